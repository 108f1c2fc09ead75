"""Evaluate: the trained model and a threshold baseline on the test split -> metrics JSON and a report.

Dice per class (mass, calcification) and for all lesions together, pooled over the dataset and as
a mean over images, with percentile-bootstrap 95% intervals over images; lesion-level sensitivity
and false positives per image (masses as connected components, calcifications as clusters); a
per-image CSV, overlays of the worst images and a Markdown summary, all logged to the training run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mammoseg import tracking
from mammoseg.config import EvaluateConfig
from mammoseg.errors import UserError
from mammoseg.fileio import write_atomically
from mammoseg.inference import load_model, predict_probabilities, select_device
from mammoseg.metrics import (
    IntensityThresholdBaseline,
    bootstrap_ci,
    dice_counts,
    dice_from_counts,
    lesion_detection,
    mean_image_dice,
    nan_to_zero,
    pooled_dice,
    summarize_detection,
)
from mammoseg.overlays import figure_grid, figure_panel, save_png
from mammoseg.preprocessing import load_example
from mammoseg.stages.train import CLASSES, load_examples, read_dataset

log = logging.getLogger(__name__)

TARGETS = (*CLASSES, "all")  # "all": any lesion, both classes merged
METHODS = ("unet", "baseline")


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    """Headline numbers of the evaluation."""

    images: int
    unet_dice_all: float
    baseline_dice_all: float
    metrics_path: Path
    report_dir: Path


def _channels(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Split a (2, H, W) bool mask into the evaluation targets."""
    return {"mass": mask[0], "calcification": mask[1], "all": mask[0] | mask[1]}


def _spacing_mm(row: pd.Series, native_mm: float) -> float:
    """Return the pixel spacing of a preprocessed image: native spacing divided by its resize scale."""
    scale = float(getattr(row, "scale", 1.0) or 1.0)
    return native_mm / scale


def run(config: EvaluateConfig, dataset: Path, model: Path, metrics_out: Path, report_out: Path) -> EvaluateResult:
    """Evaluate the trained model on the test split, next to a threshold baseline tuned on val.

    Args:
        config: evaluation parameters.
        dataset: the preprocessed dataset.
        model: the trained model folder (model.pt, MLflow run id).
        metrics_out: JSON metrics file to write.
        report_out: folder for per_image.csv, summary.md and overlays/.

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

    records, counts, detections = _score_test_split(config, dataset, test_rows, trained, baseline, device)
    metrics = _summarize(config, counts, detections, len(test_rows), trained.threshold, baseline)

    report_out.mkdir(parents=True, exist_ok=True)
    per_image = pd.DataFrame(records)
    write_atomically(report_out / "per_image.csv", lambda tmp: per_image.to_csv(tmp, index=False))
    _worst_overlays(config, dataset, test_rows, per_image, trained, device, report_out / "overlays")
    summary_md = _markdown(metrics, len(test_rows))
    write_atomically(report_out / "summary.md", lambda tmp: tmp.write_text(summary_md))
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(metrics_out, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))

    with tracking.continue_run(run_id) as mlflow_run:
        mlflow_run.log_metrics({
            f"test_{method}_dice_{kind}_{target}": nan_to_zero(metrics[method][f"dice_{kind}"][target]["value"])
            for method in METHODS for kind in ("pooled", "mean_image") for target in TARGETS})
        mlflow_run.log_metrics({
            f"test_unet_{target}_{key}": nan_to_zero(value)
            for target, values in metrics["unet"]["detection"].items() for key, value in values.items()})
        mlflow_run.log_artifact(report_out, "evaluation")
        mlflow_run.log_artifact(metrics_out, "evaluation")
        mlflow_run.set_tags({"test_dice_all": f"{metrics['unet']['dice_pooled']['all']['value']:.4f}"})
    unet_all = metrics["unet"]["dice_pooled"]["all"]["value"]
    baseline_all = metrics["baseline"]["dice_pooled"]["all"]["value"]
    log.info("test Dice (all lesions, pooled): U-Net %.3f vs threshold baseline %.3f on %d images",
             unet_all, baseline_all, len(test_rows))
    return EvaluateResult(len(test_rows), unet_all, baseline_all, metrics_out, report_out)


def _score_test_split(config, dataset, test_rows, trained, baseline, device):
    """Predict every test image; return per-image records, Dice counts and detection counts."""
    counts = {method: {target: [] for target in TARGETS} for method in METHODS}
    detections: dict[str, list] = {"mass": [], "calcification": []}
    records = []
    rows = list(test_rows.itertuples(index=False))
    for start in tqdm(range(0, len(rows), config.batch_size), desc="evaluate", unit="batch", disable=None):
        batch_rows = rows[start:start + config.batch_size]
        examples = [load_example(dataset, pd.Series(row._asdict())) for row in batch_rows]
        images = [np.asarray(image, np.float32) for image, _ in examples]
        probabilities = predict_probabilities(trained.network, images, device, config.batch_size)
        for row, image, (_, mask), probability in zip(batch_rows, images, examples, probabilities, strict=True):
            truth = _channels(np.asarray(mask, bool))
            predictions = {"unet": _channels(probability >= trained.threshold),
                           "baseline": _channels(baseline.predict(image[0]))}
            record: dict[str, Any] = {"image_id": row.image_id}
            for method, predicted in predictions.items():
                for target in TARGETS:
                    c = dice_counts(predicted[target], truth[target])
                    counts[method][target].append(c)
                    record[f"{method}_dice_{target}"] = dice_from_counts(*c)
            radius_px = round(config.cluster_radius_mm / _spacing_mm(row, config.pixel_spacing_mm))
            mass = lesion_detection(predictions["unet"]["mass"], truth["mass"], 0)
            calc = lesion_detection(predictions["unet"]["calcification"], truth["calcification"], radius_px)
            detections["mass"].append(mass)
            detections["calcification"].append(calc)
            record.update({"gt_mass_px": int(truth["mass"].sum()), "gt_calc_px": int(truth["calcification"].sum()),
                           "masses": mass.n_gt, "masses_found": mass.n_found, "mass_fp": mass.n_false_positive,
                           "calc_clusters": calc.n_gt, "calc_clusters_found": calc.n_found,
                           "calc_cluster_fp": calc.n_false_positive})
            records.append(record)
    return records, counts, detections


def _summarize(config, counts, detections, n_images, threshold, baseline) -> dict[str, Any]:
    """Point estimates and bootstrap intervals for both methods, detection for the U-Net."""
    metrics: dict[str, Any] = {"images": n_images, "threshold": threshold,
                               "baseline_thresholds": baseline.to_dict()}
    for method in METHODS:
        block: dict[str, Any] = {}
        for kind, statistic in (("pooled", pooled_dice), ("mean_image", mean_image_dice)):
            block[f"dice_{kind}"] = {}
            for target in TARGETS:
                values = counts[method][target]
                low, high = bootstrap_ci(values, statistic=kind, n_resamples=config.bootstrap_resamples,
                                         seed=config.bootstrap_seed)
                block[f"dice_{kind}"][target] = {"value": float(statistic(values)), "ci95": [low, high]}
        metrics[method] = block
    metrics["unet"]["detection"] = {target: summarize_detection(values) for target, values in detections.items()}
    return metrics


def _worst_overlays(config, dataset, test_rows, per_image, trained, device, out_dir: Path) -> None:
    """Overlay the worst-k test images that have a lesion (lowest all-lesion Dice)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    with_lesion = per_image[~per_image["unet_dice_all"].isna()]
    worst = with_lesion.nsmallest(config.worst_k, "unet_dice_all")
    rows = test_rows.set_index("image_id").loc[worst["image_id"]].reset_index()
    panels = []
    for _, row in rows.iterrows():
        image, mask = load_example(dataset, row)
        image = np.asarray(image, np.float32)
        (probability,) = predict_probabilities(trained.network, [image], device, 1)
        score = float(worst.set_index("image_id").loc[row["image_id"], "unet_dice_all"])
        panels.append(figure_panel(image[0], probability >= trained.threshold, np.asarray(mask, bool),
                                   title=f"{row['image_id']} Dice {score:.2f}"))
    if panels:
        save_png(figure_grid(panels), out_dir / "worst.png")


def _markdown(metrics: dict[str, Any], n_images: int) -> str:
    """A short human summary: the Dice table of both methods and the detection numbers."""
    lines = [f"# Test-split evaluation ({n_images} images)", "",
             f"Decision threshold (chosen on validation): {metrics['threshold']:.2f}", "",
             "| method | target | Dice pooled [95% CI] | Dice mean per image [95% CI] |",
             "|---|---|---|---|"]
    for method in METHODS:
        for target in TARGETS:
            pooled = metrics[method]["dice_pooled"][target]
            mean = metrics[method]["dice_mean_image"][target]
            lines.append(f"| {method} | {target} | {_fmt(pooled)} | {_fmt(mean)} |")
    lines += ["", "Per-image Dice excludes images where neither the ground truth nor the prediction has "
              "the target; pooled Dice sums pixels over all test images.", "",
              "| lesions | sensitivity | false positives per image |", "|---|---|---|"]
    for target, values in metrics["unet"]["detection"].items():
        lines.append(f"| {target} | {values['sensitivity']:.3f} | {values['false_positives_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"
