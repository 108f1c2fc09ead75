"""The components' own shell: the stage prologue (params block -> file -> mammoseg) and the DVC fetch.

Both run here on the host, with the same `sh` and the venv's mammoseg and dvc that the image has, so
their behaviour is checked without Docker (the end-to-end test runs them in the image).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import STAGE_COMPONENTS, check_checkpoint_volume, data, remove_run_checkpoints
from components.checkpoints import CHECK_WRITABLE, REMOVE_RUN_FOLDER
from components.common import IMAGE, RUN_STAGE, STAGE_COMMAND, TRAIN_IMAGE
from components.data import FETCH
from tests.conftest import REPO_ROOT, InbreastFolder

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_every_stage_component_runs_its_stage_in_the_image():
    for stage, component in STAGE_COMPONENTS.items():
        container = component.component_spec.implementation.container
        # train, the one task with a GPU, in the CUDA image; every other task in the CPU image.
        assert container.image == (TRAIN_IMAGE if stage == "train" else IMAGE)
        assert container.command == STAGE_COMMAND
        assert container.args[1] == stage
        assert "image_digest" in component.component_spec.inputs
    for component in (data, check_checkpoint_volume, remove_run_checkpoints):
        assert component.component_spec.implementation.container.image == IMAGE
    assert (IMAGE, TRAIN_IMAGE) == ("mammoseg:cpu", "mammoseg:cuda")  # scripts/build_image.sh --variant cpu|cuda
    assert 'tag "mammoseg:$variant"' in (REPO_ROOT / "scripts" / "build_image.sh").read_text()


def _stage(block: dict, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the components' prologue as KFP would: sh -c RUN_STAGE name <block as one-line JSON> argv..."""
    return subprocess.run([*STAGE_COMMAND, json.dumps(block), *argv], capture_output=True, text=True, env=ENV,
                          cwd=cwd, check=False, timeout=300)


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> Path:
    """Three hand-made images through ingest, run by the prologue with the block's nested mapping."""
    root = tmp_path_factory.mktemp("prologue")
    folder = InbreastFolder(root / "inbreast")
    folder.add("20586908", "6c613a14b80a8591", "R", "CC", rois=[("Mass", 15, [(10, 10), (19, 10), (19, 19)])])
    folder.add("20586960", "6c613a14b80a8591", "R", "MLO")
    folder.add("22678646", "069212ec65a94339", "L", "CC")
    folder.write_csv()
    block = {"ingest": dict(PARAMS["ingest"], workers=1)}
    proc = _stage(block, "ingest", "--inbreast", str(folder.root), "--manifest-out",
                  str(root / "m" / "manifest.parquet"), "--masks-out", str(root / "masks"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "m" / "manifest.parquet"


def test_prologue_gives_mammoseg_the_block_as_its_params(tiny_manifest):
    assert len(pd.read_parquet(tiny_manifest)) == 3
    assert "mammoseg" in RUN_STAGE and '"$@"' in RUN_STAGE


@pytest.mark.slow
def test_prologue_keeps_the_stage_exit_code(tiny_manifest, tmp_path):
    # A failed data contract is exit 1 (the task fails and the pipeline stops); a user error exit 2.
    block = {"validate": dict(PARAMS["validate"], workers=1, allowed_sizes=["64x48"], min_images=1000)}
    inbreast = tiny_manifest.parents[1] / "inbreast"  # the folder the fixture ingested
    proc = _stage(block, "validate", "--inbreast", str(inbreast), "--manifest", str(tiny_manifest), "--report-out",
                  str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (tmp_path / "r" / "summary.json").is_file()
    proc = _stage({"validate": {"workers": 1}}, "validate", "--inbreast", str(inbreast), "--manifest",
                  str(tiny_manifest), "--report-out", str(tmp_path / "r2"), cwd=tmp_path)
    assert proc.returncode == 2 and "missing key(s) in 'validate'" in proc.stderr


@pytest.fixture
def dvc_remote(s3_server, tmp_path) -> tuple[str, str, Path]:
    """A small folder pushed to a DVC remote in the session's moto S3: (remote URL, directory hash, folder)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="dvc-components")
    repo = tmp_path / "repo"
    (repo / "inbreast" / "AllDICOMs").mkdir(parents=True)
    (repo / "inbreast" / "INbreast.csv").write_text("a;b\r\n")
    (repo / "inbreast" / "AllDICOMs" / "1.dcm").write_bytes(bytes(range(256)))
    env = {**ENV, **s3_server.env}
    for cmd in (["dvc", "init", "--no-scm", "-q"], ["dvc", "remote", "add", "-d", "origin", "s3://dvc-components/s"],
                ["dvc", "add", "-q", "inbreast"], ["dvc", "push", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    digest = yaml.safe_load((repo / "inbreast.dvc").read_text())["outs"][0]["md5"]
    return "s3://dvc-components/s", digest, repo / "inbreast"


def _fetch(uri: str, digest: str, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", FETCH, "data", uri, digest, str(out)], capture_output=True, text=True,
                          env={**ENV, **env}, check=False, timeout=120)


@pytest.mark.slow
def test_data_fetches_the_folder_by_its_hash(dvc_remote, s3_server, tmp_path):
    uri, digest, folder = dvc_remote
    out = tmp_path / "task" / "inbreast"
    proc = _fetch(uri, digest, out, s3_server.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["AllDICOMs", "AllDICOMs/1.dcm",
                                                                            "INbreast.csv"]
    assert (out / "AllDICOMs" / "1.dcm").read_bytes() == (folder / "AllDICOMs" / "1.dcm").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["inbreast"]  # the scratch repository is gone

    proc = _fetch(uri, digest.removesuffix(".dir"), tmp_path / "x", s3_server.env)
    assert proc.returncode == 2 and "not a DVC directory hash" in proc.stderr
    proc = _fetch(uri, "0" * 32 + ".dir", tmp_path / "y" / "inbreast", s3_server.env)
    assert proc.returncode == 1 and "cannot fetch" in proc.stderr
    assert not (tmp_path / "y" / "inbreast").exists()


def _checkpoints(script: str, folder: str, run_id: str) -> subprocess.CompletedProcess:
    """Run a checkpoint task's script as KFP would: sh -c SCRIPT checkpoints <checkpoint_dir> <run id>."""
    return subprocess.run(["sh", "-c", script, "checkpoints", folder, run_id], capture_output=True, text=True,
                          env=ENV, check=False, timeout=60)


def test_the_removal_deletes_only_that_runs_checkpoint_folder(tmp_path):
    volume = tmp_path / "checkpoints"
    for run in ("run-a", "run-b"):
        (volume / run).mkdir(parents=True)
        (volume / run / "checkpoint.pt").write_bytes(b"state")
        (volume / run / "model.pt").write_bytes(b"best")
    (volume / "unrelated.txt").write_text("kept")
    proc = _checkpoints(REMOVE_RUN_FOLDER, str(volume), "run-a")
    assert proc.returncode == 0 and proc.stdout.strip() == f"checkpoints: removed {volume}/run-a", proc.stderr
    assert sorted(p.relative_to(volume).as_posix() for p in volume.rglob("*")) == [
        "run-b", "run-b/checkpoint.pt", "run-b/model.pt", "unrelated.txt"]
    # A run whose train was served from KFP's cache wrote no folder: nothing to remove, no error.
    assert _checkpoints(REMOVE_RUN_FOLDER, str(volume), "run-c").returncode == 0
    # No volume (kfp.local, pipeline.checkpoint_pvc ""): nothing happens.
    proc = _checkpoints(REMOVE_RUN_FOLDER, "", "run-b")
    assert proc.returncode == 0 and "nothing to remove" in proc.stdout
    # A run id that is not one folder name never widens what is removed.
    for bad in ("", ".", "..", "run-b/..", "../checkpoints"):
        proc = _checkpoints(REMOVE_RUN_FOLDER, str(volume), bad)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "is not a pipeline run id" in proc.stderr
    assert (volume / "run-b" / "checkpoint.pt").is_file() and (volume / "unrelated.txt").is_file()


def test_the_volume_check_fails_in_one_line_where_the_images_user_cannot_write(tmp_path):
    volume = tmp_path / "checkpoints"
    volume.mkdir()
    proc = _checkpoints(CHECK_WRITABLE, str(volume), "run-a")
    assert proc.returncode == 0 and "is writable by uid" in proc.stdout, proc.stderr
    assert list(volume.iterdir()) == []  # the probe file is gone
    # A folder nobody can create a file in (here: one that does not exist; as root every mode is writable).
    proc = _checkpoints(CHECK_WRITABLE, str(tmp_path / "not-mounted"), "run-a")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"checkpoints: {tmp_path}/not-mounted is not writable by uid {os.getuid()} gid {os.getgid()}; make the "
        "checkpoint PVC writable for that group (README: The checkpoint volume)"]
    assert _checkpoints(CHECK_WRITABLE, "", "run-a").returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_a_gpu_fails_at_once_in_one_line(prepared_data, tmp_path):
    """What the pipeline's train (`--device cuda`) does in a pod without a usable GPU."""
    proc = _stage({"train": PARAMS["train"]}, "train", "--dataset", str(prepared_data.dataset), "--model-out",
                  str(tmp_path / "model"), "--metrics-out", str(tmp_path / "m" / "train_metrics.json"),
                  "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "mammoseg: error: device 'cuda' requested but no CUDA device is available"]
    assert not (tmp_path / "m" / "train_metrics.json").exists()
