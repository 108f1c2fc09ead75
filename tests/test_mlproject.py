"""`mlflow run` drives a stage through MLproject, in the project's own environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import REPO_ROOT


def test_every_pipeline_stage_has_an_entry_point_calling_its_subcommand():
    from mammoseg.cli import PIPELINE_STAGES

    entry_points = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"]
    assert set(entry_points) == {"main", *PIPELINE_STAGES}
    for stage in PIPELINE_STAGES:
        assert entry_points[stage]["command"].startswith(f"mammoseg {stage} "), stage
    assert entry_points["main"]["command"] == "dvc repro"


@pytest.mark.slow
def test_mlflow_run_trains_with_overrides(prepared_data, tracking_env, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    model_out = tmp_path / "model"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO_ROOT), "-e", "train", "--env-manager",
         "local", "--experiment-name", "mlproject-test",
         "-P", f"dataset={prepared_data.dataset}", "-P", f"model_out={model_out}",
         "-P", f"metrics_out={tmp_path / 'train.json'}", "-P", f"validation_report={prepared_data.dataset}",
         "-P", "epochs=1", "-P", "batch_size=4", "-P", "num_workers=0", "-P", "overlay_every=0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((model_out / "mlflow_run.json").read_text())["run_id"]
    run = mlflow.MlflowClient(tracking_env.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    # The project run is the training run: MLflow's own tags and ours on one run.
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.data.params["train.epochs"] == "1" and run.data.params["train.batch_size"] == "4"
    assert (model_out / "model.pt").is_file()
