"""Segmentation metrics on numpy masks: Dice (per image, pooled, bootstrap CI), lesion detection, thresholds.

Reads bool masks and float probability/intensity maps in memory and writes nothing. Pure numpy/scipy
(no torch) so that train, evaluate and predict share one definition of every number they report.

Conventions (channel order follows the network: 0 = mass, 1 = calcification):

- Dice of one image is 2I / (P + G). When P + G == 0 (neither the ground truth nor the prediction has
  the class) it is undefined and returned as NaN: such images are excluded from the per-image mean. An
  image with an empty ground truth but a non-empty prediction scores 0.
- Pooled Dice sums I, P and G over all images before dividing (pixels pooled over the dataset).
- Thresholding is `values >= t`, compared in the dtype of the values (a float32 map against the float32
  rounding of t), the same comparison a caller's `probs >= t` makes with a Python float.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy import ndimage

from mammoseg.data import CLASSES as CLASS_NAMES

log = logging.getLogger(__name__)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Bootstrap index matrices are built this many resamples at a time, so memory stays bounded
# (about chunk x n_images x 24 bytes) whatever the number of resamples.
_BOOTSTRAP_CHUNK = 256


class DiceCounts(NamedTuple):
    """Pixel counts of one image and one class, from which every Dice variant is computed."""

    intersection: int
    pred_sum: int
    gt_sum: int


class DetectionCounts(NamedTuple):
    """Lesion-level counts of one image and one class.

    Attributes:
        n_gt: ground-truth lesions (or clusters).
        n_found: ground-truth lesions matched by a predicted lesion (lesion_detection's IoU rule).
        n_pred: predicted components (or clusters).
        n_false_positive: predicted lesions that match no ground-truth lesion.
    """

    n_gt: int
    n_found: int
    n_pred: int
    n_false_positive: int


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if pred.dtype != bool or gt.dtype != bool:
        raise ValueError(f"masks must be bool arrays, got {pred.dtype} and {gt.dtype}")
    return pred, gt


# ----------------------------------------------------------------------------------------------- Dice


def dice_counts(pred: np.ndarray, gt: np.ndarray) -> DiceCounts:
    """Count the intersection and the two mask sizes of one image and one class.

    Args:
        pred: (H, W) bool, the thresholded prediction.
        gt: (H, W) bool, the ground-truth mask.

    Returns:
        The counts (I, P, G) as Python ints.
    """
    pred, gt = _check_pair(pred, gt)
    return DiceCounts(
        int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    )


def dice_from_counts(intersection: int, pred_sum: int, gt_sum: int, empty: float = math.nan) -> float:
    """Return 2I / (P + G), or `empty` when P + G == 0.

    With the default `empty=nan`, images where neither the ground truth nor the prediction has the
    class are excluded from the per-image mean; an image with an empty ground truth but a non-empty
    prediction scores 0.

    Args:
        intersection: I, predicted pixels inside the ground truth.
        pred_sum: P, predicted pixels.
        gt_sum: G, ground-truth pixels.
        empty: the value for the undefined case P + G == 0.
    """
    denominator = pred_sum + gt_sum
    if denominator == 0:
        return float(empty)
    return 2.0 * intersection / denominator


def _counts_array(counts: Sequence[DiceCounts]) -> np.ndarray:
    """Stack counts into an (N, 3) int64 array [I, P, G]."""
    array = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    if np.any(array < 0) or np.any(array[:, 0] > np.minimum(array[:, 1], array[:, 2])):
        raise ValueError("Dice counts need 0 <= intersection <= min(pred_sum, gt_sum)")
    return array


def _dice_vector(intersection: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise 2I / (P + G) with NaN where P + G == 0, without warnings."""
    out = np.full(np.shape(denominator), np.nan)
    np.divide(2.0 * intersection, denominator, out=out, where=denominator > 0)
    return out


def pooled_dice(counts: Sequence[DiceCounts]) -> float:
    """Return the dataset-level Dice: I, P and G summed over images, then 2I / (P + G).

    Args:
        counts: one DiceCounts per image.

    Returns:
        The pooled Dice; NaN when no image has the class in either mask (or there are no images).
    """
    total = _counts_array(counts).sum(axis=0)
    return dice_from_counts(int(total[0]), int(total[1]), int(total[2]))


def per_image_dice(counts: Sequence[DiceCounts]) -> np.ndarray:
    """Return the Dice of every image, NaN where undefined (both masks empty).

    Returns:
        (N,) float64.
    """
    array = _counts_array(counts)
    return _dice_vector(array[:, 0], array[:, 1] + array[:, 2])


def mean_image_dice(counts: Sequence[DiceCounts]) -> float:
    """Return the mean of the per-image Dice over the images where it is defined.

    Images where neither the ground truth nor the prediction has the class are excluded; an empty
    ground truth with a non-empty prediction counts as 0.

    Returns:
        The mean; NaN when no image has a defined Dice.
    """
    dice = per_image_dice(counts)
    defined = ~np.isnan(dice)
    return float(dice[defined].mean()) if defined.any() else math.nan


def _statistic_columns(counts: Sequence[DiceCounts], statistic: str) -> np.ndarray:
    """Return the (N, 2) per-image columns whose (weighted) sums give the statistic as column 0 / column 1.

    pooled: [2I, P + G] (the pooled Dice is 2 sum I / sum (P + G)); mean_image: [Dice, defined] over
    the images where the Dice is defined.
    """
    if statistic not in ("pooled", "mean_image"):
        raise ValueError(f"statistic must be 'pooled' or 'mean_image', got {statistic!r}")
    array = _counts_array(counts)
    if statistic == "pooled":
        return np.stack([2.0 * array[:, 0], array[:, 1] + array[:, 2]], axis=1).astype(np.float64)
    dice = per_image_dice(counts)
    defined = ~np.isnan(dice)
    return np.stack([np.where(defined, dice, 0.0), defined.astype(np.float64)], axis=1)


def _ratio(sums: np.ndarray) -> np.ndarray:
    """Column 0 / column 1 of (R, 2) sums, NaN where column 1 is 0."""
    out = np.full(len(sums), np.nan)
    np.divide(sums[:, 0], sums[:, 1], out=out, where=sums[:, 1] > 0)
    return out


def _resample_weights(groups: Sequence[Any] | None, n_images: int, n_resamples: int,
                      seed: int) -> np.ndarray:
    """Return (n_resamples, n_images) bootstrap weights: how often each image is drawn in each resample.

    With groups (a patient id per image) whole patients are drawn with replacement and every image
    of a drawn patient comes along: the views of one woman are correlated, so images are not
    independent samples. Without groups, images are drawn.
    """
    if groups is None:
        group_of = np.arange(n_images)
    else:
        if len(groups) != n_images:
            raise ValueError(f"need one group per image, got {len(groups)} for {n_images} images")
        _, group_of = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(group_of.max()) + 1
    rng = np.random.default_rng(seed)
    weights = np.empty((n_resamples, n_images))
    for start in range(0, n_resamples, _BOOTSTRAP_CHUNK):
        stop = min(start + _BOOTSTRAP_CHUNK, n_resamples)
        draws = rng.integers(0, n_groups, size=(stop - start, n_groups))
        drawn = np.zeros((stop - start, n_groups))
        np.add.at(drawn, (np.arange(stop - start)[:, None], draws), 1.0)
        weights[start:stop] = drawn[:, group_of]
    return weights


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def _check_bootstrap(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap_ci(
    counts: Sequence[DiceCounts],
    statistic: Literal["pooled", "mean_image"],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
    groups: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """Return a percentile-bootstrap confidence interval of a Dice statistic.

    Each resample draws patients (`groups`, one id per image) with replacement, or images when
    groups is None, and recomputes the statistic from the drawn images' counts. Resamples where the
    statistic is undefined (no drawn image has the class) are dropped before taking the percentiles.

    Args:
        counts: one DiceCounts per image.
        statistic: "pooled" (pooled_dice) or "mean_image" (mean_image_dice).
        n_resamples: number of bootstrap resamples (>= 1).
        seed: seed of the generator; the same seed gives the same interval.
        level: coverage of the interval, in (0, 1).
        groups: the patient of each image; whole patients are resampled.

    Returns:
        (low, high); (nan, nan) when there are no images or no resample has a defined statistic.
    """
    _check_bootstrap(n_resamples, level)
    columns = _statistic_columns(counts, statistic)
    if len(columns) == 0:
        return math.nan, math.nan
    weights = _resample_weights(groups, len(columns), n_resamples, seed)
    return _interval(_ratio(weights @ columns), level)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """A paired comparison of two methods on the same images: A minus B, with a bootstrap interval.

    Attributes:
        difference: statistic(A) - statistic(B) on all images.
        ci95: (low, high) percentile interval of the difference over patient resamples.
        a: statistic(A); b: statistic(B).
    """

    difference: float
    ci95: tuple[float, float]
    a: float
    b: float

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"difference": self.difference, "ci95": list(self.ci95), "a": self.a, "b": self.b}


def paired_bootstrap(
    counts_a: Sequence[DiceCounts],
    counts_b: Sequence[DiceCounts],
    groups: Sequence[Any],
    statistic: Literal["pooled", "mean_image"],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> PairedDifference:
    """Compare two methods scored on the same images by a paired patient bootstrap.

    Every resample draws patients with replacement and computes statistic(A) - statistic(B) on the
    same drawn images, so what the two methods share (an easy patient, a hard one) cancels. A lower
    bound above 0 says A beats B on this population of patients at the interval's level.

    Args:
        counts_a: one DiceCounts per image for method A.
        counts_b: the same images, method B.
        groups: the patient of each image.
        statistic: "pooled" or "mean_image".
        n_resamples: bootstrap resamples.
        seed: generator seed.
        level: coverage of the interval.

    Returns:
        The difference on all images and its interval (NaN where undefined).
    """
    _check_bootstrap(n_resamples, level)
    columns_a, columns_b = _statistic_columns(counts_a, statistic), _statistic_columns(counts_b, statistic)
    if columns_a.shape != columns_b.shape:
        raise ValueError(f"paired methods need the same images, got {len(columns_a)} and {len(columns_b)}")
    value_a = float(_ratio(columns_a.sum(axis=0, keepdims=True))[0]) if len(columns_a) else math.nan
    value_b = float(_ratio(columns_b.sum(axis=0, keepdims=True))[0]) if len(columns_b) else math.nan
    if len(columns_a) == 0:
        return PairedDifference(math.nan, (math.nan, math.nan), value_a, value_b)
    weights = _resample_weights(groups, len(columns_a), n_resamples, seed)
    stats = _ratio(weights @ columns_a) - _ratio(weights @ columns_b)
    return PairedDifference(value_a - value_b, _interval(stats, level), value_a, value_b)


# ------------------------------------------------------------------------------- lesion detection


def _cluster_labels(mask: np.ndarray, cluster_radius_px: float) -> tuple[np.ndarray, int]:
    """Label the lesions of a mask: components, or clusters of components within a linking distance.

    With `cluster_radius_px > 0` every component grows by half the radius (a Euclidean distance
    transform, so large radii stay cheap); components whose closest pixels are within about the
    radius then touch, and the grown mask is labelled with 8-connectivity. The grown pixels belong to
    their cluster: a cluster's region is the area its calcifications span, which is what a reader
    marks and what overlap is measured on.

    Returns:
        ((H, W) int32 labels of the lesion regions, 0 = background; number of lesions).
    """
    if cluster_radius_px <= 0 or not mask.any():
        labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        return labels, int(n)
    half = cluster_radius_px / 2.0
    pad = math.ceil(half) + 1
    # Work in the mask's bounding box plus the growth margin: lesions cover a small part of the image.
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, mask.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, mask.shape[1])
    crop = mask[r0:r1, c0:c1]
    grown = ndimage.distance_transform_edt(~crop) <= half
    grown_labels, n = ndimage.label(grown, structure=_EIGHT_CONNECTED)
    labels = np.zeros(mask.shape, dtype=grown_labels.dtype)
    labels[r0:r1, c0:c1] = grown_labels
    return labels, int(n)


def _pairwise_iou(gt_labels: np.ndarray, n_gt: int, pred_labels: np.ndarray, n_pred: int) -> np.ndarray:
    """Return the (n_gt, n_pred) IoU matrix of two label images (label k is row/column k - 1)."""
    if n_gt == 0 or n_pred == 0:
        return np.zeros((n_gt, n_pred))
    gt_area = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)[1:].astype(np.float64)
    pred_area = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:].astype(np.float64)
    both = (gt_labels > 0) & (pred_labels > 0)
    pairs = (gt_labels[both].astype(np.int64) - 1) * n_pred + (pred_labels[both].astype(np.int64) - 1)
    intersection = np.bincount(pairs, minlength=n_gt * n_pred).reshape(n_gt, n_pred).astype(np.float64)
    union = gt_area[:, None] + pred_area[None, :] - intersection
    return intersection / np.maximum(union, 1.0)


def lesion_detection(pred: np.ndarray, gt: np.ndarray, cluster_radius_px: float,
                     min_iou: float) -> DetectionCounts:
    """Count found and missed ground-truth lesions and false-positive predicted lesions of one image.

    The matching rule: a ground-truth lesion is found when some predicted lesion overlaps it with
    IoU >= `min_iou`; a predicted lesion is a false positive when no ground-truth lesion overlaps it
    that much. Lesions are 8-connected components, or, with `cluster_radius_px > 0`, clusters
    (components within about that distance merged, single linkage) whose region includes the area
    between their members. A prediction covering the whole breast overlaps every lesion but with a
    tiny IoU, so it finds nothing and is one false positive.

    Args:
        pred: (H, W) bool, the thresholded prediction.
        gt: (H, W) bool, the ground-truth mask.
        cluster_radius_px: linking distance in pixels; 0 counts plain connected components.
        min_iou: the IoU a match needs, in (0, 1].

    Returns:
        The counts for this image.
    """
    pred, gt = _check_pair(pred, gt)
    if pred.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got shape {pred.shape}")
    if cluster_radius_px < 0:
        raise ValueError(f"cluster_radius_px must be >= 0, got {cluster_radius_px}")
    if not 0.0 < min_iou <= 1.0:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
    gt_labels, n_gt = _cluster_labels(gt, cluster_radius_px)
    pred_labels, n_pred = _cluster_labels(pred, cluster_radius_px)
    matched = _pairwise_iou(gt_labels, n_gt, pred_labels, n_pred) >= min_iou
    n_found = int(matched.any(axis=1).sum())
    n_true_positive = int(matched.any(axis=0).sum())
    return DetectionCounts(n_gt, n_found, n_pred, n_pred - n_true_positive)


def summarize_detection(per_image: Sequence[DetectionCounts]) -> dict[str, float]:
    """Aggregate per-image detection counts into sensitivity and false positives per image.

    Args:
        per_image: one DetectionCounts per image (images without lesions included: they count for
            the false positives per image).

    Returns:
        A dict with `images`, `n_gt`, `n_found`, `n_pred`, `n_false_positive` (totals),
        `sensitivity` (found / gt, NaN when there is no ground-truth lesion) and
        `false_positives_per_image` (false positives / images, NaN when there are no images).
    """
    totals = np.asarray(per_image, dtype=np.int64).reshape(-1, 4).sum(axis=0)
    n_images = len(per_image)
    n_gt, n_found, n_pred, n_fp = (int(value) for value in totals)
    return {
        "images": n_images,
        "n_gt": n_gt,
        "n_found": n_found,
        "n_pred": n_pred,
        "n_false_positive": n_fp,
        "sensitivity": n_found / n_gt if n_gt else math.nan,
        "false_positives_per_image": n_fp / n_images if n_images else math.nan,
    }


@dataclasses.dataclass(frozen=True)
class Froc:
    """A free-response operating characteristic: lesion sensitivity against false positives per image.

    Attributes:
        thresholds: (K,) probability thresholds, increasing.
        sensitivity: (K,) found / ground-truth lesions at each threshold.
        false_positives_per_image: (K,) at each threshold.
    """

    thresholds: np.ndarray
    sensitivity: np.ndarray
    false_positives_per_image: np.ndarray

    def sensitivity_at(self, fp_per_image: float) -> float:
        """Return the best sensitivity among thresholds with at most `fp_per_image` false positives per image.

        0 when no threshold is that clean (the usual FROC reading, without extrapolation).
        """
        ok = self.false_positives_per_image <= fp_per_image
        return float(self.sensitivity[ok].max()) if ok.any() else 0.0

    @classmethod
    def from_counts(cls, thresholds: Sequence[float], per_threshold: Sequence[Sequence[DetectionCounts]]) -> Froc:
        """Build the curve from detection counts: per threshold, one DetectionCounts per image.

        Callers that score images one at a time (evaluate) accumulate counts instead of keeping every
        probability map.
        """
        summaries = [summarize_detection(images) for images in per_threshold]
        return cls(np.asarray(thresholds, float), np.array([s["sensitivity"] for s in summaries], float),
                   np.array([s["false_positives_per_image"] for s in summaries], float))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (NaN sensitivities stay NaN; json writes them as NaN)."""
        return {"thresholds": self.thresholds.tolist(), "sensitivity": self.sensitivity.tolist(),
                "false_positives_per_image": self.false_positives_per_image.tolist(),
                "sensitivity_at_0.5_fp": self.sensitivity_at(0.5), "sensitivity_at_1_fp": self.sensitivity_at(1.0)}


def froc(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray], thresholds: Sequence[float],
         cluster_radius_px: Sequence[float], min_iou: float) -> Froc:
    """Sweep the probability threshold and count lesions found and false positives at each.

    Args:
        probabilities: per image, (H, W) float probabilities of one class.
        truths: per image, (H, W) bool ground truth of that class.
        thresholds: increasing probability thresholds.
        cluster_radius_px: per image, the linking distance (0 for masses).
        min_iou: the matching rule's IoU (lesion_detection).

    Returns:
        The curve; NaN sensitivity where no image has a lesion.
    """
    grid = _grid_array(thresholds)
    per_threshold = [[lesion_detection(np.asarray(probability) >= threshold, np.asarray(truth, bool), radius, min_iou)
                      for probability, truth, radius in zip(probabilities, truths, cluster_radius_px, strict=True)]
                     for threshold in grid]
    return Froc.from_counts(grid, per_threshold)


# ------------------------------------------------------------------------------- threshold curves


def _grid_array(grid: Sequence[float]) -> np.ndarray:
    array = np.asarray(grid, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"threshold grid must be a non-empty 1-D list of finite numbers, got {grid!r}")
    if np.any(np.diff(array) <= 0):
        raise ValueError(f"threshold grid must be strictly increasing, got {grid!r}")
    return array


def _counts_at_thresholds(values: np.ndarray, masks: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return, for every grid threshold t, #(values >= t), #(values >= t inside each mask), and #mask.

    One pass over the pixels: each pixel's bin is the last threshold it reaches (searchsorted), and a
    reversed cumulative sum of the bin counts gives the counts at every threshold.

    Args:
        values: (H, W) float intensities or probabilities.
        masks: (C, H, W) bool, the masks to intersect with (the pixel bins are shared).
        grid: (K,) float64 strictly increasing thresholds.

    Returns:
        ((K,) int64 predicted counts P, (K, C) int64 intersections I, (C,) int64 mask sizes G).
    """
    if values.shape != masks.shape[1:]:
        raise ValueError(f"values shape {values.shape} differs from mask shape {masks.shape[1:]}")
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
    edges = grid.astype(dtype)
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"threshold grid is not strictly increasing once rounded to {dtype}")
    # bin b in 0..K: number of thresholds <= value; value >= grid[k] exactly when bin >= k + 1.
    bins = np.searchsorted(edges, values.ravel(), side="right")
    size = len(grid) + 1
    hists = [np.bincount(bins, minlength=size)]
    hists += [np.bincount(bins[mask.ravel()], minlength=size) for mask in masks]
    at_least = np.cumsum(np.stack(hists, axis=1)[::-1], axis=0)[::-1][1:].astype(np.int64)  # (K, 1 + C)
    sizes = np.array([np.count_nonzero(mask) for mask in masks], dtype=np.int64)
    return at_least[:, 0], at_least[:, 1:], sizes


def _best_index(scores: np.ndarray, tolerance: float = 0.0) -> int:
    """Index of the lowest threshold whose score is within `tolerance` of the highest, NaN ignored.

    tolerance 0 is the highest score itself (the lowest threshold on ties).
    """
    filled = np.where(np.isnan(scores), -np.inf, scores)
    return int(np.argmax(filled >= filled.max() - tolerance))


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: identity equality
class ThresholdChoice:
    """A threshold chosen on validation, with the curve it was chosen from.

    Attributes:
        threshold: the chosen threshold (shared by both classes).
        grid: (K,) the candidate thresholds.
        dice: (K, 2) Dice of each class at each threshold, of the kind `statistic` names (NaN where
            undefined).
        mean_dice: (K,) mean of the two classes' Dice (over classes present in the ground truth).
        statistic: "mean_image" (mean of per-image Dice) or "pooled".
        tolerance: a threshold is chosen as the lowest whose Dice is within this of the curve's
            highest (choose_threshold).
    """

    threshold: float
    grid: np.ndarray
    dice: np.ndarray
    mean_dice: np.ndarray
    statistic: str = "mean_image"
    tolerance: float = 0.0

    @property
    def best_dice(self) -> float:
        """The mean Dice at the chosen threshold."""
        return float(self.mean_dice[int(np.searchsorted(self.grid, self.threshold))])

    @property
    def per_class(self) -> tuple[float, ...]:
        """Each class's own best threshold (the shared one for a class absent from validation).

        Masses and calcifications are calibrated differently (a calcification's probability rarely
        reaches a mass's), so one shared threshold gives up Dice on one of them.
        """
        out = []
        for channel in range(self.dice.shape[1]):
            column = self.dice[:, channel]
            out.append(self.threshold if np.isnan(column).all()
                       else float(self.grid[_best_index(column, self.tolerance)]))
        return tuple(out)

    @property
    def per_class_dice(self) -> tuple[float, ...]:
        """Each class's validation Dice at its own threshold (NaN for an absent class)."""
        return tuple(float(c[_best_index(c, self.tolerance)]) if not np.isnan(c).all() else math.nan
                     for c in self.dice.T)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (lists; NaN is written as None)."""

        def clean(values: np.ndarray) -> list[Any]:
            return [None if math.isnan(v) else float(v) for v in np.asarray(values, dtype=float).ravel()]

        curve = {"threshold": [float(t) for t in self.grid], "mean_dice": clean(self.mean_dice)}
        for index, name in enumerate(CLASS_NAMES):
            curve[f"dice_{name}"] = clean(self.dice[:, index])
        return {"threshold": self.threshold, "statistic": self.statistic, "curve": curve}


def choose_threshold(
    probabilities: Sequence[np.ndarray], masks: Sequence[np.ndarray], grid: Sequence[float],
    statistic: Literal["mean_image", "pooled"] = "mean_image",
    tolerance: float = 0.0,
) -> ThresholdChoice:
    """Choose the probability threshold that maximises the validation Dice, per class and shared.

    With a tolerance, the lowest threshold whose Dice is within it of the maximum, meant for a curve
    whose top is a flat plateau: the lowest threshold on it keeps more of each true lesion and puts
    the decision where the sigmoid is steep, so a small logit error (bf16, int8) moves fewer pixels.
    On the 2-core demo the mass curve was not flat but noisy (0.264 / 0.231 / 0.295 at 0.95 / 0.98 /
    0.998 on one run), so a tolerance of 0.01 still chose its noise peak; params.yaml keeps 0.

    `statistic` is the Dice that is maximised: "mean_image" (the mean over images of each image's
    Dice, images empty in both truth and prediction left out: the headline evaluate reports and the
    gate judges) or "pooled" (pixels summed over the images). They pull in different directions: a
    pooled Dice hardly notices a few false pixels on an image without lesions, the per-image mean
    counts that image as 0, so selecting on the statistic that is reported keeps selection and
    report consistent. The curves come from per-threshold pixel counts accumulated image by image (no
    loop over thresholds). A class absent from every validation ground truth has no defined Dice to
    maximise and is left out of the mean (a warning is logged); its curve is still returned.

    Args:
        probabilities: per image, (2, H, W) float probabilities in [0, 1].
        masks: per image, (2, H, W) bool ground truth, same order.
        grid: candidate thresholds, strictly increasing.
        statistic: "mean_image" or "pooled".
        tolerance: how far below the maximum Dice a lower threshold may score and still be chosen;
            0 chooses the maximum.

    Returns:
        The chosen threshold and the per-threshold curves; ties go to the lowest threshold.

    Raises:
        ValueError: no images, mismatched shapes, an unknown statistic, or no class present in any
            ground truth.
    """
    if statistic not in ("mean_image", "pooled"):
        raise ValueError(f"statistic must be 'mean_image' or 'pooled', got {statistic!r}")
    grid_array = _grid_array(grid)
    if len(probabilities) != len(masks) or not probabilities:
        raise ValueError(
            f"need as many probability maps as masks (> 0), got {len(probabilities)}, {len(masks)}"
        )
    n_classes = len(CLASS_NAMES)
    # Per image: (K, C) predicted counts and intersections, (C,) ground-truth sizes.
    pred_sums, inters, gt_sums = [], [], []
    for probs, mask in zip(probabilities, masks, strict=True):
        probs, mask = np.asarray(probs), np.asarray(mask, dtype=bool)
        if probs.ndim != 3 or probs.shape[0] != n_classes or probs.shape != mask.shape:
            raise ValueError(
                f"expected (2, H, W) probabilities and masks, got {probs.shape} and {mask.shape}"
            )
        image_pred, image_inter, image_gt = [], [], []
        for channel in range(n_classes):
            p, i, g = _counts_at_thresholds(probs[channel], mask[channel : channel + 1], grid_array)
            image_pred.append(p)
            image_inter.append(i[:, 0])
            image_gt.append(g[0])
        pred_sums.append(np.stack(image_pred, axis=1))
        inters.append(np.stack(image_inter, axis=1))
        gt_sums.append(np.array(image_gt, dtype=np.int64))
    pred_sum, inter, gt_sum = np.stack(pred_sums), np.stack(inters), np.stack(gt_sums)  # (N, K, C), (N, C)
    if statistic == "pooled":
        dice = _dice_vector(inter.sum(0), pred_sum.sum(0) + gt_sum.sum(0)[None, :])
    else:
        per_image = _dice_vector(inter, pred_sum + gt_sum[:, None, :])  # (N, K, C), NaN = empty in both
        defined = (~np.isnan(per_image)).sum(0)
        dice = np.full(defined.shape, np.nan)
        np.divide(np.nansum(per_image, axis=0), defined, out=dice, where=defined > 0)
    present = gt_sum.sum(0) > 0
    if not present.any():
        raise ValueError("no validation image has a lesion of any class: cannot choose a threshold")
    for channel in np.flatnonzero(~present):
        log.warning("no %s in the validation ground truth; the threshold is chosen on the other class",
                    CLASS_NAMES[channel])
    top = len(grid_array) - 1
    for channel in np.flatnonzero(present):
        # A maximum at the grid's end is censored: the Dice may still rise beyond it (the 2-core demo's
        # mass probability saturates, and a grid ending at 0.98 chose 0.98 on every seed).
        if top > 0 and _best_index(dice[:, channel], tolerance) == top:
            log.warning("the %s threshold is the grid's highest, %g: its validation Dice may rise "
                        "further above it; extend the grid", CLASS_NAMES[channel], grid_array[top])
    mean_dice = dice[:, present].mean(axis=1)
    best = _best_index(mean_dice, tolerance)
    return ThresholdChoice(float(grid_array[best]), grid_array, dice, mean_dice, statistic, tolerance)


# ----------------------------------------------------------------------------------------- baseline


def remove_large_components(mask: np.ndarray, max_area_px: int) -> np.ndarray:
    """Drop the 8-connected components of a mask larger than `max_area_px` pixels.

    Args:
        mask: (H, W) bool.
        max_area_px: largest area kept.

    Returns:
        (H, W) bool, the mask without its large components.
    """
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return mask.copy()
    keep = np.bincount(labels.ravel()) <= max_area_px
    keep[0] = False
    return keep[labels]


class IntensityThresholdBaseline:
    """The baseline segmenter: `image >= t_class`, one intensity threshold per class, tuned on validation.

    Each class's threshold maximises the pooled Dice of `image >= t` against that class's masks over
    the validation images. Optionally, calcification predictions then lose every component larger than
    `calc_max_area_px` (calcifications are specks, bright dense tissue is not): a fixed, cheap
    heuristic, applied after the fit. The calcification threshold is tuned without it (the histogram
    fit cannot see component sizes), so it is not the optimum of the filtered rule; this is a
    reference point, not a competitor.

    Attributes:
        thresholds: (mass, calcification) intensity thresholds.
        calc_max_area_px: largest calcification component kept, or None for no filter.
        validation_dice: pooled validation Dice of each class at its threshold (unfiltered rule).
    """

    KIND = "intensity_threshold"

    def __init__(
        self,
        thresholds: Sequence[float],
        calc_max_area_px: int | None = None,
        validation_dice: Sequence[float] | None = None,
    ) -> None:
        if len(thresholds) != len(CLASS_NAMES):
            raise ValueError(f"need {len(CLASS_NAMES)} thresholds, got {thresholds!r}")
        if calc_max_area_px is not None and calc_max_area_px < 1:
            raise ValueError(f"calc_max_area_px must be >= 1 or None, got {calc_max_area_px}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.calc_max_area_px = None if calc_max_area_px is None else int(calc_max_area_px)
        self.validation_dice = (
            tuple(float(d) for d in validation_dice) if validation_dice is not None else (math.nan,) * 2
        )

    def __repr__(self) -> str:
        return (f"IntensityThresholdBaseline(thresholds={self.thresholds}, "
                f"calc_max_area_px={self.calc_max_area_px})")

    @classmethod
    def fit(
        cls,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        grid: Sequence[float],
        calc_max_area_px: int | None = None,
    ) -> IntensityThresholdBaseline:
        """Choose each class's threshold on validation images.

        Args:
            images: per image, (H, W) float intensities in [0, 1].
            masks: per image, (2, H, W) bool ground truth (mass, calcification).
            grid: candidate thresholds, strictly increasing (e.g. np.linspace(0.5, 0.99, 50)).
            calc_max_area_px: largest calcification component kept at prediction time, or None.

        Returns:
            The fitted baseline. A class with no lesion in any validation mask gets the highest grid
            threshold (predict as little as possible) and a warning.

        Raises:
            ValueError: no images or mismatched shapes.
        """
        grid_array = _grid_array(grid)
        if len(images) != len(masks) or not images:
            raise ValueError(f"need as many images as masks (> 0), got {len(images)}, {len(masks)}")
        n_classes = len(CLASS_NAMES)
        pred_sum = np.zeros((len(grid_array), n_classes), dtype=np.int64)
        inter = np.zeros_like(pred_sum)
        gt_sum = np.zeros(n_classes, dtype=np.int64)
        for image, mask in zip(images, masks, strict=True):
            image, mask = np.asarray(image), np.asarray(mask, dtype=bool)
            if image.ndim != 2 or mask.shape != (n_classes, *image.shape):
                raise ValueError(
                    f"expected (H, W) images and (2, H, W) masks, got {image.shape}, {mask.shape}"
                )
            # Both classes threshold the same image: one binning, two in-mask histograms.
            p, i, g = _counts_at_thresholds(image, mask, grid_array)
            pred_sum += p[:, None]
            inter += i
            gt_sum += g
        dice = _dice_vector(inter, pred_sum + gt_sum[None, :])
        thresholds, best_dice = [], []
        for channel, name in enumerate(CLASS_NAMES):
            if gt_sum[channel] == 0:
                log.warning("no %s in the validation masks; baseline threshold set to the grid maximum", name)
                best = len(grid_array) - 1
            else:
                best = _best_index(dice[:, channel])
            thresholds.append(float(grid_array[best]))
            best_dice.append(float(dice[best, channel]))
        log.info("baseline thresholds %s, validation pooled Dice %s", thresholds, best_dice)
        return cls(thresholds, calc_max_area_px, best_dice)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Segment one image.

        Args:
            image: (H, W) float intensities in [0, 1].

        Returns:
            (2, H, W) bool, mass then calcification.
        """
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"expected an (H, W) image, got shape {image.shape}")
        # Compare in the image's dtype, as the fit's histogram did.
        scalar = image.dtype.type if np.issubdtype(image.dtype, np.floating) else np.float64
        out = np.stack([image >= scalar(t) for t in self.thresholds])
        if self.calc_max_area_px is not None:
            out[1] = remove_large_components(out[1], self.calc_max_area_px)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description of the fitted baseline."""
        return {
            "kind": self.KIND,
            "thresholds": dict(zip(CLASS_NAMES, self.thresholds, strict=True)),
            "calc_max_area_px": self.calc_max_area_px,
            "validation_dice": {
                name: (None if math.isnan(d) else d)
                for name, d in zip(CLASS_NAMES, self.validation_dice, strict=True)
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityThresholdBaseline:
        """Rebuild a baseline from `to_dict()` output.

        Raises:
            ValueError: the dict is not a baseline description.
        """
        if not isinstance(data, dict) or data.get("kind") != cls.KIND:
            raise ValueError(f"not an {cls.KIND} baseline description: {data!r}")
        try:
            thresholds = [float(data["thresholds"][name]) for name in CLASS_NAMES]
            scores = data.get("validation_dice") or {}
            dice = [math.nan if scores.get(name) is None else float(scores[name]) for name in CLASS_NAMES]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed {cls.KIND} baseline description: {error}") from error
        return cls(thresholds, data.get("calc_max_area_px"), dice)


def nan_to_zero(value: float | None) -> float:
    """Return value as a float, 0.0 for None or NaN (an undefined Dice scores nothing when ranking or logging)."""
    return 0.0 if value is None or math.isnan(value) else float(value)
