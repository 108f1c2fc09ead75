"""export -> register -> predict against a real MLflow server with an S3 artifact store (moto_server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pydicom
import pytest
from PIL import Image

from mammoseg import tracking
from mammoseg.errors import UserError
from mammoseg.onnx_runtime import read_io_spec
from mammoseg.stages import export, register
from tests.conftest import REPO_ROOT, stage_config_for

MODEL_NAME = "mammoseg-test"
METRIC = "test_unet_dice_pooled_all"


@pytest.fixture(scope="module")
def exported(trained_model, prepared_data, mlflow_server, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        export.run(stage_config_for("export", latency_repeats=1), trained_model, prepared_data.dataset, out)
    return out


def test_export_passes_checker_parity_and_carries_its_contract(exported, trained_model):
    onnx.checker.check_model(str(exported), full_check=True)
    report = json.loads(export.report_path_for(exported).read_text())
    fp32 = report["variants"]["fp32"]
    assert fp32["passed"] and fp32["max_abs_logit_diff"] <= 1e-3 and fp32["max_image_dice_diff"] <= 1e-3
    assert fp32["provider"] == "CPUExecutionProvider" and fp32["provider_fell_back"] is False
    assert report["variants"]["fp16"] == {"skipped": "no CUDA execution provider here", "passed": False}
    int8 = report["variants"]["int8"]
    assert int8["max_image_dice_diff"] <= 0.01 or not export.variant_path(exported, "int8").exists()
    spec = read_io_spec(exported)
    assert spec["training_run_id"] == tracking.read_run_id(trained_model)
    assert spec["output"]["channels"] == ["mass", "calcification"]
    assert spec["input"]["size_multiple"] == 128 and spec["preprocessing"]["size"] == 128
    assert 0 < spec["threshold"] < 1 and spec["parameters"] == 5_440_907
    assert len(spec["git_commit"]) == 40 and len(spec["dataset_digest"]) == 64


def test_export_gate_refuses_a_mismatch(trained_model, prepared_data, tracking_env, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        export.run(stage_config_for("export", parity_logit_atol=0.0, int8=False, latency_repeats=1),
                   trained_model, prepared_data.dataset, out)
    assert not out.exists()


def _another_run(trained_model: Path, dataset: Path, tmp_path: Path, score: float, tag: str) -> Path:
    """A copy of the model under a new run whose test score the test sets (the gate reads only that)."""
    tags, _ = tracking.run_data(tracking.read_run_id(trained_model))
    model_dir = tmp_path / f"model-{tag}"
    shutil.copytree(trained_model, model_dir)
    with tracking.training_run("mammoseg-test", f"run-{tag}", log_system_metrics=False) as run:
        run.set_tags({k: tags[k] for k in ("dataset_digest", "git_commit", "data_dvc_hash") if k in tags})
        run.log_metrics({METRIC: score})
    tracking.write_run_id(model_dir, run.run_id)
    out = tmp_path / f"onnx-{tag}" / "model.onnx"
    export.run(stage_config_for("export", int8=False, latency_repeats=1), model_dir, dataset, out)
    return out


def test_register_gate_and_idempotency(exported, trained_model, prepared_data, tracking_env, tmp_path):
    config = stage_config_for("register", name=MODEL_NAME)
    client = mlflow.MlflowClient(tracking_env.url)
    first = register.run(config, exported, tmp_path / "decision.json")
    assert (first.version, first.promoted, first.already_registered) == ("1", True, False)
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == "1"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.run_id == tracking.read_run_id(trained_model)
    for key in ("run_id", "data_dvc_hash", "git_commit", "validation_success", "parity", METRIC,
                "promotion_decision", "onnx_sha256"):
        assert key in version.tags, key
    assert json.loads((tmp_path / "decision.json").read_text())["decision"] == "promoted: no champion yet"

    again = register.run(config, exported)
    assert (again.version, again.already_registered) == ("1", True)
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 1

    champion_score = float(version.tags[METRIC])
    better = _another_run(trained_model, prepared_data.dataset, tmp_path, champion_score + 0.1, "better")
    promoted = register.run(config, better)
    assert (promoted.version, promoted.promoted) == ("2", True)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "2"

    worse = _another_run(trained_model, prepared_data.dataset, tmp_path, champion_score - 0.1, "worse")
    kept = register.run(config, worse)
    assert (kept.version, kept.promoted) == ("3", False)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "2"
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == "3"
    assert "kept champion v2" in client.get_model_version(MODEL_NAME, "3").tags["promotion_decision"]
    assert all(v.current_stage in (None, "None") for v in client.search_model_versions(f"name = '{MODEL_NAME}'"))


def _predict(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mammoseg.cli", "--params", str(REPO_ROOT / "params.yaml"),
                           "predict", *args], capture_output=True, text=True, env={**os.environ, **env},
                          check=False, timeout=300)


def test_predict_pulls_the_champion_in_a_fresh_process(prepared_data, tracking_env, tmp_path):
    dicoms = sorted((prepared_data.inbreast / "AllDICOMs").glob("*_R_*.dcm"))[:1] + \
        sorted((prepared_data.inbreast / "AllDICOMs").glob("*_L_*.dcm"))[:1]
    env = {"MLFLOW_TRACKING_URI": tracking_env.url}
    if not any(v for v in mlflow.MlflowClient(tracking_env.url).search_model_versions(f"name = '{MODEL_NAME}'")):
        pytest.skip("needs the registered model of test_register_gate_and_idempotency")
    proc = _predict(["--model", f"models:/{MODEL_NAME}@champion", "--input", *map(str, dicoms),
                     "--out", str(tmp_path / "out")], env)
    assert proc.returncode == 0, proc.stderr
    for dicom in dicoms:
        source = pydicom.dcmread(dicom)
        mask = np.array(Image.open(tmp_path / "out" / f"{dicom.stem}_mask.png"))
        assert mask.shape == (source.Rows, source.Columns)
        assert set(np.unique(mask)) <= {0, 1, 2}
        seg = pydicom.dcmread(tmp_path / "out" / f"{dicom.stem}_seg.dcm")
        assert seg.Modality == "SEG"
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert referenced == source.SOPInstanceUID
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["mass", "calcification"]
        assert (tmp_path / "out" / f"{dicom.stem}_overlay.png").is_file()
        assert json.loads((tmp_path / "out" / f"{dicom.stem}.json").read_text())["provider"] == "CPUExecutionProvider"


def test_predict_user_errors_are_one_line(prepared_data, tracking_env, tmp_path, exported):
    dicom = next((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    ct = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(dicom)
    ds.Modality = "CT"
    ds.save_as(ct)
    env = {"MLFLOW_TRACKING_URI": tracking_env.url}
    cases = [
        (["--model", str(exported), "--input", str(not_dicom)], "not a DICOM file"),
        (["--model", str(exported), "--input", str(ct)], "Modality is CT, not MG"),
        (["--model", f"models:/{MODEL_NAME}@nobody", "--input", str(dicom)], "no such registered model"),
        (["--model", "model.pt", "--input", str(dicom)], "not a models:/NAME@ALIAS"),
    ]
    for args, message in cases:
        proc = _predict([*args, "--out", str(tmp_path / "out")], env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) >= 1 and message in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr
    unreachable = _predict(["--model", f"models:/{MODEL_NAME}@champion", "--input", str(dicom),
                            "--out", str(tmp_path / "out")],
                           {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
    assert unreachable.returncode == 2 and "unreachable" in unreachable.stderr.strip().splitlines()[-1]
    assert "Traceback" not in unreachable.stderr


def test_laterality_falls_back_from_header_to_file_name_to_image(prepared_data, tmp_path):
    from mammoseg.dicom import read_image
    from mammoseg.preprocessing import PreprocessParams
    from mammoseg.stages.predict import laterality

    params = PreprocessParams.from_dict(json.loads((prepared_data.dataset / "dataset.json").read_text()))
    right = next((prepared_data.inbreast / "AllDICOMs").glob("*_R_*.dcm"))
    pixels = read_image(right, apply_voi=False).pixels
    assert laterality(right, "L", pixels, params) == ("L", "header")
    assert laterality(right, None, pixels, params) == ("R", "file name")
    anonymous = tmp_path / "image.dcm"
    shutil.copy(right, anonymous)
    assert laterality(anonymous, None, pixels, params) == ("R", "image")
    assert laterality(anonymous, None, pixels[:, ::-1], params) == ("L", "image")
