"""Data-parallel training across processes: the process group torchrun starts, and what ranks share.

Reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and writes
nothing. `mammoseg train` started by `torchrun --nproc-per-node N --no-python mammoseg train ...`
runs one process per device: NCCL between GPUs (each rank on cuda:LOCAL_RANK), gloo between CPU
processes. Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op and training runs as
one process, as before.

What the ranks must agree on lives here: a barrier, rank 0's picklable values broadcast to all,
sums that autograd differentiates through (the loss's batch-pooled Dice), and BatchNorm statistics
over the global batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from mammoseg.errors import UserError
from mammoseg.inference import select_device

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a rank waits in a collective for the others (rank 0's validation and uploads included).
COLLECTIVE_TIMEOUT_MINUTES = 60


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes.

    Attributes:
        rank: 0 .. world_size - 1 over all nodes; rank 0 alone logs, tracks and writes.
        world_size: the number of training processes (1: a plain `mammoseg train`).
        local_rank: the rank on this node, which picks the GPU.
        device: where this rank trains.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Tell whether this is rank 0, the one that talks to MLflow and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Tell whether there are other ranks to agree with."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank gets here (a no-op for one process)."""
        if self.distributed:
            dist.barrier()

    def from_main(self, value: T) -> T:
        """Return rank 0's `value` on every rank (a picklable object; one process returns it as is)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        """Return the mean of a number over the ranks (the logged training loss)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def sum_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks so that its gradient flows back to each rank's own part.

        The backward of the sum is again a sum over the ranks, so rank r's part of the gradient is
        the whole world's; DistributedDataParallel's averaging over the ranks then gives exactly the
        gradient of one process holding the global batch.

        Args:
            tensor: any shape, the same on every rank.

        Returns:
            The element-wise sum over the ranks, same shape.
        """
        if not self.distributed:
            return tensor
        return dist_nn.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _launched_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def single(device_name: str) -> Ranks:
    """Return the Ranks of a training that runs as one process on the configured device."""
    return Ranks(0, 1, 0, select_device(device_name))


def start(device_name: str) -> Ranks:
    """Join the process group torchrun set up (if any) and pick this rank's device.

    Args:
        device_name: train.device. Under torchrun, "auto" and "cuda" mean cuda:LOCAL_RANK (NCCL) and
            "cpu" means the CPU (gloo); a fixed "cuda:N" would put every rank on one GPU.

    Returns:
        This process's Ranks (world size 1 without torchrun).

    Raises:
        UserError: a fixed GPU index under torchrun, or more ranks on a node than it has GPUs.
    """
    world_size = _launched_size()
    if world_size <= 1:
        return single(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_name.startswith("cuda:"):
        raise UserError(f"train.device {device_name!r} under torchrun: each rank takes cuda:LOCAL_RANK, "
                        "use --device cuda (or auto)")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = select_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} GPU(s); "
                            "start at most that many processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at once (no guessing at the first
        # collective). The other ranks wait in a collective while rank 0 validates, draws overlays and
        # uploads to MLflow (whose retries alone may take minutes): NCCL's default of 10 min is too short.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))
    log.info("rank %d of %d (local rank %d) on %s, backend %s", rank, world_size, local_rank, device,
             dist.get_backend())
    return Ranks(rank, world_size, local_rank, device)


def stop(ranks: Ranks) -> None:
    """Leave the process group once every rank is done (a no-op for one process).

    Free every DistributedDataParallel replica first (train's `_Trainer.release_replica` says why).
    """
    if ranks.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, over all ranks.

    torch's SyncBatchNorm does this on GPUs only (it refuses CPU tensors), so gloo training on CPUs
    uses this one: per-channel sums are added up over the ranks with autograd-aware all-reduces
    (two passes, so the variance is that of centred values, as BatchNorm's), and gradients flow back
    through them. Running statistics, eval mode and the state dict are BatchNorm2d's, so a model
    trained with it loads into the plain network.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (N, C, H, W) with the global batch's mean and variance (training) or the running ones."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # Statistics in fp32 at least (bf16/fp16 under autocast), in the input's precision above it.
        values = x if x.dtype == torch.float64 else x.float()
        dims = (0, 2, 3)
        local_count = torch.tensor([values.numel() / values.shape[1]], dtype=values.dtype, device=values.device)
        # One all-reduce for the sums and the pixel count, a second for the centred squares.
        sums = dist_nn.all_reduce(torch.cat([values.sum(dims), local_count]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = values - mean.view(1, -1, 1, 1)
        variance = dist_nn.all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # BatchNorm keeps the unbiased variance in its running statistics.
                unbiased = variance * (count / (count - 1).clamp(min=1))
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        normalised = centred * torch.rsqrt(variance + self.eps).view(1, -1, 1, 1)
        if self.affine:
            normalised = normalised * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return normalised.to(x.dtype)


def _to_global_batch_norm(module: nn.Module) -> nn.Module:
    """Return `module` with every BatchNorm2d replaced by a GlobalBatchNorm2d sharing its parameters and buffers."""
    if type(module) is nn.BatchNorm2d:
        replaced = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            replaced.weight, replaced.bias = module.weight, module.bias
        if module.track_running_stats:
            replaced.running_mean, replaced.running_var = module.running_mean, module.running_var
            replaced.num_batches_tracked = module.num_batches_tracked
        replaced.train(module.training)
        return replaced
    for name, child in module.named_children():
        module.add_module(name, _to_global_batch_norm(child))
    return module


def synchronise_batch_norm(network: nn.Module, ranks: Ranks) -> nn.Module:
    """Make BatchNorm layers normalise with the global batch's statistics when there are several ranks.

    GroupNorm and InstanceNorm normalise each image on its own and need nothing. On GPUs this is
    torch's SyncBatchNorm; on CPUs (gloo) GlobalBatchNorm2d.

    Args:
        network: the network, on its device.
        ranks: this process's place among the ranks.

    Returns:
        The network to train (the same object when nothing changes).
    """
    if not ranks.distributed:
        return network
    if ranks.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return _to_global_batch_norm(network)
