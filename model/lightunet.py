"""LightUNet, the lightweight U-Net of Tardy & Mateus for full-size mammograms (reads, writes nothing).

The paper builds its network in four steps from the original U-Net and gives a parameter count for
each; `PAPER_VARIANTS` rebuilds the four. The paper does not say how its blocks are wired, so the
choices below are ours, made so that the four counts land near the paper's (exact counts are pinned by
tests/model/test_lightunet.py):

==================  ============================================  ===========  =====  =====
variant             LightUNet kwargs (depth=7 in all)             ours         paper  ratio
==================  ============================================  ===========  =====  =====
unet-depth7-64f     filters=64, max_filters=2048, conv=standard   591,368,258  600M   0.986
16-filters          filters=16, max_filters=512, conv=standard    36,973,586   37M    0.999
separable           filters=16, max_filters=512, conv=separable   4,214,699    4.6M   0.916
separable+residual  the same and residual=True: the final network  5,440,907    5.3M   1.027
==================  ============================================  ===========  =====  =====

Design choices and why:

- **Depth = number of down-samplings**, as the paper counts it (the original U-Net has depth 4). Depth 7
  takes a 1536x1536 image to 12x12 at the bottom, so height and width must be multiples of 2**7 = 128.
- **Channels double per level up to a cap** (`max_filters`, 32x the initial filters in the paper
  variants: 64 -> 2048, 16 -> 512). Without a cap, 64 filters at depth 7 reach 8192 channels and
  ~2.2G parameters, 3.7 times the paper's 600M; capping at 32x gives 591M and 37.0M, within 2% of
  the paper's first two steps, which suggests that the paper's network stops doubling there too.
- **Block = two 3x3 convolutions, each followed by BatchNorm + ReLU** (the U-Net block). Convolutions
  feeding a BatchNorm carry no bias (BatchNorm's shift makes it redundant); only the 1x1 head has one.
- **Separable convolution = depthwise 3x3 + pointwise 1x1 with nothing between them**, as in Keras'
  SeparableConv2D and in Xception (the backbone of the paper's ref. [2]), whose authors found that an
  activation between the two hurts.
  This cuts a 3x3 convolution's weights by ~9x, so 37.0M -> 4.2M; the paper's 4.6M suggests ~0.4M of its
  weights stayed non-separable (it does not say which), so this step is the farthest from the paper (-8%).
- **Up-sampling = nearest x2 then a (separable) 3x3 convolution + BN + ReLU** that halves the channels,
  instead of a transposed convolution: the same role as U-Net's "up-convolution" without the
  transposed convolution's checkerboard artefacts. (A 2x2 transposed convolution would give 535M / 33.5M:
  10% under the paper.)
- **Short residual connections on every block**, ResNet-style (the sum goes before the last ReLU). The
  shortcut costs no parameters wherever it can: the identity when the width is unchanged, the input
  zero-padded to the new width where an encoder block widens it (ResNet's "option A"); a 1x1
  convolution + BN projects the decoder block's concatenated input (2c channels) down to its c output
  channels, where nothing parameter-free exists. These projections (and their BatchNorms) are the 1.23M
  parameters between the third and fourth steps (paper: +0.7M); a 1x1 projection on every block would
  add 1.9M (6.1M in all, +16%).
- **Activation checkpointing** (`checkpointing=True`) recomputes each encoder/decoder stage in the
  backward pass instead of keeping its activations, for training at batch > 1 on a small GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ConvKind = Literal["standard", "separable"]
CONV_KINDS: tuple[str, ...] = get_args(ConvKind)
NormKind = Literal["batch", "group", "instance"]
NORM_KINDS: tuple[str, ...] = get_args(NormKind)
# Channels per group of GroupNorm (at most): 16 -> 2 groups ... 512 -> 64 groups.
GROUP_NORM_CHANNELS = 8


def norm_layer(kind: NormKind, channels: int) -> nn.Module:
    """Return the normalisation after a convolution: BatchNorm (the paper), GroupNorm or InstanceNorm.

    BatchNorm's statistics come from the batch, which at batch 2-4 and a 2x2 bottleneck are noisy and
    differ between training and inference; GroupNorm and InstanceNorm normalise each image alone, so
    train and eval behave alike (nnU-Net uses instance norm for its small batches). InstanceNorm
    normalises each channel over its own pixels, which the deepest levels barely have (2x2 at 256 px);
    GroupNorm pools GROUP_NORM_CHANNELS channels and stays well defined there.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // GROUP_NORM_CHANNELS), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}; got {kind!r}")


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 convolution (one filter per channel) followed by a pointwise 1x1 convolution.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        )


def conv3x3(in_channels: int, out_channels: int, kind: ConvKind) -> nn.Module:
    """Return a bias-free, size-preserving 3x3 convolution of the given kind ("standard" or "separable")."""
    if kind == "separable":
        return SeparableConv2d(in_channels, out_channels)
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, normalisation (BatchNorm by default), ReLU.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, kind: ConvKind, norm: NormKind = "batch"):
        super().__init__(
            conv3x3(in_channels, out_channels, kind),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Shortcut(nn.Module):
    """The identity path of a residual block, parameter-free wherever the width allows.

    Identity when the width is unchanged, zero-padded channels when it grows (ResNet option A), a 1x1
    convolution + BatchNorm when it shrinks.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: NormKind = "batch"):
        super().__init__()
        self.extra_channels = max(out_channels - in_channels, 0)
        self.project: nn.Module = nn.Identity()
        if out_channels < in_channels:
            self.project = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x to the block's output width."""
        if self.extra_channels:
            # F.pad pads the last dimensions first: (W left, W right, H top, H bottom, C front, C back).
            return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return self.project(x)


class DoubleConv(nn.Module):
    """The U-Net block: two 3x3 convolutions with BatchNorm and ReLU, optionally residual.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, kind: ConvKind, residual: bool,
                 norm: NormKind = "batch"):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels, kind, norm)
        self.conv2 = nn.Sequential(conv3x3(out_channels, out_channels, kind), norm_layer(norm, out_channels))
        self.shortcut = Shortcut(in_channels, out_channels, norm) if residual else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to x."""
        y = self.conv2(self.conv1(x))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.relu(y)


class Down(nn.Module):
    """An encoder stage: 2x2 max-pooling, then a block that (up to the cap) doubles the channels.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H/2, W/2).
    """

    def __init__(self, in_channels: int, out_channels: int, kind: ConvKind, residual: bool,
                 norm: NormKind = "batch"):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.block = DoubleConv(in_channels, out_channels, kind, residual, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the resolution of x and apply the block."""
        return self.block(self.pool(x))


class Up(nn.Module):
    """A decoder stage: up-sample, concatenate the encoder's skip at that level, apply a block.

    Nearest x2 followed by a 3x3 convolution plays U-Net's "up-convolution" without the checkerboard
    artefacts of a strided transposed convolution; unlike bilinear, nearest has a deterministic CUDA
    backward, so training can run under torch.use_deterministic_algorithms.

    Shapes: x (N, in_channels, H, W) and skip (N, out_channels, 2H, 2W) -> (N, out_channels, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, kind: ConvKind, residual: bool,
                 norm: NormKind = "batch"):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up_conv = ConvBNReLU(in_channels, out_channels, kind, norm)
        self.block = DoubleConv(2 * out_channels, out_channels, kind, residual, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample x to skip's resolution and merge the two."""
        x = self.up_conv(self.upsample(x))
        return self.block(torch.cat([skip, x], dim=1))


@contextlib.contextmanager
def _batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics in module on exit.

    Checkpointing runs a stage's forward twice in training mode; without this, the recomputation
    would update BatchNorm's running mean and variance a second time per step.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [{name: buffer.clone() for name, buffer in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(norm, name).copy_(value)


class LightUNet(nn.Module):
    """A U-Net of configurable depth, width, convolution kind and residual blocks.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W) logits (channel 0 mass, 1
    calcification), where H and W are multiples of 2**depth.

    Args:
        depth: number of 2x down-samplings (the original U-Net has 4; the paper uses 7).
        filters: channels of the first level; each down-sampling doubles them.
        max_filters: cap on the channels of any level; None for no cap.
        conv: "standard" 3x3 convolutions or "separable" (depthwise 3x3 + pointwise 1x1).
        residual: add a short residual connection around every block.
        in_channels: channels of the input image.
        out_channels: channels of the output logits, one per lesion class.
        checkpointing: in training, recompute each encoder/decoder stage in the backward pass instead
            of keeping its activations (less memory, ~one more forward pass of compute).
        norm: "batch" (the paper), "group" or "instance" normalisation (see norm_layer).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        depth: int = 7,
        filters: int = 16,
        max_filters: int | None = 512,
        conv: ConvKind = "separable",
        residual: bool = True,
        in_channels: int = 1,
        out_channels: int = 2,
        checkpointing: bool = False,
        norm: NormKind = "batch",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if filters < 1:
            raise ValueError(f"filters must be >= 1, got {filters}")
        if max_filters is not None and max_filters < filters:
            raise ValueError(f"max_filters must be None or >= filters ({filters}), got {max_filters}")
        if conv not in CONV_KINDS:
            raise ValueError(f"conv must be one of {', '.join(CONV_KINDS)}; got {conv!r}")
        if norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}; got {norm!r}")
        self.depth = depth
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.checkpointing = checkpointing
        cap = max_filters if max_filters is not None else filters * 2**depth
        self.channels: tuple[int, ...] = tuple(min(filters * 2**level, cap) for level in range(depth + 1))

        c = self.channels
        self.stem = DoubleConv(in_channels, c[0], conv, residual, norm)
        self.downs = nn.ModuleList(Down(c[i], c[i + 1], conv, residual, norm) for i in range(depth))
        self.ups = nn.ModuleList(Up(c[i + 1], c[i], conv, residual, norm) for i in reversed(range(depth)))
        self.head = nn.Conv2d(c[0], out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """The number that the input's height and width must be multiples of: 2**depth."""
        return 2**self.depth

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (N, C, H, W) with H and W multiples of 2**depth."""
        if x.dim() != 4:
            raise ValueError(f"LightUNet expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(
                f"LightUNet(depth={self.depth}) needs height and width that are multiples of "
                f"2**{self.depth} = {m}; got {height}x{width}"
            )

    def _stage(self, stage: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """Run one encoder/decoder stage, under activation checkpointing when it is on and training."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                stage, *inputs, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _batchnorm_stats_kept(stage)),
            )
        return stage(*inputs)

    def decoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder and decoder on x and return every decoder stage's output.

        Args:
            x: images, (N, in_channels, H, W), H and W multiples of 2**depth.

        Returns:
            depth tensors, coarsest first: element i is (N, c_{depth-1-i}, H/2**(depth-1-i),
            W/2**(depth-1-i)); the last, (N, c0, H, W), is what the head reads.

        Raises:
            ValueError: x is not 4-D or its height or width is not a multiple of 2**depth.
        """
        self.check_input(x)
        skips = [self._stage(self.stem, x)]  # (N, c0, H, W)
        for down in self.downs:  # level i: (N, c_i, H/2**i, W/2**i)
            skips.append(self._stage(down, skips[-1]))
        h = skips.pop()  # the bottom: (N, c_depth, H/2**depth, W/2**depth)
        features = []
        for up in self.ups:  # back up, one level at a time, merging the skip of that level
            h = self._stage(up, h, skips.pop())
            features.append(h)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment x.

        Args:
            x: images, (N, in_channels, H, W), H and W multiples of 2**depth.

        Returns:
            Logits, (N, out_channels, H, W).

        Raises:
            ValueError: x is not 4-D or its height or width is not a multiple of 2**depth.
        """
        return self.head(self.decoder_features(x)[-1])  # (N, out_channels, H, W)


class DeepSupervision(nn.Module):
    """A LightUNet with 1x1 auxiliary heads on its coarser decoder stages, for training only.

    nnU-Net's deep supervision: each of the `levels` decoder stages below full resolution gets its own
    logits, compared with the masks at that scale, so the deep decoder, which sees a whole mass, gets
    a gradient of its own instead of one passed back through every finer stage. The wrapped network is
    unchanged and is what is saved and exported; the auxiliary heads are thrown away after training.

    Shapes: (N, in_channels, H, W) -> in training, levels + 1 logits, finest first: element k is
    (N, out_channels, H/2**k, W/2**k); in eval mode the network's own (N, out_channels, H, W) logits.

    Args:
        network: the LightUNet to train.
        levels: auxiliary heads, on the stages at 1/2, 1/4, ... 1/2**levels of the input; at most depth - 1.

    Raises:
        ValueError: levels is out of range.
    """

    def __init__(self, network: LightUNet, levels: int):
        super().__init__()
        if not 1 <= levels < network.depth:
            raise ValueError(f"deep supervision levels must be in [1, {network.depth - 1}], got {levels}")
        self.network = network
        self.levels = levels
        # Decoder stage at 1/2**k of the input has network.channels[k] channels.
        self.aux_heads = nn.ModuleList(nn.Conv2d(network.channels[k], network.out_channels, 1)
                                       for k in range(1, levels + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Return the logits at every supervised scale (training) or the network's logits (eval)."""
        if not self.training:
            return self.network(x)
        features = self.network.decoder_features(x)[::-1]  # finest first: features[k] is at 1/2**k
        return [self.network.head(features[0])] + [head(features[k])
                                                   for k, head in enumerate(self.aux_heads, start=1)]


class PaperVariant(NamedTuple):
    """One step of the paper's construction: LightUNet keyword arguments and the paper's parameter count."""

    kwargs: Mapping[str, Any]
    paper_params: int


def _variant(paper_params: int, **kwargs: Any) -> PaperVariant:
    return PaperVariant(MappingProxyType(kwargs), paper_params)


PAPER_VARIANTS: Mapping[str, PaperVariant] = MappingProxyType({
    "unet-depth7-64f": _variant(
        600_000_000, depth=7, filters=64, max_filters=2048, conv="standard", residual=False),
    "16-filters": _variant(37_000_000, depth=7, filters=16, max_filters=512, conv="standard", residual=False),
    "separable": _variant(4_600_000, depth=7, filters=16, max_filters=512, conv="separable", residual=False),
    "separable+residual": _variant(
        5_300_000, depth=7, filters=16, max_filters=512, conv="separable", residual=True),
})
"""The four steps of the paper, in its order; the last is the paper's final network."""


def build_variant(name: str, **overrides: Any) -> LightUNet:
    """Build one of PAPER_VARIANTS by name.

    Args:
        name: a key of PAPER_VARIANTS.
        **overrides: LightUNet arguments to change (e.g. checkpointing=True).

    Raises:
        KeyError: name is not a paper variant.
    """
    if name not in PAPER_VARIANTS:
        raise KeyError(f"unknown variant {name!r}; choose one of {', '.join(PAPER_VARIANTS)}")
    return LightUNet(**{**PAPER_VARIANTS[name].kwargs, **overrides})
