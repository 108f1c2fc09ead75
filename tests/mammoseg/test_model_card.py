"""The model cards' texts from known numbers (test_registry checks them on a real server)."""

from __future__ import annotations

from mammoseg import model_card

METRICS = {"test_unet_dice_native_mean_image_mass": 0.177, "test_unet_dice_native_mean_image_mass_ci_low": 0.0,
           "test_unet_dice_native_mean_image_mass_ci_high": 0.594,
           "test_unet_vs_baseline_native_mean_image_mass_difference": 0.175,
           "test_unet_vs_baseline_native_mean_image_mass_ci_low": -0.005,
           "test_unet_vs_baseline_native_mean_image_mass_ci_high": 0.594,
           "test_baseline_dice_native_mean_image_mass": 0.003, "test_ceiling_dice_native_mean_image_mass": 0.979,
           "test_unet_calcification_sensitivity": 0.92}
LINEAGE = {"run_id": "r1", "git_commit": "c0ffee", "git_dirty": "False", "data_dvc_hash": "d1",
           "dataset_digest": "e1", "validation_success": "true", "onnx_sha256": "f1", "threshold": "[0.5, 0.3]"}


def test_version_card_holds_the_intervals_the_gate_and_the_lineage():
    text = model_card.version_description(METRICS, ["| beats baseline | 0.1750 | CI | FAIL |"], "stays @challenger",
                                          LINEAGE)
    row = next(line for line in text.splitlines() if line.startswith("| mass |"))
    assert row == "| mass | 0.177 [0.000, 0.594] | n/a | 0.003 | +0.175 [-0.005, +0.594] | 0.979 |"
    assert "| beats baseline | 0.1750 | CI | FAIL |" in text and "**Decision:** stays @challenger" in text
    assert "- git commit: `c0ffee` (clean checkout)" in text
    assert "image digest: not recorded" in text
    assert "image digest: `sha256:ab`" in model_card.version_description({}, [], "x",
                                                                        {**LINEAGE, "image_digest": "sha256:ab"})
    assert "(**uncommitted changes**)" in model_card.version_description({}, [], "x", {**LINEAGE, "git_dirty": "True"})
    assert "sensitivity 0.92" in text


def test_cards_fit_mlflows_description_column():
    rows = [f"| condition {i} | 0.0 | {'x' * 200} | pass |" for i in range(40)]
    assert len(model_card.version_description(METRICS, rows, "d", LINEAGE)) <= model_card.MAX_DESCRIPTION


def test_run_note_before_and_after_registration():
    tags = {"best_epoch": "7", "git_commit": "c0ffee", "git_dirty": "True", "validation_success": "true"}
    before = model_card.run_note(tags, {"best_val_dice_mean": 0.41})
    assert "Best epoch 7" in before and "(uncommitted changes)" in before and "Not evaluated yet" in before
    after = model_card.run_note(tags, {**METRICS, "test_unet_dice_native_mean_image_all": 0.3},
                                "m version 2, @champion: promoted")
    assert "| mass | 0.177 [0.000, 0.594] |" in after
    assert after.endswith("**Registry:** m version 2, @champion: promoted\n")
