"""Overlays and figure panels: shapes, palette, tiny calcifications stay visible, PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mammoseg.overlays import (
    GAP_COLOR,
    GAP_PX,
    GT_COLORS,
    PRED_COLORS,
    downscale_mask,
    figure_grid,
    figure_panel,
    overlay_rgb,
    save_png,
)


def _case(height=60, width=40):
    image = np.linspace(0.0, 1.0, height * width, dtype=np.float32).reshape(height, width)
    gt = np.zeros((2, height, width), dtype=bool)
    gt[0, 10:20, 10:20] = True
    gt[1, 40, 30] = True  # a 1-px calcification
    pred = np.zeros_like(gt)
    pred[0, 12:22, 12:22] = True
    pred[1, 40, 30] = True
    return image, pred, gt


def _has_color(rgb, color):
    return bool(np.all(rgb == np.asarray(color, dtype=np.uint8), axis=-1).any())


def test_overlay_shapes_and_gray_background():
    image, pred, gt = _case()
    plain = overlay_rgb(image)
    assert plain.shape == (60, 40, 3) and plain.dtype == np.uint8
    assert np.all(plain[..., 0] == plain[..., 1]) and plain[0, 0, 0] == 0 and plain[-1, -1, 0] == 255
    both = overlay_rgb(image, gt, pred)
    assert both.shape == (60, 40, 3) and both.dtype == np.uint8
    for color in (*GT_COLORS, *PRED_COLORS):
        assert _has_color(both, color)
    # Outlines only: the inside of the predicted mass keeps the image's gray values.
    np.testing.assert_array_equal(both[15:19, 15:19], plain[15:19, 15:19])
    with pytest.raises(ValueError, match="shape"):
        overlay_rgb(image, gt[:, :10])


def test_one_pixel_calcification_is_visible():
    image = np.full((50, 50), 0.5, dtype=np.float32)
    calc = np.zeros((2, 50, 50), dtype=bool)
    calc[1, 25, 25] = True
    gt_only = overlay_rgb(image, mask=calc)
    pred_only = overlay_rgb(image, pred=calc)
    # More than a pixel's worth of colour: a ring marker around the speck.
    assert np.all(gt_only == GT_COLORS[1], axis=-1).sum() > 20
    assert np.all(pred_only == PRED_COLORS[1], axis=-1).sum() > 8
    # The speck itself is not painted over.
    assert tuple(gt_only[25, 25]) == (128, 128, 128)


def test_downscale_keeps_tiny_lesions():
    image = np.full((1000, 800), 0.4, dtype=np.float32)
    calc = np.zeros((2, 1000, 800), dtype=bool)
    calc[1, 501, 333] = True
    small = overlay_rgb(image, mask=calc, max_side=250)
    assert small.shape == (250, 200, 3)
    assert _has_color(small, GT_COLORS[1])
    pooled = downscale_mask(calc, 4)
    assert pooled.shape == (2, 250, 200) and pooled[1, 125, 83] and pooled.sum() == 1
    odd = overlay_rgb(np.zeros((101, 99), np.float32), max_side=50)
    assert odd.shape == (34, 33, 3)  # integer factor ceil(101 / 50) = 3


def test_figure_panel_and_grid():
    image, pred, gt = _case()
    panel = figure_panel(image, pred, gt, title="22678646 Dice 0.71")
    assert panel.shape == (60, 3 * 40 + 2 * GAP_PX, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:, 40:40 + GAP_PX], np.broadcast_to(GAP_COLOR, (60, GAP_PX, 3)))
    prediction_column = panel[:, 40 + GAP_PX: 80 + GAP_PX]
    truth_column = panel[:, 80 + 2 * GAP_PX:]
    assert np.all(prediction_column[15, 15] == PRED_COLORS[0])
    assert np.all(truth_column[40, 30] == GT_COLORS[1])
    corner = truth_column[:15].astype(int)  # the column label: gray text on black, unlike the palette
    gray = (corner[..., 0] == corner[..., 1]) & (corner[..., 1] == corner[..., 2])
    assert np.any(gray & (corner[..., 0] > 100))
    other = figure_panel(image[:30], pred[:, :30], gt[:, :30])
    grid = figure_grid([panel, other, panel])
    assert grid.shape == (60 + 30 + 60 + 2 * GAP_PX, panel.shape[1], 3)
    small = figure_panel(np.zeros((400, 200), np.float32), np.zeros((2, 400, 200), bool),
                         np.zeros((2, 400, 200), bool), max_side=100)
    assert small.shape == (100, 3 * 50 + 2 * GAP_PX, 3)


def test_save_png_round_trip(tmp_path):
    image, pred, gt = _case()
    rgb = overlay_rgb(image, gt, pred)
    path = tmp_path / "sub" / "overlay.png"
    save_png(rgb, path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    save_png(gt[1], tmp_path / "mask.png")
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "mask.png")), gt[1])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mask.png", "overlay.png", "sub"]
    with pytest.raises(ValueError, match="save_png"):
        save_png(image, tmp_path / "float.png")
