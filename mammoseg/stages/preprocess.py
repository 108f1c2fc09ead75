"""Preprocess: read the manifest, its DICOMs and full-resolution masks; write the training dataset.

The DICOMs are found under the INbreast folder given as an input (`--inbreast`): the manifest names
them relative to it (mammoseg.stages.ingest.dicom_file), and the dataset names nothing outside itself.

Writes into `dataset_out`: `images/<image_id>.npy` ((size, size) uint16, value / 65535 = intensity in
[0, 1]), `masks/<image_id>.npy` ((size, size) uint8 bit planes: bit 0 mass, bit 1 calcification),
`native_masks/<image_id>_<class>.png` (ingest's full-resolution masks, copied, for scoring on the
DICOM grid),
`index.parquet` (one row per image: split, paths, every transform, lesion counts) and `dataset.json`
(the preprocessing contract that train, export and predict record and apply). What happens to the
pixels is mammoseg.preprocessing's docstring.

The split is by patient (the file-name hash): no patient in two splits. Every split with a non-zero
fraction gets at least one patient with a mass and one with calcifications (a patient "has" a class
when its mask has pixels), then each stratum (has mass, has calcification) is shared out in the
fractions. It is computed from the manifest alone, before any pixel work, and depends only on the
set of patients and the seed, not on row order.

Any bad input (a missing or undecodable DICOM or mask, a size that disagrees with the manifest) stops
the stage with a one-line error naming the file; the previous dataset stays until a complete new one
replaces it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from mammoseg.config import PreprocessConfig
from mammoseg.data import (
    CLASSES,
    CONTRACT_FILE,
    IMAGE_SCALE,
    IMAGES_DIR,
    INDEX_FILE,
    MASKS_DIR,
    NATIVE_MASKS_DIR,
    SPLITS,
    mask_path,
    pack_masks,
)
from mammoseg.dicom import read_image
from mammoseg.errors import UserError
from mammoseg.fileio import replace_folder, sha256_of, staging_folder, write_atomically
from mammoseg.parallel import run_jobs
from mammoseg.preprocessing import MASK_RULES, PreprocessParams, Transform, preprocess, quantize
from mammoseg.stages.ingest import dicom_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: label-free crop and background, native_masks/
# The manifest column that counts each mask channel's pixels.
MANIFEST_PX = {"mass": "mass_px", "calcification": "calc_px"}
MANIFEST_NEEDS = ("image_id", "patient_id", "laterality", "view", "rows", "columns", "dicom_path",
                  "n_mass", "n_calcification", "mass_px", "calc_px")
INDEX_COLUMNS = {
    "image_id": "string",
    "patient_id": "string",
    "laterality": "string",
    "view": "string",
    "split": "string",
    "image_path": "string",
    "mask_path": "string",
    **{f.name: ("bool" if f.name == "flip" else "int64") for f in dataclasses.fields(Transform)},
    "scale": "float64",
    "intensity_low": "float64",
    "intensity_high": "float64",
    "mass_px": "int64",
    "calc_px": "int64",
    "n_mass": "int64",
    "n_calcification": "int64",
    "breast_found": "bool",
    "chest_wall_left": "bool",
    "mass_px_outside_crop": "int64",
    "calc_px_outside_crop": "int64",
    "lesion_outside_crop": "bool",
    "restored_components": "int64",
}


@dataclasses.dataclass(frozen=True)
class PreprocessResult:
    """What preprocess wrote."""

    images: int
    patients: int
    split_images: dict[str, int]
    dataset_dir: Path
    index: Path


@dataclasses.dataclass(frozen=True)
class _Job:
    """One image to preprocess: everything a worker process needs."""

    image_id: str
    laterality: str
    dicom_path: Path
    rows: int
    columns: int
    mask_paths: tuple[Path, ...]
    mask_px: tuple[int, ...]
    params: PreprocessParams
    out_dir: Path


def params_from_config(config: PreprocessConfig) -> PreprocessParams:
    """Return the preprocessing contract of a stage config, checking what the dataclass cannot type.

    Raises:
        UserError: a value is out of range.
    """
    if len(config.percentiles) != 2:
        raise UserError(f"preprocess.percentiles must be two values (low, high), got {config.percentiles}")
    return PreprocessParams(size=config.size, percentiles=(config.percentiles[0], config.percentiles[1]),
                            crop_margin_px=config.crop_margin_px, otsu_side=config.otsu_side,
                            zero_background=config.zero_background, apply_voi=config.apply_voi,
                            max_channel=config.max_channel)


def _check_fractions(fractions: Sequence[float]) -> None:
    """Raise UserError unless the fractions are (train, val, test), non-negative, train > 0, sum 1."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or fractions[0] <= 0 \
            or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(f"preprocess.split_fractions must be {len(SPLITS)} fractions (train, val, test), "
                        f">= 0 with train > 0, summing to 1; got {list(fractions)}")


def assign_splits(manifest: pd.DataFrame, fractions: Sequence[float], seed: int,
                  where: str | Path = "manifest") -> dict[str, str]:
    """Assign every patient to train, val or test.

    Args:
        manifest: one row per image with patient_id, mass_px and calc_px.
        fractions: (train, val, test) fractions of patients; a split with fraction 0 stays empty.
        seed: shuffles patients within each stratum.
        where: the manifest's name, for error messages.

    Returns:
        patient_id -> split name.

    Raises:
        UserError: the fractions are invalid, or fewer patients have a class than there are splits.
    """
    _check_fractions(fractions)
    active = [name for name, fraction in zip(SPLITS, fractions, strict=True) if fraction > 0]
    weights = dict(zip(SPLITS, fractions, strict=True))
    flags = manifest.groupby("patient_id").agg(mass=("mass_px", lambda s: bool((s > 0).any())),
                                               calc=("calc_px", lambda s: bool((s > 0).any())))
    n_mass, n_calc = int(flags["mass"].sum()), int(flags["calc"].sum())
    if n_mass < len(active) or n_calc < len(active):
        raise UserError(
            f"{where}: cannot give each of the {len(active)} splits ({', '.join(active)}) a patient with a "
            f"mass and one with calcifications: of {len(flags)} patients, {n_mass} have masses and {n_calc} "
            f"have calcifications (need at least {len(active)} each; change preprocess.split_fractions)")
    rng = np.random.default_rng(seed)
    strata: dict[tuple[bool, bool], list[str]] = {}
    for key in ((True, True), (True, False), (False, True), (False, False)):
        members = sorted(flags.index[(flags["mass"] == key[0]) & (flags["calc"] == key[1])])
        strata[key] = [members[i] for i in rng.permutation(len(members))]
    assignment: dict[str, str] = {}
    # 1. Guarantee both classes in every split, preferring patients who have both.
    for split in reversed(active):  # the small splits first: they are the ones that could miss out
        if strata[(True, True)]:
            assignment[strata[(True, True)].pop()] = split
            continue
        assignment[strata[(True, False)].pop()] = split
        assignment[strata[(False, True)].pop()] = split
    # 2. Share out each stratum's remaining patients so the stratum's split counts track the fractions.
    for key, remaining in strata.items():
        members = [p for p in flags.index if (flags.at[p, "mass"], flags.at[p, "calc"]) == key]
        counts = {split: sum(assignment.get(p) == split for p in members) for split in active}
        for patient in remaining:
            done = sum(counts.values()) + 1
            split = max(active, key=lambda s: (weights[s] * done - counts[s], weights[s]))
            assignment[patient] = split
            counts[split] += 1
    return assignment


def _read_manifest(manifest: Path) -> pd.DataFrame:
    """Read the manifest and check that it has what preprocess needs."""
    try:
        frame = pd.read_parquet(manifest)
    except FileNotFoundError:
        raise UserError(f"{manifest}: manifest not found (run `mammoseg ingest` first)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{manifest}: not a readable Parquet manifest ({str(exc).splitlines()[0][:200]})") \
            from None
    missing = [c for c in MANIFEST_NEEDS if c not in frame.columns]
    if missing:
        raise UserError(f"{manifest}: missing column(s) {', '.join(missing)} (not an ingest manifest?)")
    if frame.empty:
        raise UserError(f"{manifest}: the manifest has no images")
    duplicated = frame["image_id"][frame["image_id"].duplicated()].tolist()
    if duplicated:
        raise UserError(f"{manifest}: image id(s) listed twice: {', '.join(map(str, duplicated[:5]))}")
    bad_side = sorted(set(frame["laterality"]) - {"L", "R"})
    if bad_side:
        raise UserError(f"{manifest}: laterality must be L or R, found {bad_side}")
    return frame


def _read_mask(path: Path, shape: tuple[int, int], expected_px: int) -> np.ndarray | None:
    """Read one full-resolution mask PNG as (rows, columns) bool, None when it is empty.

    Ingest wrote each mask and its pixel count in the manifest from the same array, so a mask the
    manifest counts as empty is only checked to exist (decoding it would cost a tenth of the image's
    whole preprocessing), and a non-empty one must have exactly the manifest's count: masks and
    manifest from different ingest runs are caught. Only the bounding box of the lesions is converted
    to an array (converting a whole 1-bit 4084x3328 PNG costs more than decoding it).
    """
    if expected_px == 0:
        if not path.is_file():
            raise UserError(f"{path}: mask not found (was --masks written by the same ingest run?)")
        return None
    try:
        with Image.open(path) as image:
            image.load()
            columns, rows = image.size
            box = image.getbbox()
            lesions = None if box is None else np.array(image.crop(box)).astype(bool, copy=False)
    except FileNotFoundError:
        raise UserError(f"{path}: mask not found (was --masks written by the same ingest run?)") from None
    except OSError as exc:
        raise UserError(f"{path}: unreadable mask PNG ({exc})") from None
    if (rows, columns) != shape:
        raise UserError(f"{path}: mask is {rows}x{columns}, the DICOM is {shape[0]}x{shape[1]}")
    found = 0 if lesions is None else int(np.count_nonzero(lesions))
    if found != expected_px:
        raise UserError(f"{path}: mask has {found} lesion pixels, the manifest says {expected_px} "
                        "(masks and manifest from different ingest runs?)")
    mask = np.zeros(shape, bool)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = lesions
    return mask


def _preprocess_one(job: _Job) -> dict[str, Any]:
    """Decode, preprocess and save one image and its masks; return its index fields."""
    decoded = read_image(job.dicom_path, apply_voi=job.params.apply_voi)
    if decoded.shape != (job.rows, job.columns):
        raise UserError(f"{job.dicom_path}: pixel data is {decoded.shape[0]}x{decoded.shape[1]}, "
                        f"the manifest says {job.rows}x{job.columns}")
    if decoded.laterality not in (None, job.laterality):
        log.warning("%s: the header says laterality %s, the manifest %s: flipping by the manifest",
                    job.dicom_path, decoded.laterality, job.laterality)
    masks = [_read_mask(path, (job.rows, job.columns), px)
             for path, px in zip(job.mask_paths, job.mask_px, strict=True)]
    out = preprocess(decoded.pixels, job.laterality == "R", job.params, masks)
    image_path = f"{IMAGES_DIR}/{job.image_id}.npy"
    mask_file = f"{MASKS_DIR}/{job.image_id}.npy"
    # (size, size) uint16, or (2, size, size) with the block-maximum channel.
    np.save(job.out_dir / image_path, quantize(out.image if out.max_image is None else out.network_input))
    np.save(job.out_dir / mask_file, pack_masks(out.masks))
    for source in job.mask_paths:
        # Byte copies of ingest's masks: evaluate scores on the DICOM grid from the dataset alone.
        shutil.copyfile(source, job.out_dir / NATIVE_MASKS_DIR / source.name)
    mass_out, calc_out = out.lesion_px_outside_crop
    if mass_out or calc_out:
        log.warning("%s: %d mass and %d calcification pixels lie outside the breast crop (not seen by the "
                    "network; counted in index.parquet)", job.image_id, mass_out, calc_out)
    if not out.breast_found:
        log.warning("%s: no breast found (flat image?): kept the whole image", job.dicom_path)
    elif not out.chest_wall_left:
        log.warning("%s: after the laterality flip the breast is not on the left: is %s the right side?",
                    job.dicom_path, job.laterality)
    return {"image_id": job.image_id, "image_path": image_path, "mask_path": mask_file,
            **out.transform.to_record(), "intensity_low": out.intensity_low,
            "intensity_high": out.intensity_high, "mass_px": int(out.masks[0].sum()),
            "calc_px": int(out.masks[1].sum()), "breast_found": out.breast_found,
            "chest_wall_left": out.chest_wall_left, "mass_px_outside_crop": mass_out,
            "calc_px_outside_crop": calc_out, "lesion_outside_crop": bool(mass_out or calc_out),
            "restored_components": out.restored_components}


def _contract(params: PreprocessParams, config: PreprocessConfig, manifest: Path, index: pd.DataFrame,
              patients: dict[str, str]) -> dict[str, Any]:
    """Return dataset.json: the preprocessing contract (flat keys, as train logs them) and split summary."""
    split_images = {s: int((index["split"] == s).sum()) for s in SPLITS}
    split_patients = {s: sum(v == s for v in patients.values()) for s in SPLITS}
    with_mass = index[index["mass_px"] > 0].groupby("split")["patient_id"].nunique()
    with_calc = index[index["calc_px"] > 0].groupby("split")["patient_id"].nunique()
    return {
        "format_version": FORMAT_VERSION,
        **params.to_dict(),
        "flip_rule": "laterality R is flipped left-right: every chest wall on the left",
        "geometry": "crop to the breast box found from the pixels (+margin; labels never shape it); longer "
                    "side scaled to size, "
                    "aspect kept, content at the top left, zero padding bottom/right; transforms per "
                    "image in index.parquet (mammoseg.preprocessing.Transform)",
        "normalisation": f"percentiles {list(params.percentiles)} of the breast's pixels on the resized "
                         "image map to 0 and 1, clipped",
        "image_format": f"{IMAGES_DIR}/<image_id>.npy, (size, size) uint16, value / {IMAGE_SCALE} in [0, 1]",
        "mask_format": f"{MASKS_DIR}/<image_id>.npy, (size, size) uint8 bit planes: "
                       + ", ".join(f"bit {i} {name}" for i, name in enumerate(CLASSES)),
        "mask_rules": dict(MASK_RULES),
        "split_fractions": list(config.split_fractions),
        "split_seed": config.seed,
        "split_images": split_images,
        "split_patients": split_patients,
        "split_patients_with_mass": {s: int(with_mass.get(s, 0)) for s in SPLITS},
        "split_patients_with_calcification": {s: int(with_calc.get(s, 0)) for s in SPLITS},
        "images": len(index),
        "native_masks": f"{NATIVE_MASKS_DIR}/<image_id>_<class>.png, ingest's full-resolution masks",
        "images_with_lesion_outside_crop": int(index["lesion_outside_crop"].sum()),
        "manifest_sha256": sha256_of(manifest),
    }


def _check_replaceable(dataset_out: Path) -> None:
    """Refuse to replace a non-empty folder that is not a preprocess dataset (a typo'd path)."""
    if dataset_out.exists() and not (dataset_out.is_dir() and (
            (dataset_out / CONTRACT_FILE).is_file() or not any(dataset_out.iterdir()))):
        raise UserError(f"{dataset_out}: exists and is not a preprocess dataset (no {CONTRACT_FILE}); "
                        "refusing to replace it")


def _dicom_files(frame: pd.DataFrame, inbreast: Path, manifest: Path) -> dict[str, Path]:
    """Return image id -> DICOM file under the INbreast folder, each checked to exist.

    Raises:
        UserError: the folder is missing, or a manifest row's DICOM is not in it (naming both).
    """
    if not inbreast.is_dir():
        raise UserError(f"{inbreast}: INbreast folder not found (--inbreast is the folder ingest read)")
    files = {}
    for row in frame[["image_id", "dicom_path"]].itertuples(index=False):
        path = dicom_file(inbreast, str(row.dicom_path), manifest)
        if not path.is_file():
            raise UserError(f"{path}: DICOM of image {row.image_id} not found ({manifest} names it "
                            f"{row.dicom_path} in the INbreast folder {inbreast}: the folder ingest read?)")
        files[str(row.image_id)] = path
    return files


def run(config: PreprocessConfig, inbreast: Path, manifest: Path, masks: Path, dataset_out: Path
        ) -> PreprocessResult:
    """Preprocess every image of the manifest into the training dataset.

    Args:
        config: preprocess parameters (size, split, normalisation, crop, workers).
        inbreast: the INbreast folder that ingest read (the manifest's DICOM paths are relative to it).
        manifest: the ingest manifest (Parquet).
        masks: the folder of full-resolution masks written by ingest.
        dataset_out: the dataset folder to (re)write.

    Returns:
        Counts and output paths.

    Raises:
        UserError: a bad parameter, manifest, DICOM or mask; the message names the file.
    """
    params = params_from_config(config)
    if config.size % config.size_multiple:
        # Caught here, not at train: a dataset the network cannot take must not replace a good one.
        raise UserError(f"preprocess.size {config.size} is not a multiple of preprocess.size_multiple "
                        f"{config.size_multiple} (the network halves its input that often)")
    frame = _read_manifest(manifest)
    dicoms = _dicom_files(frame, inbreast, manifest)
    if not masks.is_dir():
        raise UserError(f"{masks}: masks folder not found")
    patients = assign_splits(frame, config.split_fractions, config.seed, manifest)
    _check_replaceable(dataset_out)
    dataset_out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(dataset_out)
    try:
        (staging / IMAGES_DIR).mkdir()
        (staging / MASKS_DIR).mkdir()
        (staging / NATIVE_MASKS_DIR).mkdir()
        jobs = [_Job(str(row.image_id), str(row.laterality), dicoms[str(row.image_id)], int(row.rows),
                     int(row.columns), tuple(mask_path(masks, str(row.image_id), c) for c in CLASSES),
                     tuple(int(getattr(row, MANIFEST_PX[c])) for c in CLASSES), params, staging)
                for row in frame.sort_values("image_id").itertuples(index=False)]
        by_id = {row["image_id"]: row for row in run_jobs(_preprocess_one, jobs, config.workers, "preprocess")}
        meta = frame.set_index("image_id")
        records = []
        for image_id, row in sorted(by_id.items()):
            source = meta.loc[image_id]
            records.append({**row, "patient_id": source["patient_id"], "laterality": source["laterality"],
                            "view": source["view"], "split": patients[source["patient_id"]],
                            "n_mass": source["n_mass"], "n_calcification": source["n_calcification"]})
        index = pd.DataFrame(records, columns=list(INDEX_COLUMNS)).astype(INDEX_COLUMNS)
        contract = _contract(params, config, manifest, index, patients)
        index.to_parquet(staging / INDEX_FILE, index=False)
        write_atomically(staging / CONTRACT_FILE, lambda tmp: tmp.write_text(json.dumps(contract, indent=2)))
        replace_folder(staging, dataset_out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    split_images = contract["split_images"]
    log.info("preprocessed %d images of %d patients at %dx%d -> %s (train/val/test images: %s)",
             len(index), len(patients), params.size, params.size, dataset_out,
             "/".join(str(split_images[s]) for s in SPLITS))
    return PreprocessResult(len(index), len(patients), split_images, dataset_out, dataset_out / INDEX_FILE)
