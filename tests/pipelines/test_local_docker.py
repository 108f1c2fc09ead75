"""End to end in containers: the offline image build, then the compiled pipeline on kfp.local's DockerRunner.

Starts the Docker engine (scripts/docker_engine.sh: installs docker.io + debootstrap when missing),
builds the image offline on a debootstrapped Debian base (scripts/build_image.sh; an image whose content
hash is already in the engine is reused), pushes a small generated dataset to a DVC remote in the
session's moto S3, and runs `mammoseg-pipeline run --local` against the session's real MLflow server:
the containers share the host network to reach both on 127.0.0.1; the registered version must carry
the lineage the pipeline was compiled with. Skipped, with the reason, only when no engine can be
started here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from mammoseg import tracking
from pipelines.local import image_digest
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

# Test size: 8 patients at 0.1 scale, 128 px, 2 epochs (the generated sizes replace INbreast's two).
OVERRIDES = ["validate.allowed_sizes=[332x256, 408x332]", "validate.min_images=8", "validate.min_patients=3",
             "preprocess.size=128", "train.epochs=2", "train.batch_size=4", "train.num_workers=0",
             "train.warmup_epochs=0", "train.log_system_metrics=false", "train.overlay_every=1",
             "train.overlay_images=2", "evaluate.bootstrap_resamples=200", "export.latency_size=128"]


@pytest.fixture(scope="module")
def docker_engine():
    """A running engine: one already answering, else one started here (and stopped afterwards)."""
    script = str(REPO_ROOT / "scripts" / "docker_engine.sh")
    running = subprocess.run(["bash", script, "status"], capture_output=True, timeout=60, check=False).returncode == 0
    if not running:
        proc = subprocess.run(["bash", script, "start"], capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            pytest.skip(f"no Docker engine can be started here: {lines[-1] if lines else proc.returncode}")
    yield
    if not running:
        # The data root (base image, build cache, images) stays on disk for the next run.
        subprocess.run(["bash", script, "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def image(docker_engine) -> str:
    """The project image, built offline (or found by its content-hash tag)."""
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_image.sh")], capture_output=True, text=True,
                          timeout=1800, check=False, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tag = proc.stdout.strip().splitlines()[-1]
    print(f"\nimage {tag}: build_image.sh took {time.monotonic() - start:.0f} s")
    return tag


@pytest.fixture(scope="module")
def dvc_data(s3_server, tmp_path_factory) -> tuple[str, str]:
    """A generated INbreast folder pushed to a DVC remote in moto S3: (remote URL, directory hash)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="dvc-e2e")
    repo = tmp_path_factory.mktemp("dvc-repo")
    env = {**os.environ, **s3_server.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = [[sys.executable, "-m", "mammoseg.cli", "--params", str(REPO_ROOT / "params.yaml"), "synth",
                 "--out", "inbreast", "--cases", "8", "--scale", "0.1", "--seed", "3"],
                ["dvc", "init", "--no-scm", "-q"], ["dvc", "remote", "add", "-d", "origin", "s3://dvc-e2e/store"],
                ["dvc", "add", "-q", "inbreast"], ["dvc", "push", "-q"]]
    for cmd in commands:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
    return "s3://dvc-e2e/store", yaml.safe_load((repo / "inbreast.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kfp-local")


def _run_pipeline(image: str, dvc_data: tuple[str, str], root: Path, servers_env: dict, *overrides: str):
    env = {**os.environ, **servers_env}
    argv = [sys.executable, "-m", "pipelines", "--params", str(REPO_ROOT / "params.yaml"), "run", "--local",
            "--cache", "--image", image, "--pipeline-root", str(root), "--data-uri", dvc_data[0],
            "--data-hash", dvc_data[1]]
    for override in (*OVERRIDES, *overrides):
        argv += ["--set", override]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200, check=False)
    print(f"\npipeline run took {time.monotonic() - start:.0f} s (exit {proc.returncode})")
    return proc


def test_pipeline_trains_registers_and_the_gate_refuses_a_two_epoch_model(image, dvc_data, pipeline_root,
                                                                          tracking_env, s3_server):
    import mlflow

    name = f"kfp-e2e-{uuid.uuid4().hex[:8]}"
    proc = _run_pipeline(image, dvc_data, pipeline_root, {**s3_server.env, **tracking_env.env},
                         f"register.name={name}")
    assert proc.returncode == 0, (proc.stdout[-6000:], proc.stderr[-3000:])
    decision_path = Path(proc.stdout.strip().splitlines()[-1])
    decision = json.loads(decision_path.read_text())
    # Two epochs of training are useless: registered as @challenger, refused by the gate, task succeeds.
    assert decision["name"] == name and decision["promoted"] is False
    assert decision["decision"].startswith("stays @challenger: fails")

    client = mlflow.MlflowClient(tracking_env.url)
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert challenger.version == decision["version"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, "champion")
    run = client.get_run(challenger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline_run_id"]  # the KFP run id, set by the train component
    assert run.data.params["train.epochs"] == "2" and run.data.params["preprocess.size"] == "128"
    assert run.data.tags["validation_success"] == "true"
    assert "test_unet_dice_native_mean_image_all" in run.data.metrics

    # Lineage: the images hold no checkout and no data.dvc, yet the version carries the same tags as
    # one registered from a checkout, with the values the pipeline was compiled and run with.
    compiled = next(yaml.safe_load_all((pipeline_root / f"{PARAMS['pipeline']['name']}.yaml").read_text()))
    defaults = {k: v.get("defaultValue") for k, v in compiled["root"]["inputDefinitions"]["parameters"].items()}
    commit, dirty = tracking.git_state(REPO_ROOT)
    assert (defaults["git_commit"], defaults["git_dirty"]) == (commit, str(dirty)) and len(commit) == 40
    assert defaults["image_digest"] == defaults["train_image_digest"] == image_digest(image)  # one image locally
    expected = {"git_commit": commit, "git_dirty": str(dirty), "data_dvc_hash": dvc_data[1],
                "image_digest": defaults["train_image_digest"]}
    assert {key: run.data.tags[key] for key in expected} == expected
    assert {key: challenger.tags[key] for key in expected} == expected
    assert {key: challenger.tags[f"register_{key}"] for key in expected} == {**expected,
                                                                            "image_digest": defaults["image_digest"]}

    # The artifacts laid out as the components declare them (files inside artifact folders).
    run_dir = decision_path.parents[2]
    assert (run_dir / "ingest" / "manifest" / "manifest.rejected.csv").is_file()
    assert {"model.onnx", "model.export.json"} <= {p.name for p in (run_dir / "export" / "onnx").iterdir()}
    assert {"model.pt", "checkpoint.pt", "mlflow_run.json"} <= {p.name for p in (run_dir / "train" / "model").iterdir()}


def test_failed_validation_stops_the_pipeline(image, dvc_data, pipeline_root, tracking_env, s3_server):
    # Same data hash and image digest: data and ingest come from kfp.local's cache; validate fails.
    proc = _run_pipeline(image, dvc_data, pipeline_root, {**s3_server.env, **tracking_env.env},
                         "validate.min_images=1000")
    assert proc.returncode == 2, proc.stderr[-3000:]
    logs = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # kfp.local colours task names
    assert "Task 'validate' finished with status FAILURE" in logs
    assert "Task data cache hit" in logs and "Task ingest cache hit" in logs
    runs = sorted(p for p in pipeline_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert (runs[-1] / "validate").is_dir() and not (runs[-1] / "preprocess").exists()
