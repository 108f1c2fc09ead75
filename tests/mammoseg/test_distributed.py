"""Data-parallel training: N ranks at batch b take the step of one process at batch N x b, one MLflow run.

The end-to-end test starts the real `torchrun --nproc-per-node 2 --no-python mammoseg train` (gloo
on CPU, on 127.0.0.1) and the real single-process `mammoseg train` at twice the batch, on the same
data, and compares their weights after one optimizer step: same draws (one global batch holding
every training draw of the epoch), same per-draw patches and augmentations (seeded by the draw's
position, not the rank), fp32 (no bf16 autocast), deterministic kernels. Only the order of the sums
differs, so the weights agree to fp32 rounding, far below the step itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from mammoseg import distributed
from mammoseg.data import INDEX_FILE
from mammoseg.stages import train
from tests.conftest import REPO_ROOT, free_port, stage_config_for

RANK_BATCH = 4
WORLD_SIZE = 2
# fp32 rounding of sums taken in another order, through one AdamW step (measured: see the closing note).
WEIGHT_ATOL = 2e-5


def _one_global_batch(dataset: Path, out: Path, images: int) -> Path:
    """Copy a dataset keeping `images` training images, so that one epoch is one global batch."""
    shutil.copytree(dataset, out)
    index = pd.read_parquet(out / INDEX_FILE)
    train_rows = index[index["split"] == "train"]
    assert len(train_rows) >= images and (train_rows["mass_px"] > 0).any()
    # Keep the mass images first: the lesion-aware sampler (mass_image_share) needs both groups.
    kept = train_rows.sort_values("mass_px", ascending=False).head(images)
    index[(index["split"] != "train") | index.index.isin(kept.index)].to_parquet(out / INDEX_FILE, index=False)
    return out


def _train_flags(dataset: Path, model_out: Path, batch_size: int, experiment: str) -> list[str]:
    return ["--params", str(REPO_ROOT / "params.yaml"), "train", "--dataset", str(dataset),
            "--model-out", str(model_out), "--metrics-out", str(model_out.parent / f"{model_out.name}.json"),
            "--epochs", "1", "--batch-size", str(batch_size), "--grad-accum-steps", "1", "--num-workers", "0",
            "--overlay-every", "0", "--no-log-system-metrics", "--warmup-epochs", "0", "--validate-every", "1",
            "--no-amp", "--device", "cpu", "--experiment", experiment]


def _run(command: list[str]) -> None:
    # gloo stays on the loopback interface; one thread per rank keeps the two ranks off each other's core.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]


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
    assert [s["step"] for s in ddp["optimizer"]["state"].values()][:1] == [1]  # one optimizer step
    assert single["config_hash"] != ddp["config_hash"]  # another world size is another training
    # The weights the step started from: the seeded initialisation every run and rank makes.
    start = train._Trainer(stage_config_for("train", batch_size=RANK_BATCH * WORLD_SIZE), dataset,
                           tmp_path / "unused").network.state_dict()
    largest_step = 0.0
    for key, weights in single["model"].items():
        if not weights.is_floating_point():
            assert torch.equal(ddp["model"][key], weights), key  # BatchNorm's step counter
            continue
        torch.testing.assert_close(ddp["model"][key], weights, rtol=0, atol=WEIGHT_ATOL, msg=key)
        largest_step = max(largest_step, float((weights - start[key]).abs().max()))
    assert largest_step > 100 * WEIGHT_ATOL  # the step moved the weights far more than the two runs differ

    runs = mlflow.search_runs(experiment_names=["ddp-two-ranks"], output_format="list")
    assert len(runs) == 1, [run.info.run_id for run in runs]
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["global_batch_size"] == str(RANK_BATCH * WORLD_SIZE)
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_dice_mean")] == [1]
    assert (tmp_path / "ddp" / "model.pt").is_file() and not (tmp_path / "ddp" / train.STAGING_DIR).exists()


def _ranks(rank: int, world_size: int) -> distributed.Ranks:
    return distributed.Ranks(rank, world_size, rank, torch.device("cpu"))


@pytest.mark.parametrize("weights", [None, np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0])])
def test_the_ranks_share_each_global_batch_of_the_single_process_draws(weights):
    count, batch, seed = 9, 2, 7
    one = list(train.EpochDraws(count, weights, seed, batch * 2, _ranks(0, 1)))
    shares = [list(train.EpochDraws(count, weights, seed, batch, _ranks(rank, 2))) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5  # 9 draws lengthened to 10: every rank takes 3 steps
    # One process draws as it always did (RandomSampler's shuffle, WeightedRandomSampler's lesion-aware
    # draws), less the last global batch of a single image.
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
