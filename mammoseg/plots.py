"""Charts for reviewers (matplotlib, headless): training progress per epoch and the FROC curve.

Reads lists and dicts in memory and writes PNG files; the only module that imports matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mammoseg.fileio import write_atomically


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: CI, containers
    import matplotlib.pyplot as plt

    return plt


def progress_png(history: Sequence[Mapping[str, float]], path: Path) -> None:
    """Draw nnU-Net's progress plot: losses, validation Dice per class and its EMA, learning rate, epoch time.

    Args:
        history: one mapping per epoch with epoch, train_loss, val_loss, val_dice_<class>, val_dice_mean,
            val_dice_mean_ema, lr and epoch_seconds (missing keys, and epochs without validation, are skipped).
        path: the PNG to write.
    """
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (losses, dice, timing) = plt.subplots(3, 1, figsize=(8, 9), dpi=90, sharex=True)

    def series(axis, key: str, **style: Any) -> None:
        # Only the epochs that have the value (validation may run every few epochs).
        points = [(epoch, row[key]) for epoch, row in zip(epochs, history, strict=True)
                  if key in row and math.isfinite(row[key])]
        if points:
            axis.plot(*zip(*points, strict=True), label=key, **style)

    series(losses, "train_loss", color="tab:blue")
    series(losses, "val_loss", color="tab:red")
    losses.set_ylabel("loss")
    rate = losses.twinx()
    series(rate, "lr", color="tab:gray", linestyle=":")
    rate.set_ylabel("learning rate")
    losses.legend(loc="upper left")
    rate.legend(loc="upper right")
    for key, color in (("val_dice_mass", "tab:orange"), ("val_dice_calcification", "tab:green"),
                       ("val_dice_mean", "tab:purple")):
        series(dice, key, color=color, alpha=0.6)
    series(dice, "val_dice_mean_ema", color="black", linewidth=2)
    dice.set_ylabel("validation Dice")
    dice.set_ylim(0, 1)
    dice.legend(loc="upper left")
    series(timing, "epoch_seconds", color="tab:brown")
    timing.set_ylabel("epoch time (s)")
    timing.set_xlabel("epoch")
    for axis in (losses, dice, timing):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def froc_png(detection: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Draw the FROC curve of each class (lesion sensitivity against false positives per image).

    Args:
        detection: per class, evaluate's detection block ("min_iou" and "froc" with the curve).
        path: the PNG to write.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    for name, values in detection.items():
        curve = values["froc"]
        axis.plot(curve["false_positives_per_image"], curve["sensitivity"], marker="o",
                  label=f"{name} (IoU >= {values['min_iou']})")
    axis.set_xlabel("false positives per image")
    axis.set_ylabel("lesion sensitivity")
    axis.set_ylim(0, 1.02)
    axis.set_title("FROC, test split (probability threshold swept)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
