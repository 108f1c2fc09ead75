"""Evaluate: the trained model and a threshold baseline on the test split, scored on each DICOM's own grid.

Reads the preprocessed dataset (its test images, transforms and ingest's full-resolution masks in
native_masks/) and the trained model; writes metrics JSON, and into the report folder per_image.csv,
summary.json (per case, nnU-Net style), summary.md, froc.png and overlays; all logged to the training run.

How each number is made (summary.md states the same):

- **Native Dice (the headline).** Each test image's masks are what
  `mammoseg.preprocessing.masks_on_dicom_grid`, the function predict uses, delivers on the DICOM grid,
  compared with ingest's full-resolution masks (`NativeCounter` counts exactly that without building
  the full-size mask). "all" merges both classes.
- **Averaging.** *Mean per image*: the mean of the images' Dice, leaving out images where neither the
  truth nor the prediction has the class (an image with a false alarm and no lesion scores 0).
  *Pooled*: intersections and sizes summed over all images, then one Dice. *Mass-positive*: the mean
  over images whose truth has a mass (the convention of whole-image mass papers).
- **Ceiling.** The native Dice of the ground truth itself after its round trip through the network
  grid: the best any model can score at this input size.
- **Intervals.** 95 % percentile bootstrap over patients (all views of a drawn woman come along);
  U-Net vs baseline is a paired bootstrap of the difference on the same patients.
- **Detection** (network grid, where components are cheap to label): a mass is found when a predicted
  component overlaps it with IoU >= `mass_min_iou`; a calcification cluster (specks within
  `cluster_radius_mm`, its region spanning them) when a predicted cluster overlaps it with IoU >=
  `calcification_min_iou`. The FROC sweeps the probability threshold.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mammoseg import model_card, tracking
from mammoseg.config import EvaluateConfig
from mammoseg.data import CLASSES, load_example, load_examples, read_dataset, read_native_masks
from mammoseg.errors import UserError
from mammoseg.fileio import write_atomically
from mammoseg.inference import load_model, predict_probabilities, select_device, threshold_map
from mammoseg.metrics import (
    DetectionCounts,
    DiceCounts,
    Froc,
    IntensityThresholdBaseline,
    bootstrap_ci,
    dice_counts,
    dice_from_counts,
    lesion_detection,
    mean_image_dice,
    nan_to_zero,
    paired_bootstrap,
    pooled_dice,
    summarize_detection,
)
from mammoseg.overlays import figure_grid, figure_panel, save_png
from mammoseg.plots import froc_png
from mammoseg.preprocessing import Transform, target_index_on_original_grid, to_original_grid

log = logging.getLogger(__name__)

TARGETS = (*CLASSES, "all")  # "all": any lesion, both classes merged
METHODS = ("unet", "baseline", "ceiling")
KINDS = ("mean_image", "pooled")
# Every metric evaluate logs starts so (register copies them onto the logged model).
TEST_METRIC_PREFIX = "test_"
# The registry's metric and the gate's statistic: native all-lesion Dice, mean per image.
HEADLINE = f"{TEST_METRIC_PREFIX}unet_dice_native_mean_image_all"

# A probability map source: (N, 1, H, W) float32 images -> (N, C, H, W) float32 probabilities.
ProbabilityFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    """Headline numbers of the evaluation."""

    images: int
    unet_dice_all: float
    baseline_dice_all: float
    metrics_path: Path
    report_dir: Path


def by_target(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Split a (C, H, W) bool mask into the evaluation targets."""
    return {**{name: mask[i] for i, name in enumerate(CLASSES)}, "all": mask.any(axis=0)}


def _spacing_mm(row: Any, native_mm: float) -> float:
    """Return the pixel spacing of a preprocessed image: native spacing divided by its resize scale."""
    scale = float(getattr(row, "scale", 1.0) or 1.0)
    return native_mm / scale


@dataclasses.dataclass
class NativeScores:
    """Per-image native Dice counts of one method on one split, in row order, and the patients."""

    counts: dict[str, list[DiceCounts]]
    patients: list[str]

    @classmethod
    def empty(cls) -> NativeScores:
        """Return scores with no image yet."""
        return cls({target: [] for target in TARGETS}, [])


class NativeCounter:
    """Native-grid Dice counts of one image's target-grid masks, without mapping each mask back.

    A mask on the (size, size) network grid is scored exactly as `masks_on_dicom_grid` (predict's
    mapping) followed by `dice_counts` on the DICOM grid would score it: each target pixel counts as
    the original pixels that take its value and the native ground-truth pixels among them. The map is
    built once per image; every further mask (the U-Net, the baseline, the ceiling, export's variants
    and probes) costs a sum over the network grid instead of a 10-14 Mpx resampling. Where the crop was
    upsampled (an original pixel takes a maximum of target pixels) it maps back and counts.

    Args:
        transform: the image's geometry.
        truth: target -> (rows, columns) bool native ground truth.
    """

    def __init__(self, transform: Transform, truth: Mapping[str, np.ndarray]) -> None:
        self._transform, self._truth = transform, truth
        self._gt = {target: int(np.count_nonzero(mask)) for target, mask in truth.items()}
        index = target_index_on_original_grid(transform)
        self._area: np.ndarray | None = None
        if index is None:
            return
        row_index, column_index = index
        size = transform.size
        # Per target pixel (flat, size * size, for np.dot with a mask): the original pixels that take its
        # value, and the native lesion pixels among them. int32 is exact: no sum exceeds rows x columns.
        self._area = np.outer(np.bincount(row_index[row_index >= 0], minlength=size),
                              np.bincount(column_index[column_index >= 0], minlength=size)).astype(np.int32).ravel()
        self._inside = {}
        for target, mask in truth.items():
            self._inside[target] = np.zeros(size * size, np.int32)
            if not self._gt[target]:
                continue
            # Lesions are sparse: only their pixels are mapped, found within their rows.
            lesion_rows = np.flatnonzero(mask.any(axis=1))
            rows, columns = np.nonzero(mask[lesion_rows[0]:lesion_rows[-1] + 1])
            target_rows, target_columns = row_index[rows + lesion_rows[0]], column_index[columns]
            kept = (target_rows >= 0) & (target_columns >= 0)
            self._inside[target] = np.bincount(target_rows[kept] * size + target_columns[kept],
                                               minlength=size * size).astype(np.int32)

    def counts(self, predicted: Mapping[str, np.ndarray]) -> dict[str, DiceCounts]:
        """Return each target's counts (I, P, G) on the DICOM grid of (size, size) bool masks."""
        if self._area is None:
            return {target: dice_counts(to_original_grid(mask, self._transform), self._truth[target])
                    for target, mask in predicted.items()}
        out = {}
        for target, mask in predicted.items():
            chosen = mask.reshape(-1).astype(np.int32)
            out[target] = DiceCounts(int(np.dot(self._inside[target], chosen)), int(np.dot(self._area, chosen)),
                                     self._gt[target])
        return out


def score_native(dataset: Path, rows: pd.DataFrame, probabilities: ProbabilityFn, threshold: float | np.ndarray,
                 batch_size: int, desc: str = "score") -> NativeScores:
    """Score a probability source on some images of a dataset, on each DICOM's own grid.

    The code path evaluate uses for the U-Net, and register for re-scoring a champion's ONNX model on
    a challenger's test split.

    Args:
        dataset: the preprocessed dataset (images, transforms, native_masks/).
        rows: its index rows to score.
        probabilities: the model, as a function of a batch of stored images.
        threshold: decision threshold (a float, or one per class).
        batch_size: images per call of `probabilities`.
        desc: progress-bar label.

    Returns:
        Native Dice counts per target and the patient of each image.
    """
    return score_native_many(dataset, rows, {desc: probabilities}, threshold, batch_size, desc)[desc]


def score_native_many(dataset: Path, rows: pd.DataFrame, models: Mapping[str, ProbabilityFn],
                      threshold: float | np.ndarray, batch_size: int, desc: str = "score") -> dict[str, NativeScores]:
    """Score several probability sources on the same images like `score_native`, reading each image once.

    export gates its deployment variants this way: the stored images and the full-resolution native
    masks, the costly part, are read once for all of them.

    Args:
        dataset: the preprocessed dataset (images, transforms, native_masks/).
        rows: its index rows to score.
        models: name -> the model, as a function of a batch of stored images.
        threshold: decision threshold (a float, or one per class).
        batch_size: images per call of each model.
        desc: progress-bar label.

    Returns:
        name -> native Dice counts per target and the patient of each image.
    """
    scores = {name: NativeScores.empty() for name in models}
    limit = np.asarray(threshold, np.float32).reshape(-1, 1, 1)  # one threshold, or one per class
    records = list(rows.itertuples(index=False))
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", disable=None):
        batch = records[start:start + batch_size]
        images = np.stack([load_example(dataset, row)[0] for row in batch])
        counters = [NativeCounter(Transform.from_record(row), by_target(read_native_masks(dataset, row)))
                    for row in batch]
        for name, probabilities in models.items():
            for row, counter, probability in zip(batch, counters, probabilities(images), strict=True):
                counts = counter.counts(by_target(probability >= limit))
                for target in TARGETS:
                    scores[name].counts[target].append(counts[target])
                scores[name].patients.append(str(row.patient_id))
    return scores


def run(config: EvaluateConfig, dataset: Path, model: Path, metrics_out: Path, report_out: Path) -> EvaluateResult:
    """Evaluate the trained model on the test split, next to a threshold baseline tuned on val.

    Args:
        config: evaluation parameters.
        dataset: the preprocessed dataset.
        model: the trained model folder (model.pt, MLflow run id).
        metrics_out: JSON metrics file to write.
        report_out: folder for per_image.csv, summary.json, summary.md, froc.png and overlays/.

    Returns:
        Headline numbers and output paths.
    """
    index, _ = read_dataset(dataset)
    test_rows, val_rows = index[index["split"] == "test"], index[index["split"] == "val"]
    if test_rows.empty:
        raise UserError(f"{dataset / 'index.parquet'}: the test split is empty")
    device = select_device(config.device)
    trained = load_model(model, device)
    run_id = tracking.read_run_id(model)

    val_examples = load_examples(dataset, val_rows)
    baseline = IntensityThresholdBaseline.fit([image[0] for image, _ in val_examples],
                                              [mask for _, mask in val_examples], config.baseline_grid)
    del val_examples

    scored = _score_test_split(config, dataset, test_rows, trained, baseline, device)
    metrics = _summarize(config, scored, trained.threshold, baseline)

    report_out.mkdir(parents=True, exist_ok=True)
    per_image = pd.DataFrame(scored.records)
    write_atomically(report_out / "per_image.csv", lambda tmp: per_image.to_csv(tmp, index=False))
    case_summary = _case_summary(scored.cases)
    write_atomically(report_out / "summary.json",
                     lambda tmp: tmp.write_text(json.dumps(case_summary, indent=2, default=_json_default) + "\n"))
    froc_png(metrics["detection"], report_out / "froc.png")
    _worst_overlays(config, dataset, test_rows, per_image, trained, device, report_out / "overlays")
    summary_md = markdown_summary(metrics)
    write_atomically(report_out / "summary.md", lambda tmp: tmp.write_text(summary_md))
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(metrics_out, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2, default=_json_default)
                                                             + "\n"))

    flat = flat_metrics(metrics)
    with tracking.continue_run(run_id) as mlflow_run:
        mlflow_run.log_metrics(flat)
        mlflow_run.log_artifact(report_out, "evaluation")
        mlflow_run.log_artifact(metrics_out, "evaluation")
        mlflow_run.set_tags({"test_dice_native_all": f"{flat[HEADLINE]:.4f}"})
    # The run's description, now that it has test numbers (register adds where the model went).
    tracking.set_run_note(run_id, model_card.run_note(*tracking.run_data(run_id)))
    unet_all = metrics["native"]["unet"]["mean_image"]["all"]["value"]
    baseline_all = metrics["native"]["baseline"]["mean_image"]["all"]["value"]
    for target in TARGETS:
        unet, base = (metrics["native"][m]["mean_image"][target] for m in ("unet", "baseline"))
        paired = metrics["paired_unet_vs_baseline"]["mean_image"][target]
        log.info("test native Dice %-13s U-Net %.3f [%.3f, %.3f] vs baseline %.3f; difference %+.3f [%+.3f, %+.3f]; "
                 "ceiling %.3f", target, unet["value"], *unet["ci95"], base["value"], paired["difference"],
                 *paired["ci95"], metrics["native"]["ceiling"]["mean_image"][target]["value"])
    return EvaluateResult(len(test_rows), unet_all, baseline_all, metrics_out, report_out)


@dataclasses.dataclass
class _Scored:
    """Everything measured on the test split, image by image."""

    native: dict[str, NativeScores]
    grid: dict[str, dict[str, list[DiceCounts]]]
    detection: dict[str, list[DetectionCounts]]
    froc: dict[str, list[list[DetectionCounts]]]  # class -> threshold -> images
    records: list[dict[str, Any]]
    cases: list[dict[str, Any]]


def _score_test_split(config: EvaluateConfig, dataset: Path, test_rows: pd.DataFrame, trained: Any,
                      baseline: IntensityThresholdBaseline, device: Any) -> _Scored:
    """Predict every test image; score the U-Net, the baseline and the ceiling on the native grid."""
    scored = _Scored({m: NativeScores.empty() for m in METHODS},
                     {m: {t: [] for t in TARGETS} for m in ("unet", "baseline")},
                     {c: [] for c in CLASSES}, {c: [[] for _ in config.froc_thresholds] for c in CLASSES}, [], [])
    min_iou = {"mass": config.mass_min_iou, "calcification": config.calcification_min_iou}
    rows = list(test_rows.itertuples(index=False))
    for start in tqdm(range(0, len(rows), config.batch_size), desc="evaluate", unit="batch", disable=None):
        batch_rows = rows[start:start + config.batch_size]
        examples = [load_example(dataset, row) for row in batch_rows]
        images = [np.asarray(image, np.float32) for image, _ in examples]
        probabilities = predict_probabilities(trained.network, images, device, config.batch_size)
        for row, image, (_, grid_mask), probability in zip(batch_rows, images, examples, probabilities, strict=True):
            transform = Transform.from_record(row)
            grid_mask = np.asarray(grid_mask, bool)
            counter = NativeCounter(transform, by_target(read_native_masks(dataset, row)))
            baseline_grid = baseline.predict(image[0])
            grid_truth = by_target(grid_mask)
            grid_pred = {"unet": by_target(probability >= threshold_map(trained.threshold)),
                         "baseline": by_target(baseline_grid)}
            # What predict delivers (masks_on_dicom_grid: thresholded on the network grid, mapped back),
            # counted on the DICOM grid; the ceiling is the ground truth's own round trip.
            native = {"unet": counter.counts(grid_pred["unet"]), "baseline": counter.counts(grid_pred["baseline"]),
                      "ceiling": counter.counts(grid_truth)}
            record: dict[str, Any] = {"image_id": row.image_id, "patient_id": row.patient_id}
            case: dict[str, Any] = {"image_id": row.image_id, "patient_id": row.patient_id, "metrics": {}}
            for method, counts in native.items():
                scored.native[method].patients.append(str(row.patient_id))
                for target in TARGETS:
                    c = counts[target]
                    scored.native[method].counts[target].append(c)
                    name = {"unet": "dice_native", "baseline": "baseline_dice_native",
                            "ceiling": "ceiling_native"}[method]
                    record[f"{name}_{target}"] = dice_from_counts(*c)
                    if method == "unet":
                        case["metrics"][target] = _case_metrics(c)
            for method, predicted in grid_pred.items():
                for target in TARGETS:
                    c = dice_counts(predicted[target], grid_truth[target])
                    scored.grid[method][target].append(c)
                    record[f"{'' if method == 'unet' else 'baseline_'}dice_grid_{target}"] = dice_from_counts(*c)
            for target in TARGETS:
                record[f"gt_native_px_{target}"] = native["unet"][target].gt_sum
                record[f"pred_native_px_{target}"] = native["unet"][target].pred_sum
            calc_radius = config.cluster_radius_mm / _spacing_mm(row, config.pixel_spacing_mm)
            radius = {"mass": 0.0, "calcification": calc_radius}
            for channel, name in enumerate(CLASSES):
                counts = lesion_detection(grid_pred["unet"][name], grid_truth[name], radius[name], min_iou[name])
                scored.detection[name].append(counts)
                record.update({f"{name}_lesions": counts.n_gt, f"{name}_found": counts.n_found,
                               f"{name}_false_positives": counts.n_false_positive})
                for k, threshold in enumerate(config.froc_thresholds):
                    scored.froc[name][k].append(lesion_detection(
                        probability[channel] >= threshold, grid_truth[name], radius[name], min_iou[name]))
            scored.records.append(record)
            scored.cases.append(case)
    return scored


def _case_metrics(c: DiceCounts) -> dict[str, Any]:
    """nnU-Net's per-case numbers of one class: Dice, IoU and the pixel confusion counts (native grid)."""
    tp, fp, fn = c.intersection, c.pred_sum - c.intersection, c.gt_sum - c.intersection
    union = tp + fp + fn
    return {"Dice": dice_from_counts(*c), "IoU": tp / union if union else math.nan, "TP": tp, "FP": fp, "FN": fn,
            "n_pred": c.pred_sum, "n_ref": c.gt_sum}


def _case_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: every case's metrics and their means over the cases where each is defined."""
    mean: dict[str, dict[str, float]] = {}
    for target in TARGETS:
        mean[target] = {}
        for key in ("Dice", "IoU", "TP", "FP", "FN", "n_pred", "n_ref"):
            values = np.array([case["metrics"][target][key] for case in cases], float)
            defined = values[~np.isnan(values)]
            mean[target][key] = float(defined.mean()) if defined.size else math.nan
    return {"grid": "native (each DICOM's own rows x columns)",
            "nan": "Dice and IoU are NaN where neither the reference nor the prediction has the class; "
                   "means leave those cases out",
            "metric_per_case": cases, "mean": mean}


def _ci_block(counts: Sequence[DiceCounts], kind: str, patients: Sequence[str], config: EvaluateConfig) -> dict:
    value = (mean_image_dice if kind == "mean_image" else pooled_dice)(counts)
    low, high = bootstrap_ci(counts, kind, config.bootstrap_resamples, config.bootstrap_seed, groups=patients)
    return {"value": float(value), "ci95": [low, high]}


def _summarize(config: EvaluateConfig, scored: _Scored, threshold: float,
               baseline: IntensityThresholdBaseline) -> dict[str, Any]:
    """Point estimates with patient-bootstrap intervals, paired differences, detection and FROC."""
    patients = scored.native["unet"].patients
    metrics: dict[str, Any] = {
        "images": len(patients), "patients": len(set(patients)), "threshold": list(threshold),
        "baseline_thresholds": baseline.to_dict(),
        "rules": {"grid": "native: probabilities mapped to each DICOM's grid by predict's code, thresholded there",
                  "mean_image": "mean of per-image Dice over images where truth or prediction has the target",
                  "pooled": "pixels summed over all test images, then one Dice",
                  "mass_positive": "mean of per-image mass Dice over images whose truth has a mass",
                  "ci95": "percentile bootstrap over patients; paired differences resample the same patients",
                  "ceiling": "Dice of the ground truth after its round trip through the network grid"},
        "native": {}, "grid": {}, "paired_unet_vs_baseline": {}}
    for method in METHODS:
        counts = scored.native[method].counts
        block: dict[str, Any] = {kind: {t: _ci_block(counts[t], kind, patients, config) for t in TARGETS}
                                 for kind in KINDS}
        positive = [i for i, c in enumerate(counts["mass"]) if c.gt_sum > 0]
        block["mass_positive"] = _ci_block([counts["mass"][i] for i in positive], "mean_image",
                                           [patients[i] for i in positive], config)
        metrics["native"][method] = block
    for method in ("unet", "baseline"):
        metrics["grid"][method] = {kind: {t: _ci_block(scored.grid[method][t], kind, patients, config)
                                          for t in TARGETS} for kind in KINDS}
    for kind in KINDS:
        metrics["paired_unet_vs_baseline"][kind] = {
            t: paired_bootstrap(scored.native["unet"].counts[t], scored.native["baseline"].counts[t], patients,
                                kind, config.bootstrap_resamples, config.bootstrap_seed).to_dict()
            for t in TARGETS}
    metrics["detection"] = {}
    for name in CLASSES:
        curve = Froc.from_counts(config.froc_thresholds, scored.froc[name])
        min_iou = config.mass_min_iou if name == "mass" else config.calcification_min_iou
        metrics["detection"][name] = {**summarize_detection(scored.detection[name]), "min_iou": min_iou,
                                      "froc": curve.to_dict()}
    return metrics


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten the metrics JSON into MLflow metric names (NaN -> 0 so that ranking works)."""
    flat: dict[str, float] = {}
    for method in METHODS:
        for kind in KINDS:
            for target in TARGETS:
                entry = metrics["native"][method][kind][target]
                flat[f"test_{method}_dice_native_{kind}_{target}"] = nan_to_zero(entry["value"])
                if method == "unet":
                    flat[f"test_{method}_dice_native_{kind}_{target}_ci_low"] = nan_to_zero(entry["ci95"][0])
                    flat[f"test_{method}_dice_native_{kind}_{target}_ci_high"] = nan_to_zero(entry["ci95"][1])
        mass_positive = metrics["native"][method]["mass_positive"]["value"]
        flat[f"test_{method}_dice_native_mass_positive"] = nan_to_zero(mass_positive)
    for method in ("unet", "baseline"):
        for kind in KINDS:
            for target in TARGETS:
                value = metrics["grid"][method][kind][target]["value"]
                flat[f"test_{method}_dice_grid_{kind}_{target}"] = nan_to_zero(value)
    for kind in KINDS:
        for target in TARGETS:
            entry = metrics["paired_unet_vs_baseline"][kind][target]
            prefix = f"test_unet_vs_baseline_native_{kind}_{target}"
            flat[f"{prefix}_difference"] = nan_to_zero(entry["difference"])
            flat[f"{prefix}_ci_low"] = nan_to_zero(entry["ci95"][0])
            flat[f"{prefix}_ci_high"] = nan_to_zero(entry["ci95"][1])
    for name, values in metrics["detection"].items():
        flat[f"test_unet_{name}_sensitivity"] = nan_to_zero(values["sensitivity"])
        flat[f"test_unet_{name}_false_positives_per_image"] = nan_to_zero(values["false_positives_per_image"])
        flat[f"test_unet_{name}_froc_sensitivity_at_0.5_fp"] = values["froc"]["sensitivity_at_0.5_fp"]
        flat[f"test_unet_{name}_froc_sensitivity_at_1_fp"] = values["froc"]["sensitivity_at_1_fp"]
    return flat


def _worst_overlays(config, dataset, test_rows, per_image, trained, device, out_dir: Path) -> None:
    """Overlay the worst-k test images that have a lesion (lowest native all-lesion Dice)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    with_lesion = per_image[~per_image["dice_native_all"].isna()]
    worst = with_lesion.nsmallest(config.worst_k, "dice_native_all")
    rows = test_rows.set_index("image_id").loc[worst["image_id"]].reset_index()
    panels = []
    for _, row in rows.iterrows():
        image, mask = load_example(dataset, row)
        image = np.asarray(image, np.float32)
        (probability,) = predict_probabilities(trained.network, [image], device, 1)
        score = float(worst.set_index("image_id").loc[row["image_id"], "dice_native_all"])
        panels.append(figure_panel(image[0], probability >= threshold_map(trained.threshold), np.asarray(mask, bool),
                                   title=f"{row['image_id']} Dice {score:.2f}"))
    if panels:
        save_png(figure_grid(panels), out_dir / "worst.png")


def _fmt(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def markdown_summary(metrics: dict[str, Any]) -> str:
    """Return summary.md: the native Dice tables, the paired comparison, detection, and every rule once."""
    rules = metrics["rules"]
    lines = [f"# Test-split evaluation ({metrics['images']} images, {metrics['patients']} patients)", "",
             f"Decision threshold (chosen on validation): {_threshold_text(metrics['threshold'])}", "",
             "## Dice on the DICOM grid (headline)", "",
             "| method | target | mean per image [95% CI] | pooled [95% CI] |", "|---|---|---|---|"]
    for method in METHODS:
        for target in TARGETS:
            block = metrics["native"][method]
            lines.append(f"| {method} | {target} | {_fmt(block['mean_image'][target])} | "
                         f"{_fmt(block['pooled'][target])} |")
    lines += ["", f"Mass Dice over mass-positive images: U-Net {_fmt(metrics['native']['unet']['mass_positive'])}, "
              f"baseline {_fmt(metrics['native']['baseline']['mass_positive'])}.", "",
              "## U-Net minus baseline (paired, same patients)", "",
              "| target | mean per image [95% CI] | pooled [95% CI] |", "|---|---|---|"]
    for target in TARGETS:
        cells = []
        for kind in KINDS:
            entry = metrics["paired_unet_vs_baseline"][kind][target]
            cells.append(f"{entry['difference']:+.3f} [{entry['ci95'][0]:+.3f}, {entry['ci95'][1]:+.3f}]")
        lines.append(f"| {target} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Network grid (secondary)", "", "| method | target | mean per image | pooled |",
              "|---|---|---|---|"]
    for method in ("unet", "baseline"):
        for target in TARGETS:
            block = metrics["grid"][method]
            lines.append(f"| {method} | {target} | {block['mean_image'][target]['value']:.3f} | "
                         f"{block['pooled'][target]['value']:.3f} |")
    lines += ["", "## Detection (U-Net, network grid)", "",
              "| lesions | match rule | sensitivity | false positives / image | FROC sens. @0.5 FP | @1 FP |",
              "|---|---|---|---|---|---|"]
    for name, values in metrics["detection"].items():
        lines.append(f"| {name} | IoU >= {values['min_iou']} | {values['sensitivity']:.3f} | "
                     f"{values['false_positives_per_image']:.2f} | {values['froc']['sensitivity_at_0.5_fp']:.3f} | "
                     f"{values['froc']['sensitivity_at_1_fp']:.3f} |")
    lines += ["", "## How the numbers are made", ""] + [f"- **{key}**: {text}" for key, text in rules.items()]
    return "\n".join(lines) + "\n"


def _threshold_text(threshold: Any) -> str:
    if isinstance(threshold, Iterable) and not isinstance(threshold, str):
        return ", ".join(f"{name} {float(t):g}" for name, t in zip(CLASSES, threshold, strict=True))
    return f"{float(threshold):g}"  # :g, not :.2f, which prints a threshold of 0.995 as 1.00


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
