"""The tracking module against real servers (basic-auth, unreachable servers, interrupted registration) and lineage."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import pytest

from mammoseg import tracking
from mammoseg.errors import UserError
from mammoseg.stages import register, train
from tests.conftest import (
    AUTH_ADMIN,
    CHECKOUT_DATA_HASH,
    FAST_EXPORT,
    REPO_ROOT,
    TINY_TRAIN,
    run_git,
    stage_config_for,
)


def test_basic_auth_needs_credentials_and_never_records_them(team_stack, prepared_data, tmp_path,
                                                             monkeypatch, caplog):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{team_stack.url}/api/2.0/mlflow/experiments/search?max_results=1")
    assert refused.value.code == 401

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_stack.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", AUTH_ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AUTH_ADMIN[1])
    with caplog.at_level(logging.DEBUG):
        result = train.run(stage_config_for("train", **{**TINY_TRAIN, "epochs": 1}), prepared_data.dataset,
                           tmp_path / "model", tmp_path / "train.json")
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    recorded = json.dumps([run.data.params, run.data.tags]) + caplog.text
    recorded += (tmp_path / "model" / "mlflow_run.json").read_text() + (tmp_path / "train.json").read_text()
    assert AUTH_ADMIN[1] not in recorded

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(UserError, match="refused the credentials"):
        tracking.run_data(result.run_id)


def test_unreachable_server_is_one_line_after_bounded_retries(prepared_data, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mammoseg.cli", "--params", str(REPO_ROOT / "params.yaml"), "train",
         "--dataset", str(prepared_data.dataset), "--model-out", str(tmp_path / "model"),
         "--metrics-out", str(tmp_path / "m.json"), "--epochs", "1", "--num-workers", "0"],
        capture_output=True, text=True, env=env, check=False, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mammoseg: error: MLflow tracking server http://127.0.0.1:9 unreachable")
    assert "Traceback" not in proc.stderr


def test_redacts_credentials_in_uris():
    assert tracking._redact("http://user:pw@host:5000") == "http://***@host:5000"


class _InterruptedError(Exception):
    pass


@pytest.mark.slow
def test_interrupted_registration_converges(trained_model, prepared_data, tracking_env, tmp_path, monkeypatch):
    from mammoseg.stages import export

    onnx_path = tmp_path / "onnx" / "model.onnx"
    export.run(stage_config_for("export", **FAST_EXPORT), trained_model, prepared_data.dataset,
               onnx_path)
    config = stage_config_for("register", name="mammoseg-interrupted")
    client = mlflow.MlflowClient()

    def upload_then_die(*args, **kwargs):
        raise _InterruptedError("connection lost after the upload")

    with monkeypatch.context() as patch:  # dies between the upload and the version
        patch.setattr(tracking, "create_version", upload_then_die)
        with pytest.raises(_InterruptedError):
            register.run(config, onnx_path, prepared_data.dataset)
    assert client.search_model_versions("name = 'mammoseg-interrupted'") == []

    real_set_alias = tracking.set_alias
    with monkeypatch.context() as patch:  # dies after the version, before aliases and the gate
        patch.setattr(tracking, "set_alias", upload_then_die)
        with pytest.raises(_InterruptedError):
            register.run(config, onnx_path, prepared_data.dataset)
    assert tracking.set_alias is real_set_alias
    (half,) = client.search_model_versions("name = 'mammoseg-interrupted'")
    assert "promotion_decision" not in half.tags

    done = register.run(config, onnx_path, prepared_data.dataset)
    # The session's 2-epoch model: the resumed gate decides (and refuses it), exactly once.
    assert (done.version, done.promoted) == (half.version, False)
    assert len(client.search_model_versions("name = 'mammoseg-interrupted'")) == 1
    assert client.get_model_version_by_alias("mammoseg-interrupted", "challenger").version == half.version
    assert "promotion_decision" in client.get_model_version("mammoseg-interrupted", half.version).tags


def test_lineage_falls_back_to_the_checkout(git_checkout, tmp_path):
    head = run_git(git_checkout, "rev-parse", "HEAD")
    assert tracking.lineage(git_checkout) == tracking.Lineage(head, "False", CHECKOUT_DATA_HASH, "none")
    (git_checkout / "code.py").write_text("x = 2\n")
    assert tracking.lineage(git_checkout).git_dirty == "True"
    outside = tmp_path / "no-checkout"
    outside.mkdir()
    assert tracking.lineage(outside) == tracking.Lineage("unknown", "unknown", "untracked", "none")


def test_given_lineage_wins_over_the_checkout_and_only_inside_its_block(git_checkout):
    head = run_git(git_checkout, "rev-parse", "HEAD")
    commit, data_hash, digest = "a" * 40, "b" * 32 + ".dir", "sha256:" + "c" * 64
    with tracking.given_lineage(git_commit=commit, git_dirty="true", data_dvc_hash=data_hash, image_digest=digest):
        assert tracking.lineage(git_checkout) == tracking.Lineage(commit, "True", data_hash, digest)
    assert tracking.lineage(git_checkout).git_commit == head
    # A given commit takes no dirty state from a checkout of another commit; "" is what nobody knows.
    with tracking.given_lineage(git_commit=commit):
        assert tracking.lineage(git_checkout) == tracking.Lineage(commit, "unknown", CHECKOUT_DATA_HASH, "none")
    with tracking.given_lineage(git_commit="", git_dirty="", data_dvc_hash="", image_digest=""):
        assert tracking.lineage(git_checkout) == tracking.Lineage("unknown", "unknown", "untracked", "unknown")
    with tracking.given_lineage(image_digest=digest):
        assert tracking.lineage(git_checkout) == tracking.Lineage(head, "False", CHECKOUT_DATA_HASH, digest)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--git-commit", "abc123", "--git-commit 'abc123': expected a full git commit (40 or 64 hex digits)"),
    ("--git-dirty", "yes", "--git-dirty 'yes': expected true or false"),
    ("--data-dvc-hash", "d41d8cd9", "--data-dvc-hash 'd41d8cd9': expected a DVC md5"),
    ("--image-digest", "mammoseg:cpu", "--image-digest 'mammoseg:cpu': expected sha256:<64 hex digits>"),
])
def test_a_bad_lineage_flag_is_a_one_line_error(flag, value, message, tmp_path, capsys):
    from mammoseg.cli import main

    code = main(["--params", str(REPO_ROOT / "params.yaml"), "register", "--onnx", str(tmp_path / "m.onnx"),
                 "--dataset", str(tmp_path), flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"mammoseg: error: {message}") and len(err.splitlines()) == 1, err


def test_git_state_counts_code_changes_not_the_files_dvc_writes(tmp_path):
    repo = tmp_path / "clone"
    repo.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", "metrics/train.json", "metrics/evaluate.json",
                 "metrics/registration.json", "mammoseg/stages/train.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes((REPO_ROOT / name).read_bytes())
    run_git(repo, "init", "-q")
    run_git(repo, "add", ".")
    run_git(repo, "commit", "-q", "-m", "main")
    head = run_git(repo, "rev-parse", "HEAD")
    assert tracking.git_state(repo) == (head, False)

    # What `dvc repro` writes on a clean clone: the lock and the declared metrics (one staged, too).
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    for name in ("train", "evaluate", "registration"):
        (repo / "metrics" / f"{name}.json").write_text('{"rewritten": true}\n')
    run_git(repo, "add", "metrics/train.json")
    (repo / "notes.txt").write_text("untracked files are not the commit's code either\n")
    assert tracking.git_state(repo) == (head, False)
    assert tracking.git_state(repo / "metrics") == (head, False)  # from a subfolder, paths are the root's

    for changed in ("params.yaml", "mammoseg/stages/train.py"):
        original = (repo / changed).read_text()
        (repo / changed).write_text(original + "\n# an edit\n")
        assert tracking.git_state(repo) == (head, True), changed
        (repo / changed).write_text(original)
    run_git(repo, "mv", "params.yaml", "params-renamed.yaml")
    assert tracking.git_state(repo) == (head, True)
    assert tracking.git_state(tmp_path) == ("unknown", False)
