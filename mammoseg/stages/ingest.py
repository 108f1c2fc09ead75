"""Ingest: read an INbreast folder, write the manifest (Parquet) and full-resolution lesion masks (PNG).

Per-image problems (a DICOM without a table row, an unreadable DICOM or XML, a malformed ROI point, a
file name that disagrees with the table, several files with one image id) reject that image into
`<manifest>.rejected.csv` with the reason and keep the rest; dataset-level problems (no folder, no
.dcm file, an unusable table, nothing usable) are one-line user errors.

Every file the outputs name (the manifest's `dicom_path`, the rejected list's `file`) is a POSIX path
relative to the INbreast folder, never an absolute one: on a cluster each task receives its input
artifacts at paths of its own, so the readers (validate, preprocess) take that folder as an input of
their own (`--inbreast`) and join it with the manifest's paths (`dicom_file`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from mammoseg.config import IngestConfig
from mammoseg.data import CLASSES, mask_path
from mammoseg.dicom import NOT_DICOM
from mammoseg.errors import UserError
from mammoseg.fileio import replace_folder, sha256_of, staging_folder, write_atomically
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
from mammoseg.parallel import run_jobs

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
    "dicom_path": "string",  # relative to the INbreast folder, e.g. AllDICOMs/<name>.dcm (see dicom_file)
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
    relative_path: str  # dicom_path relative to the INbreast folder: what the manifest stores
    name: DicomName
    row: TableRow
    xml_path: Path
    point_radius_px: int
    lesion_classes: dict[str, list[str]]
    masks_dir: Path


def rejected_list_path(manifest: Path) -> Path:
    """Return the path of the rejected-images list written beside a manifest."""
    return manifest.with_name(manifest.stem + ".rejected.csv")


def dicom_file(inbreast: Path, dicom_path: str, manifest: Path) -> Path:
    """Return where a manifest row's DICOM is: its `dicom_path` (relative to the INbreast folder) under `inbreast`.

    Raises:
        UserError: the path is absolute or climbs out of the folder (a manifest written before ingest
            stored relative paths, or one edited by hand).
    """
    relative = PurePosixPath(dicom_path)
    if relative.is_absolute() or ".." in relative.parts:
        raise UserError(f"{manifest}: dicom_path {dicom_path!r} is not a path inside the INbreast folder "
                        "(a manifest from an older ingest? run `mammoseg ingest` again)")
    return inbreast / relative


def _relative(path: str | Path, inbreast: Path) -> str:
    """Return a path under the INbreast folder as the outputs store it: relative to that folder, POSIX."""
    return Path(path).relative_to(inbreast).as_posix()


def _stored(rejection: dict[str, str], inbreast: Path) -> dict[str, str]:
    """Return a rejection as the rejected list stores it: the files it names relative to the INbreast folder.

    The reasons name files the way the messages do, under `inbreast` as given (the log shows them so);
    the list is an output, so that prefix is dropped there.
    """
    reason = rejection["reason"]
    if inbreast != Path("."):  # "./" would also match inside "../"; a "." folder adds no prefix anyway
        reason = reason.replace(f"{inbreast}{os.sep}", "")
    return {**rejection, "file": _relative(rejection["file"], inbreast), "reason": reason}


def _ingest_one(job: _Job) -> _Outcome:
    """Read one image's header and ROIs and write its masks."""
    try:
        header = pydicom.dcmread(job.dicom_path, stop_before_pixels=True)
        rows, columns = int(header.Rows), int(header.Columns)
    except InvalidDicomError:
        return None, NOT_DICOM, set()
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
        "dicom_path": job.relative_path,
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
    """Match DICOM files to table rows; return the jobs and the rejections found before reading pixels.

    Several DICOM files with one image id are resolved by `_pick_among_duplicates`.

    Raises:
        UserError: no AllDICOMs/ folder, no .dcm file in it, or an unusable table (see `read_table`).
    """
    dicom_dir = inbreast / DICOM_DIR
    if not dicom_dir.is_dir():
        raise UserError(f"{inbreast}: no {DICOM_DIR}/ folder (is this an INbreast Release 1.0 folder?)")
    dicom_paths = sorted(dicom_dir.glob("*.dcm"))
    if not dicom_paths:
        others = sorted(path.name for path in dicom_dir.iterdir())
        hint = f" ({len(others)} other entries, e.g. {others[0]!r})" if others else " (the folder is empty)"
        raise UserError(f"{dicom_dir}: no .dcm files{hint}")
    table = read_table(inbreast)
    rejected: list[dict[str, str]] = []
    files_by_id: dict[str, list[tuple[Path, DicomName]]] = {}
    for dicom_path in dicom_paths:
        try:
            name = parse_dicom_name(dicom_path)
        except UserError as exc:
            rejected.append({"file": str(dicom_path), "image_id": "", "reason": str(exc)})
            continue
        files_by_id.setdefault(name.image_id, []).append((dicom_path, name))
    jobs: list[_Job] = []
    for image_id, files in files_by_id.items():
        row = table.get(image_id)
        if len(files) > 1:
            kept, duplicates = _pick_among_duplicates(image_id, files, row)
            rejected += duplicates
            if kept is None:
                continue
            files = [kept]
        ((dicom_path, name),) = files
        reason = None
        if row is None:
            reason = f"no row for image id {image_id} in the table"
        elif (row.laterality, row.view) != (name.laterality, name.view):
            reason = (f"file name says {name.laterality} {name.view}, "
                      f"the table says {row.laterality} {row.view}")
        if reason:
            rejected.append({"file": str(dicom_path), "image_id": image_id, "reason": reason})
            continue
        jobs.append(_Job(dicom_path, _relative(dicom_path, inbreast), name, row,
                         inbreast / XML_DIR / f"{image_id}.xml", config.point_radius_px, config.lesion_classes,
                         masks_dir))
    for image_id in sorted(set(table) - set(files_by_id)):
        rejected.append({"file": str(inbreast / DICOM_DIR), "image_id": image_id,
                         "reason": f"table row for image id {image_id} has no DICOM file"})
    return jobs, rejected


def _pick_among_duplicates(image_id: str, files: list[tuple[Path, DicomName]], row: TableRow | None
                           ) -> tuple[tuple[Path, DicomName] | None, list[dict[str, str]]]:
    """Choose which of several DICOM files sharing one image id is the image, if any can be told apart.

    INbreast ids are unique (section 1.2), so all but one of the files are copies, and the sort order
    of the names says nothing about which (keeping the first once kept a stray copy, rejected the
    genuine file and counted the copy's patient hash as an extra patient). The only independent
    evidence is the table row: a file is kept when it is the *only* one whose laterality
    and view tokens agree with it. The patient token cannot be checked (the table's Patient ID is
    `removed`, section 1.3), nor can the DICOM header (it carries no patient, side or view). When no
    file or more than one agrees, or there is no row, every file is rejected: guessing would put one
    image under the wrong patient or view. Either way one warning line names all the files.

    Returns:
        The file to keep (or None) and one rejection per other file, whose reason names the kept
        file, or the other files when none is kept.
    """
    names = [path.name for path, _ in files]
    agreeing = [] if row is None else [
        (path, name) for path, name in files if (name.laterality, name.view) == (row.laterality, row.view)]
    if row is not None and len(agreeing) == 1:
        kept = agreeing[0]
        kept_path = kept[0]
        log.warning("image id %s is used by %d DICOM files (%s): kept %s, the only one that matches the "
                    "table row (%s %s)", image_id, len(files), ", ".join(names), kept_path.name,
                    row.laterality, row.view)
        return kept, [{"file": str(path), "image_id": image_id,
                       "reason": f"image id {image_id} is also used by {kept_path.name}, kept because it "
                                 f"matches the table row ({row.laterality} {row.view}); this file says "
                                 f"{name.laterality} {name.view}"}
                      for path, name in files if path != kept_path]
    if row is None:
        why = f"no table row for image id {image_id}"
    elif agreeing:
        how_many = "all" if len(agreeing) == len(files) else len(agreeing)
        why = f"{how_many} of them match the table row ({row.laterality} {row.view})"
    else:
        why = f"none matches the table row ({row.laterality} {row.view})"
    log.warning("image id %s is used by %d DICOM files (%s): all rejected, %s", image_id, len(files),
                ", ".join(names), why)
    return None, [{"file": str(path), "image_id": image_id,
                   "reason": f"image id {image_id} is also used by "
                             f"{', '.join(other for other in names if other != path.name)}; "
                             f"cannot tell which file is the image ({why}), all rejected"}
                  for path, _ in files]


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
        UserError: the folder is not an INbreast folder (no AllDICOMs/, no .dcm file, no usable
            INbreast.csv or .xls), or no image could be ingested.
    """
    if not inbreast.is_dir():
        raise UserError(f"{inbreast}: not a folder")
    LesionClassifier(config.lesion_classes)  # fail on a bad table before any work
    manifest_out.parent.mkdir(parents=True, exist_ok=True)
    masks_out.parent.mkdir(parents=True, exist_ok=True)
    # Masks go to a fresh folder that replaces the old one only once everything succeeded.
    staging = staging_folder(masks_out)
    try:
        jobs, rejected = _plan(inbreast, config, staging)
        manifest_rows, unknown_names = [], set()
        results = run_jobs(_ingest_one, jobs, config.workers, "ingest")
        for job, (row, reason, unknown) in zip(jobs, results, strict=True):
            unknown_names |= unknown
            if reason:
                rejected.append({"file": str(job.dicom_path), "image_id": job.name.image_id,
                                 "reason": reason})
            else:
                manifest_rows.append(row)
        for name in sorted(unknown_names):
            log.warning("ROI name %r is not in params.yaml ingest.lesion_classes: counted as other", name)
        if not manifest_rows:
            reasons = "; ".join(r["reason"] for r in rejected[:3])
            raise UserError(f"{inbreast}: no image could be ingested ({reasons})")
        manifest = pd.DataFrame(manifest_rows, columns=list(MANIFEST_COLUMNS)).astype(MANIFEST_COLUMNS)
        manifest = manifest.sort_values("image_id", ignore_index=True)
        # The log names each file as given (below); the list, an output, names it inside the folder.
        rejected_frame = pd.DataFrame([_stored(item, inbreast) for item in rejected],
                                      columns=["file", "image_id", "reason"])
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

