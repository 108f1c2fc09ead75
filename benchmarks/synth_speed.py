"""Time `mammoseg synth` at full size; print one table (workers, images, seconds, images/s, CPU, MB).

Usage: python benchmarks/synth_speed.py [--cases 8] [--scale 1.0] [--workers 0 1]
Writes into a temporary folder that is removed afterwards. The target is >= 2 full-size images/s
on 2 cores (workers 0 = one process per core). `cpu s/img` (this process and its workers, user +
system) does not depend on what else runs on the machine: 2 idle cores give about 2 / cpu s/img.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from mammoseg.synth import synthesize


def _size_mb(root: Path) -> float:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) / 1e6


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="synth-speed-") as tmp:
            out = Path(tmp) / "inbreast"
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            images = synthesize(out, args.cases, args.seed, args.scale, workers=workers)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
            rows.append((workers, args.cases, len(images), seconds, len(images) / seconds,
                         cpu / len(images), _size_mb(out)))

    print(f"mammoseg synth, scale {args.scale}, seed {args.seed} (workers 0 = one per core)")
    header = ("workers", "cases", "images", "seconds", "images/s", "cpu s/img", "MB")
    print(" ".join(f"{name:>9}" for name in header))
    for workers, cases, n_images, seconds, rate, cpu, size in rows:
        print(f"{workers:>9} {cases:>9} {n_images:>9} {seconds:>9.2f} {rate:>9.2f} {cpu:>9.3f} {size:>9.1f}")


if __name__ == "__main__":
    main()
