"""Predict (deployment): DICOM mammograms in, lesion masks out at each DICOM's own resolution.

The model comes from the registry (`models:/NAME@champion`, `models:/NAME/VERSION`) or a local
.onnx file; its metadata carries the preprocessing contract and the threshold, so nothing else is
configured. The engine and variant that run are chosen from the export report that travels with
the model (`--engine auto`: the fastest that passed its export gate and can run here; see
mammoseg.variants). For each input: `<stem>_mask.png` (mass = 1, calcification = 2 on the original
grid and orientation; 0 elsewhere), `<stem>_overlay.png`, `<stem>_seg.dcm`, a DICOM SEG that
references the source image so PACS viewers can display it, and `<stem>.json`, the audit record: the
registered name, version and alias resolved, the sha256 of the ONNX file that ran, the engine,
variant, precision and provider, the preprocessing transform.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from tqdm import tqdm

from mammoseg import __version__, tracking
from mammoseg.config import PredictConfig
from mammoseg.dicom import read_image
from mammoseg.errors import UserError
from mammoseg.fileio import sha256_of, write_atomically
from mammoseg.inbreast import parse_dicom_name
from mammoseg.onnx_runtime import EngineSession, read_io_spec
from mammoseg.overlays import overlay_rgb, save_png
from mammoseg.preprocessing import (
    Preprocessed,
    PreprocessParams,
    chest_wall_on_right,
    masks_on_dicom_grid,
    preprocess,
)
from mammoseg.variants import Variant, choose, exported_model_in, open_variant, read_report, variant_path

log = logging.getLogger(__name__)

MASK_VALUES = {"mass": 1, "calcification": 2}


@dataclasses.dataclass(frozen=True)
class PredictResult:
    """What predict wrote."""

    images: int
    provider: str
    out_dir: Path


# The registry references predict takes; the version an alias names is read first, and that version
# is downloaded, so the audit record names what ran even when the alias moves during the call.
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))$")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """The exact model a predict call runs and where it came from (its audit record).

    Attributes:
        uri: the reference as given: models:/NAME@ALIAS, models:/NAME/VERSION or a file path.
        onnx_path: the local .onnx file: the exported fp32 model, or a variant's file given directly.
        onnx_sha256: that file's sha256.
        report: its export report (the variants, their gates and latencies); None where there is none.
        registered_name: the registered model's name; None for a local file.
        version: the version the reference resolved to; None for a local file.
        alias: the alias it resolved through; None for a version or a local file.
    """

    uri: str
    onnx_path: Path
    onnx_sha256: str
    report: dict[str, Any] | None = None
    registered_name: str | None = None
    version: str | None = None
    alias: str | None = None

    def record(self) -> dict[str, Any]:
        """Return the JSON-ready audit fields (the local path is left out: it is a temporary download)."""
        return {"uri": self.uri, "registered_name": self.registered_name, "version": self.version,
                "alias": self.alias}


def resolve_model(model: str, work_dir: Path) -> ResolvedModel:
    """Resolve a model reference to a local .onnx file, downloading registry models into work_dir.

    Raises:
        UserError: the reference is neither an existing .onnx file nor a models:/NAME@ALIAS or
            models:/NAME/VERSION URI, the registry has no such model, or the downloaded file is
            not the one the registry recorded (its onnx_sha256 tag).
    """
    match = _REGISTRY_URI.match(model)
    if match:
        name, alias = match["name"], match["alias"]
        found = (tracking.version_by_alias(name, alias) if alias else tracking.model_version(name, match["version"]))
        if found is None:
            raise UserError(f"{model}: no such registered model, version or alias")
        local = tracking.download_model_artifacts(f"models:/{name}/{found.version}", work_dir)
        onnx_path = exported_model_in(local) if local.is_dir() else local
        digest = sha256_of(onnx_path)
        recorded = found.tags.get("onnx_sha256")
        if recorded and recorded != digest:
            raise UserError(f"{model}: version {found.version}'s .onnx has sha256 {digest[:12]}..., the registry "
                            f"recorded {recorded[:12]}... at registration; refusing a model that changed")
        return ResolvedModel(model, onnx_path, digest, read_report(onnx_path, digest), name, found.version, alias)
    path = Path(model)
    if path.suffix != ".onnx" or not path.is_file():
        raise UserError(f"{model}: not a models:/NAME@ALIAS or models:/NAME/VERSION URI, nor an existing .onnx file")
    digest = sha256_of(path)
    return ResolvedModel(model, path, digest, read_report(path, digest))


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """The variant predict runs, its file and its session."""

    variant: Variant
    path: Path
    sha256: str
    session: EngineSession


def load_variant(resolved: ResolvedModel, engine: str, threads: int) -> LoadedModel:
    """Choose the variant to run (mammoseg.variants.choose) and open it, checking its file's digest.

    Raises:
        UserError: no variant of the engine can run, or a variant's file is not the one export wrote.
    """
    variant = choose(resolved.onnx_path, resolved.report, engine)
    if resolved.report is None:
        path, digest = resolved.onnx_path, resolved.onnx_sha256
    else:
        path = variant_path(resolved.onnx_path, variant.file)
        digest = sha256_of(path) if path != resolved.onnx_path else resolved.onnx_sha256
        recorded = resolved.report["variants"][variant.name].get("sha256")
        if recorded and recorded != digest:
            raise UserError(f"{path}: sha256 {digest[:12]}... differs from the {recorded[:12]}... its export report "
                            "recorded; refusing a file that changed")
    return LoadedModel(variant, path, digest, open_variant(path, variant, threads))


def laterality(path: Path, header_laterality: str | None, pixels: np.ndarray,
               params: PreprocessParams) -> tuple[str, str]:
    """Return the breast's laterality and where it came from.

    The flip rule of the contract: right breasts are flipped. Laterality comes from the DICOM header
    (ImageLaterality/Laterality), else from an INbreast file name, else from the image itself: the
    breast found as preprocess finds it hangs from the chest-wall edge (INbreast is not mirrored).
    """
    if header_laterality in ("L", "R"):
        return header_laterality, "header"
    try:
        return parse_dicom_name(path).laterality, "file name"
    except UserError:
        pass
    return ("R" if chest_wall_on_right(pixels, params) else "L"), "image"


# SOP Class of raw detector images (Digital Mammography X-Ray Image Storage - For Processing).
_FOR_PROCESSING_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2.1"
# Type 2 attributes highdicom copies from the source image into the SEG: they must exist (they may be
# empty). Anonymised exports, and INbreast itself, often drop them altogether.
_SEG_TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                       "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
# Type 1 attributes a SEG cannot be written without: it references the source image by them.
_SEG_TYPE1_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _check_mammogram(path: Path, allow_for_processing: bool) -> pydicom.Dataset:
    """Read a header and refuse what the model must not see: not DICOM, not MG, raw detector data."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # pydicom raises several types for a file that is not DICOM
        raise UserError(f"{path}: not a DICOM file") from None
    modality = str(getattr(header, "Modality", ""))
    if modality != "MG":
        raise UserError(f"{path}: Modality is {modality or 'missing'}, not MG (mammography)")
    intent = str(header.get("PresentationIntentType", "")).upper()
    for_processing = intent == "FOR PROCESSING" or str(header.get("SOPClassUID", "")) == _FOR_PROCESSING_SOP_CLASS
    if for_processing and not allow_for_processing:
        raise UserError(f"{path}: a FOR PROCESSING (raw detector) image; the model was trained on FOR "
                        "PRESENTATION mammograms (pass --allow-for-processing to segment it anyway)")
    missing = [keyword for keyword in _SEG_TYPE1_KEYWORDS if not str(header.get(keyword, "") or "").strip()]
    if missing:
        raise UserError(f"{path}: {', '.join(missing)} missing or empty; a DICOM SEG cannot reference "
                        "this image without it")
    return header


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Return the DICOM files to segment: files as given, folders searched recursively.

    In a folder, files that do not start like DICOM (a 128-byte preamble and "DICM") are skipped
    with one log line: PACS exports carry DICOMDIR indexes, readmes and viewer files beside the
    images. A file named on the command line is taken as meant and checked like any other.

    Raises:
        UserError: an input does not exist, or a folder holds no DICOM file.
    """
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.is_file()]
            dicoms = [p for p in found if _looks_like_dicom(p) and p.name != "DICOMDIR"]
            if not dicoms:
                raise UserError(f"{path}: no DICOM file in this folder ({len(found)} other files)")
            if len(dicoms) < len(found):
                log.info("%s: %d DICOM files, %d other files skipped", path, len(dicoms), len(found) - len(dicoms))
            files += dicoms
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def _looks_like_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def run(config: PredictConfig, model: str, input: list[Path], out: Path) -> PredictResult:  # noqa: A002
    """Segment each input DICOM and write its mask, overlay and DICOM SEG.

    Args:
        config: engine, threads and overlay size.
        model: models:/NAME@ALIAS, models:/NAME/VERSION or a local .onnx file.
        input: DICOM files and folders of them (searched recursively).
        out: output folder.

    Returns:
        The number of images, the execution provider used and the output folder.
    """
    files = expand_inputs(input)
    # Every input is checked before the model is pulled: a bad file in a batch of hundreds stops
    # the call at once, naming it, instead of after an hour of output.
    for path in files:
        _check_mammogram(path, config.allow_for_processing)
    stems = [path.stem for path in files]
    if len(set(stems)) < len(stems):
        twice = sorted({stem for stem in stems if stems.count(stem) > 1})
        raise UserError(f"{out}: several inputs share the file name {twice[0]!r} and would overwrite each "
                        "other's outputs; segment them in separate calls")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        resolved = resolve_model(model, Path(download_dir))
        spec = read_io_spec(resolved.onnx_path)
        loaded = load_variant(resolved, config.engine, config.threads)
        session = loaded.session
        registered = f" = {resolved.registered_name} version {resolved.version}" if resolved.version else ""
        log.info("model %s%s (run %s): %s (%s, sha256 %s) on %s %s%s", model, registered,
                 spec.get("training_run_id"), loaded.variant.name, loaded.path.name, loaded.sha256[:12],
                 session.engine, session.provider, " (fell back from CUDA)" if session.fell_back else "")
        params = PreprocessParams.from_dict(spec["preprocessing"])
        threshold = np.asarray(spec["threshold"], np.float32)  # one per class
        audit = {"model": {**resolved.record(), "onnx_sha256": loaded.sha256, "variant": loaded.variant.name,
                           "training_run_id": spec.get("training_run_id")},
                 "engine": session.engine, "precision": loaded.variant.precision, "provider": session.provider}
        started = time.perf_counter()
        for path in tqdm(files, desc="predict", unit="image", disable=None):
            _predict_one(path, session, params, threshold, config, out, spec, audit)
        seconds = time.perf_counter() - started
    log.info("segmented %d image%s in %.1f s (%.2f images/s) -> %s", len(files), "" if len(files) == 1 else "s",
             seconds, len(files) / max(seconds, 1e-9), out)
    return PredictResult(len(files), session.provider, out)


@dataclasses.dataclass(frozen=True)
class NetworkInput:
    """A DICOM prepared for the network exactly as training and evaluation saw its kind.

    Attributes:
        pixels: (rows, columns) decoded pixel values, bright = dense.
        laterality: "L" or "R".
        laterality_source: "header", "file name" or "image".
        prepared: the preprocessing output (image (size, size) float32, transform).
    """

    pixels: np.ndarray
    laterality: str
    laterality_source: str
    prepared: Preprocessed


def network_input(path: Path, params: PreprocessParams) -> NetworkInput:
    """Decode a DICOM and preprocess it with the model's contract: a function of the DICOM alone.

    The preprocess stage computes the same image for the same DICOM (stored on the same uint16 grid),
    so what predict feeds the network (`prepared.network_input`) is what the model was evaluated on.
    """
    image = read_image(path, apply_voi=params.apply_voi)
    side, source = laterality(path, image.laterality, image.pixels, params)
    return NetworkInput(image.pixels, side, source, preprocess(image.pixels, side == "R", params))


def _predict_one(path: Path, session, params: PreprocessParams, threshold: np.ndarray, config: PredictConfig,
                 out: Path, spec: dict[str, Any], audit: dict[str, Any]) -> None:
    header = _check_mammogram(path, config.allow_for_processing)
    prepared_input = network_input(path, params)
    pixels, side, source = prepared_input.pixels, prepared_input.laterality, prepared_input.laterality_source
    prepared = prepared_input.prepared
    probabilities = session.probabilities(prepared.network_input[None])[0]  # (2, size, size)
    original = masks_on_dicom_grid(probabilities, prepared.transform, threshold)  # (2, rows, columns)
    label = np.zeros(original.shape[1:], np.uint8)
    label[original[0]] = MASK_VALUES["mass"]
    label[original[1]] = MASK_VALUES["calcification"]  # calcification wins where both are set
    stem = path.stem
    save_png(label, out / f"{stem}_mask.png")
    display = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)
    save_png(overlay_rgb(display.astype(np.float32), pred=original, max_side=config.overlay_max_side),
             out / f"{stem}_overlay.png")
    _write_seg(header, path, original, out / f"{stem}_seg.dcm", spec)
    summary = {"input": str(path), "laterality": side, "laterality_source": source,
               "mass_px": int(original[0].sum()), "calcification_px": int(original[1].sum()),
               "threshold": threshold.tolist(), **audit,
               # With the contract, what makes this image's network input and maps its masks back.
               "preprocessing": {"contract": params.to_dict(),
                                 "transform": {key: value.item() if isinstance(value, np.generic) else value
                                               for key, value in prepared.transform.to_record().items()},
                                 "intensity_window": [float(prepared.intensity_low), float(prepared.intensity_high)],
                                 "breast_found": bool(prepared.breast_found)}}
    write_atomically(out / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    log.info("%s: %s breast (%s), %d mass px, %d calcification px", path.name, side, source,
             summary["mass_px"], summary["calcification_px"])


def seg_source(path: Path) -> pydicom.Dataset:
    """Read the source image for the SEG, adding absent Type 2 patient and study attributes empty.

    highdicom copies them and fails when one is absent; DICOM allows them empty (Type 2), which is
    what a de-identified export means by "unknown". Values that are present are kept as they are.
    """
    source = pydicom.dcmread(path)
    for keyword in _SEG_TYPE2_KEYWORDS:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def _write_seg(header: pydicom.Dataset, path: Path, masks: np.ndarray, out_path: Path, spec: dict[str, Any]) -> None:
    """Write a binary DICOM SEG (one segment per lesion class) referencing the source image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = seg_source(path)
    algorithm = hd.AlgorithmIdentificationSequence(name="mammoseg LightUNet", version=__version__,
                                                  family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(segment_number=number, segment_label=name,
                                  segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                  segmented_property_type=prop,
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                  algorithm_identification=algorithm)
        for number, (name, prop) in enumerate(
            (("mass", codes.SCT.Mass), ("calcification", codes.SCT.CalcificationOfBreast)), start=1)
    ]
    uid_seed = [str(source.SOPInstanceUID), str(spec.get("training_run_id"))]
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=np.moveaxis(masks, 0, -1)[None].astype(np.uint8),  # (frames=1, rows, columns, segments)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=pydicom.uid.generate_uid(entropy_srcs=[*uid_seed, "series"]),
        series_number=900,
        sop_instance_uid=pydicom.uid.generate_uid(entropy_srcs=[*uid_seed, "instance"]),
        instance_number=1,
        manufacturer="mammoseg",
        manufacturer_model_name="LightUNet",
        software_versions=__version__,
        device_serial_number=str(spec.get("training_run_id") or "unknown"),
    )
    if "PatientOrientation" not in seg:
        # General Image, Type 2C: needed where no plane orientation is given, as for a projection
        # radiograph; copied from the mammogram (empty where it has none, which Type 2 allows).
        seg.PatientOrientation = source.get("PatientOrientation", "")
    write_atomically(out_path, lambda tmp: seg.save_as(tmp))
