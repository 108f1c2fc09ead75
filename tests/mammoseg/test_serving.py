"""The registered model served by `mlflow models serve` and loaded by mlflow.pyfunc answers predict's
probabilities; its signature is a float32 tensor spec.

The server is a real subprocess on 127.0.0.1 pulling `models:/NAME@champion` from the session's
tracking server (artifacts proxied to moto's S3), with the environment predict runs in
(`--env-manager local`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mammoseg.onnx_runtime import open_session, read_io_spec
from mammoseg.preprocessing import PreprocessParams
from mammoseg.stages import predict
from tests.conftest import SERVED_MODEL, _start, _stop, free_port

pytestmark = pytest.mark.slow
CHAMPION = f"models:/{SERVED_MODEL}@champion"
TOLERANCE = 1e-4  # issue 15: the served probabilities equal predict's within this


def _network_inputs(prepared_data, exported: Path, count: int) -> np.ndarray:
    """(count, C, size, size) float32: DICOMs preprocessed exactly as predict does it."""
    params = PreprocessParams.from_dict(read_io_spec(exported)["preprocessing"])
    dicoms = sorted((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))[:count]
    return np.stack([predict.network_input(path, params).prepared.network_input for path in dicoms])


def _predicts_probabilities(images: np.ndarray, tmp_path: Path) -> np.ndarray:
    """What predict computes for these network inputs: the champion it resolves, its session call."""
    resolved = predict.resolve_model(CHAMPION, tmp_path / "download")
    expected = open_session(resolved.onnx_path, threads=1).probabilities(images)
    # The 2-epoch model sits near its 0.01 foreground prior; a spread of ~1e-3 across pixels and
    # classes is what makes a constant, logit or class-swapped answer fail at TOLERANCE.
    assert expected.max() - expected.min() > 5 * TOLERANCE, "a near-constant output makes the comparison vacuous"
    return expected


def _post(url: str, payload: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_logged_model_has_a_float32_tensor_signature(served_champion, exported, tracking_env):
    info = mlflow.models.get_model_info(CHAMPION)
    spec = read_io_spec(exported)
    (image,) = info.signature.inputs.inputs
    (output,) = info.signature.outputs.inputs
    assert (image.name, image.type, image.shape) == ("image", np.dtype(np.float32), (-1, 2, -1, -1))
    assert (output.name, output.type, output.shape) == ("probabilities", np.dtype(np.float32), (-1, 2, -1, -1))
    assert info.flavors["python_function"]["loader_module"] == "mammoseg.serving"
    assert info.metadata["threshold"] == spec["threshold"]
    assert info.metadata["classes"] == ["mass", "calcification"]


def test_pyfunc_load_model_works_in_a_fresh_process(served_champion, exported, prepared_data, tracking_env, tmp_path):
    images = _network_inputs(prepared_data, exported, 2)
    np.save(tmp_path / "images.npy", images)
    script = ("import sys, mlflow, numpy as np\n"
              f"model = mlflow.pyfunc.load_model({CHAMPION!r})\n"
              "out = model.predict({'image': np.load(sys.argv[1])})\n"
              "np.save(sys.argv[2], out['probabilities'])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_env.url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(served, _predicts_probabilities(images, tmp_path), rtol=0, atol=TOLERANCE)


def test_mlflow_models_serve_answers_predicts_probabilities(served_champion, exported, prepared_data, tracking_env,
                                                            tmp_path):
    images = _network_inputs(prepared_data, exported, 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", CHAMPION,
                      "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                     f"{url}/ping", {"MLFLOW_TRACKING_URI": tracking_env.url}, tmp_path / "serve.log", 180)
    try:
        status, answer = _post(f"{url}/invocations", {"inputs": {"image": images.tolist()}})
        assert status == 200, answer
        served = np.asarray(answer["predictions"]["probabilities"], np.float32)
        assert served.shape == (1, 2, *images.shape[2:])
        np.testing.assert_allclose(served, _predicts_probabilities(images, tmp_path), rtol=0, atol=TOLERANCE)

        # A size the network cannot take is a 400 that says why, not a crash deep in ONNX Runtime.
        status, answer = _post(f"{url}/invocations", {"inputs": {"image": images[:, :, :100, :100].tolist()}})
        assert status == 400 and "multiples of 128" in answer
    finally:
        _stop(process)
