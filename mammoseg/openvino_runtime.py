"""OpenVINO sessions for exported models on Intel CPUs (reads .onnx files; OpenVINO is the `openvino` extra).

OpenVINO reads the exported ONNX files directly, so its variants need no files of their own: fp32 and
bf16 run the fp32 .onnx with another inference precision, int8 runs export's QDQ .onnx (its
quantize/dequantize pairs become int8 convolutions). The network is fully convolutional with a
dynamic input shape; a session compiles once per input shape it sees (predict: one, export: the
dataset's size and the latency size), since OpenVINO's CPU kernels are fastest for a static shape.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mammoseg.errors import UserError
from mammoseg.onnx_runtime import EngineSession

log = logging.getLogger(__name__)

DEVICE = "CPU"
# The precision OpenVINO computes everything but the quantised convolutions in, per variant. int8
# keeps the rest in f32: left unset, OpenVINO picks bf16 wherever the CPU has it, and a variant must
# compute the same on every CPU that runs it for its export gate to hold there.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# OpenVINO's name for the CPU capability a precision needs (OPTIMIZATION_CAPABILITIES).
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}
INSTALL_HINT = "pip install 'mammoseg[openvino]'"


def require():
    """Import OpenVINO and return the module.

    Raises:
        UserError: OpenVINO is not installed (one line saying how to get it).
    """
    try:
        import openvino
    except ImportError:
        raise UserError(f"OpenVINO is not installed ({INSTALL_HINT}), or choose --engine onnxruntime") from None
    return openvino


def available() -> bool:
    """Return whether OpenVINO can be imported here."""
    try:
        require()
    except UserError:
        return False
    return True


def cpu_supports(precision: str) -> bool:
    """Return whether this machine's CPU runs a precision natively (bf16: AVX512-BF16 or AMX).

    Raises:
        UserError: OpenVINO is not installed.
    """
    capabilities = require().Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
    return _CAPABILITY[precision] in capabilities


@dataclasses.dataclass
class OpenVinoSession(EngineSession):
    """An OpenVINO model compiled for the CPU at one inference precision, once per input shape.

    Attributes:
        core: the openvino.Core that read the model and compiles it.
        model: the openvino.Model read from the .onnx (dynamic shape).
        precision: "fp32", "bf16" or "int8" (the variant's precision; see INFERENCE_PRECISION).
        config: the compile properties (precision hint, latency hint, threads).
        provider: the OpenVINO device, "CPU".
        fell_back: always False: the CPU plugin does not fall back.
    """

    engine: ClassVar[str] = "openvino"

    core: Any
    model: Any
    precision: str
    config: dict[str, Any]
    provider: str = DEVICE
    fell_back: bool = False
    _compiled: dict[tuple[int, ...], Any] = dataclasses.field(default_factory=dict, repr=False)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Run the model: (N, C, H, W) float32 images in, (N, 2, H, W) float32 logits out."""
        images = np.ascontiguousarray(images, np.float32)
        compiled = self._compiled.get(images.shape)
        if compiled is None:
            model = self.model.clone()
            model.reshape({0: list(images.shape)})
            compiled = self.core.compile_model(model, DEVICE, self.config)
            self._compiled[images.shape] = compiled
        return np.asarray(compiled(images)[0], np.float32)


def open_openvino(path: Path, precision: str, threads: int = 0) -> OpenVinoSession:
    """Read an exported .onnx into OpenVINO for the CPU at a variant's precision.

    Args:
        path: the .onnx file (fp32 for the fp32 and bf16 variants, the QDQ file for int8).
        precision: "fp32", "bf16" or "int8".
        threads: inference threads (0 = OpenVINO's default, one per core).

    Raises:
        UserError: OpenVINO is not installed, or the file is not a model OpenVINO can read.
    """
    core = require().Core()
    try:
        model = core.read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for unreadable models
        raise UserError(f"{path}: OpenVINO cannot read this model ({str(exc).splitlines()[0][:200]})") from None
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
                              "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return OpenVinoSession(core, model, precision, config)
