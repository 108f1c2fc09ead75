"""Time scoring masks on the DICOM grid: mapping each mask back (predict's path) against NativeCounter.

evaluate scores 3 masks per test image on the DICOM grid (U-Net, baseline, ceiling), export's gate
13 (fp32, 8 logit-shift probes, 4 CPU variants) and register 2 (challenger, champion). Mapping a
(2, size, size) mask back to a 10-14 Mpx DICOM grid and counting there costs the same for every mask;
NativeCounter maps the ground truth onto the network grid once per image and sums there.

Reads a preprocessed dataset (the main job's artifacts/dataset), takes random probability maps
(the cost does not depend on them) and checks that both ways give the same counts. Prints one table.

    python benchmarks/native_scoring.py --dataset artifacts/dataset
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mammoseg.data import read_dataset, read_native_masks
from mammoseg.metrics import dice_counts
from mammoseg.preprocessing import Transform, masks_on_dicom_grid
from mammoseg.stages.evaluate import TARGETS, NativeCounter, by_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="a preprocessed dataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=20, help="images timed (0 = the whole split)")
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 3, 13], help="masks scored per image")
    args = parser.parse_args()
    index, _ = read_dataset(args.dataset)
    rows = index[index["split"] == args.split]
    rows = rows.head(args.images) if args.images else rows
    rng = np.random.default_rng(0)
    threshold = np.array([0.5, 0.5], np.float32)
    print(f"{len(rows)} {args.split} images of {args.dataset}")
    print(f"{'masks/image':>11} | {'mapped back (s)':>15} | {'NativeCounter (s)':>17} | {'speed-up':>8} | same counts")
    for masks in args.masks:
        slow = fast = 0.0
        same = True
        for _, row in rows.iterrows():
            transform = Transform.from_record(row)
            truth = by_target(read_native_masks(args.dataset, row))
            probabilities = [rng.random((2, transform.size, transform.size), dtype=np.float32) for _ in range(masks)]
            started = time.perf_counter()
            reference = [{t: dice_counts(m, truth[t]) for t, m in
                          by_target(masks_on_dicom_grid(p, transform, threshold)).items()} for p in probabilities]
            slow += time.perf_counter() - started
            started = time.perf_counter()
            counter = NativeCounter(transform, truth)
            counted = [counter.counts(by_target(p >= threshold[:, None, None])) for p in probabilities]
            fast += time.perf_counter() - started
            same &= all(a[t] == b[t] for a, b in zip(reference, counted, strict=True) for t in TARGETS)
        print(f"{masks:>11} | {slow:>15.2f} | {fast:>17.2f} | {slow / fast:>7.1f}x | {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
