"""The model's descriptions in the MLflow UI: the registered model's card, each version's, the training run's note.

Reads nothing itself: it renders markdown from the ONNX I/O contract (export's spec), the training
run's tags and metrics (evaluate's test metrics with their intervals, flattened as MLflow holds them),
the gate's rows and decision, and the version's lineage. register writes the registered model's and
the version's descriptions; evaluate and register write the run's note (`mlflow.note.content`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mammoseg.data import CLASSES

# MLflow's SQL stores keep registered-model and version descriptions in VARCHAR(5000).
MAX_DESCRIPTION = 5000
TARGETS = (*CLASSES, "all")

INTENDED_USE = (
    "**Intended use: research only.** A research model for studying lesion segmentation on mammograms. "
    "It is not a medical device: not cleared or approved by any regulator, not validated clinically, "
    "and not for screening, diagnosis or any decision about a patient.")
# What the project's own sources say about INbreast's licence, and no more: the README ("INbreast is
# licensed and never in this repository"); shared/inbreast-format.md and the paper cite the database
# (Moreira et al., 2012) and quote no licence terms. The binding terms are those its owners grant.
DATA_LICENCE = (
    "**Training data and its licence.** Trained on INbreast (I. C. Moreira, I. Amaral, I. Domingues, "
    "A. Cardoso, M. J. Cardoso, J. S. Cardoso: *INbreast: Toward a Full-field Digital Mammographic Database*, "
    "Academic Radiology 19(2):236-248, 2012) or on data that `mammoseg synth` generates in its format "
    "(each version's lineage names the data by its DVC hash). INbreast is licensed and is not "
    "redistributed with this project. This project's sources quote no licence terms: the terms that "
    "bind a model trained on INbreast (sharing it, publishing it, any use beyond research) are those of "
    "the licence under which INbreast's owners, the authors above, provided your copy of the database. "
    "Read them before sharing this model or its outputs, and cite the paper above.")


def registered_model_description(name: str, spec: Mapping[str, Any]) -> str:
    """Return the registered model's card: what it segments, intended use, data licence, input contract.

    Args:
        name: the registered model's name.
        spec: the ONNX I/O contract of the version being registered (mammoseg.onnx_runtime.read_io_spec).
    """
    classes = list(spec["output"]["channels"])
    preprocessing = spec["preprocessing"]
    size = preprocessing["size"]
    low, high = preprocessing["percentiles"]
    channels = spec["input"]["channels"]
    voi = ", VOI window/LUT applied" if preprocessing.get("apply_voi") else ""
    lines = [
        f"# {name}",
        "",
        "**What it segments.** Masses and calcifications on full-field digital mammograms (DICOM MG "
        f"images FOR PRESENTATION, one view of one breast each): output channels {_and(classes)}, in this order. "
        "Per pixel, a logit per class; `sigmoid` gives the probability and each version's `threshold` "
        "(one per class, chosen on the validation split) the mask. A LightUNet (Tardy & Mateus, "
        "*Lightweight U-Net for High-Resolution Breast Imaging*), exported to ONNX.",
        "",
        INTENDED_USE,
        "",
        DATA_LICENCE,
        "",
        "**Input contract** (`mammoseg.preprocessing`, the function predict and evaluate call; the I/O "
        "spec in the ONNX metadata holds it in full):",
        "",
        f"- DICOM decoded to its stored pixel values{voi}, MONOCHROME1 inverted; right breasts flipped "
        "so the chest wall is on the left.",
        f"- The breast is found from the pixels alone and cropped (margin {preprocessing['crop_margin_px']} px); "
        f"the crop is scaled to a longer side of {size} px, top left of a {size}x{size} canvas, zero padded"
        f"{', background outside the breast set to 0' if preprocessing.get('zero_background') else ''}.",
        f"- Intensities: the breast's {low:g}th to {high:g}th percentiles map to [0, 1] (clipped).",
        f"- Input `{spec['input']['name']}`: float32 (batch, {len(channels)}, height, width) = "
        f"(N, {len(channels)}, {size}, {size}); channels {_and(channels)} of each block of original pixels; "
        f"{spec['input']['shape_rule']}.",
        f"- Output `{spec['output']['name']}`: float32 (N, {len(classes)}, height, width), channels {_and(classes)}; "
        "predict maps the masks back onto the DICOM's own grid.",
    ]
    return _fit("\n".join(lines) + "\n")


def metrics_table(metrics: Mapping[str, float]) -> list[str]:
    """Return evaluate's test metrics as markdown lines: native Dice with 95% CIs, the paired baseline gap, detection.

    Args:
        metrics: the training run's metrics as evaluate flattened them (`test_*`); missing ones show as n/a.
    """
    lines = ["| target | U-Net mean per image [95% CI] | U-Net pooled [95% CI] | baseline mean per image | "
             "U-Net - baseline, paired [95% CI] | ceiling |", "|---|---|---|---|---|---|"]
    for target in TARGETS:
        unet = {kind: _interval(metrics, f"test_unet_dice_native_{kind}_{target}") for kind in ("mean_image", "pooled")}
        paired = f"test_unet_vs_baseline_native_mean_image_{target}"
        lines.append(f"| {target} | {unet['mean_image']} | {unet['pooled']} | "
                     f"{_number(metrics.get(f'test_baseline_dice_native_mean_image_{target}'))} | "
                     f"{_interval(metrics, paired, f'{paired}_difference', signed=True)} | "
                     f"{_number(metrics.get(f'test_ceiling_dice_native_mean_image_{target}'))} |")
    lines.append("")
    for name in CLASSES:
        lines.append(f"- detection {name}: sensitivity {_number(metrics.get(f'test_unet_{name}_sensitivity'), 2)} at "
                     f"{_number(metrics.get(f'test_unet_{name}_false_positives_per_image'), 2)} false positives "
                     f"per image; FROC {_number(metrics.get(f'test_unet_{name}_froc_sensitivity_at_0.5_fp'), 2)} "
                     f"@0.5 FP, {_number(metrics.get(f'test_unet_{name}_froc_sensitivity_at_1_fp'), 2)} @1 FP")
    return lines


def version_description(metrics: Mapping[str, float], gate_rows: Sequence[str], decision: str,
                        lineage: Mapping[str, Any]) -> str:
    """Return a version's card: its test metrics with CIs, the gate's decision and numbers, its lineage.

    Args:
        metrics: the training run's metrics (evaluate's flattened test metrics among them).
        gate_rows: the gate's conditions as markdown rows (condition | value | reference | result).
        decision: the promotion decision, one sentence.
        lineage: the version's lineage tags (run_id, git_commit, git_dirty, data_dvc_hash,
            dataset_digest, validation_success, image_digest, onnx_sha256, threshold); a missing one
            shows as "not recorded".
    """
    def value(key: str) -> str:
        found = lineage.get(key)
        return f"`{found}`" if found not in (None, "") else "not recorded"

    dirty = str(lineage.get("git_dirty", "")).lower()
    code_state = {"false": " (clean checkout)", "true": " (**uncommitted changes**)"}.get(dirty, "")
    # tracking.lineage writes "none" outside a container image and "unknown" when nobody said.
    image = {None: "not recorded", "": "not recorded", "unknown": "not recorded",
             "none": "not recorded (not run in a container image)"}.get(lineage.get("image_digest"),
                                                                         value("image_digest"))
    lines = ["## Test split (native DICOM grid, 95% patient-bootstrap CI)", "", *metrics_table(metrics), "",
             "## Promotion gate", "", f"**Decision:** {decision}", "",
             "| gate condition | value | reference | result |", "|---|---|---|---|", *gate_rows, "",
             "## Lineage", "",
             f"- training run: {value('run_id')}",
             f"- git commit: {value('git_commit')}{code_state}",
             f"- data (DVC hash of data/inbreast): {value('data_dvc_hash')}",
             f"- dataset digest (sha256 of the preprocessed index): {value('dataset_digest')}; data contract "
             f"(validate): {value('validation_success')}",
             f"- image digest: {image}",
             f"- ONNX sha256: {value('onnx_sha256')}; thresholds {value('threshold')}"]
    return _fit("\n".join(lines) + "\n")


def run_note(tags: Mapping[str, str], metrics: Mapping[str, float], registration: str | None = None) -> str:
    """Return the training run's description (`mlflow.note.content`): what ran, how it scored, where it went.

    Args:
        tags: the run's tags (train's environment and lineage tags).
        metrics: the run's latest metrics (train's and, once evaluate ran, its test metrics).
        registration: one line on the registered version and the gate's decision, once register ran.
    """
    thresholds = ", ".join(f"{name} {_number(metrics.get(f'threshold_{name}'), 2)}" for name in CLASSES)
    dirty = " (uncommitted changes)" if str(tags.get("git_dirty", "")).lower() == "true" else ""
    validation = {"true": "passed", "false": "FAILED"}.get(tags.get("validation_success", ""), "not attached")
    lines = [f"**LightUNet segmenting masses and calcifications on mammograms.** Best epoch "
             f"{tags.get('best_epoch', 'n/a')} (validation Dice, EMA {_number(metrics.get('best_val_dice_mean'))}); "
             f"thresholds {thresholds}. "
             f"Trained on {tags.get('device', 'n/a')} ({tags.get('device_name', 'n/a')}), "
             f"torch {tags.get('torch_version', 'n/a')}.",
             "",
             f"Code {tags.get('git_commit', 'n/a')}{dirty}; data {tags.get('data_dvc_hash') or 'untracked'}; "
             f"dataset {tags.get('dataset_digest', 'n/a')}; validation {validation}."]
    if "test_unet_dice_native_mean_image_all" in metrics:  # evaluate's headline: it ran
        lines += ["", "Test split:", "", *metrics_table(metrics)]
    else:
        lines += ["", "Not evaluated yet (`mammoseg evaluate`)."]
    if registration:
        lines += ["", f"**Registry:** {registration}"]
    return _fit("\n".join(lines) + "\n")


def _and(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _interval(metrics: Mapping[str, float], prefix: str, key: str | None = None, signed: bool = False) -> str:
    """Format `key` (default `prefix`) with `prefix`_ci_low / _ci_high as "value [low, high]"."""
    value = metrics.get(key or prefix)
    low, high = metrics.get(f"{prefix}_ci_low"), metrics.get(f"{prefix}_ci_high")
    if value is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if low is None or high is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def _fit(text: str) -> str:
    """Keep a description within MLflow's limit (the end goes first; every card fits well within it)."""
    if len(text) <= MAX_DESCRIPTION:
        return text
    marker = "\n\n(cut to MLflow's description limit)\n"
    return text[:MAX_DESCRIPTION - len(marker)] + marker
