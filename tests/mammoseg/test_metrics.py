"""Metrics on hand-computed cases: Dice conventions, bootstrap CI, lesion detection, thresholds, baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mammoseg.metrics import (
    DetectionCounts,
    DiceCounts,
    IntensityThresholdBaseline,
    bootstrap_ci,
    choose_threshold,
    dice_counts,
    dice_from_counts,
    froc,
    lesion_detection,
    mean_image_dice,
    paired_bootstrap,
    per_image_dice,
    pooled_dice,
    remove_large_components,
    summarize_detection,
)


def _mask(shape, *pixels):
    mask = np.zeros(shape, dtype=bool)
    for row, col in pixels:
        mask[row, col] = True
    return mask


# --------------------------------------------------------------------------------------------- Dice


def test_dice_counts_hand_case():
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    gt = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)
    counts = dice_counts(pred, gt)
    assert counts == DiceCounts(intersection=2, pred_sum=3, gt_sum=4)
    assert all(type(value) is int for value in counts)
    assert dice_from_counts(*counts) == pytest.approx(4 / 7)


def test_pooled_and_mean_differ_on_hand_example():
    big = DiceCounts(90, 100, 100)  # Dice 0.9 on a large lesion
    small = DiceCounts(0, 2, 2)  # a missed small lesion with a small false positive: Dice 0
    assert pooled_dice([big, small]) == pytest.approx(180 / 204)
    assert mean_image_dice([big, small]) == pytest.approx(0.45)


def test_empty_masks_excluded_or_zero():
    nothing = dice_counts(np.zeros((3, 3), bool), np.zeros((3, 3), bool))
    false_alarm = dice_counts(_mask((3, 3), (1, 1)), np.zeros((3, 3), bool))
    assert math.isnan(dice_from_counts(*nothing))
    assert dice_from_counts(*nothing, empty=1.0) == 1.0
    assert dice_from_counts(*false_alarm) == 0.0
    perfect = DiceCounts(5, 5, 5)
    assert mean_image_dice([perfect, nothing]) == 1.0  # the empty image is excluded
    assert mean_image_dice([perfect, nothing, false_alarm]) == 0.5  # the false alarm counts as 0
    np.testing.assert_array_equal(per_image_dice([perfect, nothing, false_alarm]), [1.0, np.nan, 0.0])
    assert math.isnan(mean_image_dice([nothing, nothing]))
    assert math.isnan(pooled_dice([nothing]))
    assert math.isnan(pooled_dice([]))


def test_dice_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        dice_counts(np.zeros((2, 2), bool), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="bool"):
        dice_counts(np.zeros((2, 2)), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="intersection"):
        pooled_dice([DiceCounts(3, 2, 5)])


def _random_counts(n, seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 200, n)
    pred = rng.integers(0, 200, n)
    inter = (np.minimum(gt, pred) * rng.uniform(0.3, 1.0, n)).astype(int)
    return [DiceCounts(int(i), int(p), int(g)) for i, p, g in zip(inter, pred, gt, strict=True)]


@pytest.mark.parametrize("statistic", ["pooled", "mean_image"])
def test_bootstrap_ci_contains_estimate_deterministic_and_narrows(statistic):
    counts = _random_counts(50, seed=1)
    estimate = pooled_dice(counts) if statistic == "pooled" else mean_image_dice(counts)
    low, high = bootstrap_ci(counts, statistic, n_resamples=1000, seed=7)
    assert low < estimate < high
    assert bootstrap_ci(counts, statistic, n_resamples=1000, seed=7) == (low, high)
    assert bootstrap_ci(counts, statistic, n_resamples=1000, seed=8) != (low, high)
    # The same images sixteen times over: the same estimate, a ~4x narrower interval.
    low16, high16 = bootstrap_ci(counts * 16, statistic, n_resamples=1000, seed=7)
    assert low16 < estimate < high16
    assert high16 - low16 < 0.5 * (high - low)
    narrow = bootstrap_ci(counts, statistic, n_resamples=1000, seed=7, level=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_bootstrap_ci_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_ci([], "pooled", n_resamples=10, seed=0))
    empty = [DiceCounts(0, 0, 0)] * 3
    assert all(math.isnan(v) for v in bootstrap_ci(empty, "mean_image", n_resamples=10, seed=0))
    assert bootstrap_ci([DiceCounts(1, 2, 2)], "pooled", n_resamples=10, seed=0) == (0.5, 0.5)
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_ci(empty, "median", n_resamples=10, seed=0)


def test_patient_bootstrap_is_wider_than_image_bootstrap_when_views_are_correlated():
    # 10 patients with 4 identical views each: 40 images, but only 10 independent samples.
    per_patient = _random_counts(10, seed=3)
    counts = [c for c in per_patient for _ in range(4)]
    patients = [f"p{i}" for i in range(10) for _ in range(4)]
    by_image = bootstrap_ci(counts, "mean_image", n_resamples=2000, seed=0)
    by_patient = bootstrap_ci(counts, "mean_image", n_resamples=2000, seed=0, groups=patients)
    assert by_patient[1] - by_patient[0] > 1.5 * (by_image[1] - by_image[0])
    # One image per patient: the same as resampling images.
    assert bootstrap_ci(per_patient, "pooled", 500, 1, groups=[f"p{i}" for i in range(10)]) == \
        bootstrap_ci(per_patient, "pooled", 500, 1)


def test_paired_bootstrap_sees_a_consistent_small_gain():
    # B is A minus a little on every image: unpaired intervals overlap, the paired one excludes 0.
    a = _random_counts(30, seed=4)
    b = [DiceCounts(max(0, c.intersection - 3), c.pred_sum, c.gt_sum) for c in a]
    patients = [f"p{i // 2}" for i in range(30)]
    paired = paired_bootstrap(a, b, patients, "pooled", n_resamples=1000, seed=0)
    assert paired.difference > 0 and paired.ci95[0] > 0
    low_a, _ = bootstrap_ci(a, "pooled", 1000, 0, groups=patients)
    _, high_b = bootstrap_ci(b, "pooled", 1000, 0, groups=patients)
    assert low_a < high_b  # the unpaired intervals overlap
    same = paired_bootstrap(a, a, patients, "mean_image", n_resamples=200, seed=0)
    assert same.difference == 0 and same.ci95 == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(a, b[:-1], patients, "pooled", 10, 0)


def test_bootstrap_ci_large_is_vectorised():
    # 1000 resamples x 400 images must be a matter of milliseconds, not a Python loop over resamples.
    counts = _random_counts(400, seed=2)
    low, high = bootstrap_ci(counts, "pooled", n_resamples=1000, seed=0)
    assert low < pooled_dice(counts) < high


# ----------------------------------------------------------------------------------- detection


def test_lesion_detection_found_missed_false_positive():
    gt = np.zeros((20, 20), dtype=bool)
    gt[2:5, 2:5] = True  # found: a prediction of 9 px shares 4 -> IoU 4 / 14 >= 0.2
    gt[10:12, 10:12] = True  # missed: touched by one pixel only (IoU 1 / 4... of a 12 px prediction)
    gt[16, 3] = gt[17, 4] = True  # one lesion through 8-connectivity, found exactly
    pred = np.zeros_like(gt)
    pred[3:6, 3:6] = True
    pred[11:15, 11:14] = True  # overlaps the second lesion by 1 px: IoU 1 / 15 < 0.2, a false positive
    pred[16, 3] = pred[17, 4] = True
    pred[0, 15:18] = True  # false positive
    counts = lesion_detection(pred, gt, cluster_radius_px=0, min_iou=0.2)
    assert counts == DetectionCounts(n_gt=3, n_found=2, n_pred=4, n_false_positive=2)
    # Any touch would have counted the second lesion as found: the IoU rule is what refuses it.
    assert lesion_detection(pred, gt, cluster_radius_px=0, min_iou=0.05).n_found == 3


def test_a_prediction_covering_the_breast_detects_nothing():
    gt = _mask((200, 200), (50, 50), (120, 140))
    gt[100:120, 30:50] = True  # a mass
    blanket = np.zeros_like(gt)
    blanket[5:195, 5:150] = True  # the whole "breast"
    for radius, min_iou in ((0, 0.2), (10, 0.1)):
        counts = lesion_detection(blanket, gt, radius, min_iou)
        assert counts.n_found == 0 and counts.n_false_positive == counts.n_pred == 1


def test_lesion_detection_empty_masks():
    empty = np.zeros((8, 8), dtype=bool)
    assert lesion_detection(empty, empty, 0, 0.2) == DetectionCounts(0, 0, 0, 0)
    assert lesion_detection(_mask((8, 8), (3, 3)), empty, 5, 0.1) == DetectionCounts(0, 0, 1, 1)
    assert lesion_detection(empty, _mask((8, 8), (3, 3)), 5, 0.1) == DetectionCounts(1, 0, 0, 0)


# "3 px apart": centre distance 3 (two background pixels between), or three background pixels between.
@pytest.mark.parametrize("gap", [3, 4])
def test_clustering_merges_close_specks_only_with_a_large_radius(gap):
    gt = _mask((30, 30), (10, 10), (10, 10 + gap))
    pred = _mask((30, 30), (10, 10))
    assert lesion_detection(pred, gt, cluster_radius_px=1, min_iou=0.5) == DetectionCounts(2, 1, 1, 0)
    # One cluster of two specks; predicting one of them covers a good part of the cluster's region.
    assert lesion_detection(pred, gt, cluster_radius_px=5, min_iou=0.1) == DetectionCounts(1, 1, 1, 0)


def test_clustering_matches_cluster_regions():
    # Two calcification clusters of three specks each, far apart; the prediction marks the first
    # cluster's specks, lands near (not on) the second, and adds a far false-positive cluster.
    gt = _mask((100, 100), (10, 10), (12, 13), (14, 10), (60, 60), (62, 63), (64, 60))
    pred = _mask((100, 100), (10, 10), (12, 13), (14, 10), (80, 80), (90, 90), (90, 93))
    counts = lesion_detection(pred, gt, cluster_radius_px=5, min_iou=0.1)
    assert counts == DetectionCounts(n_gt=2, n_found=1, n_pred=3, n_false_positive=2)
    # Chains merge (single linkage): specks 4 px apart in a line form one cluster at radius 5.
    chain = _mask((10, 40), *[(5, c) for c in range(2, 38, 4)])
    assert lesion_detection(chain, chain, 5, 0.1) == DetectionCounts(1, 1, 1, 0)
    assert lesion_detection(chain, chain, 0, 0.1) == DetectionCounts(9, 9, 9, 0)


def test_froc_sweeps_thresholds():
    gt = np.zeros((40, 40), dtype=bool)
    gt[5:10, 5:10] = True
    probability = np.zeros((40, 40), np.float32)
    probability[5:10, 5:10] = 0.8  # the lesion, found up to 0.8
    probability[30:33, 30:33] = 0.4  # a false positive below 0.5
    curve = froc([probability], [gt], [0.3, 0.5, 0.9], [0.0], min_iou=0.2)
    assert curve.sensitivity.tolist() == [1.0, 1.0, 0.0]
    assert curve.false_positives_per_image.tolist() == [1.0, 0.0, 0.0]
    assert curve.sensitivity_at(0.5) == 1.0 and curve.sensitivity_at(0.0) == 1.0


def test_summarize_detection():
    summary = summarize_detection([DetectionCounts(2, 1, 3, 1), DetectionCounts(0, 0, 2, 2)])
    assert summary["sensitivity"] == 0.5
    assert summary["false_positives_per_image"] == 1.5
    assert (summary["images"], summary["n_gt"], summary["n_false_positive"]) == (2, 2, 3)
    none = summarize_detection([DetectionCounts(0, 0, 1, 1)])
    assert math.isnan(none["sensitivity"]) and none["false_positives_per_image"] == 1.0
    assert math.isnan(summarize_detection([])["false_positives_per_image"])


# ---------------------------------------------------------------------------- threshold choice


def _separable_case(seed):
    """Probabilities >= 0.62 inside the lesions, <= 0.58 outside, for both classes."""
    rng = np.random.default_rng(seed)
    probabilities, masks = [], []
    for index in range(4):
        mask = np.zeros((2, 32, 32), dtype=bool)
        mask[0, 5:15, 5:15] = True
        if index % 2 == 0:  # half the images have no calcification
            mask[1, 20, 20] = mask[1, 25, 22] = True
        probs = np.where(mask, rng.uniform(0.62, 1.0, mask.shape), rng.uniform(0.0, 0.58, mask.shape))
        probabilities.append(probs.astype(np.float32))
        masks.append(mask)
    return probabilities, masks


def test_choose_threshold_separable():
    probabilities, masks = _separable_case(seed=0)
    grid = np.round(np.arange(0.1, 1.0, 0.1), 2)
    choice = choose_threshold(probabilities, masks, grid)
    assert choice.threshold == pytest.approx(0.6)
    assert choice.best_dice == 1.0
    assert choice.dice.shape == (9, 2) and choice.mean_dice.shape == (9,)
    np.testing.assert_array_equal(choice.dice[5], [1.0, 1.0])
    assert np.all(choice.mean_dice[[0, 1, 2, 3, 4, 6, 7, 8]] < 1.0)
    json.dumps(choice.to_dict())


def test_choose_threshold_curve_matches_direct_thresholding():
    probabilities, masks = _separable_case(seed=1)
    rng = np.random.default_rng(3)
    probabilities = [np.clip(p + np.float32(0.4) * (rng.random(p.shape, np.float32) - 0.5), 0, 1)
                     for p in probabilities]
    grid = [0.3, 0.45, 0.6, 0.75]
    pooled = choose_threshold(probabilities, masks, grid, statistic="pooled")
    mean_image = choose_threshold(probabilities, masks, grid)
    for k, t in enumerate(grid):
        for c in range(2):
            counts = [dice_counts(p[c] >= t, m[c]) for p, m in zip(probabilities, masks, strict=True)]
            assert pooled.dice[k, c] == pytest.approx(pooled_dice(counts))
            assert mean_image.dice[k, c] == pytest.approx(mean_image_dice(counts))


def test_choose_threshold_maximises_the_statistic_it_is_told():
    """A false speck on a lesion-free image: the pooled Dice ignores it, the per-image mean does not."""
    shape = (2, 20, 20)
    with_lesion, speck_only, half_sure = (np.full(shape, 0.1, np.float32) for _ in range(3))
    truth = np.zeros(shape, bool)
    truth[:, :10, :10] = True                  # 100 lesion pixels in both channels
    with_lesion[truth] = 0.9                   # found with certainty
    speck_only[:, 15, 15:17] = 0.6             # 2 false pixels on an image without lesions
    half_sure[:, :5, :10] = 0.9                # half the lesion certain, half at 0.6
    half_sure[:, 5:10, :10] = 0.6
    probabilities = [with_lesion, speck_only, half_sure]
    masks = [truth, np.zeros(shape, bool), truth]
    grid = [0.5, 0.8]
    # t = 0.5: per image 1, 0, 1 (mean 0.667); pooled 2 * 200 / 402 = 0.995.
    # t = 0.8: per image 1, empty in both (left out), 2 * 50 / 150 (mean 0.833); pooled 2 * 150 / 350.
    mean_image = choose_threshold(probabilities, masks, grid)
    pooled = choose_threshold(probabilities, masks, grid, statistic="pooled")
    assert mean_image.statistic == "mean_image" and mean_image.threshold == 0.8
    assert mean_image.per_class == (0.8, 0.8)
    np.testing.assert_allclose(mean_image.dice[:, 0], [2 / 3, (1 + 2 / 3) / 2])
    assert pooled.threshold == 0.5
    np.testing.assert_allclose(pooled.dice[:, 0], [400 / 402, 300 / 350])
    with pytest.raises(ValueError, match="statistic"):
        choose_threshold(probabilities, masks, grid, statistic="median")


def test_choose_threshold_warns_when_a_class_peaks_at_the_grids_top(caplog):
    """A maximum at the grid's end is censored: the operator is told to extend the grid, per class."""
    probabilities, masks = _separable_case(seed=0)   # lesions above 0.62, background below 0.58
    choice = choose_threshold(probabilities, masks, [0.2, 0.4])
    assert choice.per_class == (0.4, 0.4)
    assert "mass threshold is the grid's highest, 0.4" in caplog.text
    assert "calcification threshold is the grid's highest, 0.4" in caplog.text
    caplog.clear()
    choice = choose_threshold(probabilities, masks, [0.2, 0.4, 0.6, 0.8])
    assert choice.per_class == (0.6, 0.6) and "grid's highest" not in caplog.text


def test_choose_threshold_takes_the_lowest_threshold_within_the_tolerance_of_the_best():
    """A flat top is noise: the lowest threshold on it is chosen, its own Dice reported."""
    # One image, a 4-px lesion (mass and calcification alike) at probability 0.7 and one false pixel at
    # 0.55: threshold 0.5 scores 8/9, 0.6 scores 1; with tolerance 0.2 the lower one is chosen.
    probabilities, masks = np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool)
    masks[:, :2, :2] = True
    probabilities[:, :2, :2] = 0.7
    probabilities[:, 3, 3] = 0.55
    grid = [0.5, 0.6, 0.8]
    best = choose_threshold([probabilities], [masks], grid)
    assert best.per_class == (0.6, 0.6) and best.per_class_dice == (1.0, 1.0) and best.threshold == 0.6
    tolerant = choose_threshold([probabilities], [masks], grid, tolerance=0.2)
    assert tolerant.per_class == (0.5, 0.5) and tolerant.threshold == 0.5
    assert tolerant.per_class_dice == pytest.approx((8 / 9, 8 / 9))
    # Within no tolerance of the best, nothing lower is taken: 8/9 is 0.11 below 1.
    assert choose_threshold([probabilities], [masks], grid, tolerance=0.1).per_class == (0.6, 0.6)


def test_choose_threshold_without_a_class_uses_the_other(caplog):
    probabilities, masks = _separable_case(seed=0)
    for mask in masks:
        mask[1] = False
    choice = choose_threshold(probabilities, masks, [0.2, 0.6, 0.8])
    assert choice.threshold == 0.6
    assert "no calcification" in caplog.text
    for mask in masks:
        mask[0] = False
    with pytest.raises(ValueError, match="no validation image"):
        choose_threshold(probabilities, masks, [0.2, 0.6])


# ------------------------------------------------------------------------------------- baseline


def _bright_lesion_images(seed, n=3):
    """Breast-like background in [0.3, 0.7]; masses at 0.80-0.85, calcification specks at 0.95-1.0."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        image = rng.uniform(0.3, 0.7, (64, 64)).astype(np.float32)
        mask = np.zeros((2, 64, 64), dtype=bool)
        mask[0, 10:25, 10:25] = True
        mask[1, rng.integers(35, 60, 6), rng.integers(35, 60, 6)] = True
        image[mask[0]] = rng.uniform(0.80, 0.85, mask[0].sum())
        image[mask[1]] = rng.uniform(0.95, 1.0, mask[1].sum())
        images.append(image)
        masks.append(mask)
    return images, masks


def test_baseline_finds_the_right_thresholds(tmp_path):
    images, masks = _bright_lesion_images(seed=0)
    grid = np.linspace(0.5, 0.99, 50)
    baseline = IntensityThresholdBaseline.fit(images, masks, grid, calc_max_area_px=4)
    mass_t, calc_t = baseline.thresholds
    # Mass: every threshold in (0.7, 0.8] separates the mass from the background (the brighter
    # calcifications cost the same at each), so the lowest one (0.7 rounded) wins the tie.
    assert 0.69 < mass_t <= 0.8
    assert 0.85 < calc_t <= 0.95
    assert baseline.validation_dice[1] == 1.0
    prediction = baseline.predict(images[0])
    assert prediction.shape == (2, 64, 64) and prediction.dtype == bool
    np.testing.assert_array_equal(prediction[1], masks[0][1])
    assert prediction[0][masks[0][0]].all()
    # JSON round trip keeps the fitted state.
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline.to_dict()))
    again = IntensityThresholdBaseline.from_dict(json.loads(path.read_text()))
    assert again.thresholds == baseline.thresholds and again.calc_max_area_px == 4
    np.testing.assert_array_equal(again.predict(images[1]), baseline.predict(images[1]))
    with pytest.raises(ValueError, match="intensity_threshold"):
        IntensityThresholdBaseline.from_dict({"kind": "unet"})


def test_baseline_area_filter_drops_large_bright_regions():
    images, masks = _bright_lesion_images(seed=1, n=2)
    baseline = IntensityThresholdBaseline.fit(images, masks, [0.9], calc_max_area_px=4)
    image = images[0].copy()
    image[40:50, 0:10] = 1.0  # a bright 100-px region: not a calcification
    filtered = baseline.predict(image)[1]
    assert not filtered[40:50, 0:10].any()
    np.testing.assert_array_equal(filtered, masks[0][1])
    unfiltered = IntensityThresholdBaseline(baseline.thresholds).predict(image)[1]
    assert unfiltered[40:50, 0:10].all()


def test_baseline_fit_equals_brute_force():
    images, masks = _bright_lesion_images(seed=2)
    rng = np.random.default_rng(5)
    images = [np.clip(i + rng.normal(0, 0.08, i.shape), 0, 1).astype(np.float32) for i in images]
    grid = np.linspace(0.5, 0.99, 50)
    baseline = IntensityThresholdBaseline.fit(images, masks, grid)
    for c in range(2):
        scores = [
            pooled_dice([dice_counts(i >= np.float32(t), m[c]) for i, m in zip(images, masks, strict=True)])
            for t in grid
        ]
        assert baseline.thresholds[c] == grid[int(np.nanargmax(scores))]
        assert baseline.validation_dice[c] == pytest.approx(max(scores))


def test_remove_large_components():
    mask = _mask((10, 10), (0, 0), (5, 5), (5, 6), (6, 5))
    np.testing.assert_array_equal(remove_large_components(mask, 1), _mask((10, 10), (0, 0)))
    np.testing.assert_array_equal(remove_large_components(mask, 3), mask)
