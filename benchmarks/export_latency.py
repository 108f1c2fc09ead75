"""Latency of the deployment variants at full resolution on the CPU, engines and peers side by side (one table).

Exports a trained model.pt (or the untrained paper network) with the export stage's own functions,
quantises it with validation images (or random ones), and times every variant export builds: ONNX
Runtime fp32 and int8 QDQ, OpenVINO fp32, bf16 and int8 (the same QDQ file), at --size x --size,
batch 1, --threads threads (median of --repeats after a warm-up), all in one run so the ratios
compare like with like on a machine that other work slows down. The peers of benchmarks/model_cost.py
(MONAI UNet, BasicUNet; random weights, one input channel) run through ONNX Runtime fp32 and
OpenVINO fp32 and bf16. "vs ORT fp32" is relative to ONNX Runtime fp32 of the same network.

    python benchmarks/export_latency.py [--model artifacts/model] [--dataset artifacts/dataset] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from model_cost import MODELS  # benchmarks/ is the script's folder, first on sys.path
from rich.console import Console
from rich.table import Table

from mammoseg.data import load_example
from mammoseg.inference import load_model
from mammoseg.stages.export import _quantize_int8, latency_seconds
from mammoseg.variants import VARIANTS, cannot_run_here, open_variant, variant_path
from model import LightUNet, export_onnx

PEERS = ("monai-unet", "monai-basicunet")
PEER_VARIANTS = ("fp32", "openvino_fp32", "openvino_bf16")


def _time(table: Table, network: str, onnx: Path, names, shape, args, base: dict[str, float]) -> None:
    """Add one row per variant of an exported network; the first (ONNX Runtime fp32) is the base."""
    for name in names:
        variant = VARIANTS[name]
        reason = cannot_run_here(variant)
        if reason:
            table.add_row(network, variant.engine, variant.precision, "-", "-", reason)
            continue
        session = open_variant(variant_path(onnx, variant.file), variant, args.threads)
        seconds = latency_seconds(session, shape, args.repeats)
        base.setdefault(network, seconds)
        table.add_row(network, variant.engine, variant.precision, f"{seconds:.3f}", f"{base[network] / seconds:.2f}x",
                      session.provider)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="trained model folder; default untrained")
    parser.add_argument("--dataset", type=Path, default=None, help="dataset whose val images calibrate int8")
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    network = load_model(args.model).network if args.model else LightUNet().eval()
    channels = network.in_channels
    rng = np.random.default_rng(0)
    if args.dataset:
        index = pd.read_parquet(args.dataset / "index.parquet")
        rows = index[index["split"] == "val"].head(8)
        calibration = [np.asarray(load_example(args.dataset, row)[0], np.float32) for _, row in rows.iterrows()]
    else:
        calibration = [rng.random((channels, 256, 256), dtype=np.float32) for _ in range(4)]
    table = Table(title=f"CPU latency at {args.size}x{args.size}, batch 1, {args.threads} threads "
                        f"(median of {args.repeats} after a warm-up)")
    for column in ("network", "engine", "precision", "s / image", "vs ORT fp32", "runs on"):
        table.add_column(column, justify="right" if column in ("s / image", "vs ORT fp32") else "left")
    base: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(network, fp32)
        _quantize_int8(fp32, variant_path(fp32, "int8"), calibration)
        names = ("fp32", "int8", "openvino_fp32", "openvino_bf16", "openvino_int8")
        _time(table, "LightUNet", fp32, names, (1, channels, args.size, args.size), args, base)
        for key in PEERS if args.peers else ():
            peer = MODELS[key]
            if importlib.util.find_spec(peer.package) is None:
                table.add_row(peer.name, "-", "-", "-", "-", f"not installed ({peer.package})")
                continue
            torch.manual_seed(0)
            path = Path(tmp) / f"{key}.onnx"
            multiple = peer.size_multiple
            export_onnx(peer.build().eval(), path, example=torch.zeros(2, 1, 2 * multiple, 2 * multiple),
                        size_multiple=multiple)
            _time(table, peer.name, path, PEER_VARIANTS, (1, 1, args.size, args.size), args, base)
    Console().print(table)


if __name__ == "__main__":
    main()
