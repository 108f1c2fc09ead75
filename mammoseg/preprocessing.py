"""Turn one decoded mammogram (and its masks) into the network's square input, and map masks back.

Reads and writes nothing (arrays in, arrays out). Used by the
preprocess stage (training data) and by predict (a new DICOM in, a mask on its own grid out).

The steps, and the choices behind them:

1. **Orientation.** Right breasts are flipped left-right so that every chest wall is on the left
   (INbreast stores each breast on the side of its laterality). The flip is recorded per image;
   `chest_wall_on_right` decides it from the pixels where the laterality is unknown.
2. **Breast crop.** The breast is found on a block-mean thumbnail (long side about `otsu_side`):
   Otsu's threshold on log intensities above the image minimum (pixels at the minimum are a black
   border or padding and are left out; the log stretches the air/skin step and squeezes the fat/dense
   step, so the threshold falls between background and breast rather than inside the breast), then the
   largest connected component (drops bright labels and markers, which are not connected to the
   breast), holes filled. The crop box is that component's bounding box plus `crop_margin_px`. No
   breast found (a flat image): the whole image is kept. Labels never shape the crop or the
   background: lesion pixels outside the box are counted (`lesion_px_outside_crop`), not kept.
3. **Resize, keeping the aspect ratio.** The crop is scaled by one factor so that its longer side is
   `size`, placed at the top left of a `size` x `size` canvas (chest wall on the left edge), and the
   rest is zero padding. Stretching would fill the canvas but would give every image its own
   anisotropic pixel shape, which distorts lesion shape (spiculation, calcification morphology) by an
   amount that depends on how wide the breast is; one isotropic scale per image keeps shapes.
4. **Resampling = exact block partition.** Along each axis, crop pixel k (centre k + 0.5) belongs to
   the target pixel `floor((k + 0.5) * n_out / n_in)`; integer arithmetic, so the geometry is exact.
   The image becomes the mean of each block (area interpolation with pixel-snapped blocks), computed
   as two sparse matrix products (one pass over the crop, no full-size temporaries). Masks use the
   same blocks: calcifications by the any-pixel rule (a block is set when any of its pixels is: no
   calcification can vanish, since every pixel belongs to a block), masses by area (a block is set
   when at least half of it is covered, which keeps the area within a few percent); a mass component
   that still vanishes (a sliver) gets the block of its pixel nearest its centroid. When the crop is
   smaller than the target (tiny test images), each target pixel takes its source pixel instead.
5. **Block maximum (optional second channel).** With `max_channel`, a second image holds each
   block's maximum instead of its mean, on the same intensity scale. At 256 px a block is about 16x16
   original pixels: a 0.2-0.5 mm calcification (a few dozen pixels) is averaged to a few per cent of
   contrast and vanishes from the mean, but it is still the block's brightest value. Computed from
   the pixels alone, like the mean (no label involved), and windowed by its own percentiles (the
   maximum of textured tissue sits above its mean); the network then reads (2, size, size).
6. **Intensity.** Values between the `percentiles` (low, high) of the breast's pixels on the resized
   image (inside the dilated breast mask and above the Otsu threshold, so the thumbnail's mixed edge
   blocks do not pull `low` down to air) map linearly to [0, 1], clipped, and are rounded to the
   uint16 storage grid. With `zero_background`, pixels outside the breast (dilated by the crop
   margin) are set to 0, which removes labels and markers inside the crop box.

`to_original_grid(mask, transform)` gives each original pixel the value of the target pixel its centre
falls in (0 outside the crop), and `to_target_grid(mask, transform, rule)` is the forward mask
resampling. "Exact" means: the flip, crop and scale are integer maps without rounding drift, and for
any target-grid mask m that is 0 in the padding, `to_target_grid(to_original_grid(m, t), t, rule) == m`
for either rule whenever the crop is at least as large as the resized content (always for mammograms:
3328 rows or more against 1536); a full-resolution mask sent forward and back keeps a pixel of every
component.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sparse
from skimage.filters import threshold_otsu

from mammoseg.data import CLASSES, IMAGE_SCALE, getter
from mammoseg.errors import UserError

MASK_CHANNELS = CLASSES
# Mask resampling rule per channel: "area" = at least half the block covered, "any" = any pixel.
MASK_RULES = {"mass": "area", "calcification": "any"}
# The smallest breast component kept, as a fraction of the thumbnail; smaller means "not found".
_MIN_BREAST_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    """The preprocessing contract: what train, export and predict must apply identically.

    Attributes:
        size: side of the square output, in pixels.
        percentiles: (low, high) percentiles of the breast's pixels that map to 0 and 1.
        crop_margin_px: margin around the breast box, in original pixels.
        otsu_side: approximate long side of the thumbnail the breast is found on.
        zero_background: set pixels outside the (dilated) breast to 0.
        apply_voi: apply the DICOM VOI window/LUT where present (mammoseg.dicom.read_image).
        max_channel: add a second input channel holding each block's maximum (see the module text).
    """

    size: int
    percentiles: tuple[float, float]
    crop_margin_px: int
    otsu_side: int
    zero_background: bool
    apply_voi: bool
    max_channel: bool = False

    @property
    def channels(self) -> int:
        """Return the number of network input channels: block mean, and block maximum when asked."""
        return 2 if self.max_channel else 1

    def __post_init__(self) -> None:
        low, high = self.percentiles
        if self.size < 1:
            raise UserError(f"preprocess.size must be a positive number of pixels, got {self.size}")
        if not 0.0 <= low < high <= 100.0:
            raise UserError(f"preprocess.percentiles must be two values 0 <= low < high <= 100, "
                            f"got {list(self.percentiles)}")
        if self.crop_margin_px < 0:
            raise UserError(f"preprocess.crop_margin_px must be >= 0, got {self.crop_margin_px}")
        if self.otsu_side < 16:
            raise UserError(f"preprocess.otsu_side must be >= 16, got {self.otsu_side}")

    def to_dict(self) -> dict[str, Any]:
        """Return the parameters as JSON-ready values."""
        return {**dataclasses.asdict(self), "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessParams:
        """Build the parameters from `to_dict`'s output (e.g. dataset.json's "preprocessing")."""
        return cls(size=int(values["size"]), percentiles=tuple(float(p) for p in values["percentiles"]),
                   crop_margin_px=int(values["crop_margin_px"]), otsu_side=int(values["otsu_side"]),
                   zero_background=bool(values["zero_background"]), apply_voi=bool(values["apply_voi"]),
                   max_channel=bool(values.get("max_channel", False)))


@dataclasses.dataclass(frozen=True)
class Transform:
    """Where one image's target grid sits on its original DICOM grid.

    The original (rows, columns) image is flipped left-right when `flip`, cropped to rows
    [crop_r0, crop_r1) and columns [crop_c0, crop_c1) of the flipped image, resampled to
    (content_rows, content_columns) and placed at the top left of a (size, size) canvas.
    """

    rows: int
    columns: int
    flip: bool
    crop_r0: int
    crop_r1: int
    crop_c0: int
    crop_c1: int
    size: int
    content_rows: int
    content_columns: int

    def __post_init__(self) -> None:
        rows_ok = 0 <= self.crop_r0 < self.crop_r1 <= self.rows
        if not (rows_ok and 0 <= self.crop_c0 < self.crop_c1 <= self.columns):
            raise ValueError(f"crop box {self.crop_box} outside a {self.rows}x{self.columns} image")
        if not (1 <= self.content_rows <= self.size and 1 <= self.content_columns <= self.size):
            raise ValueError(f"content {self.content_rows}x{self.content_columns} does not fit {self.size}")

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """Return (r0, r1, c0, c1) in the flipped image."""
        return self.crop_r0, self.crop_r1, self.crop_c0, self.crop_c1

    @property
    def crop_shape(self) -> tuple[int, int]:
        """Return the crop's (rows, columns)."""
        return self.crop_r1 - self.crop_r0, self.crop_c1 - self.crop_c0

    @property
    def scale(self) -> float:
        """Return target pixels per original pixel (rows; columns differ by rounding only)."""
        return self.content_rows / (self.crop_r1 - self.crop_r0)

    def to_record(self) -> dict[str, Any]:
        """Return the fields as index columns (plus the derived scale, for reading)."""
        return {**dataclasses.asdict(self), "scale": self.scale}

    @classmethod
    def from_record(cls, record: Any) -> Transform:
        """Build a transform from an index row (a mapping, a pandas Series or a namedtuple)."""
        get = getter(record)
        values = {f.name: get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: bool(v) if k == "flip" else int(v) for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class Preprocessed:
    """One preprocessed image.

    Attributes:
        image: (size, size) float32 in [0, 1], chest wall on the left, zero padding bottom/right.
        max_image: (size, size) float32 in [0, 1], each block's maximum on the same scale, or None
            when the contract has no max channel.
        masks: (2, size, size) bool [mass, calcification], or None when no masks were given.
        transform: the geometry, for mapping masks back.
        intensity_low: the original value mapped to 0.
        intensity_high: the original value mapped to 1.
        breast_found: False when no breast was found and the whole image was kept.
        chest_wall_left: whether, after the flip, the breast touches the left more than the right
            (False suggests a wrong laterality).
        lesion_px_outside_crop: per mask channel, original-grid lesion pixels outside the crop box
            (lost to the network's view: counted, never used to widen the crop).
        restored_components: mass components that the area rule lost and the centroid rule restored.
    """

    image: np.ndarray
    max_image: np.ndarray | None
    masks: np.ndarray | None
    transform: Transform
    intensity_low: float
    intensity_high: float
    breast_found: bool
    chest_wall_left: bool
    lesion_px_outside_crop: tuple[int, ...]
    restored_components: int

    @property
    def network_input(self) -> np.ndarray:
        """Return what the network reads: (channels, size, size) float32, block mean first."""
        planes = [self.image] if self.max_image is None else [self.image, self.max_image]
        return np.stack(planes)


# ---------------------------------------------------------------------------------------------------
# One axis of the geometry.


def _targets(n_in: int, n_out: int) -> np.ndarray:
    """Return, for each of n_in input pixels, the output pixel holding its centre (n_out <= n_in)."""
    k = np.arange(n_in, dtype=np.int64)
    return (2 * k + 1) * n_out // (2 * n_in)


def _sources(n_in: int, n_out: int) -> np.ndarray:
    """Return, for each of n_out output pixels, the input pixel holding its centre."""
    i = np.arange(n_out, dtype=np.int64)
    return (2 * i + 1) * n_in // (2 * n_out)


def _axis_matrix(n_in: int, n_out: int) -> sparse.csr_matrix:
    """Return the (n_out, n_in) 0/1 matrix of one axis: row i sums the input pixels of output i.

    Downsampling: each input column has exactly one 1 (its block). Upsampling: each output row has
    exactly one 1 (its source pixel), so the product is a nearest-neighbour gather.
    """
    if n_out <= n_in:
        rows, cols = _targets(n_in, n_out), np.arange(n_in)
    else:
        rows, cols = np.arange(n_out), _sources(n_in, n_out)
    data = np.ones(len(rows), np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(n_out, n_in))


def _axis_back(values: np.ndarray, n_in: int, n_out: int, axis: int) -> np.ndarray:
    """Map values along `axis` from n_out target pixels back to n_in original pixels.

    Downsampling: each original pixel takes its block's value. Upsampling: the maximum of the
    target pixels whose source it is.
    """
    if n_out <= n_in:
        return np.take(values, _targets(n_in, n_out), axis=axis)
    starts = np.searchsorted(_sources(n_in, n_out), np.arange(n_in))
    return np.maximum.reduceat(values, starts, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The sparse resampling matrices of one transform, in the original array's own column order.

    The crop is read from the unflipped array as `array[row_slice, col_slice]`; for a flipped image
    its columns run right to left in crop coordinates, which the column matrix absorbs (no copy).
    """

    row_slice: slice
    col_slice: slice
    row_matrix: sparse.csr_matrix  # (content_rows, crop rows)
    col_matrix: sparse.csr_matrix  # (content_columns, crop columns), columns in data order
    # When both axes downsample: the target row of each crop row and the target column of each crop
    # column (data order); None otherwise.
    row_targets: np.ndarray | None
    col_targets: np.ndarray | None

    @classmethod
    def of(cls, t: Transform) -> _Grid:
        h, w = t.crop_shape
        col_order = np.arange(w)[::-1] if t.flip else np.arange(w)
        col_slice = (slice(t.columns - t.crop_c1, t.columns - t.crop_c0) if t.flip
                     else slice(t.crop_c0, t.crop_c1))
        down = t.content_rows <= h and t.content_columns <= w
        return cls(slice(t.crop_r0, t.crop_r1), col_slice, _axis_matrix(h, t.content_rows),
                   _axis_matrix(w, t.content_columns)[:, col_order].tocsr(),
                   _targets(h, t.content_rows) if down else None,
                   _targets(w, t.content_columns)[col_order] if down else None)

    def sums(self, data: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Return the block sums (content_rows, content_columns) float32 of a crop-aligned array.

        Args:
            data: (h', w') values: the crop, or its sub-block rows x cols (slices of the crop).
            rows: which crop rows `data` holds.
            cols: which crop columns (in data order) `data` holds.
        """
        by_rows = self.row_matrix[:, rows] @ data  # (content_rows, w') dense
        out = self.col_matrix[:, cols] @ by_rows.T  # (content_columns, content_rows)
        return np.ascontiguousarray(out.T, dtype=np.float32)

    def maxima(self, data: np.ndarray, flip: bool) -> np.ndarray:
        """Return each target pixel's maximum over its block, (content_rows, content_columns) float32.

        Args:
            data: the (h, w) crop in data order (`array[row_slice, col_slice]`).
            flip: whether the crop's columns run right to left (a flipped image).
        """
        if self.row_targets is None or self.col_targets is None:
            # Upsampled crops: each target pixel has one source pixel, so the maximum is the gather.
            return self.sums(data) / self.block_areas()
        rows = np.maximum.reduceat(data, np.flatnonzero(np.diff(self.row_targets, prepend=-1)), axis=0)
        columns = self.col_targets[::-1] if flip else self.col_targets
        rows = rows[:, ::-1] if flip else rows
        return np.maximum.reduceat(rows, np.flatnonzero(np.diff(columns, prepend=-1)), axis=1).astype(np.float32)

    def block_areas(self) -> np.ndarray:
        """Return the number of crop pixels per target pixel, (content_rows, content_columns) float32."""
        return np.outer(np.asarray(self.row_matrix.sum(axis=1)).ravel(),
                        np.asarray(self.col_matrix.sum(axis=1)).ravel()).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Masks: forward and back.


def _check_grid(array: np.ndarray, shape: tuple[int, int], what: str) -> None:
    """Raise ValueError when the array's last two axes are not `shape`."""
    if array.shape[-2:] != shape:
        raise ValueError(f"{what} has shape {array.shape}, expected (..., {shape[0]}, {shape[1]})")


def _mask_forward(mask: np.ndarray, t: Transform, grid: _Grid, rule: str) -> tuple[np.ndarray, int]:
    """Resample one (rows, columns) bool mask onto the content grid; return it and the restored count."""
    content = np.zeros((t.content_rows, t.content_columns), bool)
    crop = mask[grid.row_slice, grid.col_slice]
    rows_any = np.flatnonzero(crop.any(axis=1))
    if rows_any.size == 0:
        return content, 0
    cols_any = np.flatnonzero(crop.any(axis=0))
    # Only the lesions' bounding box is multiplied: masks are sparse.
    rows, cols = slice(rows_any[0], rows_any[-1] + 1), slice(cols_any[0], cols_any[-1] + 1)
    box = crop[rows, cols]
    if rule == "any" and grid.row_targets is not None and grid.col_targets is not None:
        # Calcifications are a few thousand pixels: marking each one's block beats multiplying the box.
        rr, cc = np.nonzero(box)
        content[grid.row_targets[rows][rr], grid.col_targets[cols][cc]] = True
        return content, 0
    counts = grid.sums(box.astype(np.float32), rows, cols)
    if rule == "any":
        return counts > 0, 0
    if rule != "area":
        raise ValueError(f"unknown mask rule {rule!r} (expected 'area' or 'any')")
    content = 2 * counts >= grid.block_areas()  # at least half of the block covered
    return content, _restore_lost_components(box, content, grid.row_matrix[:, rows], grid.col_matrix[:, cols])


def _restore_lost_components(box: np.ndarray, content: np.ndarray, row_matrix: sparse.csr_matrix,
                             col_matrix: sparse.csr_matrix) -> int:
    """Give every component of `box` that has no target pixel the block of its most central pixel.

    Args:
        box: (h', w') bool, the mask's bounding box in the crop (data column order).
        content: (content_rows, content_columns) bool target mask, updated in place.
        row_matrix: (content_rows, h') the row matrix restricted to the box.
        col_matrix: (content_columns, w') the column matrix restricted to the box.

    Returns:
        The number of components restored.
    """
    labels, n = ndi.label(box)
    if n == 0:
        return 0
    back = (row_matrix.T @ (col_matrix.T @ content.T.astype(np.float32)).T) > 0  # (h', w')
    lost = np.setdiff1d(np.arange(1, n + 1), np.unique(labels[back & (labels > 0)]))
    for label in lost:
        rr, cc = np.nonzero(labels == label)
        nearest = np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2)
        target_row = row_matrix[:, rr[nearest]].nonzero()[0][0]
        target_col = col_matrix[:, cc[nearest]].nonzero()[0][0]
        content[target_row, target_col] = True
    return len(lost)


def to_target_grid(mask: np.ndarray, transform: Transform, rule: str) -> np.ndarray:
    """Resample full-resolution binary masks onto the (size, size) target grid.

    Args:
        mask: (..., rows, columns) bool (or 0/1) masks on the original DICOM grid.
        transform: the image's geometry.
        rule: "any" (a target pixel is set when any pixel of its block is: nothing small vanishes)
            or "area" (set when at least half is covered; components that vanish are restored).

    Returns:
        (..., size, size) bool masks, zero in the padding.
    """
    _check_grid(mask, (transform.rows, transform.columns), "mask")
    grid = _Grid.of(transform)
    flat = np.asarray(mask, bool).reshape(-1, transform.rows, transform.columns)
    out = np.zeros((flat.shape[0], transform.size, transform.size), bool)
    for index, plane in enumerate(flat):
        out[index, : transform.content_rows, : transform.content_columns] = _mask_forward(
            plane, transform, grid, rule)[0]
    return out.reshape(*mask.shape[:-2], transform.size, transform.size)


def to_original_grid(mask_target: np.ndarray, transform: Transform) -> np.ndarray:
    """Map (size, size) target-grid values back onto the original (rows, columns) DICOM grid.

    Each original pixel inside the crop box takes the value of the target pixel that holds its centre
    (upsampled crops: the maximum of the target pixels it is the source of); pixels outside the crop
    box are 0. The flip is undone. Works for masks and for probability maps (dtype is kept).

    Args:
        mask_target: (..., size, size) values on the target grid.
        transform: the image's geometry.

    Returns:
        (..., rows, columns) array of mask_target's dtype.
    """
    t = transform
    _check_grid(mask_target, (t.size, t.size), "target mask")
    h, w = t.crop_shape
    content = mask_target[..., : t.content_rows, : t.content_columns]
    crop = _axis_back(_axis_back(content, h, t.content_rows, -2), w, t.content_columns, -1)
    out = np.zeros((*mask_target.shape[:-2], t.rows, t.columns), dtype=mask_target.dtype)
    if t.flip:
        out[..., t.crop_r0 : t.crop_r1, t.columns - t.crop_c1 : t.columns - t.crop_c0] = crop[..., ::-1]
    else:
        out[..., t.crop_r0 : t.crop_r1, t.crop_c0 : t.crop_c1] = crop
    return out


def target_index_on_original_grid(transform: Transform) -> tuple[np.ndarray, np.ndarray] | None:
    """Say which target pixel gives each original pixel its value in `to_original_grid`, axis by axis.

    The mapping is separable: original pixel (r, c) takes target pixel (row_index[r], column_index[c]).
    With it, counts on the DICOM grid (a mask's area, its overlap with a native mask) become sums over
    the target grid weighted by how many original pixels each target pixel stands for, without mapping
    every mask back (evaluate and export score many masks per image).

    Args:
        transform: the image's geometry.

    Returns:
        (rows,) and (columns,) int64 target row / column of each original row / column, -1 outside the
        crop box (the flip undone as `to_original_grid` undoes it); None when the crop is upsampled along
        an axis (an original pixel then takes the maximum of several target pixels, not one's value).
    """
    t = transform
    crop_rows, crop_columns = t.crop_shape
    if t.content_rows > crop_rows or t.content_columns > crop_columns:
        return None
    row_index = np.full(t.rows, -1, np.int64)
    row_index[t.crop_r0 : t.crop_r1] = _targets(crop_rows, t.content_rows)
    column_index = np.full(t.columns, -1, np.int64)
    crop_columns_index = _targets(crop_columns, t.content_columns)
    if t.flip:  # as in to_original_grid: the crop lands mirrored
        column_index[t.columns - t.crop_c1 : t.columns - t.crop_c0] = crop_columns_index[::-1]
    else:
        column_index[t.crop_c0 : t.crop_c1] = crop_columns_index
    return row_index, column_index


def masks_on_dicom_grid(probabilities: np.ndarray, transform: Transform,
                        threshold: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Turn the network's probabilities into masks on the DICOM's own grid: what predict delivers.

    Thresholds on the network grid, then maps back with `to_original_grid` (each original pixel takes
    the value of the target pixel holding its centre, so thresholding before or after is the same).
    evaluate scores exactly this.

    Args:
        probabilities: (C, size, size) float probabilities.
        transform: the image's geometry.
        threshold: one threshold, or one per channel.

    Returns:
        (C, rows, columns) bool.
    """
    threshold = np.asarray(threshold, dtype=probabilities.dtype)
    if threshold.ndim == 1:
        threshold = threshold[:, None, None]
    return to_original_grid(probabilities >= threshold, transform)


# ---------------------------------------------------------------------------------------------------
# Breast, crop box, image.


@dataclasses.dataclass(frozen=True)
class _Breast:
    """The breast on a block-mean thumbnail of the flipped image (thumbnail pixel = factor^2 pixels)."""

    mask: np.ndarray  # (rows // factor, columns // factor) bool, flipped orientation
    factor: int
    found: bool
    threshold: float  # the Otsu threshold in the image's own units (-inf when not found)


def _find_breast(pixels: np.ndarray, flip: bool, otsu_side: int) -> _Breast:
    """Find the breast: Otsu on log intensities of a thumbnail, largest component, holes filled."""
    rows, columns = pixels.shape
    factor = max(1, min(math.ceil(max(rows, columns) / otsu_side), rows, columns))
    hs, ws = rows // factor, columns // factor
    # Block means over the flipped image, whose right remainder (the original's left) is dropped.
    # Summing the unflipped array row blocks first, then column blocks, then flipping the thumbnail,
    # reads memory in order: 3x faster than a 4-D mean over a flipped view.
    first = columns - ws * factor if flip else 0
    blocks = pixels[: hs * factor, first : first + ws * factor].reshape(hs, factor, ws * factor)
    thumb = blocks.sum(axis=1, dtype=np.float32).reshape(hs, ws, factor).sum(axis=2)
    thumb = thumb[:, ::-1] / np.float32(factor * factor) if flip else thumb / np.float32(factor * factor)
    floor = float(thumb.min())
    # Pixels at the minimum are a black border or padding: leaving them out keeps Otsu on air vs breast.
    lifted = np.log1p(thumb - floor)
    values = lifted[thumb > floor]
    everything = _Breast(np.ones((hs, ws), bool), factor, found=False, threshold=-math.inf)
    if values.size < 2 or float(values.max() - values.min()) <= 1e-6:
        return everything
    threshold = float(threshold_otsu(values))
    foreground = lifted > threshold
    labels, n = ndi.label(foreground)
    if n == 0:
        return everything
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (1 + int(np.argmax(sizes)))
    if largest.sum() < _MIN_BREAST_FRACTION * largest.size:
        return everything
    return _Breast(ndi.binary_fill_holes(largest), factor, found=True,
                   threshold=floor + float(np.expm1(threshold)))


def _bounds(any_along: np.ndarray) -> tuple[int, int] | None:
    """Return [first, last + 1) of the True entries of a 1-D array, None when there is none."""
    hits = np.flatnonzero(any_along)
    return (int(hits[0]), int(hits[-1]) + 1) if hits.size else None


def _breast_box(breast: _Breast, rows: int, columns: int, margin: int) -> tuple[int, int, int, int]:
    """Return the crop box (r0, r1, c0, c1) in the flipped image around the breast, plus the margin."""
    f = breast.factor
    hs, ws = breast.mask.shape
    (a, b), (c, d) = _bounds(breast.mask.any(axis=1)), _bounds(breast.mask.any(axis=0))
    # A box touching the thumbnail's last row/column also covers the remainder the thumbnail dropped.
    r1 = rows if b == hs else b * f
    c1 = columns if d == ws else d * f
    return max(0, a * f - margin), min(rows, r1 + margin), max(0, c * f - margin), min(columns, c1 + margin)


def _content_shape(crop_rows: int, crop_columns: int, size: int) -> tuple[int, int]:
    """Return the resized crop's (rows, columns): the longer side becomes `size`, aspect kept."""
    scale = size / max(crop_rows, crop_columns)
    return (max(1, min(size, round(crop_rows * scale))), max(1, min(size, round(crop_columns * scale))))


def _breast_on_target(breast: _Breast, t: Transform, dilate_px: int) -> np.ndarray:
    """Return the breast mask dilated by dilate_px on the content grid, (content_rows, content_columns)."""
    h, w = t.crop_shape
    hs, ws = breast.mask.shape
    row_src = np.minimum((t.crop_r0 + _sources(h, t.content_rows)) // breast.factor, hs - 1)
    col_src = np.minimum((t.crop_c0 + _sources(w, t.content_columns)) // breast.factor, ws - 1)
    iterations = math.ceil(dilate_px / breast.factor)
    dilated = ndi.binary_dilation(breast.mask, iterations=iterations) if iterations else breast.mask
    return dilated[np.ix_(row_src, col_src)]


def chest_wall_on_right(pixels: np.ndarray, params: PreprocessParams) -> bool:
    """Tell whether an image's breast hangs from its right edge, i.e. whether `preprocess` must flip it.

    For images whose laterality is unknown (predict on a DICOM without ImageLaterality): the breast
    found as in `preprocess` touches the right quarter more than the left one.

    Args:
        pixels: (rows, columns) bright = dense values.
        params: the preprocessing contract (for otsu_side).
    """
    breast = _find_breast(pixels, False, params.otsu_side)
    quarter = max(1, breast.mask.shape[1] // 4)
    return bool(breast.mask[:, -quarter:].sum() > breast.mask[:, :quarter].sum())


def preprocess(pixels: np.ndarray, flip: bool, params: PreprocessParams,
               masks: Sequence[np.ndarray | None] | None = None) -> Preprocessed:
    """Orient, crop, resize and normalise one image; resample its masks without losing a lesion.

    Args:
        pixels: (rows, columns) bright = dense values (mammoseg.dicom.read_image), any numeric dtype.
        flip: flip left-right first (right breasts), so the chest wall ends up on the left.
        params: the preprocessing contract.
        masks: optional full-resolution (rows, columns) bool masks [mass, calcification], None for
            an empty one. They follow the image's transform and change nothing of the image.

    Returns:
        The (size, size) image in [0, 1] (on the uint16 storage grid), the (2, size, size) masks and
        what was done.
    """
    rows, columns = pixels.shape
    breast = _find_breast(pixels, flip, params.otsu_side)
    # The crop comes from the pixels alone: a label never shapes the input (evaluate and predict
    # must see the same image for the same DICOM).
    r0, r1, c0, c1 = _breast_box(breast, rows, columns, params.crop_margin_px)
    if masks is not None:
        if len(masks) != len(MASK_CHANNELS):
            raise ValueError(f"expected {len(MASK_CHANNELS)} masks {MASK_CHANNELS}, got {len(masks)}")
        masks = [None if m is None else np.asarray(m, bool) for m in masks]
        for mask in masks:
            if mask is not None:
                _check_grid(mask, (rows, columns), "mask")
    content_rows, content_columns = _content_shape(r1 - r0, c1 - c0, params.size)
    transform = Transform(rows, columns, bool(flip), r0, r1, c0, c1, params.size, content_rows,
                          content_columns)
    grid = _Grid.of(transform)
    outside = tuple(0 if mask is None else _pixels_outside_crop(mask, grid) for mask in masks or ())

    crop = pixels[grid.row_slice, grid.col_slice]
    image = grid.sums(crop) / grid.block_areas()
    max_image = grid.maxima(crop, transform.flip) if params.max_channel else None
    target_masks = None
    restored = 0
    if masks is not None:
        target_masks = np.zeros((len(MASK_CHANNELS), params.size, params.size), bool)
        for index, (name, mask) in enumerate(zip(MASK_CHANNELS, masks, strict=True)):
            if mask is None:
                continue
            content, lost = _mask_forward(mask, transform, grid, MASK_RULES[name])
            target_masks[index, :content_rows, :content_columns] = content
            restored += lost

    keep = _breast_on_target(breast, transform, params.crop_margin_px)
    # Statistics over the breast's own pixels: the thumbnail's edge blocks mix air and skin, so the
    # pixel-level threshold decides at the edge.
    inside = keep & (image > breast.threshold)
    # Every step-th row and column (about 2**18 pixels) gives the same percentiles 4x faster.
    step = max(1, math.isqrt(inside.size >> 18))
    inside = inside[::step, ::step]

    def window(plane: np.ndarray) -> tuple[float, float]:
        sampled = plane[::step, ::step]
        values = sampled[inside] if inside.any() else sampled
        low, high = (float(v) for v in np.percentile(values, params.percentiles))
        return (low, low + 1.0) if high <= low else (low, high)  # a flat image maps to 0

    low, high = window(image)
    canvases = []
    for plane in (image, max_image):
        if plane is None:
            canvases.append(None)
            continue
        # Each plane gets its own window: a block's maximum sits above its mean wherever the tissue has
        # texture or noise, so the mean's window would clip the maximum everywhere.
        plane_low, plane_high = (low, high) if plane is image else window(plane)
        plane = np.clip((plane - np.float32(plane_low)) / np.float32(plane_high - plane_low), 0.0, 1.0)
        if params.zero_background and breast.found:
            plane[~keep] = 0.0
        canvas = np.zeros((params.size, params.size), np.float32)
        canvas[:content_rows, :content_columns] = quantize(plane).astype(np.float32) / np.float32(IMAGE_SCALE)
        canvases.append(canvas)

    quarter = max(1, breast.mask.shape[1] // 4)
    chest_wall_left = bool(breast.mask[:, :quarter].sum() >= breast.mask[:, -quarter:].sum())
    return Preprocessed(canvases[0], canvases[1], target_masks, transform, low, high, breast.found, chest_wall_left,
                        outside or (0,) * len(MASK_CHANNELS), restored)


def _pixels_outside_crop(mask: np.ndarray, grid: _Grid) -> int:
    """Count the lesion pixels of one (rows, columns) original-grid mask that the crop box leaves out."""
    return int(np.count_nonzero(mask)) - int(np.count_nonzero(mask[grid.row_slice, grid.col_slice]))


def quantize(image: np.ndarray) -> np.ndarray:
    """Return [0, 1] intensities as the dataset stores them: uint16, value / IMAGE_SCALE.

    `preprocess` returns the image already rounded to this grid, so the network input predict
    computes from a DICOM is bit-identical to what training and evaluation load from the dataset.
    """
    return np.round(np.clip(image, 0.0, 1.0) * IMAGE_SCALE).astype(np.uint16)
