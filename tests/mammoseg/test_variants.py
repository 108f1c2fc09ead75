"""Deployment variants: the OpenVINO engine, export's per-variant gate and latency, predict's --engine choice.

Real engines throughout (OpenVINO's CPU plugin, ONNX Runtime) on the session's exported model, and
evaluate's native-grid scoring for the gate.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mammoseg import openvino_runtime, tracking
from mammoseg.data import load_examples, read_dataset
from mammoseg.errors import UserError
from mammoseg.onnx_runtime import open_session, read_io_spec
from mammoseg.openvino_runtime import open_openvino
from mammoseg.stages import export, predict
from mammoseg.stages.evaluate import score_native_many
from mammoseg.variants import VARIANTS, choose, report_path_for, variant_path
from tests.conftest import REPO_ROOT, SERVED_MODEL, stage_config_for

pytestmark = pytest.mark.slow


def _report(onnx: Path) -> dict:
    return json.loads(report_path_for(onnx).read_text())


def _test_rows(dataset: Path):
    index, _ = read_dataset(dataset)
    return index[index["split"] == "test"]


def test_openvino_fp32_computes_what_onnx_runtime_computes(exported, prepared_data):
    images = np.stack([image for image, _ in load_examples(prepared_data.dataset,
                                                           _test_rows(prepared_data.dataset).head(2))])
    expected = open_session(exported, threads=1).probabilities(images)
    session = open_openvino(exported, "fp32", threads=1)
    assert (session.engine, session.provider) == ("openvino", "CPU")
    np.testing.assert_allclose(session.probabilities(images), expected, atol=1e-5)
    # Another input shape compiles the model again; the numbers stay the same.
    np.testing.assert_allclose(session.probabilities(images[:1]), expected[:1], atol=1e-5)


def test_export_reports_engine_precision_gate_and_latency_per_variant(exported, prepared_data):
    report = _report(exported)
    assert report["latency_shape"] == [1, 2, 256, 256]  # conftest's latency_size, whatever the network grid
    variants = report["variants"]
    assert set(variants) == {"fp32", "int8", "fp16", "openvino_fp32", "openvino_bf16", "openvino_int8"}
    tests = len(_test_rows(prepared_data.dataset))
    for name, result in variants.items():
        assert (result["engine"], result["precision"]) == (VARIANTS[name].engine, VARIANTS[name].precision)
        assert result["file"] == variant_path(exported, VARIANTS[name].file).name
        if "skipped" in result:
            assert result["passed"] is False
            continue
        assert result["latency_s"] > 0
        if name != "fp32":
            assert result["images"] == tests
            assert result["passed"] == (result["max_native_dice_diff"] <= 0.01)
    assert ("skipped" in variants["openvino_bf16"]) == (not openvino_runtime.cpu_supports("bf16"))
    # fp32 arithmetic in another engine moves no pixel of the masks.
    assert variants["openvino_fp32"]["passed"] and variants["openvino_fp32"]["max_native_dice_diff"] <= 1e-3
    # A variant's file is kept exactly when a variant that runs it passed, and is the file it timed.
    int8 = variant_path(exported, "int8")
    assert int8.exists() == any(variants[name]["passed"] for name in ("int8", "openvino_int8"))
    if int8.exists():
        assert variants["openvino_int8"]["sha256"] == hashlib.sha256(int8.read_bytes()).hexdigest()


def _constant_model(trained_model: Path, tmp_path: Path) -> Path:
    """A copy of the trained model that marks every pixel of every image: its masks differ from the real one's."""
    import torch

    from mammoseg.inference import MODEL_FILE

    model_dir = tmp_path / "constant"
    shutil.copytree(trained_model, model_dir)
    payload = torch.load(model_dir / MODEL_FILE, weights_only=True)
    payload["state_dict"]["head.weight"].zero_()
    payload["state_dict"]["head.bias"].fill_(20.0)
    torch.save(payload, model_dir / MODEL_FILE)
    with tracking.training_run("mammoseg-test", "run-constant", log_system_metrics=False) as run:
        pass
    tracking.write_run_id(model_dir, run.run_id)
    return model_dir


def test_the_gate_refuses_a_variant_whose_masks_differ_and_keeps_one_whose_do_not(
        exported, trained_model, prepared_data, tracking_env, tmp_path):
    # The gate's statistic on evaluate's native scores: a model whose masks differ is far beyond the
    # tolerance; OpenVINO computing the same model in fp32 is within it.
    constant = tmp_path / "constant.onnx"
    export.run(stage_config_for("export", int8=False, openvino=[], latency_size=128, latency_repeats=1),
               _constant_model(trained_model, tmp_path), prepared_data.dataset, constant)
    threshold = np.asarray(read_io_spec(exported)["threshold"], np.float32)
    scores = score_native_many(prepared_data.dataset, _test_rows(prepared_data.dataset), {
        "fp32": open_session(exported, threads=1).probabilities,
        "openvino_fp32": open_openvino(exported, "fp32", threads=1).probabilities,
        "different": open_session(constant, threads=1).probabilities}, threshold, batch_size=1)
    assert export.max_native_dice_diff(scores["openvino_fp32"], scores["fp32"]) <= 1e-3
    assert export.max_native_dice_diff(scores["different"], scores["fp32"]) > 0.01

    # Through export: a variant over the tolerance is reported FAILED, its file not kept, never chosen.
    out = tmp_path / "strict" / "model.onnx"
    export.run(stage_config_for("export", variant_dice_tolerance=-1.0, openvino=["fp32", "int8"],
                                latency_size=128, latency_repeats=1), trained_model, prepared_data.dataset, out)
    report = _report(out)
    assert not any(report["variants"][name]["passed"] for name in ("int8", "openvino_fp32", "openvino_int8"))
    assert not variant_path(out, "int8").exists()
    assert choose(out, report, "auto") == VARIANTS["fp32"]
    with pytest.raises(UserError, match=r"no openvino variant passed its export gate .*openvino_fp32: missed"):
        choose(out, report, "openvino")


def test_the_logit_shift_probe_measures_how_far_the_fp32_masks_move(exported, prepared_data):
    # export reports, beside the gate, how far the fp32 model's own masks move when every logit shifts
    # by +-each of gate_probe_logit_shifts: the probe is fp32's logits moved by exactly that.
    probe = _report(exported)["logit_shift_probe"]
    moved = probe["max_native_dice_diff"]
    assert list(moved) == ["0.01", "0.03", "0.1", "0.3"]
    expected = None
    for shift, diff in moved.items():
        if diff > 0.01:
            break
        expected = float(shift)
    assert probe["largest_within_tolerance"] == expected
    session = open_session(exported, threads=1)
    rows = _test_rows(prepared_data.dataset)
    images = np.stack([image for image, _ in load_examples(prepared_data.dataset, rows.head(2))])
    logits = export._ShiftedLogits(session)
    np.testing.assert_array_equal(logits.shifted(0.0)(images), session.probabilities(images))
    np.testing.assert_allclose(logits.shifted(0.5)(images), 1 / (1 + np.exp(-(session.run(images) + 0.5))),
                               atol=1e-5)
    # On evaluate's native scores: a shift of 0 moves nothing; a large one marks every pixel (the
    # 2-epoch model finds nothing, so its Dice cannot move: the predicted areas show the shift).
    threshold = np.asarray(read_io_spec(exported)["threshold"], np.float32)
    scores = score_native_many(prepared_data.dataset, rows, {
        "fp32": session.probabilities, "zero": logits.shifted(0.0), "large": logits.shifted(20.0)},
        threshold, batch_size=1)
    assert export.max_native_dice_diff(scores["zero"], scores["fp32"]) == 0.0
    for target in ("mass", "calcification"):
        fp32_area = [c.pred_sum for c in scores["fp32"].counts[target]]
        assert [c.pred_sum for c in scores["zero"].counts[target]] == fp32_area
        assert all(shifted.pred_sum > area for shifted, area in
                   zip(scores["large"].counts[target], fp32_area, strict=True))


def _copy_export(exported: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for path in exported.parent.iterdir():
        shutil.copy2(path, folder / path.name)
    return folder / exported.name


def _set_latencies(onnx: Path, **latencies: float) -> None:
    path = report_path_for(onnx)
    report = json.loads(path.read_text())
    for name, result in report["variants"].items():
        if "latency_s" in result:
            result["latency_s"] = latencies.get(name, 1.0)
    path.write_text(json.dumps(report))


def test_auto_runs_the_fastest_variant_the_export_measured(exported, prepared_data, tmp_path, caplog):
    onnx = _copy_export(exported, tmp_path / "export")
    source = sorted((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))[0]
    report = _report(onnx)
    assert report["variants"]["openvino_fp32"]["passed"]
    refused = [name for name, result in report["variants"].items() if "latency_s" in result and not result["passed"]]

    def run(engine: str, out: str) -> dict:
        predict.run(stage_config_for("predict", threads=1, engine=engine), str(onnx), [source], tmp_path / out)
        return json.loads((tmp_path / out / f"{source.stem}.json").read_text())

    # A refused variant measured fastest is never run.
    _set_latencies(onnx, openvino_fp32=0.01, fp32=0.5, **dict.fromkeys(refused, 0.001))
    caplog.set_level("INFO", logger="mammoseg.variants")
    record = run("auto", "openvino-fastest")
    assert (record["engine"], record["model"]["variant"], record["precision"]) == ("openvino", "openvino_fp32", "fp32")
    assert record["model"]["onnx_sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert "engine auto runs openvino_fp32, the fastest variant that passed its gate" in caplog.text
    # The same measurements, one engine asked for: the fastest of that engine's.
    assert run("onnxruntime", "onnxruntime")["model"]["variant"] == "fp32"
    _set_latencies(onnx, openvino_fp32=0.5, fp32=0.01)
    record = run("auto", "fp32-fastest")
    assert (record["engine"], record["model"]["variant"]) == ("onnxruntime", "fp32")


def test_a_variant_whose_file_changed_is_refused(exported, prepared_data, tmp_path):
    onnx = _copy_export(exported, tmp_path / "export")
    _set_latencies(onnx, openvino_fp32=0.01)
    report = _report(onnx)
    report["variants"]["openvino_fp32"]["sha256"] = "0" * 64  # what a replaced file looks like
    report_path_for(onnx).write_text(json.dumps(report))
    source = sorted((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))[0]
    with pytest.raises(UserError, match=r"model\.onnx: sha256 .* differs from .* its export report recorded"):
        predict.run(stage_config_for("predict", threads=1), str(onnx), [source], tmp_path / "out")


def test_engine_openvino_without_openvino_is_one_line(exported, prepared_data, tmp_path):
    source = sorted((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))[0]
    # An environment without OpenVINO: its import fails as it does where the extra is not installed.
    script = ("import sys; sys.modules['openvino'] = None\n"
              "from mammoseg.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    args = ["--params", str(REPO_ROOT / "params.yaml"), "predict", "--model", str(exported), "--input", str(source),
            "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", script, *args, "--engine", "openvino"], capture_output=True,
                          text=True, check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[-1] == ("mammoseg: error: OpenVINO is not installed (pip install 'mammoseg[openvino]'), "
                         "or choose --engine onnxruntime")
    assert not list((tmp_path / "out").glob("*.json"))
    # auto, there, runs what ONNX Runtime can: the OpenVINO variants are not eligible, named in the log.
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "openvino_fp32: OpenVINO is not installed" in proc.stderr
    record = json.loads((tmp_path / "out" / f"{source.stem}.json").read_text())
    assert record["engine"] == "onnxruntime"


def test_the_registered_version_carries_its_variants(served_champion, exported, tracking_env, tmp_path):
    version = mlflow.MlflowClient(tracking_env.url).get_model_version(SERVED_MODEL, served_champion)
    report = _report(exported)
    for name, result in report["variants"].items():
        tag = version.tags[f"variant_{name}"]
        assert tag.startswith(f"{result['engine']} {result['precision']}: ")
        assert ("passed its gate" in tag) == result["passed"]
    resolved = predict.resolve_model(f"models:/{SERVED_MODEL}@champion", tmp_path / "download")
    assert resolved.report == report
    shipped = {path.name for path in resolved.onnx_path.parent.iterdir()}
    passed_files = {result["file"] for result in report["variants"].values() if result["passed"]}
    assert shipped == {exported.name, report_path_for(exported).name, *passed_files}
