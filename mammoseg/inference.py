"""The trained model on disk and on a device: save/load `model.pt`, batched probabilities, device choice.

`model.pt` holds the weights, the LightUNet arguments, the decision threshold and the preprocessing
contract of the dataset it was trained on; train writes it, evaluate and export read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammoseg.errors import UserError
from mammoseg.fileio import write_atomically
from model import LightUNet

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained LightUNet and what it needs to be used the way it was trained.

    Attributes:
        network: the network, in eval mode.
        architecture: LightUNet keyword arguments.
        threshold: decision thresholds on the sigmoid probabilities, one per class, chosen on validation.
        preprocessing: the dataset's preprocessing contract (target size, normalisation, flip rule).
        parameters: number of parameters.
    """

    network: LightUNet
    architecture: dict[str, Any]
    threshold: tuple[float, ...]
    preprocessing: dict[str, Any]
    parameters: int


def select_device(name: str) -> torch.device:
    """Return the torch device for a config value: "auto" (cuda when available), "cpu" or "cuda[:N]".

    Raises:
        UserError: CUDA was asked for and is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


def thresholds(value: float | Sequence[float], channels: int) -> tuple[float, ...]:
    """Return one threshold per output channel from a stored value (older models stored one float)."""
    if isinstance(value, int | float):
        return (float(value),) * channels
    out = tuple(float(v) for v in value)
    if len(out) != channels:
        raise ValueError(f"expected {channels} thresholds, got {list(out)}")
    return out


def threshold_map(threshold: Sequence[float]) -> np.ndarray:
    """Return thresholds shaped (C, 1, 1) to compare with (C, H, W) probabilities."""
    return np.asarray(threshold, np.float32)[:, None, None]


def save_model(path: Path, network: LightUNet, architecture: dict[str, Any], threshold: Sequence[float],
               preprocessing: dict[str, Any]) -> None:
    """Write model.pt atomically (weights on CPU, so it loads anywhere)."""
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    payload = {"state_dict": state, "architecture": architecture,
               "threshold": thresholds(threshold, network.out_channels),
               "preprocessing": preprocessing}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_model(model_dir: Path, device: torch.device | None = None) -> TrainedModel:
    """Load `model_dir/model.pt` into an eval-mode LightUNet on `device` (CPU by default).

    Raises:
        UserError: the file is missing or is not a mammoseg model.
    """
    path = model_dir / MODEL_FILE
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        architecture = dict(payload["architecture"])
        network = LightUNet(**architecture)
        network.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        raise UserError(f"{path}: no trained model (run `mammoseg train` first)") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a mammoseg model ({str(exc).splitlines()[0][:200]})") from None
    network.eval().to(device or torch.device("cpu"))
    parameters = sum(p.numel() for p in network.parameters())
    return TrainedModel(network, architecture, thresholds(payload["threshold"], network.out_channels),
                        dict(payload["preprocessing"]),
                        parameters)


def cpu_supports_bf16() -> bool:
    """Tell whether this CPU has native bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays.

    Elsewhere torch emulates bf16 and a step gets slower, so autocast stays off.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[torch.dtype | None]:
    """Mixed precision: bf16 on CUDA where supported (else fp16), bf16 on CPUs with AMX/AVX512-BF16.

    A no-op when disabled or on a CPU without native bf16.

    Yields:
        The autocast dtype, or None when running in fp32.
    """
    if not enabled:
        yield None
        return
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield dtype
        return
    if device.type == "cpu" and cpu_supports_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield torch.bfloat16
        return
    yield None


@torch.no_grad()
def predict_probabilities(network: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device,
                          batch_size: int, amp: bool = False,
                          channels_last: bool = False) -> Iterator[np.ndarray]:
    """Yield sigmoid probabilities for each image, batch by batch.

    Args:
        network: an eval-mode segmentation network.
        images: arrays of shape (1, H, W), float32 in [0, 1], all the same size.
        device: where to run.
        batch_size: images per forward pass.
        amp: mixed precision on CUDA.
        channels_last: NHWC memory format (faster convolutions on CUDA and recent CPUs).

    Yields:
        (2, H, W) float32 probabilities per image, in input order.
    """
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.stack(images[start:start + batch_size])).to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = network(batch)
        yield from torch.sigmoid(logits.float()).cpu().numpy()
