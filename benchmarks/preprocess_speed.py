"""Time `mammoseg preprocess` on full-size generated mammograms against a naive per-image loop.

Generates an INbreast-format dataset at full size (mammoseg.synth, scale 1.0: 3328x2560 and
4084x3328 uint16 DICOMs) and ingests it (manifest + full-resolution masks), then times:

- ours: the preprocess stage (mammoseg.stages.preprocess.run) over every image, `--workers` processes,
  then again in one process (the per-core cost, comparable with the naive loop's);
- naive: one process, per image `pydicom.dcmread(...).pixel_array`, `skimage.transform.resize` of the
  image (anti-aliased) and of each mask (nearest neighbour) to size x size, saved as .npy. It runs on
  the first `--naive-images` images and is projected to all of them (it is ~10x slower).

Prints one table. The target: 410 images in <= 60 s on 2 cores, and >= 3x the naive loop.

    python benchmarks/preprocess_speed.py                 # 108 cases (about 410 images), kept in a temp dir
    python benchmarks/preprocess_speed.py --data /tmp/bench --cases 20   # reuse /tmp/bench next time
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import yaml
from PIL import Image
from skimage.transform import resize

from mammoseg.config import stage_config
from mammoseg.data import mask_path
from mammoseg.stages import ingest, preprocess
from mammoseg.synth import synthesize

REPO = Path(__file__).resolve().parents[1]


def prepare(data: Path, cases: int, seed: int, workers: int) -> tuple[Path, Path]:
    """Generate and ingest a full-size dataset under `data` unless it is already there."""
    manifest, masks = data / "manifest.parquet", data / "masks"
    if manifest.is_file() and masks.is_dir():
        return manifest, masks
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    synthesize(data / "inbreast", cases=cases, seed=seed, scale=1.0, workers=workers)
    ingest.run(stage_config("ingest", params, {"workers": workers}), data / "inbreast", manifest, masks)
    return manifest, masks


def naive(inbreast: Path, manifest: pd.DataFrame, masks: Path, size: int, out: Path) -> float:
    """Run the naive loop over the manifest's rows; return the wall time in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for row in manifest.itertuples(index=False):
        image = pydicom.dcmread(inbreast / row.dicom_path).pixel_array.astype(np.float32)
        small = resize(image, (size, size), preserve_range=True, anti_aliasing=True).astype(np.float32)
        np.save(out / f"{row.image_id}_image.npy", small)
        for name in ("mass", "calcification"):
            mask = np.array(Image.open(mask_path(masks, row.image_id, name)))
            small_mask = resize(mask, (size, size), order=0, preserve_range=True, anti_aliasing=False) > 0.5
            np.save(out / f"{row.image_id}_{name}.npy", small_mask)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=108, help="patients to generate (108: about 410 images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="preprocess processes")
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--naive-images", type=int, default=16, help="images the naive loop runs on")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder for the generated data, reused when present (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")

    data = args.data or Path(tempfile.mkdtemp(prefix="preprocess-speed-"))
    try:
        manifest_path, masks = prepare(data, args.cases, args.seed, args.workers)
        manifest = pd.read_parquet(manifest_path).sort_values("image_id")
        n = len(manifest)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        config = stage_config("preprocess", params, {"size": args.size, "workers": args.workers})
        # Page-cache the DICOMs for both contenders alike: the same bytes are read either way.
        for path in manifest["dicom_path"]:
            (data / "inbreast" / path).read_bytes()
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        result = preprocess.run(config, data / "inbreast", manifest_path, masks, data / "dataset")
        ours = time.perf_counter() - start
        # The same work in one process: the per-core cost, comparable with the naive loop's.
        start = time.perf_counter()
        preprocess.run(dataclasses.replace(config, workers=1), data / "inbreast", manifest_path, masks,
                       data / "dataset")
        ours_one = time.perf_counter() - start
        sample = manifest.head(args.naive_images)
        naive_time = naive(data / "inbreast", sample, masks, args.size, data / "naive")
        naive_per_image = naive_time / len(sample)
        shapes = manifest.groupby(["rows", "columns"]).size()
        sizes = ", ".join(f"{r}x{c}: {k}" for (r, c), k in shapes.items())
        print(f"preprocess speed: {n} generated full-size images ({sizes}), target {args.size}x{args.size}, "
              f"{os.cpu_count()} CPU cores, load average {load_before:.1f} before / "
              f"{os.getloadavg()[0]:.1f} after")
        header = f"{'method':<34}{'images timed':>13}{'wall s':>9}{'s/image':>9}{f's for {n}':>10}"
        print(f"{header}{'speedup':>9}")
        rows = [(f"ours ({args.workers} workers)", result.images, ours, ours / n, ours),
                ("ours (1 process)", result.images, ours_one, ours_one / n, ours_one),
                ("naive (pydicom+skimage, 1 proc)", len(sample), naive_time, naive_per_image,
                 naive_per_image * n)]
        for name, timed, wall, per_image, projected in rows:
            print(f"{name:<34}{timed:>13}{wall:>9.1f}{per_image:>9.3f}{projected:>10.1f}"
                  f"{naive_per_image * n / projected:>8.1f}x")
        print(f"410-image projection for ours: {ours / n * 410:.1f} s (target <= 60 s); "
              f"speedup over naive: {naive_per_image * n / ours:.1f}x (target >= 3x)")
    finally:
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
