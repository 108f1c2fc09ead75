"""Evaluate on a trained model: the metrics file, the report, and what lands in the training run."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammoseg.data import read_native_masks
from mammoseg.metrics import dice_counts
from mammoseg.preprocessing import Transform, target_index_on_original_grid, to_original_grid
from mammoseg.stages.evaluate import NativeCounter, score_native
from mammoseg.tracking import read_run_id

TARGETS = ("mass", "calcification", "all")


def test_metrics_report_and_run(trained_model, prepared_data, tracking_env):
    root = trained_model.parent
    metrics = json.loads((root / "metrics.json").read_text())
    index = pd.read_parquet(prepared_data.dataset / "index.parquet")
    test = index[index["split"] == "test"]
    assert metrics["images"] == len(test) and metrics["patients"] == test["patient_id"].nunique()
    for method in ("unet", "baseline", "ceiling"):
        for kind in ("pooled", "mean_image"):
            for target in TARGETS:
                entry = metrics["native"][method][kind][target]
                low, high = entry["ci95"]
                if not math.isnan(entry["value"]):
                    assert 0.0 <= low <= high <= 1.0
    for kind in ("pooled", "mean_image"):
        for target in TARGETS:
            paired = metrics["paired_unet_vs_baseline"][kind][target]
            assert set(paired) == {"difference", "ci95", "a", "b"}
    detection = metrics["detection"]
    assert set(detection) == {"mass", "calcification"}
    assert {"sensitivity", "false_positives_per_image", "froc", "min_iou"} <= set(detection["mass"])
    assert {"sensitivity_at_0.5_fp", "sensitivity_at_1_fp"} <= set(detection["mass"]["froc"])

    per_image = pd.read_csv(root / "evaluation" / "per_image.csv", dtype={"image_id": str, "patient_id": str})
    assert sorted(per_image["image_id"]) == sorted(test["image_id"])
    needed = {"image_id", "patient_id", *(f"{p}_{t}" for p in ("dice_native", "ceiling_native") for t in TARGETS)}
    assert needed <= set(per_image.columns)
    cases = json.loads((root / "evaluation" / "summary.json").read_text())
    assert len(cases["metric_per_case"]) == len(test)
    assert {"Dice", "IoU", "TP", "FP", "FN"} <= set(cases["metric_per_case"][0]["metrics"]["mass"])
    summary = (root / "evaluation" / "summary.md").read_text()
    assert "| unet | all |" in summary and "| baseline | all |" in summary and "| ceiling | all |" in summary
    assert "## How the numbers are made" in summary and "bootstrap over patients" in summary
    assert (root / "evaluation" / "overlays" / "worst.png").is_file()
    assert (root / "evaluation" / "froc.png").read_bytes()[:4] == b"\x89PNG"

    run = mlflow.MlflowClient(tracking_env.url).get_run(read_run_id(trained_model))
    for key in ("test_unet_dice_native_mean_image_all", "test_baseline_dice_native_mean_image_all",
                "test_unet_vs_baseline_native_mean_image_all_ci_low", "test_unet_mass_froc_sensitivity_at_1_fp"):
        assert key in run.data.metrics, key
    artifacts = [a.path for a in mlflow.MlflowClient(tracking_env.url).list_artifacts(run.info.run_id, "evaluation")]
    assert "evaluation/summary.md" in artifacts and "evaluation/metrics.json" in artifacts


def test_ceiling_is_the_round_trip_of_the_ground_truth(trained_model, prepared_data):
    per_image = pd.read_csv(trained_model.parent / "evaluation" / "per_image.csv", dtype={"image_id": str})
    index = pd.read_parquet(prepared_data.dataset / "index.parquet").set_index("image_id")
    for record in per_image.itertuples(index=False):
        row = index.loc[record.image_id]
        truth = read_native_masks(prepared_data.dataset, pd.Series({**row, "image_id": record.image_id}))
        stored = np.array(Image.open(prepared_data.masks / f"{record.image_id}_mass.png")).astype(bool)
        np.testing.assert_array_equal(truth[0], stored)
        from mammoseg.data import load_example

        _, grid = load_example(prepared_data.dataset, pd.Series({**row, "image_id": record.image_id}))
        back = to_original_grid(grid[1].astype(bool), Transform.from_record(row))
        if truth[1].any():
            dice = 2 * (back & truth[1]).sum() / (back.sum() + truth[1].sum())
            assert abs(dice - record.ceiling_native_calcification) < 1e-9


@pytest.mark.parametrize("transform", [
    Transform(300, 220, False, 10, 290, 5, 200, 128, 128, 89),    # downsampled, crop inside the image
    Transform(300, 220, True, 0, 300, 20, 220, 128, 128, 85),     # flipped
    Transform(90, 70, False, 5, 85, 0, 70, 128, 128, 112),        # upsampled: the mapped-back path
    Transform(200, 150, True, 30, 200, 10, 140, 128, 100, 76),    # content smaller than the canvas
])
def test_native_counter_counts_what_predict_delivers(transform):
    """NativeCounter's sums over the network grid equal Dice counts of the mask mapped back by predict's code."""
    rng = np.random.default_rng(0)
    shape = (transform.rows, transform.columns)
    below_top = (np.arange(transform.rows) >= transform.rows // 3)[:, None]  # lesions start below row 0
    truth = {"mass": (rng.random(shape) < 0.2) & below_top, "calcification": rng.random(shape) < 0.01}
    truth["all"] = truth["mass"] | truth["calcification"]
    counter = NativeCounter(transform, truth)
    upsampled = transform.content_rows > transform.crop_shape[0] or transform.content_columns > transform.crop_shape[1]
    assert (target_index_on_original_grid(transform) is None) == upsampled  # the sums, not the fallback, are tested
    for density in (0.0, 0.05, 0.5, 1.0):
        predicted = {target: rng.random((transform.size, transform.size)) < density for target in truth}
        counts = counter.counts(predicted)
        for target, mask in predicted.items():
            assert counts[target] == dice_counts(to_original_grid(mask, transform), truth[target]), (target, density)


def test_score_native_takes_one_threshold_or_one_per_class(prepared_data):
    rows = pd.read_parquet(prepared_data.dataset / "index.parquet").query("split == 'test'").head(2)

    def constant(images: np.ndarray) -> np.ndarray:  # every pixel 0.6 in both classes
        return np.full((len(images), 2, *images.shape[-2:]), 0.6, np.float32)

    one = score_native(prepared_data.dataset, rows, constant, 0.5, batch_size=1)
    per_class = score_native(prepared_data.dataset, rows, constant, np.array([0.5, 0.5]), batch_size=1)
    assert one.counts == per_class.counts and one.counts["mass"][0].pred_sum > 0
    split = score_native(prepared_data.dataset, rows, constant, np.array([0.5, 0.7]), batch_size=1)
    assert split.counts["mass"] == one.counts["mass"]
    assert all(c.pred_sum == 0 for c in split.counts["calcification"])
