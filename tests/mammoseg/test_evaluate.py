"""Evaluate on a trained model: the metrics file, the report, and what lands in the training run."""

from __future__ import annotations

import json
import math

import mlflow
import pandas as pd

from mammoseg.tracking import read_run_id


def test_metrics_report_and_run(trained_model, prepared_data, mlflow_server):
    root = trained_model.parent
    metrics = json.loads((root / "metrics.json").read_text())
    index = pd.read_parquet(prepared_data.dataset / "index.parquet")
    assert metrics["images"] == int((index["split"] == "test").sum())
    for method in ("unet", "baseline"):
        for kind in ("dice_pooled", "dice_mean_image"):
            for target in ("mass", "calcification", "all"):
                entry = metrics[method][kind][target]
                low, high = entry["ci95"]
                if not math.isnan(entry["value"]):
                    assert 0.0 <= low <= high <= 1.0
    detection = metrics["unet"]["detection"]
    assert set(detection) == {"mass", "calcification"}
    assert {"sensitivity", "false_positives_per_image"} <= set(detection["mass"])

    per_image = pd.read_csv(root / "evaluation" / "per_image.csv", dtype={"image_id": str})
    assert sorted(per_image["image_id"]) == sorted(index.loc[index["split"] == "test", "image_id"])
    assert {"unet_dice_all", "baseline_dice_all", "masses", "calc_clusters_found"} <= set(per_image.columns)
    summary = (root / "evaluation" / "summary.md").read_text()
    assert "| unet | all |" in summary and "| baseline | all |" in summary
    assert (root / "evaluation" / "overlays" / "worst.png").is_file()

    run = mlflow.MlflowClient(mlflow_server.url).get_run(read_run_id(trained_model))
    assert "test_unet_dice_pooled_all" in run.data.metrics
    assert "test_baseline_dice_pooled_all" in run.data.metrics
    artifacts = [a.path for a in mlflow.MlflowClient(mlflow_server.url).list_artifacts(run.info.run_id, "evaluation")]
    assert "evaluation/summary.md" in artifacts and "evaluation/metrics.json" in artifacts
