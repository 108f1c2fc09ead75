"""Train: the preprocessed dataset in, the best LightUNet (model.pt), its threshold and curves out.

Whole images at the preprocessed size (the paper never trains on patches). One MLflow run per
training; every epoch ends with an atomic checkpoint (model, optimizer, scheduler, scaler, RNG
states), so a killed run re-started with the same config continues where it stopped and, on CPU,
reaches the same weights as an uninterrupted run.

Under torchrun (`torchrun --nproc-per-node N --no-python mammoseg train ...`) each rank trains a
DistributedDataParallel replica on its share of every global batch of N x batch_size draws; rank 0
alone tracks, validates, selects and writes (mammoseg.distributed). Draws, patches and
augmentations are functions of the epoch and a draw's position in it, never of the rank, so N ranks
at batch b train like one process at batch N x b on the same images. One process (no torchrun)
draws exactly as it did before there were ranks: its loader's samplers and one augmentation
generator per epoch (its lesion-aware draws are the ranks', its shuffle and augmentations are not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler
from tqdm import tqdm

from mammoseg import distributed, tracking
from mammoseg.config import TrainConfig
from mammoseg.data import CLASSES, CONTRACT_FILE, INDEX_FILE, ExampleDataset, load_examples, read_dataset
from mammoseg.errors import UserError
from mammoseg.fileio import sha256_of, write_atomically
from mammoseg.inference import (
    MODEL_FILE,
    autocast,
    cpu_supports_bf16,
    predict_probabilities,
    save_model,
)
from mammoseg.metrics import choose_threshold, dice_counts, nan_to_zero, pooled_dice
from mammoseg.overlays import figure_grid, figure_panel, save_png
from mammoseg.plots import progress_png
from model import DeepSupervision, LightUNet

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# Where a training writes until it succeeds (inside model_out, so no write outside it is needed).
STAGING_DIR = ".training"
HISTORY_FILE = "history.csv"
PROGRESS_FILE = "progress.png"
OVERLAYS_DIR = "overlays"
# What a training owns in model_out, published together when it succeeds.
PUBLISHED = (MODEL_FILE, CHECKPOINT_FILE, HISTORY_FILE, PROGRESS_FILE, tracking.RUN_ID_FILE, OVERLAYS_DIR)
# Fields that do not change what is trained: a checkpoint stays valid when only these differ.
_NOT_HASHED = {"num_workers", "resume", "checkpoint_dir", "log_system_metrics", "pipeline_run_id", "overlay_every",
               "overlay_images", "experiment", "device"}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What training produced."""

    run_id: str
    best_epoch: int
    best_val_dice: float
    threshold: tuple[float, ...]
    model_path: Path
    metrics_path: Path


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float,
                      bce_weight: float, bce_pos_weight: float = 1.0,
                      pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-class soft Dice (pooled over the batch) plus binary cross-entropy.

    Args:
        logits: (N, 2, H, W) raw network outputs.
        target: (N, 2, H, W) masks in {0, 1}.
        dice_weight: weight of the mean soft-Dice loss over classes.
        bce_weight: weight of the mean binary cross-entropy.
        bce_pos_weight: weight of lesion pixels in the cross-entropy (background pixels weigh 1).
        pool: sums the (2, C) intersection and denominator sums over the ranks, differentiably
            (Ranks.sum_with_grad), so the Dice is that of the global batch; None for one process.
            The cross-entropy is a mean per rank, which DistributedDataParallel's gradient average
            turns into the global batch's mean (every rank holds as many images).

    Returns:
        A scalar loss.
    """
    # fp32 at least (bf16/fp16 logits under autocast); float64 stays float64 (the DDP equivalence test).
    logits = logits if logits.dtype == torch.float64 else logits.float()
    probabilities = torch.sigmoid(logits)
    dims = (0, 2, 3)
    intersection = (probabilities * target).sum(dims)
    denominator = probabilities.sum(dims) + target.sum(dims)
    if pool is not None:
        intersection, denominator = pool(torch.stack([intersection, denominator]))
    # Smoothing of 1 px: a class absent from the batch and absent from the prediction scores ~1.
    soft_dice = (2 * intersection + 1) / (denominator + 1)
    pos_weight = torch.tensor(bce_pos_weight, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    return dice_weight * (1 - soft_dice.mean()) + bce_weight * bce


def deep_supervision_loss(logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                          dice_weight: float, bce_weight: float, bce_pos_weight: float = 1.0,
                          pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """segmentation_loss at every supervised scale, weighted 1, 1/2, 1/4, ... and normalised (nnU-Net).

    Args:
        logits: (N, C, H, W), or a sequence of them finest first, element k at (H/2**k, W/2**k)
            (DeepSupervision's training output).
        target: (N, C, H, W) masks in {0, 1}; max-pooled to each coarser scale, so a calcification of
            a few pixels stays a lesion pixel there instead of vanishing as under nearest resampling.
        dice_weight: weight of the soft-Dice term, as segmentation_loss.
        bce_weight: weight of the cross-entropy term, as segmentation_loss.
        bce_pos_weight: weight of lesion pixels in the cross-entropy, as segmentation_loss.
        pool: sums the Dice's sums over the ranks at every scale, as segmentation_loss.

    Returns:
        A scalar loss; segmentation_loss itself for a single tensor.
    """
    if isinstance(logits, torch.Tensor):
        return segmentation_loss(logits, target, dice_weight, bce_weight, bce_pos_weight, pool)
    weights = [0.5**k for k in range(len(logits))]
    total = 0.0
    for k, (scale_logits, weight) in enumerate(zip(logits, weights, strict=True)):
        scale_target = F.max_pool2d(target, 2**k) if k else target
        total = total + weight * segmentation_loss(scale_logits, scale_target, dice_weight, bce_weight,
                                                   bce_pos_weight, pool)
    return total / sum(weights)


def sample_patches(images: torch.Tensor, masks: torch.Tensor, size: int, lesion_prob: float,
                   generators: torch.Generator | Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one square patch per image, centred near a lesion pixel with probability lesion_prob.

    nnU-Net's foreground oversampling: a uniformly placed patch rarely holds one of the few lesions.
    A lesion patch puts a random lesion pixel at a random position inside its central 3/4, so the
    network never learns "lesions sit in the middle". Draws come from one generator for the batch
    (one process: the epoch's, resumable), or from each image's own (several ranks: draw_generators,
    the same whichever rank the image lands in).

    Args:
        images: (N, 1, H, W).
        masks: (N, C, H, W) in {0, 1}.
        size: the patch side, <= H and W.
        lesion_prob: probability that a patch is placed on a lesion (when the image has one).
        generators: a CPU generator, or N of them, one per image.

    Returns:
        (N, 1, size, size) images and (N, C, size, size) masks.
    """
    height, width = images.shape[-2:]
    if isinstance(generators, torch.Generator):
        generators = [generators] * len(images)
    out_images, out_masks = [], []
    for image, mask, generator in zip(images, masks, generators, strict=True):
        draws = torch.rand(3, generator=generator)
        lesion = mask.amax(dim=0) > 0
        if draws[0] < lesion_prob and bool(lesion.any()):
            rows, cols = torch.nonzero(lesion, as_tuple=True)
            pick = int(torch.randint(len(rows), (1,), generator=generator))
            margin = size // 8
            top = int(rows[pick]) - margin - int(draws[1] * (size - 2 * margin))
            left = int(cols[pick]) - margin - int(draws[2] * (size - 2 * margin))
        else:
            top, left = int(draws[1] * (height - size + 1)), int(draws[2] * (width - size + 1))
        top, left = min(max(top, 0), height - size), min(max(left, 0), width - size)
        out_images.append(image[:, top:top + size, left:left + size])
        out_masks.append(mask[:, top:top + size, left:left + size])
    return torch.stack(out_images), torch.stack(out_masks)


def augment(images: torch.Tensor, masks: torch.Tensor, config: TrainConfig,
            generators: torch.Generator | Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply random vertical flips, small rotations/zooms and gamma/contrast jitter to a batch.

    Random draws come from one generator for the batch (one process: seeded per epoch), or from
    each image's own (several ranks: draw_generators, seeded by the epoch and the image's draw
    position, so an image gets the same ones whichever rank it is trained on). Either way a resumed
    run sees the same augmentations as an uninterrupted one.

    Args:
        images: (N, 1, H, W) in [0, 1].
        masks: (N, 2, H, W) in {0, 1}.
        config: augmentation strengths.
        generators: a CPU generator, or N of them, one per image.

    Returns:
        The augmented (images, masks), same shapes.
    """
    n = images.shape[0]
    if isinstance(generators, torch.Generator):
        draws = torch.rand(n, 5, generator=generators).to(images.device)
    else:
        draws = torch.stack([torch.rand(5, generator=generator) for generator in generators]).to(images.device)
    flip = draws[:, 0] < config.aug_vflip_prob
    angle = (draws[:, 1] * 2 - 1) * math.radians(config.aug_rotate_deg)
    zoom = 1 + (draws[:, 2] * 2 - 1) * config.aug_scale
    # Inverse mapping (output -> input coordinates): rotate by angle, scale by 1/zoom, flip rows.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    row_sign = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * row_sign
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos * row_sign
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    log_gamma = (draws[:, 3] * 2 - 1) * math.log1p(config.aug_gamma)
    images = images.clamp(0, 1) ** torch.exp(log_gamma).view(n, 1, 1, 1)
    contrast = (1 + (draws[:, 4] * 2 - 1) * config.aug_contrast).view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * contrast + mean).clamp(0, 1), masks


def _lr_factor(epoch: int, config: TrainConfig) -> float:
    """Linear warm-up for warmup_epochs, then cosine decay to 0 at the last epoch."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    span = max(config.epochs - config.warmup_epochs, 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


def config_hash(config: TrainConfig, dataset_digest: str, world_size: int = 1) -> str:
    """Hash the fields that define a training (and the data), to recognise a resumable checkpoint.

    The number of ranks is part of it when there are several: N ranks at batch b train at a global
    batch of N x b, another training than the same config on another number of GPUs. One process
    hashes as it did before there were ranks, so its checkpoints (and run names) stay valid.
    """
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_HASHED}
    hashed = {"config": fields, "dataset": dataset_digest}
    if world_size > 1:
        hashed["world_size"] = world_size
    text = json.dumps(hashed, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_path(config: TrainConfig, model_out: Path) -> Path:
    """Return where the resumable checkpoint lives: in model_out, or under checkpoint_dir[/pipeline run]."""
    if not config.checkpoint_dir:
        return model_out / CHECKPOINT_FILE
    root = Path(config.checkpoint_dir)
    return (root / config.pipeline_run_id if config.pipeline_run_id else root) / CHECKPOINT_FILE


def _architecture(config: TrainConfig, in_channels: int = 1) -> dict[str, Any]:
    return {"depth": config.depth, "filters": config.filters, "max_filters": config.max_filters,
            "conv": config.conv, "residual": config.residual, "norm": config.norm, "in_channels": in_channels,
            "out_channels": len(CLASSES)}


def sampling_weights(rows: pd.DataFrame, mass_image_share: float) -> np.ndarray | None:
    """Return per-image draw probabilities that give images with a mass `mass_image_share` of the draws.

    Masses are in a fifth of the images and cover ~0.3 % of their pixels; drawn uniformly, a batch of
    4 often holds none, and the loss then mostly teaches "no mass here". nnU-Net oversamples
    foreground for the same reason. Images without a mass share the rest uniformly (calcifications
    are in half the images, so they need no boost). None (uniform) when the share is 0 or one group
    is empty.

    Args:
        rows: the training split's index rows (mass_px per image).
        mass_image_share: the share of draws, in [0, 1).
    """
    has_mass = (rows["mass_px"].to_numpy() > 0)
    if mass_image_share <= 0 or has_mass.all() or not has_mass.any():
        return None
    weights = np.where(has_mass, mass_image_share / has_mass.sum(), (1 - mass_image_share) / (~has_mass).sum())
    return weights / weights.sum()


def mass_image_share(config: TrainConfig, epoch: int) -> float:
    """Return the share of mass images among the draws of epoch `epoch` (0-based).

    Linear from train.mass_image_share at the first epoch to train.mass_image_share_end at the last:
    the early epochs show the few mass images often enough for the network to learn what a mass is,
    the late ones show the lesion-free tissue that it must not call one.
    """
    progress = epoch / max(config.epochs - 1, 1)
    return config.mass_image_share + (config.mass_image_share_end - config.mass_image_share) * min(progress, 1.0)


class EpochDraws(Sampler[tuple[int, int]]):
    """One epoch's training draws, this rank's share: (image index, position in the epoch's draws).

    The sampler of several ranks; one process keeps its DataLoader's own (_Trainer._loader), so its
    random stream is the one it always had. Every rank computes the same global sequence from the
    epoch's seed: with `weights`, `len(rows)` draws with replacement (WeightedRandomSampler's draw,
    the one process's), else a seeded permutation (not the one process's: its DataLoader draws the
    workers' base seed from the generator first). Global batches of batch_size x world_size
    consecutive draws follow one another; rank r takes the r-th contiguous slice of each, so with
    lesion-aware sampling the ranks train on exactly the batches one process at the global batch
    size would. With several ranks the sequence is lengthened to a multiple of the world size (more
    draws with replacement; a permutation repeats its first images, as DistributedSampler does) so
    every rank takes as many steps; a last global batch of a single image, which BatchNorm cannot
    normalise, is dropped.

    Args:
        count: the number of training images.
        weights: per-image draw probabilities (sampling_weights), or None for a shuffle.
        seed: the epoch's seed (the same on every rank).
        batch_size: images per rank and step.
        ranks: this process's place among the ranks.
    """

    def __init__(self, count: int, weights: np.ndarray | None, seed: int, batch_size: int,
                 ranks: distributed.Ranks) -> None:
        self.count, self.weights, self.seed = count, weights, seed
        self.batch_size, self.ranks = batch_size, ranks
        world = ranks.world_size
        self.drawn = -(-count // world) * world
        global_batch = batch_size * world
        # The draws trained on: all, but a last global batch of one image.
        self.total = self.drawn - 1 if self.drawn % global_batch == 1 and self.drawn > global_batch else self.drawn

    def _sequence(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed)
        if self.weights is not None:
            # WeightedRandomSampler's own draw, so one process samples as it always did.
            weights = torch.as_tensor(self.weights, dtype=torch.double)
            return torch.multinomial(weights, self.drawn, True, generator=generator).tolist()
        # RandomSampler's own shuffle, repeated from the start where several ranks need more draws.
        order = torch.randperm(self.count, generator=generator).tolist()
        return (order * (-(-self.drawn // self.count)))[:self.drawn]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield this rank's (image index, draw position) pairs in training order."""
        sequence = self._sequence()
        global_batch = self.batch_size * self.ranks.world_size
        for start in range(0, self.total, global_batch):
            share = min(global_batch, self.total - start) // self.ranks.world_size
            for position in range(start + self.ranks.rank * share, start + (self.ranks.rank + 1) * share):
                yield sequence[position], position

    def __len__(self) -> int:
        return self.total // self.ranks.world_size


class _Drawn:
    """A training split addressed by EpochDraws' pairs: items (image, mask, draw position)."""

    def __init__(self, dataset: ExampleDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, draw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
        index, position = draw
        return (*self.dataset[index], position)


def draw_generators(epoch_seed: int, positions: Sequence[int]) -> list[torch.Generator]:
    """Return one CPU generator per draw, seeded by the epoch and the draw's position in it.

    A draw's patch and augmentation are then the same whatever batch, step or rank it falls in, and
    a resumed epoch repeats them.
    """
    return [torch.Generator().manual_seed((epoch_seed + 1) * 1_000_003 + int(position)) for position in positions]


def _moving_average(decay: float):
    """Return AveragedModel's update for an exponential moving average of the weights with warm-up.

    The decay after n updates is min(decay, (1 + n) / (10 + n)) (TensorFlow's
    ExponentialMovingAverage with num_updates): the first steps' weights, still near the
    initialisation, fade out fast, so a short training's average is not dragged back to its start.
    Integer buffers (BatchNorm's step counter) take the current value.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        n = float(updates)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return update


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # Needed by cuBLAS for deterministic matrix products; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _environment_tags(device: torch.device, config: TrainConfig) -> dict[str, Any]:
    tags = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda or "none",
            "python_version": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "deterministic": config.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    return tags


def _require(config: TrainConfig, name: str, valid: Callable[[Any], bool], rule: str) -> None:
    """Raise a one-line UserError naming train.<name> unless valid(its value)."""
    value = getattr(config, name)
    if not valid(value):
        raise UserError(f"train.{name} must {rule}, got {value}")


class _Trainer:
    """The training loop's state; one instance per `run`."""

    def __init__(self, config: TrainConfig, dataset_dir: Path, model_out: Path,
                 ranks: distributed.Ranks | None = None) -> None:
        self.config = config
        self.dataset_dir = dataset_dir
        self.model_out = model_out
        self.index, self.contract = read_dataset(dataset_dir)
        self.dataset_digest = sha256_of(dataset_dir / INDEX_FILE)
        splits = {name: self.index[self.index["split"] == name] for name in ("train", "val")}
        for name, rows in splits.items():
            if rows.empty:
                raise UserError(f"{dataset_dir / INDEX_FILE}: the {name} split is empty")
        self.splits = splits
        self.ranks = ranks or distributed.single(config.device)
        self.device = self.ranks.device
        # bf16 autocast on CPUs with native bf16 units too (AMX: ~1.4x per step at 256 px).
        self.amp = config.amp and (self.device.type == "cuda" or cpu_supports_bf16())
        for name in ("mass_image_share", "mass_image_share_end", "weight_ema", "selection_ema"):
            _require(config, name, lambda v: 0 <= v < 1, "be in [0, 1)")
        _require(config, "validate_every", lambda v: v >= 1, "be at least 1")
        _seed_everything(config.seed, config.deterministic)
        # The contract says how many planes an input has (block mean, and block maximum when on).
        self.in_channels = 2 if self.contract.get("max_channel") else 1
        self.architecture = _architecture(config, self.in_channels)
        self.network = LightUNet(**self.architecture, checkpointing=config.checkpointing)
        # Start from the lesion prior instead of p = 0.5 everywhere: the first steps then learn where
        # lesions are rather than that almost nothing is one (RetinaNet's prior initialisation).
        prior_logit = math.log(config.foreground_prior / (1 - config.foreground_prior))
        torch.nn.init.constant_(self.network.head.bias, prior_logit)
        self.network = self.network.to(self.device)
        size = int(self.contract.get("size", 0)) or None
        if size is not None and size % self.network.size_multiple:
            raise UserError(f"{dataset_dir / CONTRACT_FILE}: image size {size} is not a multiple of "
                            f"2**depth = {self.network.size_multiple} (use preprocess --size)")
        if config.patch_size % self.network.size_multiple:
            raise UserError(f"train.patch_size {config.patch_size} must be a multiple of "
                            f"{self.network.size_multiple} (0 = whole images)")
        # A patch as large as the image is the whole image (nnU-Net clips its patch to the image the
        # same way), so one patch_size serves the demo's 512 px data and the tests' 128 px data.
        self.patch_size = config.patch_size if size is None or config.patch_size < size else 0
        if config.patch_size and not self.patch_size:
            log.info("train.patch_size %d >= image size %d: training on whole images", config.patch_size, size)
        bottleneck = (self.patch_size or size or 0) // self.network.size_multiple
        # Several ranks normalise over the global batch (synchronise_batch_norm below).
        if config.norm == "batch" and config.batch_size * self.ranks.world_size == 1 and bottleneck < 2:
            raise UserError(f"train.batch_size 1 with norm batch: BatchNorm at the {bottleneck}x{bottleneck} "
                            "bottleneck has one value per channel; use --batch-size 2 or more, or --norm group")
        if config.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        # Several ranks: BatchNorm takes the global batch's statistics, so its output, and the EMA of
        # its running statistics below, are those of one process at the global batch size.
        self.network = distributed.synchronise_batch_norm(self.network, self.ranks)
        # What the optimizer trains: the network, or the network inside deep supervision's auxiliary
        # heads (training only: the network alone is validated, averaged, saved and exported).
        _require(config, "deep_supervision", lambda v: 0 <= v < config.depth, f"be in [0, {config.depth - 1}]")
        self.trained: torch.nn.Module = self.network
        if config.deep_supervision:
            self.trained = DeepSupervision(self.network, config.deep_supervision).to(self.device)
            for head in self.trained.aux_heads:
                torch.nn.init.constant_(head.bias, prior_logit)
            if config.channels_last:
                self.trained = self.trained.to(memory_format=torch.channels_last)
        self.parameters = sum(p.numel() for p in self.network.parameters())
        # The network that is validated, selected and saved: the weights' moving average when
        # weight_ema is on (its BatchNorm statistics averaged alike), else the trained network itself.
        self.averaged = None
        if config.weight_ema:
            self.averaged = torch.optim.swa_utils.AveragedModel(
                self.network, multi_avg_fn=_moving_average(config.weight_ema), use_buffers=True)
        self.optimizer = torch.optim.AdamW(self.trained.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: _lr_factor(e, config))
        use_scaler = self.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.epoch = 0
        self.best = {"epoch": -1, "val_dice": -1.0}
        self.selection_score: float | None = None  # the EMA of the validation Dice
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None
        # The contract (input channels, size, normalisation) changes what a checkpoint means even when
        # the index does not: hash it too.
        self.hash = config_hash(config, f"{self.dataset_digest}:{sha256_of(dataset_dir / CONTRACT_FILE)}",
                                self.ranks.world_size)
        self.checkpoint_path = checkpoint_path(config, model_out)
        # What the training step runs: the network itself, or its DDP replica (which averages the
        # gradients over the ranks in backward; built after the optimizer, sharing its parameters).
        self.replica: torch.nn.Module = self.trained
        if self.ranks.distributed:
            self.replica = DistributedDataParallel(
                self.trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def release_replica(self) -> None:
        """Drop the DDP replica; call it before the process group is destroyed (distributed.stop).

        The replica's reducer holds the process group. Freed after destroy_process_group, it is the
        group's last owner, and its destructor runs with the GIL held while it joins gloo's worker
        threads. A worker that is still freeing a finished collective's tensors waits for that GIL:
        rank 0 deadlocked at exit this way under torchrun on a 2-core CPU (CI hung in
        test_distributed). Freed first, the reducer leaves the last reference to the process group
        registry, whose destructor releases the GIL.
        """
        if self.replica is not self.trained:
            self.replica = self.trained
            gc.collect()  # frees the DDP module now even if it sits in a reference cycle

    @property
    def evaluated(self) -> torch.nn.Module:
        """The network validation, model selection and the saved model use."""
        return self.averaged.module if self.averaged is not None else self.network

    # --- checkpoints -------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the checkpoint in model_out when it belongs to this config; return whether it did."""
        path = self.checkpoint_path
        if not path.is_file():
            if self.config.resume:
                raise UserError(f"{path}: --resume given but there is no checkpoint to resume from")
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("config_hash") != self.hash:
            if self.config.resume:
                raise UserError(f"{path}: checkpoint was written for another config or dataset "
                                f"({state.get('config_hash')} != {self.hash}); cannot --resume")
            log.warning("%s belongs to another config or dataset: starting afresh", path)
            return False
        self.trained.load_state_dict(state["model"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["averaged"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.bad_epochs = state["epoch"], state["best"], state["bad_epochs"]
        self.selection_score = state["selection_score"]
        self.history, self.run_id = state["history"], state["run_id"]
        _set_rng_state(state["rng"])
        best_beside = self.checkpoint_path.parent / MODEL_FILE
        if self.ranks.is_main and not (self.model_out / MODEL_FILE).is_file() and best_beside.is_file():
            # A new container with an empty model folder (a KFP retry): the best weights so far come
            # from the checkpoint volume.
            shutil.copy2(best_beside, self.model_out / MODEL_FILE)
        log.info("resuming from %s at epoch %d (MLflow run %s)", path, self.epoch, self.run_id)
        return True

    def keep_best_beside_checkpoint(self) -> None:
        """Copy model.pt next to a checkpoint kept outside the model folder, so a resume has it too."""
        if self.checkpoint_path.parent != self.model_out:
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            best = self.model_out / MODEL_FILE
            write_atomically(self.checkpoint_path.parent / MODEL_FILE, lambda tmp: shutil.copy2(best, tmp))

    def save_checkpoint(self) -> None:
        state = {"model": self.trained.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": self.epoch, "best": self.best, "bad_epochs": self.bad_epochs,
                 "history": self.history, "run_id": self.run_id, "rng": _rng_state(),
                 "selection_score": self.selection_score,
                 "averaged": self.averaged.state_dict() if self.averaged is not None else None,
                 "config_hash": self.hash}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    # --- one epoch ---------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle_seed: int | None) -> DataLoader:
        """Return the split's loader: validation in order; training shuffled or lesion-aware sampled.

        One process's training batches are (images, masks), from the DataLoader's own samplers;
        several ranks' are (images, masks, draw positions), this rank's share of the epoch's draws
        (EpochDraws).
        """
        rows = self.splits[split]
        dataset = ExampleDataset(self.dataset_dir, rows)
        common = {"batch_size": self.config.batch_size, "num_workers": self.config.num_workers,
                  "pin_memory": self.device.type == "cuda"}
        if shuffle_seed is None:
            return DataLoader(dataset, shuffle=False, drop_last=False, **common)
        weights = sampling_weights(rows, mass_image_share(self.config, self.epoch))
        if self.ranks.distributed:
            draws = EpochDraws(len(rows), weights, shuffle_seed, self.config.batch_size, self.ranks)
            return DataLoader(_Drawn(dataset), sampler=draws, drop_last=False, **common)
        generator = torch.Generator().manual_seed(shuffle_seed)
        # A last batch of one image gives BatchNorm a single sample at the 1x1-2x2 bottleneck.
        drop_last = len(rows) % self.config.batch_size == 1 and len(rows) > self.config.batch_size
        if weights is None:
            return DataLoader(dataset, shuffle=True, generator=generator, drop_last=drop_last, **common)
        sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(rows), replacement=True,
                                        generator=generator)
        return DataLoader(dataset, sampler=sampler, drop_last=drop_last, **common)

    def train_epoch(self) -> float:
        """Train one epoch on this rank's share of the draws; return the mean loss over steps and ranks."""
        config = self.config
        self.trained.train()
        epoch_seed = config.seed * 100_003 + self.epoch
        # One process: one generator for the epoch's patches and augmentations, drawn batch after
        # batch. Several ranks: one per draw (draw_generators), whichever rank holds it.
        augment_rng = torch.Generator().manual_seed(epoch_seed + 1)
        total, batches = 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        loader = self._loader("train", shuffle_seed=epoch_seed)
        pool = self.ranks.sum_with_grad if self.ranks.distributed else None
        for step, (images, masks, *positions) in enumerate(tqdm(
                loader, desc=f"epoch {self.epoch + 1}/{config.epochs}", unit="batch", leave=False,
                disable=None if self.ranks.is_main else True)):
            generators = draw_generators(epoch_seed, positions[0].tolist()) if positions else augment_rng
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
            if self.patch_size:
                images, masks = sample_patches(images, masks, self.patch_size, config.patch_lesion_prob,
                                               generators)
            images, masks = augment(images, masks, config, generators)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            stepping = (step + 1) % config.grad_accum_steps == 0 or step + 1 == len(loader)
            # Accumulating steps keep their gradients local; the stepping one averages them over the ranks.
            with self._gradient_sync(stepping):
                with autocast(self.device, self.amp):
                    logits = self.replica(images)
                loss = deep_supervision_loss(logits, masks, config.dice_weight, config.bce_weight,
                                             config.bce_pos_weight, pool)
                self.scaler.scale(loss / config.grad_accum_steps).backward()
            if stepping:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.averaged is not None:
                    self.averaged.update_parameters(self.network)
            total += float(loss.detach())
            batches += 1
        self.scheduler.step()
        return self.ranks.mean(total / max(batches, 1))

    def _gradient_sync(self, stepping: bool):
        """Return DDP's no_sync() for an accumulating step, else a no-op context."""
        if self.ranks.distributed and not stepping:
            return self.replica.no_sync()
        return contextlib.nullcontext()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss and pooled Dice per class (threshold 0.5), their mean and all-lesion Dice."""
        network = self.evaluated.eval()
        total, batches = 0.0, 0
        counts: dict[str, list] = {name: [] for name in (*CLASSES, "all")}
        for images, masks in self._loader("val", shuffle_seed=None):
            images, masks = images.to(self.device), masks.to(self.device)
            if self.config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                logits = network(images)
            total += float(segmentation_loss(logits, masks, self.config.dice_weight, self.config.bce_weight,
                                             self.config.bce_pos_weight))
            batches += 1
            predicted = (torch.sigmoid(logits.float()) >= 0.5).cpu().numpy()
            truth = masks.cpu().numpy() > 0.5
            for pred, gt in zip(predicted, truth, strict=True):
                for channel, name in enumerate(CLASSES):
                    counts[name].append(dice_counts(pred[channel], gt[channel]))
                counts["all"].append(dice_counts(pred.any(0), gt.any(0)))
        dice = {f"val_dice_{name}": nan_to_zero(pooled_dice(values)) for name, values in counts.items()}
        dice["val_dice_mean"] = (dice["val_dice_mass"] + dice["val_dice_calcification"]) / 2
        return {"val_loss": total / max(batches, 1), **dice}

    def overlays(self, path: Path) -> None:
        """Write a Figure-2-like grid (input, thresholded output, ground truth) of a few val images."""
        rows = self.splits["val"].head(self.config.overlay_images)
        examples = load_examples(self.dataset_dir, rows)
        probabilities = predict_probabilities(self.evaluated.eval(), [image for image, _ in examples], self.device,
                                              self.config.batch_size, self.amp, self.config.channels_last)
        panels = [figure_panel(image[0], prob >= 0.5, mask, title=str(image_id))
                  for (image, mask), prob, image_id in zip(examples, probabilities, rows["image_id"], strict=True)]
        save_png(figure_grid(panels), path)


def run(config: TrainConfig, dataset: Path, model_out: Path, metrics_out: Path,
        validation_report: Path | None = None) -> TrainResult:
    """Train LightUNet on the train split, select on val, and record everything in one MLflow run.

    Under torchrun every rank calls this (mammoseg.distributed): rank 0 alone opens the MLflow run,
    validates, selects and writes model_out and metrics_out, while the others train their share of
    each global batch and wait for it; every rank resumes from the same checkpoint and returns rank
    0's result.

    Args:
        config: training parameters.
        dataset: the preprocessed dataset (index.parquet, dataset.json, arrays).
        model_out: folder for model.pt, checkpoint.pt, history.csv, the run id.
        metrics_out: JSON summary (best epoch, validation Dice, threshold).
        validation_report: the validate stage's report folder, attached to the run when given.

    Returns:
        The run id, best epoch and validation Dice, the chosen threshold and output paths.
    """
    if validation_report is not None and not validation_report.is_dir():
        raise UserError(f"{validation_report}: validation report folder not found")
    ranks = distributed.start(config.device)
    # Training works in a staging folder inside model_out and publishes only when it succeeds: a
    # re-run that fails (bad input, unreachable tracking server, a crash) leaves the last good model,
    # its run id and checkpoint where evaluate and export read them.
    work = model_out / STAGING_DIR
    if ranks.is_main:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(config, dataset, work, ranks)
    if ranks.is_main:
        _adopt_finished_training(trainer, model_out)
    ranks.barrier()
    resumed = trainer.restore()
    # Every rank has read the checkpoint (or found none) before rank 0 clears a stale one away.
    ranks.barrier()
    if not ranks.is_main:
        _train_loop(trainer, None)
        result = ranks.from_main(None)
        _leave_the_ranks(trainer, ranks)
        return result
    if not resumed:
        _empty_folder(work)
    run_name = f"lightunet-{trainer.contract.get('size', '?')}px-{trainer.hash[:6]}"
    with _open_run(trainer, run_name, resumed) as mlflow_run:
        trainer.run_id = mlflow_run.run_id
        tracking.write_run_id(work, mlflow_run.run_id)
        if not resumed:
            _log_run_inputs(mlflow_run, trainer, config, dataset, validation_report)
        _train_loop(trainer, mlflow_run)
        result = _finalize(trainer, mlflow_run, metrics_out)
    _publish(work, model_out)
    result = ranks.from_main(dataclasses.replace(result, model_path=model_out / MODEL_FILE))
    _leave_the_ranks(trainer, ranks)
    return result


def _leave_the_ranks(trainer: _Trainer, ranks: distributed.Ranks) -> None:
    """Free the DDP replica, then leave the process group: in this order (`_Trainer.release_replica`)."""
    trainer.release_replica()
    distributed.stop(ranks)


def _adopt_finished_training(trainer: _Trainer, model_out: Path) -> None:
    """Continue from model_out's own checkpoint when no interrupted one is staged.

    A finished (or, before staging existed, in-place) training keeps its checkpoint in model_out; a
    re-run of the same config then resumes it (it ends at once) instead of training again. Copies, so
    model_out stays intact until the re-run publishes.
    """
    if trainer.checkpoint_path.parent != trainer.model_out or trainer.checkpoint_path.is_file():
        return
    finished = model_out / CHECKPOINT_FILE
    if not finished.is_file():
        return
    state = torch.load(finished, map_location="cpu", weights_only=False)
    if state.get("config_hash") != trainer.hash:
        return
    for name in PUBLISHED:
        source = model_out / name
        if source.is_dir():
            shutil.copytree(source, trainer.model_out / name, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, trainer.model_out / name)


def _empty_folder(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _publish(work: Path, model_out: Path) -> None:
    """Move a successful training's outputs from the staging folder into model_out.

    Each file is replaced atomically; a published name the new training did not write (overlays of a
    run without them, a checkpoint kept on a volume) is removed, so model_out never mixes two runs.
    Files of model_out that training does not own (a metrics file a user put there) stay.
    """
    for name in PUBLISHED:
        source, target = work / name, model_out / name
        if target.is_dir():
            shutil.rmtree(target)
        if source.exists():
            os.replace(source, target)
        else:
            target.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)


def _open_run(trainer: _Trainer, run_name: str, resumed: bool):
    if resumed and trainer.run_id:
        return tracking.continue_run(trainer.run_id)
    return tracking.training_run(trainer.config.experiment, run_name, trainer.config.log_system_metrics)


def _log_run_inputs(mlflow_run: tracking.Run, trainer: _Trainer, config: TrainConfig, dataset: Path,
                    validation_report: Path | None) -> None:
    params = {f"train.{k}": v for k, v in dataclasses.asdict(config).items()
              if k not in {"resume", "pipeline_run_id"}}
    params.update({f"preprocess.{k}": v for k, v in trainer.contract.items()})
    params["model.parameters"] = trainer.parameters
    mlflow_run.log_params(params)
    mlflow_run.set_tags({**_environment_tags(trainer.device, config), **tracking.lineage().tags(),
                         "world_size": trainer.ranks.world_size,
                         "global_batch_size": config.batch_size * config.grad_accum_steps * trainer.ranks.world_size,
                         "manifest_digest": trainer.contract.get("manifest_sha256"),
                         "dataset_digest": trainer.dataset_digest, "config_hash": trainer.hash,
                         "pipeline_run_id": config.pipeline_run_id or None})
    mlflow_run.log_dataset(trainer.index, name="inbreast-preprocessed", digest=trainer.dataset_digest,
                           source=str(dataset.resolve()), context="training")
    if validation_report is not None:
        if not validation_report.is_dir():
            raise UserError(f"{validation_report}: validation report folder not found")
        mlflow_run.log_artifact(validation_report, "validation_report")
        mlflow_run.set_tags({"validation_success": _validation_success(validation_report)})


def _validation_success(report: Path) -> str:
    """Return "true"/"false" from a validate report's summary.json, "unknown" when it has none."""
    try:
        return str(bool(json.loads((report / "summary.json").read_text())["success"])).lower()
    except (OSError, ValueError, KeyError):
        return "unknown"


def _train_loop(trainer: _Trainer, mlflow_run: tracking.Run | None) -> None:
    """Train epochs until the last or an early stop; rank 0 (the one holding the run) closes each epoch."""
    config = trainer.config
    while trainer.epoch < config.epochs and trainer.bad_epochs < config.early_stopping_patience:
        lr = trainer.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        train_loss = trainer.train_epoch()
        if trainer.ranks.is_main:
            _close_epoch(trainer, mlflow_run, train_loss, lr, started)
        else:
            trainer.epoch += 1
        # The other ranks wait here while rank 0 validates and writes; stopping early is its decision.
        trainer.bad_epochs = trainer.ranks.from_main(trainer.bad_epochs)
    if trainer.ranks.is_main and trainer.bad_epochs >= config.early_stopping_patience:
        log.info("early stop: no better validation Dice for %d epochs", trainer.bad_epochs)


def _close_epoch(trainer: _Trainer, mlflow_run: tracking.Run, train_loss: float, lr: float, started: float) -> None:
    """Validate (every validate_every epochs), select, log, draw the curves and overlays, checkpoint."""
    config = trainer.config
    epoch = trainer.epoch + 1
    validating = epoch % config.validate_every == 0 or epoch == config.epochs
    metrics = {"train_loss": train_loss, **(trainer.validate() if validating else {}), "lr": lr,
               "epoch_seconds": time.perf_counter() - started}
    trainer.history.append({"epoch": epoch, **metrics})
    mlflow_run.log_metrics(metrics, step=epoch)
    if validating:
        log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val Dice mass %.3f calc %.3f", epoch,
                 config.epochs, train_loss, metrics["val_loss"], metrics["val_dice_mass"],
                 metrics["val_dice_calcification"])
        _select(trainer, metrics["val_dice_mean"], mlflow_run)
    else:
        log.info("epoch %d/%d: train loss %.4f", epoch, config.epochs, train_loss)
    trainer.epoch = epoch
    if config.overlay_every and trainer.epoch % config.overlay_every == 0:
        overlay = trainer.model_out / OVERLAYS_DIR / f"epoch_{trainer.epoch:03d}.png"
        overlay.parent.mkdir(exist_ok=True)
        trainer.overlays(overlay)
        mlflow_run.log_artifact(overlay, "overlays")
    progress = trainer.model_out / PROGRESS_FILE
    progress_png(trainer.history, progress)
    mlflow_run.log_artifact(progress, "curves")
    trainer.save_checkpoint()


def _select(trainer: _Trainer, val_dice: float, mlflow_run: tracking.Run) -> None:
    """Update the smoothed validation Dice; keep the weights when it is the best so far.

    Selects on an exponential moving average of the validation Dice: with a handful of validation
    patients one validation's Dice jumps by noise, and a raw maximum picks a noise peak (nnU-Net keeps
    the same EMA). Early stopping counts epochs from min_epochs on.
    """
    config, epoch = trainer.config, trainer.epoch + 1
    previous = trainer.selection_score
    trainer.selection_score = val_dice if previous is None else (
        config.selection_ema * previous + (1 - config.selection_ema) * val_dice)
    trainer.history[-1]["val_dice_mean_ema"] = trainer.selection_score
    mlflow_run.log_metrics({"val_dice_mean_ema": trainer.selection_score}, step=epoch)
    if trainer.selection_score > trainer.best["val_dice"]:
        trainer.best = {"epoch": epoch, "val_dice": trainer.selection_score}
        trainer.bad_epochs = 0
        save_model(trainer.model_out / MODEL_FILE, trainer.evaluated, trainer.architecture,
                   (0.5,) * len(CLASSES), trainer.contract)
        trainer.keep_best_beside_checkpoint()
    elif epoch >= config.min_epochs:
        # Patience is in epochs, whichever validate_every.
        trainer.bad_epochs += min(config.validate_every, epoch - config.min_epochs + 1)


def _finalize(trainer: _Trainer, mlflow_run: tracking.Run, metrics_out: Path) -> TrainResult:
    """Reload the best weights, choose the threshold on val, write the model, curves and summary."""
    config, model_out = trainer.config, trainer.model_out
    best_state = torch.load(model_out / MODEL_FILE, map_location="cpu", weights_only=True)
    trainer.network.load_state_dict(best_state["state_dict"])
    trainer.network.eval()
    val_rows = trainer.splits["val"]
    examples = load_examples(trainer.dataset_dir, val_rows)
    probabilities = list(predict_probabilities(trainer.network, [image for image, _ in examples], trainer.device,
                                               config.batch_size, trainer.amp, config.channels_last))
    choice = choose_threshold(probabilities, [mask for _, mask in examples], config.threshold_grid,
                              tolerance=config.threshold_tolerance)
    threshold = choice.per_class
    save_model(model_out / MODEL_FILE, trainer.network, trainer.architecture, threshold, trainer.contract)
    history = pd.DataFrame(trainer.history)
    write_atomically(model_out / HISTORY_FILE, lambda tmp: history.to_csv(tmp, index=False))
    summary = {"run_id": mlflow_run.run_id, "best_epoch": trainer.best["epoch"],
               "best_val_dice_mean": trainer.best["val_dice"],
               "threshold": dict(zip(CLASSES, threshold, strict=True)),
               # The statistic evaluate reports and the gate judges: mean over images of each
               # image's Dice (metrics.choose_threshold chooses the thresholds on it).
               "val_dice_mean_image_at_threshold": dict(zip(CLASSES, choice.per_class_dice, strict=True)),
               "epochs_run": trainer.epoch,
               "parameters": trainer.parameters}
    write_atomically(metrics_out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    mlflow_run.log_metrics({"best_val_dice_mean": trainer.best["val_dice"],
                            **{f"threshold_{name}": t for name, t in zip(CLASSES, threshold, strict=True)},
                            **{f"val_dice_mean_image_{name}_at_threshold": nan_to_zero(d)
                               for name, d in zip(CLASSES, choice.per_class_dice, strict=True)}})
    mlflow_run.set_tags({"best_epoch": trainer.best["epoch"]})
    mlflow_run.log_artifact(model_out / MODEL_FILE, "checkpoint")
    mlflow_run.log_artifact(model_out / HISTORY_FILE, "curves")
    log.info("best epoch %d, val Dice (EMA) %.3f; thresholds %s -> %s", trainer.best["epoch"],
             trainer.best["val_dice"], ", ".join(f"{n} {t:g}" for n, t in zip(CLASSES, threshold, strict=True)),
             model_out / MODEL_FILE)
    return TrainResult(mlflow_run.run_id, trainer.best["epoch"], trainer.best["val_dice"], threshold,
                       model_out / MODEL_FILE, metrics_out)
