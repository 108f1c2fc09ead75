"""Display images of segmentations: reads in-memory images and masks, writes RGB overlays and PNG panels.

Palette (RGB), chosen so that ground truth and prediction stay distinguishable where they coincide:

- ground truth: mass green (0, 255, 0), calcification cyan (0, 255, 255), drawn just OUTSIDE each
  component (the ring of pixels around it);
- prediction: mass red (255, 0, 0), calcification magenta (255, 0, 255), drawn just INSIDE each
  component (its border pixels).

Only outlines are drawn, never filled areas, so the tissue and the calcifications under them stay
visible. A component too small for its outline to be seen at display size (calcifications are 1-15
px) also gets a ring marker around it: radius 7 px for the ground truth, 4 px for the prediction, so a
found speck shows two nested rings.

Large images are shrunk by an integer factor for display: the image by block mean, the masks by
block max (max-pooling) so that no lesion pixel disappears.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from mammoseg.fileio import write_atomically
from mammoseg.metrics import CLASS_NAMES

GT_COLORS = ((0, 255, 0), (0, 255, 255))  # mass, calcification
PRED_COLORS = ((255, 0, 0), (255, 0, 255))  # mass, calcification
GAP_COLOR = (255, 255, 255)
GAP_PX = 4
COLUMN_LABELS = ("image", "prediction", "ground truth")

_GT_MARKER_RADIUS = 7
_PRED_MARKER_RADIUS = 4
# Components whose bounding box is at most this many display pixels on its longer side get a marker.
_TINY_SIDE_PX = 5
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def to_gray_rgb(image: np.ndarray) -> np.ndarray:
    """Turn a [0, 1] float image into gray RGB.

    Args:
        image: (H, W) float, values clipped to [0, 1]; NaN shows black.

    Returns:
        (H, W, 3) uint8.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) image, got shape {image.shape}")
    gray = np.rint(np.nan_to_num(np.clip(image, 0.0, 1.0), nan=0.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def display_factor(shape: tuple[int, ...], max_side: int | None) -> int:
    """Return the integer shrink factor that brings the longer side of `shape` to at most `max_side`."""
    if max_side is None:
        return 1
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    return max(1, math.ceil(max(shape[-2:]) / max_side))


def downscale_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Shrink an (H, W) image by block mean; the last partial blocks average their own pixels.

    Returns:
        (ceil(H / factor), ceil(W / factor)) float32.
    """
    image = np.asarray(image, dtype=np.float32)
    if factor == 1:
        return image
    height, width = image.shape
    rows, cols = -(-height // factor), -(-width // factor)
    padded = np.pad(image, ((0, rows * factor - height), (0, cols * factor - width)), mode="edge")
    return padded.reshape(rows, factor, cols, factor).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def downscale_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Shrink a (..., H, W) bool mask by block max, so every lesion pixel survives.

    Returns:
        (..., ceil(H / factor), ceil(W / factor)) bool.
    """
    mask = np.asarray(mask, dtype=bool)
    if factor == 1:
        return mask
    *lead, height, width = mask.shape
    rows, cols = -(-height // factor), -(-width // factor)
    pad = [(0, 0)] * len(lead) + [(0, rows * factor - height), (0, cols * factor - width)]
    padded = np.pad(mask, pad)
    return padded.reshape(*lead, rows, factor, cols, factor).any(axis=(-3, -1))


def _ring_offsets(radius: int) -> np.ndarray:
    """(M, 2) row/column offsets of a one-pixel-wide 8-connected circle of the given radius."""
    span = np.arange(-radius - 1, radius + 2)
    dy, dx = np.meshgrid(span, span, indexing="ij")
    disk = dy**2 + dx**2 <= radius**2
    ring = disk & ~ndimage.binary_erosion(disk, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]))
    return np.stack([dy[ring], dx[ring]], axis=1)


def _markers(mask: np.ndarray, radius: int) -> np.ndarray:
    """Rings around the tiny components of a mask.

    Args:
        mask: (H, W) bool.
        radius: ring radius in pixels.

    Returns:
        (H, W) bool, the ring pixels.
    """
    out = np.zeros(mask.shape, dtype=bool)
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return out
    centres = []
    for box in ndimage.find_objects(labels):
        if max(box[0].stop - box[0].start, box[1].stop - box[1].start) <= _TINY_SIDE_PX:
            centres.append(((box[0].start + box[0].stop - 1) // 2, (box[1].start + box[1].stop - 1) // 2))
    if not centres:
        return out
    points = (np.asarray(centres)[:, None, :] + _ring_offsets(radius)[None, :, :]).reshape(-1, 2)
    inside = np.all((points >= 0) & (points < np.asarray(mask.shape)), axis=1)
    out[points[inside, 0], points[inside, 1]] = True
    return out


def _outline(mask: np.ndarray, outside: bool) -> np.ndarray:
    """One-pixel outline of every component: the ring just outside it, or its own border pixels."""
    if outside:
        return ndimage.binary_dilation(mask, structure=_EIGHT_CONNECTED) & ~mask
    return mask & ~ndimage.binary_erosion(mask, structure=_EIGHT_CONNECTED, border_value=1)


def _check_masks(name: str, mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    expected = (len(CLASS_NAMES), *shape)
    if mask.shape != expected:
        raise ValueError(f"{name} must have shape {expected} to match the image, got {mask.shape}")
    return mask.astype(bool, copy=False)


def overlay_rgb(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """Draw ground-truth and predicted outlines over a grayscale image (palette in the module docstring).

    Args:
        image: (H, W) float in [0, 1].
        mask: (2, H, W) bool ground truth (mass, calcification), or None.
        pred: (2, H, W) bool prediction, or None.
        max_side: shrink for display so the longer side is at most this (masks max-pooled), or None.

    Returns:
        (h, w, 3) uint8, (h, w) = (H, W) shrunk by display_factor(image.shape, max_side).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) image, got shape {image.shape}")
    mask = _check_masks("mask", mask, image.shape)
    pred = _check_masks("pred", pred, image.shape)
    factor = display_factor(image.shape, max_side)
    rgb = to_gray_rgb(downscale_image(image, factor))
    layers = ((mask, GT_COLORS, True, _GT_MARKER_RADIUS), (pred, PRED_COLORS, False, _PRED_MARKER_RADIUS))
    for masks, colors, outside, radius in layers:
        if masks is None:
            continue
        for channel, color in enumerate(colors):
            shown = downscale_mask(masks[channel], factor)
            if not shown.any():
                continue
            rgb[_outline(shown, outside) | _markers(shown, radius)] = color
    return rgb


def _mask_rgb(masks: np.ndarray, colors: Sequence[tuple[int, int, int]], radius: int) -> np.ndarray:
    """Filled masks on black, with ring markers around tiny components (the paper's binary outputs)."""
    rgb = np.zeros((*masks.shape[1:], 3), dtype=np.uint8)
    for channel, color in enumerate(colors):
        if masks[channel].any():
            rgb[masks[channel] | _markers(masks[channel], radius)] = color
    return rgb


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _label(rgb: np.ndarray, text: str, bottom: bool = False) -> np.ndarray:
    """Write `text` in white on a black box in a corner of an RGB image (in place, returned)."""
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    font = _font()
    left, top, right, low = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, low - top + 4
    y = max(rgb.shape[0] - height, 0) if bottom else 0
    draw.rectangle((0, y, width - 1, y + height - 1), fill=(0, 0, 0))
    draw.text((2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)
    rgb[...] = np.asarray(picture)
    return rgb


def figure_panel(
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray,
    title: str | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """Build one row of a figure like the paper's Figure 2: input image, thresholded output, ground truth.

    The second and third columns show the masks filled on black (prediction in red/magenta, ground
    truth in green/cyan), with ring markers around tiny components. Each column is labelled in its
    top-left corner; the title, if any, is written in the bottom-left corner of the first column.

    Args:
        image: (H, W) float in [0, 1].
        pred: (2, H, W) bool thresholded prediction (mass, calcification).
        gt: (2, H, W) bool ground truth.
        title: text such as the image id and its Dice, or None.
        max_side: shrink each column so its longer side is at most this, or None.

    Returns:
        (h, 3 w + 2 GAP_PX, 3) uint8, (h, w) = (H, W) shrunk by display_factor(image.shape, max_side).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) image, got shape {image.shape}")
    pred = _check_masks("pred", pred, image.shape)
    gt = _check_masks("gt", gt, image.shape)
    factor = display_factor(image.shape, max_side)
    columns = [
        to_gray_rgb(downscale_image(image, factor)),
        _mask_rgb(downscale_mask(pred, factor), PRED_COLORS, _PRED_MARKER_RADIUS),
        _mask_rgb(downscale_mask(gt, factor), GT_COLORS, _GT_MARKER_RADIUS),
    ]
    for column, text in zip(columns, COLUMN_LABELS, strict=True):
        _label(column, text)
    if title:
        _label(columns[0], title, bottom=True)
    gap = np.empty((columns[0].shape[0], GAP_PX, 3), dtype=np.uint8)
    gap[...] = GAP_COLOR
    return np.concatenate([columns[0], gap, columns[1], gap, columns[2]], axis=1)


def figure_grid(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stack panels vertically, GAP_PX apart; narrower panels are padded on the right with GAP_COLOR.

    Args:
        rows: (h_i, w_i, 3) uint8 panels, e.g. from figure_panel.

    Returns:
        (sum h_i + GAP_PX (n - 1), max w_i, 3) uint8.
    """
    if not rows:
        raise ValueError("figure_grid needs at least one panel")
    width = max(row.shape[1] for row in rows)
    parts = []
    for index, row in enumerate(rows):
        if row.ndim != 3 or row.shape[2] != 3 or row.dtype != np.uint8:
            raise ValueError(f"panel {index} must be (h, w, 3) uint8, got {row.shape} {row.dtype}")
        if index:
            parts.append(np.full((GAP_PX, width, 3), GAP_COLOR, dtype=np.uint8))
        padded = np.empty((row.shape[0], width, 3), dtype=np.uint8)
        padded[...] = GAP_COLOR
        padded[:, : row.shape[1]] = row
        parts.append(padded)
    return np.concatenate(parts, axis=0)


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an image losslessly as PNG, atomically (creates the parent folder).

    Args:
        array: (H, W, 3) uint8 RGB, (H, W) uint8 gray, or (H, W) bool (1-bit PNG).
        path: the PNG file to (re)write.
    """
    array = np.asarray(array)
    valid = (array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8) or (
        array.ndim == 2 and array.dtype in (np.uint8, np.bool_)
    )
    if not valid:
        raise ValueError(
            f"save_png takes (H, W, 3) uint8, (H, W) uint8 or bool, got {array.shape} {array.dtype}"
        )
    picture = Image.fromarray(array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))
