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

from components import STAGE_COMPONENTS, data
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
    assert data.component_spec.implementation.container.image == IMAGE
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
