"""Latency of the deployment variants at full resolution: fp32 ONNX and int8 QDQ on the CPU (one table).

Exports a trained model.pt (or the untrained paper network) with the export stage's own functions,
quantises it with validation-like calibration images, and times ONNX Runtime at 1536x1536 with 1 and
2 threads (median after a warm-up).

    python benchmarks/export_latency.py [--model artifacts/model] [--dataset artifacts/dataset]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from mammoseg.data import load_example
from mammoseg.inference import load_model
from mammoseg.onnx_runtime import open_session
from mammoseg.stages.export import _quantize_int8, latency_seconds
from model import LightUNet, export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="trained model folder; default untrained")
    parser.add_argument("--dataset", type=Path, default=None, help="dataset whose val images calibrate int8")
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    network = load_model(args.model).network if args.model else LightUNet().eval()
    rng = np.random.default_rng(0)
    if args.dataset:
        index = pd.read_parquet(args.dataset / "index.parquet")
        rows = index[index["split"] == "val"].head(4)
        calibration = [np.asarray(load_example(args.dataset, row)[0], np.float32) for _, row in rows.iterrows()]
    else:
        calibration = [rng.random((1, 256, 256), dtype=np.float32) for _ in range(4)]
    table = Table(title=f"ONNX Runtime latency at {args.size}x{args.size}, batch 1 (median of {args.repeats})")
    for column in ("variant", "threads", "provider", "s / image", "vs fp32"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(network, fp32)
        int8 = Path(tmp) / "model.int8.onnx"
        _quantize_int8(fp32, int8, calibration)
        for threads in (1, 2):
            base = None
            for name, path in (("fp32", fp32), ("int8 QDQ", int8)):
                session = open_session(path, threads=threads, prefer_cuda=False)
                seconds = latency_seconds(session, (1, 1, args.size, args.size), args.repeats)
                base = base or seconds
                table.add_row(name, str(threads), session.provider, f"{seconds:.3f}", f"{base / seconds:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
