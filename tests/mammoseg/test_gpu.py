"""GPU paths: AMP training and the CUDA execution provider. Skipped where no CUDA device exists."""

from __future__ import annotations

import json

import pytest
import torch

from mammoseg.stages import export, train
from mammoseg.variants import report_path_for
from tests.conftest import TINY_TRAIN, stage_config_for


@pytest.mark.gpu
def test_amp_training_on_cuda(prepared_data, tracking_env, tmp_path):
    config = stage_config_for("train", **{**TINY_TRAIN, "device": "cuda", "amp": True, "checkpointing": True})
    result = train.run(config, prepared_data.dataset, tmp_path / "model", tmp_path / "train.json")
    assert json.loads((tmp_path / "train.json").read_text())["run_id"] == result.run_id
    import mlflow

    tags = mlflow.MlflowClient().get_run(result.run_id).data.tags
    assert tags["device"].startswith("cuda") and tags["cuda_version"] != "none"


@pytest.mark.gpu
def test_cuda_execution_provider_is_used(trained_model, prepared_data, tracking_env, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (install onnxruntime-gpu)")
    out = tmp_path / "model.onnx"
    export.run(stage_config_for("export", latency_size=256, latency_repeats=1), trained_model,
               prepared_data.dataset, out)
    report = json.loads(report_path_for(out).read_text())
    assert report["variants"]["fp32"]["provider"] == "CUDAExecutionProvider"
    assert report["variants"]["fp16"]["passed"] is True
    assert torch.cuda.is_available()
