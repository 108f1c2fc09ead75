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
        threshold: decision threshold on the sigmoid probabilities, chosen on validation.
        preprocessing: the dataset's preprocessing contract (target size, normalisation, flip rule).
        parameters: number of parameters.
    """

    network: LightUNet
    architecture: dict[str, Any]
    threshold: float
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


def save_model(path: Path, network: LightUNet, architecture: dict[str, Any], threshold: float,
               preprocessing: dict[str, Any]) -> None:
    """Write model.pt atomically (weights on CPU, so it loads anywhere)."""
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    payload = {"state_dict": state, "architecture": architecture, "threshold": float(threshold),
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
    return TrainedModel(network, architecture, float(payload["threshold"]), dict(payload["preprocessing"]),
                        parameters)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[torch.dtype | None]:
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU or when disabled.

    Yields:
        The autocast dtype, or None when running in fp32.
    """
    if not enabled or device.type != "cuda":
        yield None
        return
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        yield dtype


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
