"""Ingest: read an INbreast folder, write the manifest (Parquet) and full-resolution lesion masks (PNG).

Per-image problems (a DICOM without a table row, an unreadable DICOM or XML, a file name that
disagrees with the table) reject that image into `<manifest>.rejected.csv` with the reason and keep
the rest; dataset-level problems (no folder, no table, nothing usable) are one-line user errors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from tqdm import tqdm

from mammoseg.config import IngestConfig
from mammoseg.data import CLASSES, mask_path
from mammoseg.errors import UserError
from mammoseg.fileio import replace_folder, sha256_of, write_atomically
from mammoseg.inbreast import (
    DICOM_DIR,
    XML_DIR,
    DicomName,
    LesionClassifier,
    TableRow,
    parse_dicom_name,
    rasterize,
    read_rois,
    read_table,
)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = {
    "image_id": "string",
    "patient_id": "string",
    "laterality": "string",
    "view": "string",
    "acquisition_date": "string",
    "acr": "Int64",
    "birads": "string",
    "rows": "int64",
    "columns": "int64",
    "dicom_path": "string",
    "dicom_sha256": "string",
    "n_mass": "int64",
    "n_calcification": "int64",
    "n_other": "int64",
    "n_points_out_of_bounds": "int64",
    "mass_px": "int64",
    "calc_px": "int64",
}

# A worker's answer for one image: (manifest row or None, reject reason or None, unknown ROI names).
_Outcome = tuple[dict[str, Any] | None, str | None, set[str]]


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """What ingest wrote."""

    images: int
    rejected: int
    manifest: Path
    rejected_list: Path
    masks_dir: Path


@dataclasses.dataclass(frozen=True)
class _Job:
    """One image to read: everything a worker process needs."""

    dicom_path: Path
    name: DicomName
    row: TableRow
    xml_path: Path
    point_radius_px: int
    lesion_classes: dict[str, list[str]]
    masks_dir: Path


def rejected_list_path(manifest: Path) -> Path:
    """Return the path of the rejected-images list written beside a manifest."""
    return manifest.with_name(manifest.stem + ".rejected.csv")


def _ingest_one(job: _Job) -> _Outcome:
    """Read one image's header and ROIs and write its masks."""
    try:
        header = pydicom.dcmread(job.dicom_path, stop_before_pixels=True)
        rows, columns = int(header.Rows), int(header.Columns)
    except Exception as exc:  # pydicom raises many types for a damaged file; all mean "unreadable"
        return None, f"unreadable DICOM ({type(exc).__name__}: {exc})", set()
    rois = []
    if job.xml_path.is_file():
        try:
            rois = read_rois(job.xml_path)
        except UserError as exc:
            return None, str(exc), set()
    classifier = LesionClassifier(job.lesion_classes)
    raster = rasterize(rois, rows, columns, job.point_radius_px, classifier)
    for lesion_class, mask in zip(CLASSES, (raster.mass, raster.calcification), strict=True):
        # 1-bit PNG: lossless and ~100x smaller than 8-bit for sparse masks.
        Image.fromarray(mask).save(mask_path(job.masks_dir, job.name.image_id, lesion_class),
                                   optimize=False, compress_level=6)
    manifest_row = {
        "image_id": job.name.image_id,
        "patient_id": job.name.patient_id,
        "laterality": job.row.laterality,
        "view": job.row.view,
        "acquisition_date": job.row.acquisition_date,
        "acr": job.row.acr,
        "birads": job.row.birads,
        "rows": rows,
        "columns": columns,
        "dicom_path": str(job.dicom_path.resolve()),
        "dicom_sha256": sha256_of(job.dicom_path),
        "n_mass": raster.counts["mass"],
        "n_calcification": raster.counts["calcification"],
        "n_other": raster.counts["other"],
        "n_points_out_of_bounds": raster.points_out_of_bounds,
        "mass_px": int(np.count_nonzero(raster.mass)),
        "calc_px": int(np.count_nonzero(raster.calcification)),
    }
    return manifest_row, None, classifier.unknown_names


def _plan(inbreast: Path, config: IngestConfig, masks_dir: Path) -> tuple[list[_Job], list[dict[str, str]]]:
    """Match DICOM files to table rows; return the jobs and the rejections found before reading pixels."""
    dicom_dir = inbreast / DICOM_DIR
    if not dicom_dir.is_dir():
        raise UserError(f"{inbreast}: no {DICOM_DIR}/ folder (is this an INbreast Release 1.0 folder?)")
    table = read_table(inbreast)
    rejected: list[dict[str, str]] = []
    jobs: list[_Job] = []
    seen: dict[str, Path] = {}
    for dicom_path in sorted(dicom_dir.glob("*.dcm")):
        try:
            name = parse_dicom_name(dicom_path)
        except UserError as exc:
            rejected.append({"file": str(dicom_path), "image_id": "", "reason": str(exc)})
            continue
        row = table.get(name.image_id)
        reason = None
        if name.image_id in seen:
            reason = f"image id {name.image_id} also used by {seen[name.image_id].name}"
        elif row is None:
            reason = f"no row for image id {name.image_id} in the table"
        elif (row.laterality, row.view) != (name.laterality, name.view):
            reason = (f"file name says {name.laterality} {name.view}, "
                      f"the table says {row.laterality} {row.view}")
        if reason:
            rejected.append({"file": str(dicom_path), "image_id": name.image_id, "reason": reason})
            continue
        seen[name.image_id] = dicom_path
        jobs.append(_Job(dicom_path, name, row, inbreast / XML_DIR / f"{name.image_id}.xml",
                         config.point_radius_px, config.lesion_classes, masks_dir))
    for image_id in sorted(set(table) - set(seen) - {r["image_id"] for r in rejected}):
        rejected.append({"file": str(inbreast / DICOM_DIR), "image_id": image_id,
                         "reason": f"table row for image id {image_id} has no DICOM file"})
    return jobs, rejected


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[tuple[_Job, _Outcome]]:
    """Run the per-image work in a process pool (or inline for one worker), with a progress bar."""
    progress = tqdm(total=len(jobs), desc="ingest", unit="image", disable=None)
    if workers <= 1:
        for job in jobs:
            yield job, _ingest_one(job)
            progress.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for job, outcome in zip(jobs, pool.map(_ingest_one, jobs, chunksize=1), strict=True):
                yield job, outcome
                progress.update()
    progress.close()


def run(config: IngestConfig, inbreast: Path, manifest_out: Path, masks_out: Path) -> IngestResult:
    """Read an INbreast folder into a manifest and full-resolution masks.

    Args:
        config: ingest parameters (point radius, workers, lesion-name table).
        inbreast: the INbreast Release 1.0 folder.
        manifest_out: the Parquet manifest to write (one row per accepted image).
        masks_out: folder for `<image_id>_mass.png` and `<image_id>_calcification.png`.

    Returns:
        Counts and output paths.

    Raises:
        UserError: the folder is not an INbreast folder, or no image could be ingested.
    """
    if not inbreast.is_dir():
        raise UserError(f"{inbreast}: not a folder")
    LesionClassifier(config.lesion_classes)  # fail on a bad table before any work
    manifest_out.parent.mkdir(parents=True, exist_ok=True)
    masks_out.parent.mkdir(parents=True, exist_ok=True)
    # Masks go to a fresh folder that replaces the old one only once everything succeeded.
    staging = Path(tempfile.mkdtemp(prefix=f".{masks_out.name}.", dir=masks_out.parent))
    try:
        jobs, rejected = _plan(inbreast, config, staging)
        workers = config.workers or os.cpu_count() or 1
        manifest_rows, unknown_names = [], set()
        for job, (row, reason, unknown) in _run_jobs(jobs, min(workers, max(len(jobs), 1))):
            unknown_names |= unknown
            if reason:
                rejected.append({"file": str(job.dicom_path), "image_id": job.name.image_id,
                                 "reason": reason})
            else:
                manifest_rows.append(row)
        for name in sorted(unknown_names):
            log.warning("ROI name %r is not in params.yaml ingest.lesion_classes: counted as other", name)
        if not manifest_rows:
            reasons = "; ".join(r["reason"] for r in rejected[:3]) or "no .dcm files"
            raise UserError(f"{inbreast}: no image could be ingested ({reasons})")
        manifest = pd.DataFrame(manifest_rows, columns=list(MANIFEST_COLUMNS)).astype(MANIFEST_COLUMNS)
        manifest = manifest.sort_values("image_id", ignore_index=True)
        rejected_frame = pd.DataFrame(rejected, columns=["file", "image_id", "reason"])
        write_atomically(manifest_out, lambda tmp: manifest.to_parquet(tmp, index=False))
        rejected_path = rejected_list_path(manifest_out)
        write_atomically(rejected_path, lambda tmp: rejected_frame.to_csv(tmp, index=False))
        replace_folder(staging, masks_out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    for item in rejected:
        log.warning("rejected %s: %s", item["file"], item["reason"])
    log.info("ingested %d images (%d rejected) -> %s", len(manifest), len(rejected), manifest_out)
    return IngestResult(len(manifest), len(rejected), manifest_out, rejected_path, masks_out)

