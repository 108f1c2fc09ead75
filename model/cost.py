"""Static cost of a network: parameters, forward FLOPs, activation memory (reads and writes nothing).

Everything here runs the network on the `meta` device: tensors there have shapes and dtypes but no
data, so a forward pass of the 600M-parameter variant at 1536x1536 takes milliseconds and no memory.
The model passed in is not touched: its parameters and buffers are swapped for meta tensors of the same
shape for the duration of the call (`torch.func.functional_call`), so a model on the CPU, a GPU or the
meta device itself all work.

Conventions:

- **FLOPs = 2 x multiply-accumulates (MACs)** of the convolutions and linear layers, counted with forward
  hooks from each layer's output shape: a Conv2d does Cout * (Cin / groups) * kh * kw MACs per output
  pixel, so a depthwise 3x3 convolution does 9 per pixel per channel, not 9 * Cin. Biases, BatchNorm,
  ReLU, pooling, up-sampling, additions and concatenations are not counted (they are element-wise and
  bound by memory bandwidth, not arithmetic). `torch.utils.flop_counter` is not used because it
  over-counts the depthwise weight gradient.
- **Activation memory = bytes of the tensors autograd saves for the backward pass** in training mode,
  at batch 1 unless asked: every tensor packed by `torch.autograd.graph.saved_tensors_hooks`, counted
  once per storage (a convolution's input and the ReLU output it reads are the same storage), less the
  parameters and buffers. This is what training keeps alive between forward and backward; the peak
  adds the gradients in flight and the framework's workspace on top of it. Tensors that activation
  checkpointing keeps outside autograd are not seen: measure a checkpointed model on a device instead
  (benchmarks/model_cost.py).
- **bf16** means the parameters and the input in bfloat16, which is what mixed precision saves to within
  the few tensors autocast keeps in fp32 (BatchNorm statistics, a C-sized vector per layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

GIB = 2**30
_COUNTED_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters of model (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def _meta_state(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Return meta stand-ins for model's parameters and buffers; floating ones cast to dtype if given."""
    state = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        state[name] = torch.empty_like(tensor, device="meta", dtype=cast).requires_grad_(tensor.requires_grad)
    return state


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put model in training or eval mode for the duration; restore its mode after."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def _meta_input(model: nn.Module, shape: tuple[int, int, int], in_channels: int | None,
                dtype: torch.dtype) -> torch.Tensor:
    """Return a meta input (batch, in_channels or model.in_channels, height, width)."""
    batch, height, width = shape
    channels = in_channels if in_channels is not None else model.in_channels
    return torch.empty(batch, channels, height, width, device="meta", dtype=dtype)


def forward_flops(
    model: nn.Module, height: int, width: int, batch: int = 1, in_channels: int | None = None
) -> int:
    """Return the FLOPs (2 x MACs of convolutions and linear layers) of one forward pass.

    Args:
        model: the network, (N, C, H, W) -> anything.
        height: input height, pixels.
        width: input width, pixels.
        batch: images per forward pass.
        in_channels: C; default model.in_channels (LightUNet has it).
    """
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features
        elif isinstance(module, nn.ConvTranspose2d):
            # Each input pixel scatters a (Cout/groups) x kh x kw patch.
            kh, kw = module.kernel_size
            macs += inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
        else:
            kh, kw = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, _COUNTED_LAYERS)]
    try:
        with _mode(model, training=False), torch.no_grad():
            x = _meta_input(model, (batch, height, width), in_channels, torch.float32)
            functional_call(model, _meta_state(model, None), (x,))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * macs


def saved_activation_bytes(
    model: nn.Module,
    height: int,
    width: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    in_channels: int | None = None,
) -> int:
    """Return the bytes of activations that a training forward pass saves for its backward pass.

    Args:
        model: the network, (N, C, H, W) -> anything.
        height: input height, pixels.
        width: input width, pixels.
        batch: images per step.
        dtype: dtype of the parameters and input (torch.float32, torch.bfloat16, ...).
        in_channels: C; default model.in_channels (LightUNet has it).
    """
    state = _meta_state(model, dtype)
    weights = {t.untyped_storage()._cdata for t in state.values()}
    saved: dict[int, torch.Tensor] = {}  # storage id -> a tensor on it, kept alive so ids stay unique

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        if key not in weights:
            saved.setdefault(key, tensor)
        return tensor

    with _mode(model, training=True), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        functional_call(model, state, (_meta_input(model, (batch, height, width), in_channels, dtype),))
    return sum(t.untyped_storage().nbytes() for t in saved.values())


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """The cost of a network at one input size (batch 1)."""

    params: int
    height: int
    width: int
    gflops: float
    """Forward GFLOPs (1e9, 2 x MACs)."""
    activation_gib_fp32: float
    """Activations saved for backward in fp32, GiB (2**30 bytes)."""
    activation_gib_bf16: float
    """The same in bf16, GiB."""


def model_cost(model: nn.Module, height: int = 1536, width: int = 1536) -> ModelCost:
    """Return the parameters, forward GFLOPs and saved activations of model at height x width, batch 1.

    The default size is the paper's 1536x1536 input.
    """
    return ModelCost(
        params=count_parameters(model),
        height=height,
        width=width,
        gflops=forward_flops(model, height, width) / 1e9,
        activation_gib_fp32=saved_activation_bytes(model, height, width, dtype=torch.float32) / GIB,
        activation_gib_bf16=saved_activation_bytes(model, height, width, dtype=torch.bfloat16) / GIB,
    )
