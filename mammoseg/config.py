"""Typed stage configuration: reads params.yaml, applies command-line overrides.

Every tunable lives in params.yaml (one block per stage); the dataclasses below give each block a
type and hold no default values, so a key missing from params.yaml is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mammoseg.errors import UserError

PARAMS_ENV = "MAMMOSEG_PARAMS"


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Generator of INbreast-format data (`mammoseg synth`)."""

    cases: int
    seed: int
    scale: float


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Manifest and full-resolution masks from an INbreast folder (`mammoseg ingest`)."""

    point_radius_px: int
    workers: int
    lesion_classes: dict[str, list[str]]


# --- validate: ValidateConfig goes here ---


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """Data-contract thresholds for the manifest and its DICOMs (`mammoseg validate`)."""

    workers: int
    allowed_sizes: list[str]
    min_images: int
    min_patients: int
    max_out_of_bounds_share: float
    max_mask_fraction: float
    allowed_bits_allocated: list[int]
    bits_stored_range: list[int]
    privacy_allowed: list[str]
    warnings: list[str]


# --- preprocess: PreprocessConfig goes here ---


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Training dataset at the network's resolution, patient-level splits (`mammoseg preprocess`)."""

    size: int
    size_multiple: int
    split_fractions: list[float]
    seed: int
    workers: int
    percentiles: list[float]
    crop_margin_px: int
    otsu_side: int
    zero_background: bool
    apply_voi: bool
    max_channel: bool


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """LightUNet training (`mammoseg train`): architecture, optimisation, augmentation, hardware."""

    experiment: str
    depth: int
    filters: int
    max_filters: int
    conv: str
    residual: bool
    norm: str
    epochs: int
    batch_size: int
    grad_accum_steps: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    dice_weight: float
    bce_weight: float
    bce_pos_weight: float
    foreground_prior: float
    mass_image_share: float
    mass_image_share_end: float
    patch_size: int
    patch_lesion_prob: float
    deep_supervision: int
    weight_ema: float
    validate_every: int
    selection_ema: float
    min_epochs: int
    early_stopping_patience: int
    aug_vflip_prob: float
    aug_rotate_deg: float
    aug_scale: float
    aug_gamma: float
    aug_contrast: float
    device: str
    amp: bool
    channels_last: bool
    checkpointing: bool
    num_workers: int
    seed: int
    deterministic: bool
    threshold_grid: list[float]
    threshold_tolerance: float
    overlay_every: int
    overlay_images: int
    log_system_metrics: bool
    resume: bool
    checkpoint_dir: str
    pipeline_run_id: str


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Test-split evaluation (`mammoseg evaluate`): bootstrap, lesion detection, baseline, overlays."""

    batch_size: int
    bootstrap_resamples: int
    bootstrap_seed: int
    cluster_radius_mm: float
    pixel_spacing_mm: float
    mass_min_iou: float
    calcification_min_iou: float
    froc_thresholds: list[float]
    worst_k: int
    baseline_grid: list[float]
    device: str


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """ONNX export (`mammoseg export`): parity tolerances, deployment variants, latency."""

    parity_logit_atol: float
    parity_dice_tolerance: float
    variant_dice_tolerance: float
    gate_probe_logit_shifts: list[float]
    parity_images: int
    int8: bool
    fp16: bool
    openvino: list[str]
    calibration_images: int
    threads: int
    latency_size: int
    latency_repeats: int


@dataclasses.dataclass(frozen=True)
class RegisterConfig:
    """Model Registry (`mammoseg register`): model name and promotion gate."""

    name: str
    metric: str
    dice_floors: dict[str, float]
    bootstrap_resamples: int
    bootstrap_seed: int
    batch_size: int
    threads: int


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Deployment inference (`mammoseg predict`)."""

    engine: str
    threads: int
    overlay_max_side: int
    allow_for_processing: bool


STAGE_CONFIGS: dict[str, type] = {
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "register": RegisterConfig,
    "predict": PredictConfig,
    "synth": SynthConfig,
    "ingest": IngestConfig,
    # --- register further stage configs below, one line each ---
    "preprocess": PreprocessConfig,
    "validate": ValidateConfig,
}


def default_params_path() -> Path:
    """Return the params.yaml to use: $MAMMOSEG_PARAMS, ./params.yaml, else the repository's own."""
    if env := os.environ.get(PARAMS_ENV):
        return Path(env)
    cwd_params = Path.cwd() / "params.yaml"
    if cwd_params.is_file():
        return cwd_params
    return Path(__file__).resolve().parent.parent / "params.yaml"


def load_params(path: Path | None = None) -> dict[str, Any]:
    """Read params.yaml into a dict of stage blocks.

    Raises:
        UserError: the file is missing or is not a YAML mapping.
    """
    path = path or default_params_path()
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found (set --params or ${PARAMS_ENV})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of stage blocks, got {type(params).__name__}")
    return params


def overridable_fields(config_type: type) -> list[dataclasses.Field]:
    """Return the fields of a stage config that a command-line flag can override (scalars and lists)."""
    hints = typing.get_type_hints(config_type)
    return [f for f in dataclasses.fields(config_type) if flag_type(hints[f.name]) is not None]


def field_types(config_type: type) -> dict[str, Any]:
    """Return the resolved type annotation of each field of a stage config."""
    return typing.get_type_hints(config_type)


def flag_type(annotation: Any) -> tuple[type, bool] | None:
    """Return (element type, is_list) for an annotation a flag can set; None for nested mappings."""
    origin = typing.get_origin(annotation)
    if annotation in (int, float, str, bool):
        return annotation, False
    if origin is list:
        (element,) = typing.get_args(annotation)
        if element in (int, float, str):
            return element, True
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return flag_type(args[0])
    return None


# Process counts: a negative one would only fail deep inside a process pool or DataLoader.
_PROCESS_COUNTS = {"workers", "num_workers"}


def stage_config(stage: str, params: dict[str, Any], overrides: dict[str, Any] | None = None,
                 params_path: Path | None = None) -> Any:
    """Build a stage's typed config from its params block and the flags that override it.

    Args:
        stage: the stage name, a key of STAGE_CONFIGS and of params.yaml.
        params: all stage blocks, as returned by load_params.
        overrides: field name -> value from the command line; None values are ignored.
        params_path: where params came from, for error messages.

    Raises:
        UserError: the block is missing, has unknown keys, lacks keys, or a value has the wrong type.
    """
    where = params_path or "params.yaml"
    config_type = STAGE_CONFIGS[stage]
    block = params.get(stage)
    if not isinstance(block, dict):
        raise UserError(f"{where}: no '{stage}:' block")
    names = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(block) - names)
    missing = sorted(names - set(block))
    if unknown:
        raise UserError(f"{where}: unknown key(s) in '{stage}': {', '.join(unknown)}")
    if missing:
        raise UserError(f"{where}: missing key(s) in '{stage}': {', '.join(missing)}")
    values = dict(block)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = field_types(config_type)
    for name, value in values.items():
        values[name] = _coerce(value, hints[name], f"{where}: {stage}.{name}")
    for name in _PROCESS_COUNTS & names:
        if values[name] < 0:
            raise UserError(f"{where}: {stage}.{name} is {values[name]}; must be >= 0")
    return config_type(**values)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and widen int to float) a value against its annotation; raise UserError on mismatch."""
    rule = flag_type(annotation)
    if rule is None:
        return value  # nested mappings are validated by the stage that uses them
    element, is_list = rule
    optional = type(None) in typing.get_args(annotation)
    if value is None and optional:
        return None
    items = value if is_list else [value]
    if is_list and not isinstance(value, list):
        raise UserError(f"{where}: expected a list, got {value!r}")
    out = []
    for item in items:
        if element is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if not isinstance(item, element) or (element is int and isinstance(item, bool)):
            raise UserError(f"{where}: expected {element.__name__}, got {item!r}")
        out.append(item)
    return out if is_list else out[0]
