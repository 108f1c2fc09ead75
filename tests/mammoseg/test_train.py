"""Training against a real MLflow server: what the run carries, exact resume after SIGKILL, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from mammoseg import tracking
from mammoseg.errors import UserError
from mammoseg.inference import load_model
from mammoseg.stages import train
from tests.conftest import REPO_ROOT, TINY_TRAIN, stage_config_for, tree_digest


def _client():
    return mlflow.MlflowClient()


@pytest.mark.slow
def test_training_run_carries_what_reviewers_need(prepared_data, tracking_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    report = tmp_path / "validation"
    report.mkdir()
    (report / "summary.json").write_text('{"success": true}')
    config = stage_config_for("train", **{**TINY_TRAIN, "log_system_metrics": True, "pipeline_run_id": "kfp-123"})
    # As the KFP component gives it (its image holds no checkout); the session's trained_model has the
    # checkout's (tests/mammoseg/test_registry.py).
    lineage = tracking.Lineage("c" * 40, "False", "d" * 32 + ".dir", "sha256:" + "e" * 64)
    with tracking.given_lineage(**lineage.tags()):
        result = train.run(config, prepared_data.dataset, tmp_path / "model", tmp_path / "train.json", report)

    run = _client().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["train.lr"] == str(config.lr)
    assert params["preprocess.size"] == "128" and int(params["model.parameters"]) == 5_440_932  # 2 input channels
    tags = run.data.tags
    assert {key: tags[key] for key in lineage.tags()} == lineage.tags()
    assert tags["device"] == "cpu" and tags["torch_version"] == torch.__version__
    assert tags["deterministic"] == "True" and tags["pipeline_run_id"] == "kfp-123"
    assert tags["validation_success"] == "true"
    assert len(tags["manifest_digest"]) == 64 and len(tags["dataset_digest"]) == 64
    history = _client().get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    for key in ("val_loss", "val_dice_mass", "val_dice_calcification", "val_dice_mean", "val_dice_all", "lr"):
        assert len(_client().get_metric_history(result.run_id, key)) == 2, key
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "inbreast-preprocessed"
    assert tags["dataset_digest"].startswith(dataset_input.dataset.digest)
    artifacts = {a.path for a in _client().list_artifacts(result.run_id)}
    assert {"validation_report", "overlays", "checkpoint", "curves"} <= artifacts
    assert [a.path for a in _client().list_artifacts(result.run_id, "overlays")] == [
        "overlays/epoch_001.png", "overlays/epoch_002.png"]
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["run_id"] == result.run_id and all(0.0 <= t <= 1.0 for t in summary["threshold"].values())
    assert json.loads((tmp_path / "model" / "mlflow_run.json").read_text())["run_id"] == result.run_id
    assert (tmp_path / "model" / "history.csv").read_text().startswith("epoch,train_loss")


def _train_cli(dataset: Path, model_out: Path, env: dict[str, str], epochs: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mammoseg.cli", "--params", str(REPO_ROOT / "params.yaml"), "train",
         "--dataset", str(dataset), "--model-out", str(model_out), "--metrics-out", str(model_out / "m.json"),
         "--epochs", str(epochs), "--batch-size", "2", "--num-workers", "0", "--overlay-every", "0",
         "--no-log-system-metrics", "--warmup-epochs", "1"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_reaches_the_same_weights(prepared_data, tracking_env, tmp_path):
    env = {"MLFLOW_TRACKING_URI": tracking_env.url}
    epochs = 3
    straight = _train_cli(prepared_data.dataset, tmp_path / "straight", env, epochs)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    killed_dir = tmp_path / "killed"
    killed = _train_cli(prepared_data.dataset, killed_dir, env, epochs)
    checkpoint = killed_dir / train.STAGING_DIR / train.CHECKPOINT_FILE  # published only on success
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # no handler can run: the run stays RUNNING, the epoch half done
    killed.wait(timeout=60)
    state = torch.load(checkpoint, weights_only=False)
    assert 1 <= state["epoch"] < epochs

    resumed = _train_cli(prepared_data.dataset, killed_dir, env, epochs)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert "resuming from" in stderr

    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(killed_dir / "model.pt", weights_only=True)
    assert a["threshold"] == b["threshold"]
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key
    run_id = json.loads((killed_dir / "mlflow_run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(tracking_env.url).get_run(run_id).info.status == "FINISHED"
    assert not (killed_dir / train.STAGING_DIR).exists()


def test_a_crash_marks_the_run_failed(prepared_data, tracking_env, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(prepared_data.dataset, dataset)
    for image in (dataset / "images").glob("*.npy"):
        image.write_bytes(b"not an array")  # every load fails, inside the first epoch
    config = stage_config_for("train", **TINY_TRAIN)
    with pytest.raises(ValueError):
        train.run(config, dataset, tmp_path / "model", tmp_path / "train.json")
    # The failed run's id stays in the staging folder; model_out itself was never touched.
    run_id = json.loads((tmp_path / "model" / train.STAGING_DIR / "mlflow_run.json").read_text())["run_id"]
    assert _client().get_run(run_id).info.status == "FAILED"
    assert not (tmp_path / "model" / "mlflow_run.json").exists()


@pytest.mark.slow
def test_a_failed_retrain_keeps_the_good_model(prepared_data, tracking_env, tmp_path):
    """A re-run with another config that crashes mid-epoch, or stops on a bad input, loses nothing."""
    model_dir, metrics = tmp_path / "model", tmp_path / "train.json"
    good = train.run(stage_config_for("train", **{**TINY_TRAIN, "epochs": 1}), prepared_data.dataset,
                     model_dir, metrics)
    before = tree_digest(model_dir)
    assert {"model.pt", "checkpoint.pt", "mlflow_run.json", "history.csv"} <= set(before)
    assert not (model_dir / train.STAGING_DIR).exists()

    broken = tmp_path / "broken"
    shutil.copytree(prepared_data.dataset, broken)
    for image in (broken / "images").glob("*.npy"):
        image.write_bytes(b"not an array")  # the new run opens, then fails inside its first epoch
    other = stage_config_for("train", **{**TINY_TRAIN, "epochs": 1, "lr": 0.00037})
    with pytest.raises(ValueError):
        train.run(other, broken, model_dir, metrics)
    with pytest.raises(UserError, match="validation report folder not found"):
        train.run(other, prepared_data.dataset, model_dir, metrics, tmp_path / "no-such-report")
    after = {name: data for name, data in tree_digest(model_dir).items()
             if not name.startswith(train.STAGING_DIR)}
    assert after == before
    assert json.loads((model_dir / "mlflow_run.json").read_text())["run_id"] == good.run_id

    # The same config as the good run resumes its finished checkpoint: nothing is trained again.
    again = train.run(stage_config_for("train", **{**TINY_TRAIN, "epochs": 1}), prepared_data.dataset,
                      model_dir, metrics)
    assert again.run_id == good.run_id
    assert not (model_dir / train.STAGING_DIR).exists()


def test_validation_every_few_epochs_and_after_the_last(prepared_data, tracking_env, tmp_path):
    config = stage_config_for("train", **{**TINY_TRAIN, "epochs": 3, "validate_every": 2, "overlay_every": 0})
    result = train.run(config, prepared_data.dataset, tmp_path / "model", tmp_path / "train.json")
    assert [m.step for m in _client().get_metric_history(result.run_id, "train_loss")] == [1, 2, 3]
    for key in ("val_loss", "val_dice_mean", "val_dice_mean_ema"):
        assert [m.step for m in _client().get_metric_history(result.run_id, key)] == [2, 3], key
    history = pd.read_csv(tmp_path / "model" / train.HISTORY_FILE)
    assert history["val_loss"].isna().tolist() == [True, False, False]
    assert result.best_epoch in (2, 3)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("validate_every", 0, r"train\.validate_every must be at least 1, got 0"),
    ("mass_image_share", 1.0, r"train\.mass_image_share must be in \[0, 1\), got 1\.0"),
    ("mass_image_share_end", -0.5, r"train\.mass_image_share_end must be in \[0, 1\), got -0\.5"),
    ("weight_ema", -0.1, r"train\.weight_ema must be in \[0, 1\), got -0\.1"),
    ("selection_ema", 1.5, r"train\.selection_ema must be in \[0, 1\), got 1\.5"),
    ("deep_supervision", 7, r"train\.deep_supervision must be in \[0, 6\], got 7"),
])
def test_an_out_of_range_setting_is_one_line_naming_it(prepared_data, tmp_path, name, value, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        train._Trainer(stage_config_for("train", **{**TINY_TRAIN, name: value}), prepared_data.dataset,
                       tmp_path / "other")


@pytest.mark.parametrize("weight_ema", [0.0, 0.9])
def test_the_saved_model_is_the_moving_average_of_the_weights(prepared_data, tracking_env, tmp_path, weight_ema):
    config = stage_config_for("train", **{**TINY_TRAIN, "epochs": 1, "overlay_every": 0, "weight_ema": weight_ema})
    train.run(config, prepared_data.dataset, tmp_path / "model", tmp_path / "train.json")
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=True)["state_dict"]
    checkpoint = torch.load(tmp_path / "model" / train.CHECKPOINT_FILE, weights_only=False)
    # The optimiser's weights after the last step (inside DeepSupervision's wrapper when it is on).
    trained = {k.removeprefix("network."): v for k, v in checkpoint["model"].items()}
    key = "head.weight"
    if weight_ema:
        averaged = {k.removeprefix("module."): v for k, v in checkpoint["averaged"].items()}
        assert torch.equal(saved[key], averaged[key])
        assert not torch.allclose(saved[key], trained[key])
        # BatchNorm's running statistics are averaged too, not left at the initial 0 / 1.
        means = [k for k in saved if k.endswith("running_mean")]
        assert means and torch.equal(saved[means[0]], averaged[means[0]])
    else:
        assert checkpoint["averaged"] is None and torch.equal(saved[key], trained[key])


def test_user_errors(tmp_path):
    config = stage_config_for("train", **TINY_TRAIN)
    with pytest.raises(UserError, match="index.parquet: missing"):
        train.run(config, tmp_path, tmp_path / "model", tmp_path / "train.json")


def test_patch_size_must_fit_the_network_and_clips_to_the_image(prepared_data, tmp_path):
    with pytest.raises(UserError, match="patch_size 192 must be a multiple of 128"):
        train.run(stage_config_for("train", **{**TINY_TRAIN, "patch_size": 192}), prepared_data.dataset,
                  tmp_path / "model", tmp_path / "train.json")
    # The 128 px test data with the demo's 256 px patches: whole images, as nnU-Net clips its patch.
    trainer = train._Trainer(stage_config_for("train", **{**TINY_TRAIN, "patch_size": 256}), prepared_data.dataset,
                             tmp_path / "model")
    assert trainer.patch_size == 0
    trainer = train._Trainer(stage_config_for("train", **{**TINY_TRAIN, "patch_size": 0}), prepared_data.dataset,
                             tmp_path / "model")
    assert trainer.patch_size == 0


def test_each_epochs_training_draws_follow_the_mass_image_share_schedule(prepared_data, tmp_path):
    config = stage_config_for("train", **{**TINY_TRAIN, "epochs": 3, "mass_image_share": 0.9,
                                          "mass_image_share_end": 0.5})
    trainer = train._Trainer(config, prepared_data.dataset, tmp_path / "model")
    holds_mass = torch.as_tensor((trainer.splits["train"]["mass_px"] > 0).to_numpy())
    assert 0 < holds_mass.sum() < len(holds_mass)
    shares = []
    for epoch in range(3):
        trainer.epoch = epoch
        weights = trainer._loader("train", shuffle_seed=epoch).sampler.weights
        shares.append(float(weights[holds_mass].sum() / weights.sum()))
    assert shares == pytest.approx([0.9, 0.7, 0.5])


def test_resume_flag_needs_a_checkpoint(prepared_data, tmp_path):
    config = stage_config_for("train", **{**TINY_TRAIN, "resume": True})
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train.run(config, prepared_data.dataset, tmp_path / "model", tmp_path / "train.json")


def test_segmentation_loss_prefers_the_truth():
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, 2:5, 2:5] = 1
    good = (target * 2 - 1) * 10
    bad = -good
    assert train.segmentation_loss(good, target, 1.0, 1.0) < 0.01
    assert train.segmentation_loss(bad, target, 1.0, 1.0) > 1.0


def test_deep_supervision_loss_scores_each_scale_against_max_pooled_masks():
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, 2:6, 2:6] = 1
    target[0, 1, 5, 1] = 1  # a one-pixel calcification
    good = (target * 2 - 1) * 10
    # A single tensor is segmentation_loss itself.
    assert torch.equal(train.deep_supervision_loss(good, target, 1.0, 1.0, 10.0),
                       train.segmentation_loss(good, target, 1.0, 1.0, 10.0))
    coarse_truth = torch.nn.functional.max_pool2d(target, 2)
    assert coarse_truth[0, 1].sum() == 1  # the speck survives at half resolution
    right = [good, (coarse_truth * 2 - 1) * 10]
    wrong = [good, -right[1]]
    assert train.deep_supervision_loss(right, target, 1.0, 1.0) < 0.01
    # A wrong coarse output costs a third (weight 1/2 of 1 + 1/2) of its own loss.
    expected = train.segmentation_loss(wrong[1], coarse_truth, 1.0, 1.0) / 3
    torch.testing.assert_close(train.deep_supervision_loss(wrong, target, 1.0, 1.0),
                               train.segmentation_loss(good, target, 1.0, 1.0) * 2 / 3 + expected)


def test_deep_supervision_trains_the_auxiliary_heads_and_saves_the_plain_network(prepared_data, tracking_env,
                                                                                 tmp_path):
    config = stage_config_for("train", **{**TINY_TRAIN, "epochs": 1, "overlay_every": 0, "deep_supervision": 2})
    train.run(config, prepared_data.dataset, tmp_path / "model", tmp_path / "train.json")
    checkpoint = torch.load(tmp_path / "model" / train.CHECKPOINT_FILE, weights_only=False)
    aux = {k: v for k, v in checkpoint["model"].items() if k.startswith("aux_heads.")}
    assert sorted(aux) == ["aux_heads.0.bias", "aux_heads.0.weight", "aux_heads.1.bias", "aux_heads.1.weight"]
    prior = torch.logit(torch.tensor(config.foreground_prior))
    assert not torch.allclose(aux["aux_heads.0.bias"], prior.expand(2))  # the optimiser moved them
    model = load_model(tmp_path / "model")  # strict load into a plain LightUNet
    assert not any("aux" in k for k in model.network.state_dict())


def test_augment_is_reproducible_and_keeps_shapes():
    config = stage_config_for("train", **TINY_TRAIN)
    images = torch.rand(2, 1, 32, 32)
    masks = (torch.rand(2, 2, 32, 32) > 0.9).float()
    # One process: one generator for the batch, drawn as it always was.
    one = train.augment(images, masks, config, torch.Generator().manual_seed(5))
    again = train.augment(images, masks, config, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(one, again, strict=True))
    # Several ranks: one generator per draw.
    a = train.augment(images, masks, config, train.draw_generators(5, [0, 1]))
    b = train.augment(images, masks, config, train.draw_generators(5, [0, 1]))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Then an image's augmentation depends on its draw, not on the batch it is in (or the rank).
    alone = train.augment(images[1:], masks[1:], config, train.draw_generators(5, [1]))
    assert torch.allclose(alone[0], a[0][1:], atol=1e-6) and torch.equal(alone[1], a[1][1:])
    assert a[0].shape == images.shape and a[1].shape == masks.shape
    assert set(np.unique(a[1].numpy())) <= {0.0, 1.0} and a[0].min() >= 0 and a[0].max() <= 1


@pytest.mark.slow
def test_a_retry_in_a_new_container_resumes_from_the_checkpoint_volume(prepared_data, tracking_env, tmp_path):
    """KFP retries start a new pod with an empty model folder; the checkpoint volume carries the state."""
    volume = tmp_path / "volume"
    base = {**TINY_TRAIN, "checkpoint_dir": str(volume), "pipeline_run_id": "run-42", "overlay_every": 0}
    first = train.run(stage_config_for("train", **{**base, "epochs": 1}), prepared_data.dataset,
                      tmp_path / "attempt1", tmp_path / "m1.json")
    assert (volume / "run-42" / train.CHECKPOINT_FILE).is_file()
    assert (volume / "run-42" / "model.pt").is_file()
    assert not (tmp_path / "attempt1" / train.CHECKPOINT_FILE).exists()
    # Same config but a longer schedule is another training: simulate the retry of an interrupted
    # 2-epoch run by resuming the checkpoint with epochs unchanged and an empty model folder.
    state = torch.load(volume / "run-42" / train.CHECKPOINT_FILE, weights_only=False)
    assert state["epoch"] == 1
    again = train.run(stage_config_for("train", **{**base, "epochs": 1}), prepared_data.dataset,
                      tmp_path / "attempt2", tmp_path / "m2.json")
    assert again.run_id == first.run_id  # the same MLflow run continues
    assert (tmp_path / "attempt2" / "model.pt").is_file()
    other = train.run(stage_config_for("train", **{**base, "epochs": 1, "pipeline_run_id": "run-43"}),
                      prepared_data.dataset, tmp_path / "attempt3", tmp_path / "m3.json")
    assert other.run_id != first.run_id  # another pipeline run never picks up run-42's checkpoint
