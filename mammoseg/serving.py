"""Serving: the registered model as an MLflow pyfunc that answers lesion probabilities (reads the .onnx).

register logs each version with `loader_module="mammoseg.serving"` and the export's folder (the
fp32 .onnx byte for byte, its export report and the files of the variants that passed their gates)
as the model's data, so `mlflow models serve -m models:/NAME@champion --env-manager local` (or
`mlflow.pyfunc.load_model`) in an environment with mammoseg installed answers a preprocessed image
with the same probabilities predict computes: both call `Session.probabilities`. The answer is
probabilities, not logits: what a caller thresholds with the model's own `threshold` (in the logged
model's metadata and the ONNX I/O contract), with no activation of its own to get wrong.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mammoseg import __version__
from mammoseg.onnx_runtime import Session, open_session, read_io_spec
from mammoseg.tracking import PyfuncModel
from mammoseg.variants import exported_model_in

log = logging.getLogger(__name__)

OUTPUT_NAME = "probabilities"


def pyfunc_model(export_folder: Path, spec: Mapping[str, Any]) -> PyfuncModel:
    """Describe the served model register logs: this module as loader, the export's folder as its data.

    Args:
        export_folder: the exported fp32 .onnx, its export report and variant files (one model).
        spec: its I/O contract (read_io_spec).

    Returns:
        The pyfunc model: input named as the ONNX graph's, (-1, C, -1, -1) float32 (any batch, any
        height and width the network takes; C from the contract: 2 with the block-maximum channel);
        output "probabilities" (-1, 2, -1, -1) float32; a one-image example of the smallest size
        the network takes (a small example file); the threshold, classes and preprocessing
        contract as metadata, so a caller can turn probabilities into masks without the .onnx.
    """
    name, channels = spec["input"]["name"], int(spec["input"]["shape"][1])
    multiple = int(spec["input"]["size_multiple"])
    # Pinned to what registered it. mammoseg is no PyPI package: the model serves where mammoseg is
    # installed (the project image or venv), hence `--env-manager local`.
    requirements = tuple(f"{package}=={importlib.metadata.version(package)}"
                         for package in ("mlflow", "onnxruntime", "numpy")) + (f"mammoseg=={__version__}",)
    return PyfuncModel(
        loader_module=__name__, data_path=export_folder,
        inputs={name: (-1, channels, -1, -1)}, outputs={OUTPUT_NAME: (-1, len(spec["output"]["channels"]), -1, -1)},
        input_example={name: np.zeros((1, channels, multiple, multiple), np.float32)}, requirements=requirements,
        metadata={"threshold": spec["threshold"], "classes": spec["output"]["channels"],
                  "preprocessing": spec["preprocessing"], "training_run_id": spec.get("training_run_id")})


class LesionProbabilities:
    """The pyfunc model: a preprocessed image batch in, per-class lesion probabilities out."""

    def __init__(self, session: Session, input_name: str, size_multiple: int) -> None:
        self._session = session
        self._input_name = input_name
        self._size_multiple = size_multiple

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Return the probabilities of a batch of preprocessed images.

        Args:
            model_input: {input name: (N, C, H, W) float32 in [0, 1]} (what MLflow passes for a
                request `{"inputs": {"image": ...}}`), or the (N, C, H, W) array itself.
            params: unused (the signature has no parameters).

        Returns:
            {"probabilities": (N, 2, H, W) float32 [mass, calcification]}.

        Raises:
            ValueError: H or W is not a multiple of the network's size multiple (the server answers
                400 with this message in its stack trace).
        """
        images = model_input[self._input_name] if isinstance(model_input, dict) else model_input
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[2] % self._size_multiple or images.shape[3] % self._size_multiple:
            raise ValueError(f"{self._input_name} has shape {images.shape}; expected (N, C, H, W) with H and W "
                             f"multiples of {self._size_multiple} (a preprocessed image)")
        return {OUTPUT_NAME: self._session.probabilities(images)}


def _load_pyfunc(data_path: str) -> LesionProbabilities:
    """Open the logged fp32 .onnx for MLflow's pyfunc loader (the `loader_module` hook's fixed name).

    ONNX Runtime picks CUDA where onnxruntime-gpu can use it and one thread per core otherwise:
    a server has the machine to itself. The server answers the fp32 model's probabilities, which
    the variants' export gates compare with; versions registered before the export folder was
    logged hold the .onnx alone.
    """
    path = Path(data_path)
    path = exported_model_in(path) if path.is_dir() else path
    spec = read_io_spec(path)
    session = open_session(path, threads=0)
    log.info("serving %s (run %s) on %s", path.name, spec.get("training_run_id"), session.provider)
    return LesionProbabilities(session, spec["input"]["name"], int(spec["input"]["size_multiple"]))
