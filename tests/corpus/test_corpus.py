"""The bad-input corpus through the real command line: one clear line, no traceback, nothing lost.

Data cases (tests/corpus/cases.py) break one file of a good generated INbreast folder and run
ingest -> validate -> preprocess into folders pre-filled with good output. Model cases break what
train, predict and register receive. The last test prints the totals table and fails unless
tracebacks, silent successes, unclear messages and data lost are all zero.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pydicom
import pytest

from tests.conftest import free_port
from tests.corpus.cases import (
    CASES,
    INGEST_FLAGS,
    PREPROCESS_FLAGS,
    VALIDATE_FLAGS,
    Layout,
    Outcome,
    Step,
    run_case,
    run_cli,
    run_steps,
    totals,
)

pytestmark = pytest.mark.slow
OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="module")
def good_layout(tmp_path_factory) -> Layout:
    """The issue's corpus base (`--cases 6 --seed 3 --scale 0.1`) with every stage's good output."""
    layout = Layout(tmp_path_factory.mktemp("corpus-base"))
    for argv in (["synth", "--out", str(layout.inbreast), "--cases", "6", "--seed", "3", "--scale", "0.1"],
                 ["ingest", "--inbreast", str(layout.inbreast), "--manifest-out", str(layout.manifest),
                  "--masks-out", str(layout.masks), *INGEST_FLAGS],
                 ["validate", *layout.manifest_args(), "--report-out", str(layout.report),
                  *VALIDATE_FLAGS],
                 ["preprocess", *layout.manifest_args(), "--masks", str(layout.masks),
                  "--dataset-out", str(layout.dataset), *PREPROCESS_FLAGS]):
        result = run_cli(argv, {})
        assert result.returncode == 0, result.stderr
    return layout


def _copy_layout(good: Layout, root: Path) -> Layout:
    shutil.copytree(good.root, root)
    return Layout(root)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_data_case(case, good_layout, tmp_path):
    outcome = run_case(case, _copy_layout(good_layout, tmp_path / "case"), {})
    OUTCOMES.append(outcome)
    assert outcome.stage is not None, f"{case.name}: silently accepted by every stage"
    assert not outcome.traceback, outcome.message
    assert outcome.clear, f"{case.name} stopped at {outcome.stage} without a clear line: {outcome.message}"
    assert not outcome.data_lost, f"{case.name}: {outcome.stage} changed its pre-filled good output"


def test_outputs_keep_the_usual_permissions(good_layout, tmp_path):
    """Staged outputs are renamed into place: they must not keep mkdtemp's 0700."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for folder in (good_layout.masks, good_layout.report, good_layout.dataset):
        assert folder.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, folder


# --- model cases: train, predict, register --------------------------------------------------------------

def _mg_dicom(layout: Layout) -> Path:
    return layout.dicoms()[0]


def _filled(folder: Path, text: str = "good output of an earlier run\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "earlier.txt").write_text(text)
    return folder


def test_train_without_its_validation_report_keeps_the_model(trained_model, prepared_data, tracking_env, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model, model_dir)
    report = tmp_path / "no-such-report"
    step = Step("train", ["train", "--dataset", str(prepared_data.dataset), "--model-out", str(model_dir),
                          "--metrics-out", str(tmp_path / "train.json"), "--epochs", "1", "--lr", "0.001",
                          "--validation-report", str(report)], [model_dir])
    _record(run_steps("train_missing_validation_report", [step], str(report), r"not found", {}))


def test_retrain_with_the_tracking_server_unreachable_keeps_the_model(trained_model, prepared_data, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model, model_dir)
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    step = Step("train", ["train", "--dataset", str(prepared_data.dataset), "--model-out", str(model_dir),
                          "--metrics-out", str(tmp_path / "train.json"), "--epochs", "1", "--lr", "0.001"],
                [model_dir], env={"MLFLOW_TRACKING_URI": server})
    _record(run_steps("train_tracking_unreachable", [step], "127.0.0.1", r"unreachable", {}))


def test_train_batch_of_one(trained_model, prepared_data, tracking_env, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model, model_dir)
    step = Step("train", ["train", "--dataset", str(prepared_data.dataset), "--model-out", str(model_dir),
                          "--metrics-out", str(tmp_path / "train.json"), "--batch-size", "1", "--epochs", "1"],
                [model_dir])
    _record(run_steps("train_batch_size_1", [step], "batch_size 1", r"batchnorm|--batch-size 2", {}))


def test_predict_garbage_onnx(good_layout, tmp_path):
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x00garbage, not a protobuf" * 10)
    out = _filled(tmp_path / "predictions")
    step = Step("predict", ["predict", "--model", str(garbage), "--input", str(_mg_dicom(good_layout)),
                            "--out", str(out)], [out])
    _record(run_steps("predict_garbage_onnx", [step], str(garbage), r"onnx|model", {}))


def test_register_garbage_onnx(prepared_data, tracking_env, tmp_path):
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x00garbage, not a protobuf" * 10)
    decision = tmp_path / "registration.json"
    decision.write_text('{"earlier": "decision"}\n')
    step = Step("register", ["register", "--onnx", str(garbage), "--dataset", str(prepared_data.dataset),
                             "--decision-out", str(decision), "--name", "mammoseg-corpus"], [decision])
    _record(run_steps("register_garbage_onnx", [step], str(garbage), r"onnx|model", {}))


def test_predict_on_a_ct(exported, good_layout, tmp_path):
    ct = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(_mg_dicom(good_layout))
    ds.Modality = "CT"
    ds.save_as(ct, enforce_file_format=True)
    out = _filled(tmp_path / "predictions")
    step = Step("predict", ["predict", "--model", str(exported), "--input", str(ct), "--out", str(out)], [out])
    _record(run_steps("predict_on_ct", [step], str(ct), r"modality", {}))


def test_predict_with_the_registry_unreachable(good_layout, tmp_path):
    out = _filled(tmp_path / "predictions")
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    step = Step("predict", ["predict", "--model", "models:/mammoseg-lightunet@champion", "--input",
                            str(_mg_dicom(good_layout)), "--out", str(out)], [out],
                env={"MLFLOW_TRACKING_URI": server})
    _record(run_steps("predict_registry_unreachable", [step], "127.0.0.1", r"unreachable", {}))


def test_register_twice_is_one_version(exported, prepared_data, tracking_env, tmp_path):
    name = "mammoseg-corpus-twice"
    steps = [Step("register", ["register", "--onnx", str(exported), "--dataset", str(prepared_data.dataset),
                               "--decision-out", str(tmp_path / f"decision{i}.json"), "--name", name,
                               "--bootstrap-resamples", "50"], [tmp_path / f"decision{i}.json"])
             for i in (1, 2)]
    outcome = run_steps("register_twice", steps, name, r".", {}, expect_success=True)
    versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    second = json.loads((tmp_path / "decision2.json").read_text())
    assert len(versions) == 1 and second["version"] == "1", (versions, second)
    _record(outcome)


def _record(outcome: Outcome) -> None:
    OUTCOMES.append(outcome)
    assert not outcome.traceback, outcome.message
    assert outcome.clear, f"{outcome.case}: {outcome.message}"
    assert not outcome.data_lost, f"{outcome.case}: {outcome.stage} changed its pre-filled good output"


def test_totals():
    """Runs last in this module: the table quoted in the notes; every bad count must be zero."""
    table = totals(OUTCOMES)
    print("\nbad-input corpus\n" + table)  # noqa: T201 - the table is this test's report
    for outcome in OUTCOMES:
        print(f"  {outcome.case:<34} {outcome.stage or '-':<10} exit {outcome.exit_code}  {outcome.message[:110]}")  # noqa: T201
    counts = dict(line.rsplit(None, 1) for line in table.splitlines())
    if os.environ.get("PYTEST_XDIST_WORKER") is None and len(OUTCOMES) < len(CASES):
        pytest.skip("only part of the corpus ran")
    assert all(counts[key] == "0" for key in ("tracebacks", "silent successes", "unclear messages", "data lost"))
