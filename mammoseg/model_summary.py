"""`mammoseg model-summary`: the paper's four network variants and their cost (reads nothing, prints a table).

For each step of the paper's construction: our parameter count next to the paper's, forward GFLOPs and
the activations a training step saves at the paper's 1536x1536 input (batch 1). Every network is built
on the meta device, so the 600M-parameter one costs no memory and the whole table a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from model import PAPER_VARIANTS, build_variant, model_cost

# The paper's training resolution; the cost columns are given at this size.
SIZE = 1536


def summarize() -> list[dict[str, Any]]:
    """Return one row per paper variant: its name, our and the paper's parameter counts, and its cost."""
    rows = []
    for name, variant in PAPER_VARIANTS.items():
        with torch.device("meta"):
            net = build_variant(name)
        cost = model_cost(net, SIZE, SIZE)
        rows.append({
            "variant": name,
            "params": cost.params,
            "paper_params": variant.paper_params,
            "ratio": cost.params / variant.paper_params,
            **{k: v for k, v in dataclasses.asdict(cost).items() if k != "params"},
        })
    return rows


def _table(rows: list[dict[str, Any]]) -> Table:
    """Lay the rows out as a rich Table."""
    table = Table(title=f"The paper's variants, cost at {SIZE}x{SIZE} batch 1", show_edge=False)
    table.add_column("variant", no_wrap=True)
    for header in ("params", "paper", "ratio", "GFLOPs\nforward", "saved GiB\nfp32", "saved GiB\nbf16"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["variant"],
            f"{row['params']:,}",
            f"{row['paper_params'] / 1e6:g}M",
            f"{row['ratio']:.3f}",
            f"{row['gflops']:,.1f}",
            f"{row['activation_gib_fp32']:.2f}",
            f"{row['activation_gib_bf16']:.2f}",
        )
    return table


def run(config: Any, as_json: bool = False) -> None:
    """Print the variants' table to stdout, as a rich table or as a JSON list of objects.

    Args:
        config: unused (the command has no params.yaml block); None.
        as_json: write JSON (keys: variant, params, paper_params, ratio, height, width, gflops,
            activation_gib_fp32, activation_gib_bf16) instead of the table.
    """
    rows = summarize()
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        # Off a terminal rich assumes 80 columns and would cut cells: give the table the room it needs.
        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 120)
        console.print(_table(rows))
