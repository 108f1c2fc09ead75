"""ONNX Runtime sessions and the model's I/O contract stored in ONNX metadata (reads .onnx files).

The contract travels inside the model (`metadata_props["mammoseg.io_spec"]`, in the spirit of MONAI
bundles' `network_data_format`) so a deployment job needs nothing but the .onnx file. `EngineSession`
is what every engine's session offers (this module's ONNX Runtime one, mammoseg.openvino_runtime's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mammoseg.errors import UserError

log = logging.getLogger(__name__)

IO_SPEC_KEY = "mammoseg.io_spec"


class EngineSession:
    """What export, predict, register and serving use of a loaded model, whatever runs it.

    Attributes:
        engine: the engine's name, as export's report and predict's audit record write it.
        provider: what it really runs on (an ONNX Runtime execution provider, an OpenVINO device).
        fell_back: it runs on something other than what was asked for.
    """

    engine: ClassVar[str]
    provider: str
    fell_back: bool

    def run(self, images: np.ndarray) -> np.ndarray:
        """Run the model.

        Args:
            images: (N, C, H, W) float32 in [0, 1] (C: the contract's input channels).

        Returns:
            (N, 2, H, W) float32 logits.
        """
        raise NotImplementedError

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Run the model and apply its output activation (the I/O contract's sigmoid).

        The one place logits become probabilities: predict, register's re-scoring and the served
        model (mammoseg.serving) all call it, so the three agree to the bit on the same input.

        Args:
            images: (N, C, H, W) float32 in [0, 1].

        Returns:
            (N, 2, H, W) float32 probabilities [mass, calcification].
        """
        return sigmoid(self.run(images))


@dataclasses.dataclass(frozen=True)
class Session(EngineSession):
    """An ONNX Runtime session and the execution provider it really runs on."""

    engine: ClassVar[str] = "onnxruntime"

    session: Any
    provider: str
    requested: tuple[str, ...]
    fell_back: bool

    def run(self, images: np.ndarray) -> np.ndarray:
        """Run the model: (N, C, H, W) float32 images in, (N, 2, H, W) float32 logits out."""
        input_name = self.session.get_inputs()[0].name
        (logits,) = self.session.run(None, {input_name: np.ascontiguousarray(images, np.float32)})
        return np.asarray(logits, np.float32)


def open_session(path: Path, threads: int = 0, prefer_cuda: bool = True) -> Session:
    """Open an ONNX Runtime session on CUDA when available, else on the CPU; detect silent fallback.

    onnxruntime-gpu registers the CPU provider when CUDA cannot be initialised (a driver or library
    mismatch) and logs a warning only; `session.get_providers()` tells what actually runs.

    Args:
        path: the .onnx file.
        threads: intra-op threads (0 = ONNX Runtime's default, one per core).
        prefer_cuda: ask for the CUDA provider when the installed package offers it.

    Raises:
        UserError: the file is not a loadable ONNX model.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    requested = ["CPUExecutionProvider"]
    if prefer_cuda and "CUDAExecutionProvider" in available:
        requested.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid models
        raise UserError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
    provider = session.get_providers()[0]
    fell_back = provider != requested[0]
    if fell_back:
        log.warning("%s: asked for %s, ONNX Runtime runs on %s", path, requested[0], provider)
    return Session(session, provider, tuple(requested), fell_back)


def _load(path: Path):
    """Load an ONNX model's graph and metadata (weights stored outside the file are not read)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not a model
        raise UserError(f"{path}: not an ONNX model ({str(exc).splitlines()[0][:200]})") from None


def read_io_spec(path: Path) -> dict[str, Any]:
    """Return the I/O contract stored in an exported model's metadata.

    Raises:
        UserError: the model has no mammoseg I/O contract.
    """
    for prop in _load(path).metadata_props:
        if prop.key == IO_SPEC_KEY:
            return json.loads(prop.value)
    raise UserError(f"{path}: no {IO_SPEC_KEY} metadata (was it exported by `mammoseg export`?)")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Return 1 / (1 + exp(-logits)) in float32, without overflow warnings for large |logits|."""
    return (0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float32)))).astype(np.float32)


def variant_of(path: Path) -> str:
    """Return which of export's variants an ONNX file is, read from its graph, not its name.

    Returns:
        "int8" (quantize/dequantize nodes), "fp16" (float16 weights) or "fp32".

    Raises:
        UserError: the file is not an ONNX model.
    """
    import onnx

    graph = _load(path).graph
    if {"QuantizeLinear", "DequantizeLinear"} & {node.op_type for node in graph.node}:
        return "int8"
    if any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in graph.initializer):
        return "fp16"
    return "fp32"
