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
from mammoseg.variants import report_path_for
from tests.conftest import FAST_EXPORT, REPO_ROOT, TINY_TRAIN, stage_config_for

MODEL_NAME = "mammoseg-test"
METRIC = "test_unet_dice_native_mean_image_all"


def test_export_passes_checker_parity_and_carries_its_contract(exported, trained_model):
    onnx.checker.check_model(str(exported), full_check=True)
    report = json.loads(report_path_for(exported).read_text())
    fp32 = report["variants"]["fp32"]
    assert fp32["passed"] and fp32["max_abs_logit_diff"] <= 1e-3 and fp32["max_image_dice_diff"] <= 1e-3
    assert fp32["provider"] == "CPUExecutionProvider" and fp32["provider_fell_back"] is False
    assert report["variants"]["fp16"] == {"engine": "onnxruntime", "precision": "fp16", "file": "model.fp16.onnx",
                                          "skipped": "no CUDA execution provider here", "passed": False}
    int8 = report["variants"]["int8"]
    assert int8["passed"] == (int8["max_native_dice_diff"] <= 0.01)
    spec = read_io_spec(exported)
    assert spec["training_run_id"] == tracking.read_run_id(trained_model)
    assert spec["output"]["channels"] == ["mass", "calcification"]
    assert spec["input"]["size_multiple"] == 128 and spec["preprocessing"]["size"] == 128
    assert len(spec["threshold"]) == 2 and all(0 < t < 1 for t in spec["threshold"])
    assert spec["parameters"] == 5_440_932  # the paper's 5,440,907 + 25 for the block-maximum input channel
    assert spec["input"]["shape"][1] == 2 and spec["architecture"]["in_channels"] == 2
    assert len(spec["git_commit"]) == 40 and len(spec["dataset_digest"]) == 64


def test_export_gate_refuses_a_mismatch(trained_model, prepared_data, tracking_env, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        export.run(stage_config_for("export", **FAST_EXPORT, parity_logit_atol=0.0),
                   trained_model, prepared_data.dataset, out)
    assert not out.exists()


PASSING = {"test_unet_vs_baseline_native_mean_image_all_difference": 0.3,
           "test_unet_vs_baseline_native_mean_image_all_ci_low": 0.1,
           "test_unet_vs_baseline_native_mean_image_all_ci_high": 0.5,
           "test_unet_dice_native_mean_image_mass": 0.5, "test_unet_dice_native_mean_image_calcification": 0.3,
           "test_unet_dice_native_mean_image_all": 0.4}


def _variant_model(trained_model: Path, dataset: Path, tmp_path: Path, tag: str, head_bias: float) -> Path:
    """Export a copy of the trained model whose output is constant (bias +-20: everything or nothing),
    under a new run whose test metrics pass condition (a) of the gate; condition (b) then depends only
    on re-scoring the ONNX models, which these constant models make predictable."""
    import torch

    from mammoseg.inference import MODEL_FILE

    tags, _ = tracking.run_data(tracking.read_run_id(trained_model))
    model_dir = tmp_path / f"model-{tag}"
    shutil.copytree(trained_model, model_dir)
    payload = torch.load(model_dir / MODEL_FILE, weights_only=True)
    payload["state_dict"]["head.weight"].zero_()
    payload["state_dict"]["head.bias"].fill_(head_bias)
    torch.save(payload, model_dir / MODEL_FILE)
    with tracking.training_run("mammoseg-test", f"run-{tag}", log_system_metrics=False) as run:
        run.set_tags({k: tags[k] for k in ("dataset_digest", "git_commit", "data_dvc_hash") if k in tags})
        run.log_metrics(PASSING)
    tracking.write_run_id(model_dir, run.run_id)
    out = tmp_path / f"onnx-{tag}" / "model.onnx"
    export.run(stage_config_for("export", **FAST_EXPORT), model_dir, dataset, out)
    return out


def test_a_useless_model_is_registered_but_never_champion(exported, prepared_data, tracking_env, tmp_path, caplog):
    # The session's model trained for 2 epochs: evaluate's real metrics, the real gate.
    config = stage_config_for("register", name=f"{MODEL_NAME}-useless")
    result = register.run(config, exported, prepared_data.dataset, tmp_path / "decision.json")
    client = mlflow.MlflowClient(tracking_env.url)
    assert (result.version, result.promoted) == ("1", False)
    assert client.get_model_version_by_alias(config.name, "challenger").version == "1"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(config.name, "champion")
    assert result.decision.startswith("stays @challenger: fails ")
    assert "U-Net minus baseline" in result.decision or "native Dice" in result.decision
    assert any(result.decision in record.getMessage() for record in caplog.records)
    version = client.get_model_version(config.name, "1")
    assert "| gate condition |" in version.description and "FAIL" in version.description
    assert version.tags["promoted"] == "false" and any(k.startswith("gate_") for k in version.tags)
    decision = json.loads((tmp_path / "decision.json").read_text())
    assert decision["promoted"] is False and any(not check["passed"] for check in decision["gate"])
    _assert_model_cards(client, config.name, version, read_io_spec(exported)["training_run_id"], result)


def _assert_model_cards(client, name, version, run_id, result):
    """The registered model's card, the version's, the run's note and the logged model's metrics."""
    run = client.get_run(run_id)
    metrics = run.data.metrics
    card = client.get_registered_model(name).description
    for phrase in ("Masses and calcifications", "full-field digital mammograms", "research only",
                   "not a medical device", "INbreast", "Moreira", "Academic Radiology 19(2):236-248, 2012",
                   "quote no licence terms", "(N, 2, 128, 128)", "block mean and block maximum",
                   "multiples of 128"):
        assert phrase in card, phrase
    # The version's card: test metrics with their intervals (the run's own numbers), the gate, lineage.
    all_lesions = (f"{metrics[METRIC]:.3f} [{metrics[METRIC + '_ci_low']:.3f}, "
                   f"{metrics[METRIC + '_ci_high']:.3f}]")
    paired = "test_unet_vs_baseline_native_mean_image_all"
    difference = (f"{metrics[paired + '_difference']:+.3f} [{metrics[paired + '_ci_low']:+.3f}, "
                  f"{metrics[paired + '_ci_high']:+.3f}]")
    row = next(line for line in version.description.splitlines() if line.startswith("| all |"))
    assert all_lesions in row and difference in row, row
    assert f"**Decision:** {result.decision}" in version.description
    lineage = version.description.split("## Lineage")[1]
    for key in ("run_id", "git_commit", "data_dvc_hash", "dataset_digest", "onnx_sha256"):
        assert f"`{version.tags[key]}`" in lineage, key
    assert version.tags["git_dirty"] == run.data.tags["git_dirty"]
    assert "image digest: not recorded" in lineage  # registered outside a container image
    assert len(version.description) <= 5000 and len(card) <= 5000  # MLflow's VARCHAR(5000)
    note = run.data.tags["mlflow.note.content"]
    assert all_lesions in note and f"{name} version {version.version}, @challenger only" in note
    # Evaluate's metrics on MLflow 3's logged model, which the UI's model page shows. The SQL registry
    # keeps no model_id column: the version names its logged model by its source, models:/<model id>.
    assert version.source.startswith("models:/m-"), version.source
    logged = {m.key: m.value for m in client.get_logged_model(version.source.removeprefix("models:/")).metrics}
    test_metrics = {key for key in metrics if key.startswith("test_")}
    assert len(test_metrics) >= 40 and test_metrics <= set(logged), sorted(test_metrics - set(logged))[:5]
    assert logged[METRIC] == pytest.approx(metrics[METRIC])


@pytest.mark.slow
def test_a_fresh_clone_trains_and_registers_with_clean_lineage(prepared_data, tracking_env, tmp_path, monkeypatch):
    """The main job on a fresh clone: DVC rewrites dvc.lock and the metrics, and the lineage stays clean."""
    from mammoseg.stages import evaluate, train

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True,
                          check=True).stdout.strip()
    # What `dvc repro` has rewritten by the time train starts: the lock (earlier stages' entries).
    with (clone / "dvc.lock").open("a") as lock:
        lock.write("# rewritten by dvc repro\n")
    monkeypatch.chdir(clone)  # the stages run where dvc runs them: the clone's root
    model, metrics = tmp_path / "model", clone / "metrics"
    train.run(stage_config_for("train", **{**TINY_TRAIN, "epochs": 1, "overlay_every": 0}), prepared_data.dataset,
              model, metrics / "train.json")
    evaluate.run(stage_config_for("evaluate", bootstrap_resamples=50, worst_k=1), prepared_data.dataset, model,
                 metrics / "evaluate.json", tmp_path / "evaluation")
    run_id = tracking.read_run_id(model)
    client = mlflow.MlflowClient(tracking_env.url)
    tags = client.get_run(run_id).data.tags
    assert (tags["git_commit"], tags["git_dirty"]) == (head, "False")
    assert "Test split" in tags["mlflow.note.content"] and "Registry" not in tags["mlflow.note.content"]

    onnx_path = tmp_path / "onnx" / "model.onnx"
    export.run(stage_config_for("export", **FAST_EXPORT), model, prepared_data.dataset, onnx_path)
    name = f"{MODEL_NAME}-clean-clone"
    result = register.run(stage_config_for("register", name=name), onnx_path, prepared_data.dataset,
                          metrics / "registration.json")
    version = client.get_model_version(name, result.version)
    assert (version.tags["git_commit"], version.tags["git_dirty"]) == (head, "False")
    assert f"`{head}` (clean checkout)" in version.description
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=clone,
                             capture_output=True, text=True, check=True).stdout.split()
    assert set(changed[1::2]) == {"dvc.lock", "metrics/train.json", "metrics/evaluate.json",
                                  "metrics/registration.json"}  # only what DVC writes changed
    assert tracking.git_state(clone) == (head, False)


LINEAGE_TAGS = ("git_commit", "git_dirty", "data_dvc_hash", "image_digest")


def test_the_version_carries_its_runs_lineage_and_register_records_its_own(exported, prepared_data, tracking_env):
    from mammoseg.cli import main

    name = f"{MODEL_NAME}-lineage"
    given = {"git_commit": "e" * 40, "git_dirty": "True", "data_dvc_hash": "f" * 32 + ".dir",
             "image_digest": "sha256:" + "9" * 64}
    flags = [arg for key, value in given.items() for arg in (f"--{key.replace('_', '-')}", value)]
    assert main(["--params", str(REPO_ROOT / "params.yaml"), "register", "--onnx", str(exported),
                 "--dataset", str(prepared_data.dataset), "--name", name, *flags]) == 0
    client = mlflow.MlflowClient(tracking_env.url)
    version = client.get_model_version(name, "1")
    run_tags = client.get_run(version.run_id).data.tags
    # The session's model was trained here, from this checkout, in no image.
    assert run_tags["git_commit"] == tracking.git_state(REPO_ROOT)[0] and run_tags["image_digest"] == "none"
    assert run_tags["data_dvc_hash"] == tracking.dvc_data_hash(REPO_ROOT)
    assert {key: version.tags[key] for key in LINEAGE_TAGS} == {key: run_tags[key] for key in LINEAGE_TAGS}
    assert {key: version.tags[f"register_{key}"] for key in LINEAGE_TAGS} == given


def test_register_gate_and_idempotency(trained_model, prepared_data, tracking_env, tmp_path):
    config = stage_config_for("register", name=MODEL_NAME)
    client = mlflow.MlflowClient(tracking_env.url)
    nothing = _variant_model(trained_model, prepared_data.dataset, tmp_path, "nothing", -20.0)
    first = register.run(config, nothing, prepared_data.dataset, tmp_path / "decision.json")
    assert (first.version, first.promoted, first.already_registered) == ("1", True, False)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    version = client.get_model_version(MODEL_NAME, "1")
    for key in ("run_id", "data_dvc_hash", "git_commit", "validation_success", "parity", METRIC,
                "promotion_decision", "onnx_sha256"):
        assert key in version.tags, key
    assert json.loads((tmp_path / "decision.json").read_text())["decision"].startswith("promoted: beats the baseline")

    again = register.run(config, nothing, prepared_data.dataset)
    assert (again.version, again.already_registered) == ("1", True)
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 1

    # The same model again (another run): the paired test cannot tell them apart, the champion stays.
    same = _variant_model(trained_model, prepared_data.dataset, tmp_path, "same", -20.0)
    kept = register.run(config, same, prepared_data.dataset)
    assert (kept.version, kept.promoted) == ("2", False)
    assert "does not beat champion v1" in kept.decision
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == "2"

    # Predicting everything finds some lesion pixels in every test patient; predicting nothing none.
    everything = _variant_model(trained_model, prepared_data.dataset, tmp_path, "everything", 20.0)
    promoted = register.run(config, everything, prepared_data.dataset)
    assert (promoted.version, promoted.promoted) == ("3", True), promoted.decision
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "3"
    assert "challenger minus champion v1" in client.get_model_version(MODEL_NAME, "3").description
    assert all(v.current_stage in (None, "None") for v in client.search_model_versions(f"name = '{MODEL_NAME}'"))


def test_a_champion_scored_on_another_split_is_re_scored_not_blocking(trained_model, prepared_data, tracking_env,
                                                                     tmp_path):
    from mammoseg.stages import preprocess

    other = tmp_path / "other-split"
    preprocess.run(stage_config_for("preprocess", size=128, workers=1, seed=7), prepared_data.inbreast,
                   prepared_data.manifest, prepared_data.masks, other)
    config = stage_config_for("register", name=f"{MODEL_NAME}-resplit")
    nothing = _variant_model(trained_model, prepared_data.dataset, tmp_path, "nothing-a", -20.0)
    assert register.run(config, nothing, prepared_data.dataset).promoted
    everything = _variant_model(trained_model, other, tmp_path, "everything-b", 20.0)
    result = register.run(config, everything, other)
    assert result.promoted and "beats the baseline, every floor and champion v1" in result.decision


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


def test_evaluate_scores_exactly_what_predict_delivers(exported, trained_model, prepared_data, tmp_path):
    import pandas as pd

    per_image = pd.read_csv(trained_model.parent / "evaluation" / "per_image.csv", dtype={"image_id": str})
    dicoms = pd.read_parquet(prepared_data.manifest).set_index("image_id")["dicom_path"]
    proc = _predict(["--model", str(exported), "--input",
                     *(str(prepared_data.inbreast / dicoms[i]) for i in per_image["image_id"]),
                     "--out", str(tmp_path / "out")], {})
    assert proc.returncode == 0, proc.stderr
    for record in per_image.itertuples(index=False):
        label = np.array(Image.open(tmp_path / "out" / f"{Path(dicoms[record.image_id]).stem}_mask.png"))
        truth = {name: np.array(Image.open(prepared_data.masks / f"{record.image_id}_{name}.png")).astype(bool)
                 for name in ("mass", "calcification")}
        # The PNG holds one label per pixel (calcification wins an overlap): compare the merged masks.
        predicted, gt = label > 0, truth["mass"] | truth["calcification"]
        if predicted.any() or gt.any():
            dice = 2 * (predicted & gt).sum() / (predicted.sum() + gt.sum())
            assert abs(dice - record.dice_native_all) <= 0.005, record.image_id
        else:
            assert np.isnan(record.dice_native_all)
