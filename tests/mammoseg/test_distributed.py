"""Data-parallel training: N ranks at batch b take the step of one process at batch N x b, one MLflow run.

The end-to-end test starts the real `torchrun --nproc-per-node 2 --no-python mammoseg train` (gloo
on CPU, on 127.0.0.1) and the real single-process `mammoseg train` at twice the batch, on the same
data, and compares their weights after one optimizer step: same draws (one global batch holding
every training draw of the epoch), augmentation off (one process draws its augmentations from one
generator per epoch, as it always has, and several ranks from one per draw: with augmentation on
the two would train on differently augmented images), fp32 (no bf16 autocast), deterministic
kernels. Only the order of the sums differs, so the weights agree to fp32 rounding, far below the
step itself. That holds with GroupNorm; with BatchNorm the full network's fp32 gradient is itself
~0.5 % off its float64 value (a one-process run alone, measured at 128 and 256 px), so any other
order of fp32 sums (GlobalBatchNorm2d's) moves it as much. The BatchNorm equivalence is therefore
tested on the whole network in float64, where nothing but the arithmetic's order differs and the
two agree to ~1e-13.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from mammoseg import distributed
from mammoseg.data import INDEX_FILE
from mammoseg.stages import train
from model import LightUNet
from tests.conftest import REPO_ROOT, TINY_TRAIN, free_port, stage_config_for

RANK_BATCH = 4
WORLD_SIZE = 2
# A torchrun training takes 40-90 s on 2 cores; far beyond that, a rank is stuck and the test says so.
TORCHRUN_TIMEOUT_S = 600
# fp32 sums taken in another order: |g_ddp - g_single| / |g_single| per parameter tensor, and the
# distance between the two runs' weights over the length of the step, per tensor. Measured (GroupNorm):
# at most 8e-5 and 1.1e-4; with the per-rank Dice instead of the pooled one, 0.04 and 0.43.
GRADIENT_RTOL = 1e-3
WEIGHT_RTOL = 1e-3


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _one_global_batch(dataset: Path, out: Path, images: int) -> Path:
    """Copy a dataset keeping `images` training images, so that one epoch is one global batch."""
    shutil.copytree(dataset, out)
    index = pd.read_parquet(out / INDEX_FILE)
    train_rows = index[index["split"] == "train"]
    # Images with and without a mass: the lesion-aware sampler (mass_image_share) draws from both groups.
    with_mass = train_rows[train_rows["mass_px"] > 0].head(images // 2)
    without = train_rows[train_rows["mass_px"] == 0].head(images - len(with_mass))
    assert len(with_mass) and len(with_mass) + len(without) == images
    kept = pd.concat([with_mass, without])
    index[(index["split"] != "train") | index.index.isin(kept.index)].to_parquet(out / INDEX_FILE, index=False)
    return out


def _train_flags(dataset: Path, model_out: Path, batch_size: int, experiment: str) -> list[str]:
    return ["--params", str(REPO_ROOT / "params.yaml"), "train", "--dataset", str(dataset),
            "--model-out", str(model_out), "--metrics-out", str(model_out.parent / f"{model_out.name}.json"),
            "--epochs", "1", "--batch-size", str(batch_size), "--grad-accum-steps", "1", "--num-workers", "0",
            "--overlay-every", "0", "--no-log-system-metrics", "--warmup-epochs", "0", "--validate-every", "1",
            "--no-amp", "--device", "cpu", "--experiment", experiment,
            # Augmentation off: one process and several ranks seed it differently (module docstring).
            "--aug-vflip-prob", "0", "--aug-rotate-deg", "0", "--aug-scale", "0", "--aug-gamma", "0",
            "--aug-contrast", "0",
            # GroupNorm: the fp32 comparison covers draws, the pooled Dice, DDP's averaging and rank
            # 0's run. BatchNorm's is in float64 (test_the_whole_network_on_two_ranks_...).
            "--norm", "group"]


def _run(command: list[str]) -> None:
    # gloo stays on the loopback interface; one thread per rank keeps the two ranks off each other's core.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    # Its own session, so that a timeout kills torchrun's ranks too: subprocess.run kills torchrun
    # alone, and a rank left behind holds the pipes open, so the test waited on them for ever (a rank
    # deadlocked at exit hung CI this way, see
    # test_a_rank_frees_its_ddp_replica_before_leaving_the_process_group).
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            _, stderr = process.communicate(timeout=TORCHRUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
            pytest.fail(f"{Path(command[0]).name} still running after {TORCHRUN_TIMEOUT_S} s; stderr: {stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]


@pytest.mark.slow
def test_two_ranks_at_batch_b_take_the_step_of_one_process_at_2b_and_log_one_run(prepared_data, tracking_env,
                                                                                  tmp_path):
    dataset = _one_global_batch(prepared_data.dataset, tmp_path / "dataset", RANK_BATCH * WORLD_SIZE)
    bin_dir = Path(sys.executable).parent
    _run([str(bin_dir / "mammoseg"), *_train_flags(dataset, tmp_path / "single", RANK_BATCH * WORLD_SIZE,
                                                   "ddp-single")])
    _run([str(bin_dir / "torchrun"), "--nnodes", "1", "--nproc-per-node", str(WORLD_SIZE),
          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--no-python",
          str(bin_dir / "mammoseg"), *_train_flags(dataset, tmp_path / "ddp", RANK_BATCH, "ddp-two-ranks")])

    single = torch.load(tmp_path / "single" / train.CHECKPOINT_FILE, weights_only=False)
    ddp = torch.load(tmp_path / "ddp" / train.CHECKPOINT_FILE, weights_only=False)
    assert single["epoch"] == ddp["epoch"] == 1
    assert single["config_hash"] != ddp["config_hash"]  # another world size is another training
    # The weights the step started from: the seeded initialisation every run and rank makes (with
    # deep supervision's auxiliary heads when it is on: what the optimizer steps and the checkpoint holds).
    start = train._Trainer(stage_config_for("train", batch_size=RANK_BATCH * WORLD_SIZE, norm="group"), dataset,
                           tmp_path / "unused").trained
    names = [name for name, _ in start.named_parameters()]
    for index, name in enumerate(names):
        states = single["optimizer"]["state"][index], ddp["optimizer"]["state"][index]
        assert [float(state["step"]) for state in states] == [1.0, 1.0], name  # exactly one optimizer step
        # AdamW's first moment after one step is (1 - beta1) x the gradient: the two gradients agree.
        assert _relative_difference(states[1]["exp_avg"], states[0]["exp_avg"]) < GRADIENT_RTOL, name
    moved = 0.0
    for key, weights in single["model"].items():
        if not weights.is_floating_point():
            assert torch.equal(ddp["model"][key], weights), key  # BatchNorm's step counter
            continue
        # Parameters and BatchNorm's running statistics: the two steps land on the same weights, up to
        # a tiny fraction of the step itself.
        step = float((weights - start.state_dict()[key]).norm())
        assert float((ddp["model"][key] - weights).norm()) <= WEIGHT_RTOL * step, key
        moved += step
    assert moved > 0  # the step moved the weights: the comparison is not between two untouched networks

    runs = mlflow.search_runs(experiment_names=["ddp-two-ranks"], output_format="list")
    assert len(runs) == 1, [run.info.run_id for run in runs]
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["global_batch_size"] == str(RANK_BATCH * WORLD_SIZE)
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_dice_mean")] == [1]
    assert (tmp_path / "ddp" / "model.pt").is_file() and not (tmp_path / "ddp" / train.STAGING_DIR).exists()


WHOLE_BATCH = 8
# float64: two ranks against one process, the whole 7-level network at 128 px (a 1x1 bottleneck).
# Measured: gradients 1e-13 apart (BatchNorm and GroupNorm), as far as one process's own with the
# batch's halves swapped; in fp32 both are ~5e-3 (BatchNorm), the fp32 gradient's own error.
FLOAT64_RTOL = 1e-9


def _whole_network(norm: str) -> torch.nn.Module:
    """params.yaml's LightUNet with `norm`, seeded, in float64 and training mode."""
    torch.manual_seed(0)
    config = stage_config_for("train", norm=norm)
    return LightUNet(**train._architecture(config, in_channels=2)).double().train()


def _whole_network_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(WHOLE_BATCH, 2, 128, 128, generator=generator, dtype=torch.float64)
    masks = (torch.rand(WHOLE_BATCH, 2, 128, 128, generator=generator) > 0.99).double()
    return images, masks


def _whole_network_step(network: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor,
                        pool=None) -> dict[str, torch.Tensor]:
    """One forward and backward with train's loss; return the gradients and BatchNorm's buffers."""
    train.segmentation_loss(network(images), masks, 1.0, 1.0, 10.0, pool).backward()
    module = network.module if isinstance(network, DistributedDataParallel) else network
    return {**{f"grad.{name}": p.grad.clone() for name, p in module.named_parameters()},
            **{f"buffer.{name}": b.clone() for name, b in module.named_buffers()}}


def _whole_network_rank(rank: int, port: int, out: str, norm: str) -> None:
    """One rank: half the batch through DDP(LightUNet), BatchNorm as train synchronises it; saves its step."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    ranks = _ranks(rank, WORLD_SIZE)
    network = DistributedDataParallel(distributed.synchronise_batch_norm(_whole_network(norm), ranks))
    images, masks = _whole_network_inputs()
    share = slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH)
    step = _whole_network_step(network, images[share], masks[share], ranks.sum_with_grad)
    kinds = sorted({type(m).__name__ for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)})
    torch.save({"step": step, "batch_norm": kinds}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_the_whole_network_on_two_ranks_takes_the_step_of_one_process_in_float64(norm, tmp_path):
    """BatchNorm (the paper's) and GroupNorm: DDP's gradients, and BatchNorm's running statistics.

    The gradient through the global batch's statistics (differentiable all-reduces), the pooled
    Dice, DDP's average over the ranks, the momentum update of the running mean and variance and
    the batch counter: all as one process at twice the batch.
    """
    torch.multiprocessing.spawn(_whole_network_rank, args=(free_port(), str(tmp_path), norm), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert ranks[0]["batch_norm"] == (["GlobalBatchNorm2d"] if norm == "batch" else [])
    torch.set_num_threads(1)
    single = _whole_network_step(_whole_network(norm), *_whole_network_inputs())
    assert any(key.startswith("buffer.") for key in single) == (norm == "batch")
    for rank in ranks:
        assert rank["step"].keys() == single.keys()
        for key, expected in single.items():
            got = rank["step"][key]
            if not expected.is_floating_point():
                assert torch.equal(got, expected), key  # num_batches_tracked
                continue
            assert _relative_difference(got, expected) < FLOAT64_RTOL, key


def _global_batch_norm_rank(rank: int, port: int, out: str) -> None:
    """One rank: GlobalBatchNorm2d on its half of a batch; saves output, input and parameter gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    images, weights = _batch_norm_inputs()
    layer = distributed.synchronise_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), _ranks(rank, 2))
    half = images[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    output = layer(half)
    (output * weights[rank * 4:(rank + 1) * 4]).sum().backward()
    torch.save({"type": type(layer[0]).__name__, "output": output.detach(), "grad": half.grad,
                "weight_grad": layer[0].weight.grad, "running_var": layer[0].running_var}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _batch_norm_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(8, 3, 4, 4, generator=generator) * 0.5 + 1.0,
            torch.randn(8, 3, 4, 4, generator=generator))


@pytest.mark.slow
def test_global_batch_norm_on_two_ranks_is_batch_norm_on_the_whole_batch(tmp_path):
    torch.multiprocessing.spawn(_global_batch_norm_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["type"] for r in ranks] == ["GlobalBatchNorm2d"] * 2
    images, weights = _batch_norm_inputs()
    images.requires_grad_()
    layer = torch.nn.BatchNorm2d(3)
    output = layer(images)
    (output * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["output"] for r in ranks]), output.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), images.grad, rtol=1e-4, atol=1e-5)
    # Each rank holds its images' share of the affine gradient (DDP adds them up, as averages of
    # per-rank losses); the running statistics are the global batch's on every rank.
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], layer.weight.grad,
                               rtol=1e-4, atol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["running_var"], layer.running_var, rtol=1e-5, atol=1e-6)


def _release_rank(rank: int, port: int, out: str, dataset: str) -> None:
    """One rank: a real trainer with its DDP replica, leaving the ranks as train.run does."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    ranks = _ranks(rank, WORLD_SIZE)
    work = Path(out) / f"work{rank}"
    work.mkdir()
    trainer = train._Trainer(stage_config_for("train", batch_size=RANK_BATCH, norm="group"), Path(dataset), work,
                             ranks)
    replica = weakref.ref(trainer.replica)
    built = isinstance(trainer.replica, DistributedDataParallel)
    train._leave_the_ranks(trainer, ranks)
    facts = {"built": built, "freed": replica() is None, "steps_with_the_network": trainer.replica is trainer.trained,
             "left": not torch.distributed.is_initialized()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))


@pytest.mark.slow
def test_a_rank_frees_its_ddp_replica_before_leaving_the_process_group(prepared_data, tmp_path):
    """The DDP replica is gone before distributed.stop destroys the process group.

    Freed later, its reducer is the process group's last owner and destroys it with the GIL held
    while gloo's threads may wait for that GIL: rank 0 of `torchrun ... mammoseg train` deadlocked
    at exit this way. The race itself cannot be forced; that the replica is freed first can be checked.
    """
    torch.multiprocessing.spawn(_release_rank, args=(free_port(), str(tmp_path), str(prepared_data.dataset)),
                                nprocs=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert facts == {"built": True, "freed": True, "steps_with_the_network": True, "left": True}, (rank, facts)


def _ranks(rank: int, world_size: int) -> distributed.Ranks:
    return distributed.Ranks(rank, world_size, rank, torch.device("cpu"))


@pytest.mark.parametrize("weights", [None, np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0])])
def test_the_ranks_share_each_global_batch_of_the_single_process_draws(weights):
    count, batch, seed = 9, 2, 7
    one = list(train.EpochDraws(count, weights, seed, batch * 2, _ranks(0, 1)))
    shares = [list(train.EpochDraws(count, weights, seed, batch, _ranks(rank, 2))) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5  # 9 draws lengthened to 10: every rank takes 3 steps
    # One rank draws the seeded permutation, or WeightedRandomSampler's lesion-aware draws (one
    # process's own, train._Trainer._loader), less the last global batch of a single image.
    generator = torch.Generator().manual_seed(seed)
    if weights is None:
        before = torch.randperm(count, generator=generator).tolist()
    else:
        before = list(torch.utils.data.WeightedRandomSampler(weights.tolist(), count, replacement=True,
                                                             generator=generator))
    assert [index for index, _ in one] == before[:8]
    for start in (0, 4):  # the two full global batches are the single process's batches
        together = shares[0][start // 2:start // 2 + 2] + shares[1][start // 2:start // 2 + 2]
        assert sorted(together) == sorted(one[start:start + 4])
    # Rank r takes the r-th contiguous slice of each global batch of 4; the last one holds 2.
    assert [position for _, position in shares[0]] == [0, 1, 4, 5, 8]
    assert [position for _, position in shares[1]] == [2, 3, 6, 7, 9]
    # Reproducible and resumable: the same seed gives the same draws, another epoch's seed others.
    assert list(train.EpochDraws(count, weights, seed, batch, _ranks(1, 2))) == shares[1]
    assert list(train.EpochDraws(count, weights, seed + 1, batch, _ranks(1, 2))) != shares[1]


def test_a_last_global_batch_of_one_image_is_dropped():
    assert len(train.EpochDraws(9, None, 0, 4, _ranks(0, 1))) == 8
    assert len(train.EpochDraws(10, None, 0, 4, _ranks(0, 1))) == 10


def test_one_process_hashes_and_draws_as_before_there_were_ranks(prepared_data, tmp_path):
    """One process's checkpoints, run names and random stream are those it had before DDP."""
    config = stage_config_for("train", **TINY_TRAIN)
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in train._NOT_HASHED}
    before = hashlib.sha256(json.dumps({"config": fields, "dataset": "d"}, sort_keys=True).encode()).hexdigest()[:16]
    assert train.config_hash(config, "d") == train.config_hash(config, "d", 1) == before
    assert train.config_hash(config, "d", 2) != before
    # The DataLoader's own samplers, batches of (images, masks): EpochDraws is for several ranks.
    trainer = train._Trainer(config, prepared_data.dataset, tmp_path)
    assert isinstance(trainer._loader("train", 0).sampler, torch.utils.data.WeightedRandomSampler)
    shuffled = train._Trainer(dataclasses.replace(config, mass_image_share=0.0), prepared_data.dataset, tmp_path)
    assert isinstance(shuffled._loader("train", 0).sampler, torch.utils.data.RandomSampler)
    assert len(next(iter(trainer._loader("train", 0)))) == 2
