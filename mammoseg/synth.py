"""Generate INbreast-format data: writes AllDICOMs/*.dcm, AllXML/*.xml and INbreast.csv under one folder.

The output follows inbreast-format.md (the spec of the real INbreast Release 1.0 on-disk format):
the 6-token DICOM file names (`ML` in the name, `MLO` in the CSV), the CRLF `;` CSV with `removed`
columns and one 193-space ACR, OsiriX plist XMLs written byte-for-byte like Cocoa writes them, and
uint16 MONOCHROME2 12-bit DICOMs without patient data or PixelSpacing. Images are synthetic
mammograms: a breast silhouette on its laterality's side with skin line, fatty periphery and a
power-law (1/f^3) fibroglandular texture, a pectoral muscle on MLO views, masses and clusters of
microcalcifications whose ROIs are written to the XML, with the real annotation quirks.

The output is a pure function of (cases, seed, scale): every random draw comes from a generator
seeded by the seed and the image index, and no timestamp is written, so two runs are byte-identical.
A hidden `.mammoseg-synth` file marks the folder as generated, so a later run may replace it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import scipy.fft
import scipy.ndimage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from mammoseg import __version__
from mammoseg.config import SynthConfig
from mammoseg.errors import UserError
from mammoseg.fileio import replace_folder
from mammoseg.parallel import cpu_count, run_jobs

log = logging.getLogger(__name__)

# --- Facts of the real format (inbreast-format.md sections 1, 2, 4, 5) -----------------------------

MM_PER_PX = 0.07
"""Pixel pitch of INbreast images at scale 1 (70 µm); XML `Area` is always computed with it."""

IMAGE_SIZES: tuple[tuple[int, int], ...] = ((3328, 2560), (4084, 3328))
"""The two (rows, columns) sizes of the real DICOMs."""
_SIZE_WEIGHTS = (242, 167)  # images of each size in the real set

ACQUISITION_DATES = ("200801", "200802", "200901", "200902", "201001")
_DATE_WEIGHTS = (8, 22, 82, 72, 226)  # images per date in the real CSV
_ACR_WEIGHTS = (136, 146, 99, 28)  # images with ACR 1, 2, 3, 4 in the real CSV

CSV_HEADER = ("Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name", "ACR",
              "Bi-Rads")
BLANK_ACR = " " * 193
"""The one blank ACR cell of the real CSV (id 53582540) is 193 spaces, not an empty field."""

PLIST_HEADER = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
    '<plist version="1.0">\n'
)
ZERO_POINT_MM = "(0.000000, 0.000000, 0.000000)"

ROI_TYPE_OVAL = 9  # OsiriX tOval: Cluster, Spiculated Region (200 points)
ROI_TYPE_PENCIL = 15  # OsiriX tPencil: Mass outlines
ROI_TYPE_POINT = 19  # OsiriX t2DPoint: single-point Calcification

VIEW_FILE_TOKEN = {"CC": "CC", "MLO": "ML"}
"""CSV view -> file-name view token (the real file names say ML where the CSV says MLO)."""

DICOM_DIR = "AllDICOMs"
XML_DIR = "AllXML"
CSV_NAME = "INbreast.csv"
MARKER_NAME = ".mammoseg-synth"
"""Written into every output so a later run may replace it; any other non-empty folder is refused."""

MIN_SCALE = 0.025  # below this an image is under 84x64 px, too small to hold a breast and lesions
MAX_CASES = 100_000  # keeps the 8-digit image ids below 10^8


def derived_uid(*parts: str) -> str:
    """Return a UID that depends only on `parts`.

    Under pydicom's root: with `prefix=None` pydicom ignores the entropy and draws a random UUID.
    """
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["mammoseg-synth", *parts])


_IMPLEMENTATION_UID = derived_uid("implementation")
_OVAL_POINTS = 200  # real OsiriX ovals are written as exactly 200 points
_POOL_MIN_PIXELS = 4 * 4084 * 3328  # below ~4 full-size images a process pool costs more than it saves


# --- Public records --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SynthRoi:
    """One ROI as written to the XML.

    Attributes:
        name: the `Name` string, e.g. "Mass", "Calcification", "Cluster".
        roi_type: the OsiriX `Type` (15 pencil, 9 oval, 19 point).
        points_px: (x, y) pairs, x = column, y = row, exactly as written ("%f" round-trip); points
            may lie outside the image, as in the real data.
    """

    name: str
    roi_type: int
    points_px: tuple[tuple[float, float], ...]


@dataclasses.dataclass(frozen=True)
class SynthImage:
    """One generated image and its ground truth (what was drawn)."""

    image_id: str
    patient_id: str
    laterality: str
    view: str
    acquisition_date: str
    acr: int | None
    birads: str
    rows: int
    columns: int
    rois: tuple[SynthRoi, ...]
    dicom_path: Path
    xml_path: Path | None


@dataclasses.dataclass(frozen=True)
class SynthResult:
    """What `mammoseg synth` wrote."""

    images: int
    patients: int
    out_dir: Path


@dataclasses.dataclass(frozen=True)
class RoiStats:
    """The pixel statistics OsiriX stores with a ROI (`Area` in cm² at 0.07 mm/px)."""

    area_cm2: float = 0.0
    dev: float = 0.0
    max: float = 0.0
    mean: float = 0.0
    min: float = 0.0
    total: float = 0.0


# --- Writers of the three file formats (reusable by tests to hand-write fixtures) -----------------


def format_real(value: float) -> str:
    """Format a plist <real> as Cocoa does for OsiriX's float32 values.

    OsiriX keeps ROI statistics as float32 and Cocoa prints them with 17 significant digits:
    0 -> "0.0", integral values without a decimal point ("3103"), others like
    "0.66951507329940796".
    """
    value32 = float(np.float32(value))
    if value32 == 0.0:
        return "0.0"
    return f"{value32:.17g}"


def format_point(x: float, y: float) -> str:
    """Format a `Point_px` string: "(%f, %f)", x first, comma and one space."""
    return f"({x:f}, {y:f})"


def written_coordinate(value: float) -> float:
    """Return a coordinate as a reader gets it back from the XML (float32, then six decimals)."""
    return float(f"{float(np.float32(value)):f}")


def polygon_area_cm2(points: Sequence[tuple[float, float]]) -> float:
    """Return the area of a closed polygon in cm² at 0.07 mm/px (0 for fewer than 3 points)."""
    if len(points) < 3:
        return 0.0
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    area_px = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return area_px * MM_PER_PX**2 / 100.0


def polygon_pixels(xs: np.ndarray, ys: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Return (rows, columns) of the pixels a polygon covers, clipped to `shape`.

    The same pixels as `skimage.draw.polygon(ys, xs, shape)`, the rasterisation readers use: pixel
    centres at integer coordinates, O'Rourke's crossing test, pixels on an edge or a vertex
    included. Computed per row from the edge crossings rather than by testing every pixel of the
    bounding box against every edge, which takes a second for a large 200-point oval.
    """
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    rows, cols = shape
    r0, r1 = max(0, int(math.floor(ys.min()))), min(rows - 1, int(math.ceil(ys.max())))
    c0, c1 = max(0, int(math.floor(xs.min()))), min(cols - 1, int(math.ceil(xs.max())))
    if r0 > r1 or c0 > c1:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    y = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    x0, y0 = xs[None, :], ys[None, :] - y  # edge (i-1, i) as (x1, y1) -> (x0, y0), row-relative
    x1, y1 = np.roll(xs, 1)[None, :], np.roll(ys, 1)[None, :] - y
    right = (y0 > 0) != (y1 > 0)  # edge straddles the row (half-open above)
    left = (y0 < 0) != (y1 < 0)  # ... (half-open below)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = (x0 * y1 - x1 * y0) / (y1 - y0)  # where the edge meets the row
    width = c1 - c0 + 2
    # counts[c] = crossings right of pixel c (x > c, i.e. c <= ceil(x) - 1) plus crossings left of
    # it (x < c, i.e. c >= floor(x) + 1), built with a difference array and a cumulative sum. The
    # pixel is covered when either count is odd: inside (right odd) or on an edge (parities differ).
    right_counts = np.zeros((r1 - r0 + 1, width), dtype=np.int32)
    row, edge = np.nonzero(right)
    stop = np.clip(np.ceil(cross[row, edge]), c0, c1 + 1).astype(np.int64) - c0
    np.add.at(right_counts, (row, 0), 1)
    np.add.at(right_counts, (row, stop), -1)
    left_counts = np.zeros_like(right_counts)
    row, edge = np.nonzero(left)
    start = np.clip(np.floor(cross[row, edge]) + 1, c0, c1 + 1).astype(np.int64) - c0
    np.add.at(left_counts, (row, start), 1)
    covered = ((np.cumsum(right_counts[:, :-1], axis=1) | np.cumsum(left_counts[:, :-1], axis=1)) & 1) > 0
    # Pixel centres on a vertex count as covered.
    on_vertex = (np.abs(xs - np.round(xs)) < 1e-12) & (np.abs(ys - np.round(ys)) < 1e-12)
    vr, vc = np.round(ys[on_vertex]).astype(np.int64), np.round(xs[on_vertex]).astype(np.int64)
    keep = (vr >= r0) & (vr <= r1) & (vc >= c0) & (vc <= c1)
    covered[vr[keep] - r0, vc[keep] - c0] = True
    rr, cc = np.nonzero(covered)
    return rr + r0, cc + c0


def roi_stats(roi: SynthRoi, image: np.ndarray, *, point_values: bool = True) -> RoiStats:
    """Compute a ROI's statistics from the pixels it covers, as OsiriX stores them.

    Polygons (>= 3 points) cover the pixels whose centres lie inside (as skimage.draw.polygon,
    clipped to the image: the rasterisation readers use); 1- and 2-point ROIs cover the pixel each
    point falls in (truncation). Values are float32, like OsiriX's.

    Args:
        roi: the ROI.
        image: the 2-D image, shape (rows, columns).
        point_values: for 1- and 2-point ROIs, store the covered pixel values; False stores zeros
            (both occur in the real files).
    """
    points = np.asarray(roi.points_px, dtype=np.float64).reshape(-1, 2)
    rows, cols = image.shape
    if len(points) >= 3:
        rr, cc = polygon_pixels(points[:, 0], points[:, 1], (rows, cols))
        area = polygon_area_cm2(roi.points_px)
    else:
        if not point_values:
            return RoiStats()
        rr = np.floor(points[:, 1]).astype(np.int64)
        cc = np.floor(points[:, 0]).astype(np.int64)
        keep = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        rr, cc = rr[keep], cc[keep]
        area = 0.0
    if rr.size == 0:
        return RoiStats(area_cm2=area)
    values = image[rr, cc].astype(np.float64)
    return RoiStats(area_cm2=area, dev=float(values.std()), max=float(values.max()),
                    mean=float(values.mean()), min=float(values.min()), total=float(values.sum()))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def osirix_xml(rois: Sequence[SynthRoi], stats: Sequence[RoiStats]) -> bytes:
    """Return the bytes of an OsiriX ROI plist, laid out exactly like the real AllXML files.

    Args:
        rois: the ROIs, written in order with IndexInImage 0, 1, ...
        stats: one RoiStats per ROI.
    """
    if len(stats) != len(rois):
        raise ValueError(f"{len(rois)} ROIs but {len(stats)} stats")
    lines = ["<dict>", "\t<key>Images</key>", "\t<array>", "\t\t<dict>",
             "\t\t\t<key>ImageIndex</key>", "\t\t\t<integer>0</integer>",
             "\t\t\t<key>NumberOfROIs</key>", f"\t\t\t<integer>{len(rois)}</integer>",
             "\t\t\t<key>ROIs</key>"]
    if not rois:
        lines.append("\t\t\t<array/>")
    else:
        lines.append("\t\t\t<array>")
        t5 = "\t" * 5
        t6 = "\t" * 6
        for index, (roi, st) in enumerate(zip(rois, stats, strict=True)):
            n = len(roi.points_px)
            lines += [
                "\t\t\t\t<dict>",
                f"{t5}<key>Area</key>", f"{t5}<real>{format_real(st.area_cm2)}</real>",
                f"{t5}<key>Center</key>", f"{t5}<string>{ZERO_POINT_MM}</string>",
                f"{t5}<key>Dev</key>", f"{t5}<real>{format_real(st.dev)}</real>",
                f"{t5}<key>IndexInImage</key>", f"{t5}<integer>{index}</integer>",
                f"{t5}<key>Max</key>", f"{t5}<real>{format_real(st.max)}</real>",
                f"{t5}<key>Mean</key>", f"{t5}<real>{format_real(st.mean)}</real>",
                f"{t5}<key>Min</key>", f"{t5}<real>{format_real(st.min)}</real>",
                f"{t5}<key>Name</key>", f"{t5}<string>{_escape(roi.name)}</string>",
                f"{t5}<key>NumberOfPoints</key>", f"{t5}<integer>{n}</integer>",
                f"{t5}<key>Point_mm</key>", f"{t5}<array>",
            ]
            lines += [f"{t6}<string>{ZERO_POINT_MM}</string>"] * n
            lines += [f"{t5}</array>", f"{t5}<key>Point_px</key>", f"{t5}<array>"]
            lines += [f"{t6}<string>{format_point(x, y)}</string>" for x, y in roi.points_px]
            lines += [
                f"{t5}</array>",
                f"{t5}<key>Total</key>", f"{t5}<real>{format_real(st.total)}</real>",
                f"{t5}<key>Type</key>", f"{t5}<integer>{roi.roi_type}</integer>",
                "\t\t\t\t</dict>",
            ]
        lines.append("\t\t\t</array>")
    lines += ["\t\t</dict>", "\t</array>", "</dict>", "</plist>"]
    return (PLIST_HEADER + "\n".join(lines) + "\n").encode("utf-8")


def write_osirix_xml(path: Path, rois: Sequence[SynthRoi], *, image: np.ndarray | None = None,
                     stats: Sequence[RoiStats] | None = None, point_values: bool = True) -> None:
    """Write an `AllXML/<id>.xml` OsiriX plist.

    Statistics come from `stats` if given, else from the pixels of `image` (see roi_stats), else
    only `Area` is filled (from the polygon) and the pixel statistics are 0.0.

    Args:
        path: the file to write.
        rois: the ROIs, in IndexInImage order.
        image: the image the ROIs belong to, shape (rows, columns).
        stats: explicit statistics, one per ROI.
        point_values: passed to roi_stats when computing from `image`.
    """
    if stats is None:
        if image is not None:
            stats = [roi_stats(roi, image, point_values=point_values) for roi in rois]
        else:
            stats = [RoiStats(area_cm2=polygon_area_cm2(roi.points_px)) for roi in rois]
    Path(path).write_bytes(osirix_xml(rois, stats))


def csv_row(image: SynthImage) -> tuple[str, ...]:
    """Return the 8 INbreast.csv fields of an image (None ACR -> the 193-space blank)."""
    acr = BLANK_ACR if image.acr is None else str(image.acr)
    return ("removed", "removed", image.laterality, image.view, image.acquisition_date, image.image_id,
            acr, image.birads)


def write_inbreast_csv(path: Path, rows: Iterable[SynthImage | Sequence[str]]) -> None:
    """Write INbreast.csv byte-for-byte like the real one: ASCII, CRLF, `;`, no quoting.

    Args:
        path: the file to write.
        rows: SynthImages, or sequences of the 8 field strings written verbatim (to build quirky
            fixtures by hand).

    Raises:
        ValueError: a row does not have 8 fields or a field holds `;`, a line break or non-ASCII.
    """
    lines = [";".join(CSV_HEADER)]
    for row in rows:
        fields = csv_row(row) if isinstance(row, SynthImage) else tuple(row)
        if len(fields) != len(CSV_HEADER):
            raise ValueError(f"CSV row needs {len(CSV_HEADER)} fields, got {len(fields)}: {fields!r}")
        for field in fields:
            if not field.isascii() or any(c in field for c in ";\r\n"):
                raise ValueError(f"CSV field {field!r} is not plain ASCII without ';' or line breaks")
        lines.append(";".join(fields))
    Path(path).write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))


def dicom_file_name(image_id: str, patient_id: str, laterality: str, view: str) -> str:
    """Return `<id>_<patient hash>_MG_<L|R>_<CC|ML>_ANON.dcm` for a CSV view (CC/MLO)."""
    return f"{image_id}_{patient_id}_MG_{laterality}_{VIEW_FILE_TOKEN[view]}_ANON.dcm"


def write_mg_dicom(path: Path, pixels: np.ndarray, uid_seed: str, **overrides: Any) -> None:
    """Write a Digital Mammography X-Ray (For Presentation) DICOM like INbreast's.

    The file has a proper file meta group, Explicit VR Little Endian, uncompressed uint16
    MONOCHROME2 pixels with BitsStored 12, no PixelSpacing and empty patient attributes. UIDs derive
    from `uid_seed`, so the same arguments give the same bytes.

    Args:
        path: the file to write.
        pixels: uint16 array, shape (rows, columns), values below 2**BitsStored.
        uid_seed: any string; different strings give different SOP/series/study UIDs.
        **overrides: DICOM keywords to set (value None deletes the attribute), e.g.
            `PatientID="x"`, `BitsStored=16`, `PixelSpacing=[0.07, 0.07]`. `TransferSyntaxUID` goes
            to the file meta; only the two uncompressed little-endian syntaxes can be written.

    Raises:
        ValueError: pixels are not 2-D uint16 within BitsStored, or the transfer syntax is unsupported.
    """
    if pixels.ndim != 2 or pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be a 2-D uint16 array, got {pixels.dtype} {pixels.shape}")
    transfer_syntax = overrides.pop("TransferSyntaxUID", ExplicitVRLittleEndian)
    if transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise ValueError(f"cannot write transfer syntax {transfer_syntax} (only uncompressed little endian)")
    sop_uid = derived_uid("sop", uid_seed)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MAMMOSEG_{__version__}".replace(".", "_")[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    # Dates and times are type 2 and left empty: INbreast headers carry no dates, and an empty
    # value keeps the output free of the generation time.
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "mammoseg synth"
    ds.ReferringPhysicianName = ""
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = derived_uid("study", uid_seed)
    ds.SeriesInstanceUID = derived_uid("series", uid_seed)
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if pixels.size and int(pixels.max()) >= 1 << int(ds.BitsStored):
        raise ValueError(f"pixel value {int(pixels.max())} does not fit BitsStored {ds.BitsStored}")
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


# --- The plan: patients, views, findings (cheap, drawn in the parent process) ----------------------


@dataclasses.dataclass(frozen=True)
class _MassSpec:
    diameter_mm: float
    shape: str  # round | oval | lobulated | spiculated
    region_name: str | None  # a "Spiculated Region" oval drawn around it
    at_edge: bool  # placed on the chest wall so that its outline runs past the image edge


@dataclasses.dataclass(frozen=True)
class _CalcGroupSpec:
    count: int
    spread_mm: float  # radius of the group
    diameter_mm: tuple[float, float]  # range of calcification diameters
    outline_name: str | None  # "Cluster" / "Calcifications" oval around the group
    outlined: int  # calcifications annotated with a multi-point outline instead of a point


@dataclasses.dataclass(frozen=True)
class _Findings:
    masses: tuple[_MassSpec, ...] = ()
    calc_groups: tuple[_CalcGroupSpec, ...] = ()
    others: tuple[str, ...] = ()  # "Asymmetry", "Distortion"


@dataclasses.dataclass(frozen=True)
class _ImageTask:
    index: int
    seed: int
    scale: float
    image_id: str
    patient_id: str
    laterality: str
    view: str
    acquisition_date: str
    acr: int | None
    birads: str
    rows: int
    columns: int
    findings: _Findings
    work_dir: Path  # where the files are written now
    out_dir: Path  # where they will be after the final rename


def _even(value: float) -> int:
    """Round to the nearest even integer (images keep even sizes at every scale)."""
    return max(2, 2 * round(value / 2))


def scaled_size(rows: int, columns: int, scale: float) -> tuple[int, int]:
    """Return (rows, columns) at a scale, each rounded to an even integer (0.1 -> 332 x 256)."""
    return _even(rows * scale), _even(columns * scale)


def _choice(rng: np.random.Generator, items: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """Pick one item (by index, so any item type works), weights normalised."""
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return items[int(rng.choice(len(items), p=p))]


def _draw_mass(rng: np.random.Generator, at_edge: bool = False) -> _MassSpec:
    shape = _choice(rng, ("round", "oval", "lobulated", "spiculated"), (0.2, 0.3, 0.25, 0.25))
    region = None
    if shape == "spiculated" and rng.random() < 0.5:
        region = _choice(rng, ("Spiculated Region", "Espiculated Region"), (0.75, 0.25))
    return _MassSpec(diameter_mm=float(rng.uniform(5.0, 30.0)), shape=shape, region_name=region,
                     at_edge=at_edge or bool(rng.random() < 0.08))


def _draw_calc_group(rng: np.random.Generator, kind: str | None = None) -> _CalcGroupSpec:
    kind = kind or _choice(rng, ("cluster", "scattered"), (0.7, 0.3))
    if kind == "cluster":
        count = int(rng.integers(5, 31))
        outline = None
        if rng.random() < 0.4:
            outline = _choice(rng, ("Cluster", "Calcifications"), (0.8, 0.2))
        return _CalcGroupSpec(count=count, spread_mm=float(rng.uniform(3.0, 10.0)), diameter_mm=(0.1, 0.6),
                              outline_name=outline, outlined=int(rng.binomial(count, 0.1)))
    count = int(rng.integers(5, 21))
    return _CalcGroupSpec(count=count, spread_mm=float(rng.uniform(20.0, 45.0)), diameter_mm=(0.3, 1.0),
                          outline_name=None, outlined=int(rng.binomial(count, 0.1)))


def _draw_calcs(rng: np.random.Generator, kind: str | None = None) -> tuple[_CalcGroupSpec, ...]:
    first = _draw_calc_group(rng, kind)
    extra = int(rng.choice(3, p=(0.6, 0.3, 0.1)))
    return (first,) + tuple(_draw_calc_group(rng) for _ in range(extra))


def _draw_others(rng: np.random.Generator) -> tuple[str, ...]:
    others = []
    if rng.random() < 0.06:
        others.append("Asymmetry")
    if rng.random() < 0.04:
        others.append("Distortion")
    return tuple(others)


def _birads(rng: np.random.Generator, findings: _Findings) -> str:
    """Return a BI-RADS consistent with the findings (none -> 1, calcs -> mostly 2, mass -> 3..6)."""
    if findings.masses:
        if any(m.shape == "spiculated" for m in findings.masses):
            return _choice(rng, ("4c", "5", "6"), (0.25, 0.55, 0.2))
        return _choice(rng, ("3", "4a", "4b", "4c", "5"), (0.3, 0.25, 0.15, 0.15, 0.15))
    if findings.calc_groups or findings.others:
        return _choice(rng, ("2", "3", "4a", "4b", "4c"), (0.7, 0.12, 0.1, 0.04, 0.04))
    return "1"


def _patient_hash(seed: int, patient: int) -> str:
    return hashlib.sha256(f"mammoseg-synth:{seed}:{patient}".encode()).hexdigest()[:16]


def _plan(cases: int, seed: int, scale: float, work_dir: Path, out_dir: Path) -> list[_ImageTask]:
    """Draw patients, their views and findings; return one task per image in CSV order.

    Datasets of >= 4 cases are guaranteed the features tests and patient-level splits need: a
    patient with a mass whose outline crosses the chest-wall edge and a normal contralateral breast,
    another mass patient with calcifications, a calcification-only patient, and one blank ACR.
    Datasets of >= 2 cases hold both image sizes.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    forced: dict[int, str] = {}
    if cases >= 4:
        first, second, third = (int(i) for i in rng.permutation(cases)[:3])
        forced = {first: "edge", second: "mass", third: "calc"}
    size_index = [int(rng.choice(2, p=np.asarray(_SIZE_WEIGHTS) / sum(_SIZE_WEIGHTS))) for _ in range(cases)]
    if cases >= 2 and len(set(size_index)) == 1:
        flip = int(rng.integers(cases))
        size_index[flip] = 1 - size_index[flip]

    patients = []
    for patient in range(cases):
        role = forced.get(patient) or _choice(rng, ("normal", "calc", "mass"), (0.12, 0.5, 0.38))
        four_views = role == "edge" or rng.random() < 0.78  # 90 of 115 real cases have 4 views
        sides = ("R", "L") if four_views else (_choice(rng, ("L", "R")),)
        lesion_side = _choice(rng, sides)
        findings: dict[str, _Findings] = {side: _Findings() for side in sides}
        if role in ("edge", "mass"):
            masses = (_draw_mass(rng, at_edge=role == "edge"),)
            if role == "mass" and rng.random() < 0.15:
                masses += (_draw_mass(rng),)
            with_calcs = role in ("edge", "mass") and (patient in forced or rng.random() < 0.5)
            calcs = _draw_calcs(rng, "cluster") if with_calcs else ()
            findings[lesion_side] = _Findings(masses=masses, calc_groups=calcs, others=_draw_others(rng))
            for side in sides:
                if side != lesion_side and role != "edge" and rng.random() < 0.35:
                    findings[side] = _Findings(calc_groups=_draw_calcs(rng, "scattered"))
        elif role == "calc":
            for side in sides:
                if side == lesion_side or rng.random() < 0.5:
                    findings[side] = _Findings(calc_groups=_draw_calcs(rng), others=_draw_others(rng))
        birads = {side: _birads(rng, findings[side]) for side in sides}
        date = _choice(rng, ACQUISITION_DATES, _DATE_WEIGHTS)
        acr = int(_choice(rng, (1, 2, 3, 4), _ACR_WEIGHTS))
        views = [(side, view) for view in ("CC", "MLO") for side in sides]
        order = rng.permutation(len(views))  # the real CSV lists an exam's views in varying order
        patients.append((patient, [views[int(i)] for i in order], findings, birads, date, acr))

    n_images = sum(len(p[1]) for p in patients)
    blank_acr = int(rng.integers(n_images)) if cases >= 4 else -1
    next_id = int(rng.integers(20_000_000, 30_000_000))
    tasks = []
    for patient, views, findings, birads, date, acr in patients:
        rows, columns = scaled_size(*IMAGE_SIZES[size_index[patient]], scale)
        for side, view in views:
            index = len(tasks)
            tasks.append(_ImageTask(
                index=index, seed=seed, scale=scale, image_id=f"{next_id:08d}",
                patient_id=_patient_hash(seed, patient), laterality=side, view=view,
                acquisition_date=date, acr=None if index == blank_acr else acr, birads=birads[side],
                rows=rows, columns=columns, findings=findings[side], work_dir=work_dir, out_dir=out_dir))
            next_id += int(rng.integers(20, 41))
    return tasks


# --- Image synthesis ------------------------------------------------------------------------------


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """Return 3x^2 - 2x^3 of x clipped to [0, 1] (float32)."""
    x = np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
    return x * x * (3.0 - 2.0 * x)


def _power_noise(rng: np.random.Generator, shape: tuple[int, int], px_mm: float, beta: float,
                 longest_mm: float, stretch: tuple[float, float] = (1.0, 1.0),
                 shortest_mm: float = 0.0) -> np.ndarray:
    """Return unit-variance noise whose power spectrum falls as 1/f^beta (float32, `shape`).

    Args:
        rng: the generator.
        shape: (rows, columns) of the grid.
        px_mm: grid spacing in mm, so the texture has the same physical scale at every image scale.
        beta: spectral exponent (about 3 for breast parenchyma).
        longest_mm: wavelength below whose frequency the spectrum is flat (largest structures).
        stretch: frequency multipliers along (rows, columns); > 1 smooths the field along that axis.
        shortest_mm: wavelength above whose frequency the spectrum is rolled off (Gaussian), so a
            field drawn on a coarse grid upsamples without showing the grid.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = scipy.fft.rfft2(white, workers=1)
    fy = (scipy.fft.fftfreq(shape[0], d=px_mm) * stretch[0]).astype(np.float32)[:, None]
    fx = (scipy.fft.rfftfreq(shape[1], d=px_mm) * stretch[1]).astype(np.float32)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    np.maximum(f, np.float32(1.0 / longest_mm), out=f)
    gain = f ** np.float32(-beta / 2.0)
    if shortest_mm > 0:
        gain *= np.exp(-((f * np.float32(shortest_mm)) ** 2))
    spectrum *= gain
    field = scipy.fft.irfft2(spectrum, s=shape, workers=1).astype(np.float32, copy=False)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def _upsample(low: np.ndarray, factor: int, rows: int, columns: int) -> np.ndarray:
    """Bilinearly upsample by an integer factor (half-pixel aligned, edges clamped), crop to size.

    Low-res pixel j covers full-res pixels [j*factor, (j+1)*factor); full-res pixel c samples the
    low-res grid at (c + 0.5) / factor - 0.5. Written as `factor` strided multiply-adds per axis,
    which is faster than index gathers and needs no torch in the worker processes.
    """
    if factor == 1:
        return np.ascontiguousarray(low[:rows, :columns], dtype=np.float32)

    def along_last(x: np.ndarray) -> np.ndarray:
        n = x.shape[-1]
        pad = np.concatenate([x[..., :1], x, x[..., -1:]], axis=-1)
        out = np.empty(x.shape[:-1] + (n, factor), dtype=np.float32)
        for phase in range(factor):
            offset = (phase + 0.5) / factor - 0.5
            if offset < 0:
                lo, hi, w = pad[..., 0:n], pad[..., 1:n + 1], 1.0 + offset
            else:
                lo, hi, w = pad[..., 1:n + 1], pad[..., 2:n + 2], offset
            np.multiply(lo, np.float32(1.0 - w), out=out[..., phase])
            out[..., phase] += hi * np.float32(w)
        return out.reshape(x.shape[:-1] + (n * factor,))

    h = low.shape[0]
    pad = np.concatenate([low[:1], low, low[-1:]], axis=0)
    tall = np.empty((h, factor, low.shape[1]), dtype=np.float32)
    for phase in range(factor):
        offset = (phase + 0.5) / factor - 0.5
        if offset < 0:
            lo, hi, w = pad[0:h], pad[1:h + 1], 1.0 + offset
        else:
            lo, hi, w = pad[1:h + 1], pad[2:h + 2], offset
        np.multiply(lo, np.float32(1.0 - w), out=tall[:, phase])
        tall[:, phase] += hi * np.float32(w)
    tall = tall.reshape(h * factor, low.shape[1])[:rows]
    full = along_last(tall)
    return full[:, :columns] if full.shape[1] != columns else full


@dataclasses.dataclass
class _Anatomy:
    """Low-resolution maps of one image, in final (not mirrored) orientation."""

    factor: int  # full-res pixels per low-res pixel
    px_mm: float  # full-res pixel pitch in mm
    depth_mm: np.ndarray  # signed distance inside the breast skin, mm (negative outside)
    muscle: np.ndarray  # pectoral-muscle weight 0..1
    intensity: np.ndarray  # smooth image (background, tissue, skin, muscle)

    def sample(self, x: float, y: float) -> tuple[float, float]:
        """Return (depth_mm, muscle) at full-res coordinates (x, y), nearest low-res pixel."""
        rows, cols = self.depth_mm.shape
        j = min(max(int(round((x + 0.5) / self.factor - 0.5)), 0), cols - 1)
        i = min(max(int(round((y + 0.5) / self.factor - 0.5)), 0), rows - 1)
        return float(self.depth_mm[i, j]), float(self.muscle[i, j])


def _anatomy(rng: np.random.Generator, task: _ImageTask) -> _Anatomy:
    """Draw the breast, its parenchyma and (MLO) the pectoral muscle on a ~0.28 mm grid."""
    px_mm = MM_PER_PX / task.scale
    factor = max(1, round(4 * task.scale))  # keeps the low-res grid at ~0.28 mm for every scale >= 0.25
    low_rows, low_cols = -(-task.rows // factor), -(-task.columns // factor)
    low_mm = px_mm * factor
    height_mm, width_mm = task.rows * px_mm, task.columns * px_mm

    # Coordinates (mm) of low-res pixel centres, x measured from the chest wall: column 0 for L,
    # the last column for R, so everything below is drawn once in one orientation.
    xs = ((np.arange(low_cols, dtype=np.float32) + 0.5) * factor - 0.5) * np.float32(px_mm)
    if task.laterality == "R":
        xs = np.float32((task.columns - 1) * px_mm) - xs
    ys = ((np.arange(low_rows, dtype=np.float32) + 0.5) * factor - 0.5) * np.float32(px_mm)
    x, y = xs[None, :], ys[:, None]

    mlo = task.view == "MLO"
    if mlo:
        # MLO: the breast hangs from the axilla; it leaves the top edge along a diagonal upper
        # contour, reaches the nipple below mid-height and meets the chest wall near the bottom.
        depth = min(rng.uniform(0.62, 0.85) * width_mm, width_mm - 8.0)
        centre_y = rng.uniform(0.38, 0.48) * height_mm
        half_height = rng.uniform(0.56, 0.66) * height_mm
        shear = rng.uniform(0.18, 0.35)
    else:
        depth = min(rng.uniform(0.55, 0.85) * width_mm, width_mm - 8.0)  # chest wall to nipple
        centre_y = rng.uniform(0.46, 0.54) * height_mm
        half_height = min(rng.uniform(0.38, 0.46) * height_mm, min(centre_y, height_mm - centre_y) - 4.0)
        shear = rng.uniform(-0.05, 0.05)
    power = rng.uniform(1.8, 2.2)  # superellipse: 2 is an ellipse, larger is boxier
    u = x / np.float32(depth)
    v = (y - np.float32(centre_y) - np.float32(shear) * x) / np.float32(half_height)
    rho = (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in range(2, 6):  # low harmonics make every silhouette a little different
        amplitude = np.float32(rng.uniform(0.0, 0.035 / (k - 1)))
        wobble += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rho = (rho / wobble).astype(np.float32)
    grad_y, grad_x = np.gradient(rho, low_mm)
    grad = np.sqrt(grad_x * grad_x + grad_y * grad_y)
    depth_mm = ((1.0 - rho) / np.maximum(grad, 1e-4)).astype(np.float32)  # first-order distance to skin

    # Parenchyma: isotropic 1/f^3 noise plus streaks converging on the nipple (ducts, ligaments),
    # the streaks drawn as anisotropic noise in polar coordinates around the nipple.
    iso = _power_noise(rng, (low_rows, low_cols), low_mm, 3.0, 60.0, shortest_mm=3 * low_mm)
    nipple_x, nipple_y = depth, centre_y + shear * depth
    radius = np.hypot(x - np.float32(nipple_x), y - np.float32(nipple_y))
    angle = np.arctan2(y - np.float32(nipple_y), np.float32(nipple_x) - x)
    # Ducts and ligaments wander instead of radiating straight: bend the angle by a smooth field
    # (a field with fine detail would turn the streaks into its contour lines).
    bend = _power_noise(rng, (low_rows, low_cols), low_mm, 3.0, 80.0, shortest_mm=15.0)
    angle += np.float32(0.04) * bend
    # The streak field lives on a (radius, angle) grid: smooth along the radius (stretch 5) and,
    # along the angle, flat beyond 60 columns and rolled off below 2, so the streaks are thin lines
    # rather than the long straight steps a stretched plain 1/f^3 field draws.
    polar_rows, polar_cols = 192, 1440
    r_max = float(math.hypot(width_mm, height_mm))
    polar = _power_noise(rng, (polar_rows, polar_cols), 1.0, 2.5, 60.0, stretch=(5.0, 1.0),
                         shortest_mm=2.0)
    coords = np.stack([np.broadcast_to(radius * np.float32((polar_rows - 1) / r_max), depth_mm.shape),
                       np.broadcast_to((angle + np.float32(np.pi)) * np.float32(polar_cols / (2 * np.pi)),
                                       depth_mm.shape)])
    streaks = scipy.ndimage.map_coordinates(polar, coords, order=1, mode="grid-wrap").astype(np.float32)
    streak_weight = _smoothstep(radius / np.float32(25.0)) * np.float32(0.3)
    texture = iso * np.float32(0.85) + streaks * streak_weight

    fine = _power_noise(rng, (low_rows, low_cols), low_mm, 2.0, 20.0, shortest_mm=3 * low_mm)
    acr = task.acr if task.acr is not None else int(rng.integers(1, 5))
    bias = np.float32((-2.4, -1.3, -0.4, 0.5)[acr - 1] + rng.uniform(-0.2, 0.2))  # ACR density
    gland_x, gland_y = rng.uniform(0.3, 0.6) * depth, centre_y + shear * 0.45 * depth
    gland_y += rng.uniform(-0.2, 0.2) * half_height
    envelope = np.exp(-(((x - np.float32(gland_x)) / np.float32(0.45 * depth)) ** 2
                        + ((y - np.float32(gland_y)) / np.float32(0.5 * half_height)) ** 2))
    subcutaneous = np.exp(-np.maximum(depth_mm, 0.0) / np.float32(rng.uniform(6.0, 12.0)))
    logit = texture + bias + np.float32(1.3) * envelope - np.float32(2.5) * subcutaneous
    dense = 1.0 / (1.0 + np.exp(-np.float32(1.25) * logit))

    fat = rng.uniform(1000.0, 1250.0)
    fat_edge = fat * rng.uniform(0.35, 0.5)
    glandular = rng.uniform(1200.0, 1600.0)
    thickness = np.sqrt(np.clip(depth_mm / np.float32(rng.uniform(15.0, 30.0)), 0.0, 1.0))
    tissue = (np.float32(fat_edge) + np.float32(fat - fat_edge) * thickness
              + np.float32(glandular) * dense * (np.float32(0.3) + np.float32(0.7) * thickness)
              + np.float32(80.0) * fine * (np.float32(0.3) + dense) * thickness)
    skin_mm = rng.uniform(0.8, 1.5)
    skin = np.float32(rng.uniform(80.0, 160.0)) * np.exp(-(((depth_mm - np.float32(skin_mm))
                                                            / np.float32(0.6 * skin_mm)) ** 2))
    inside = _smoothstep(depth_mm / np.float32(0.3) + np.float32(0.5))
    background = np.float32(rng.uniform(25.0, 60.0))
    intensity = background + inside * (tissue + skin - background)

    muscle = np.zeros_like(depth_mm)
    if mlo:
        # Pectoral muscle: a bright triangle at the top chest-wall corner with a slightly curved
        # front edge x = width * (1 - y/height)^gamma, brighter towards the axilla.
        m_width = rng.uniform(0.30, 0.48) * width_mm
        m_height = rng.uniform(0.40, 0.65) * height_mm
        gamma = np.float32(rng.uniform(0.75, 1.2))
        s = np.clip(1.0 - y / np.float32(m_height), 0.0, 1.0)
        ripple = sum(np.float32(rng.uniform(0.0, 0.03)) * np.sin(k * np.pi * s + rng.uniform(0, 2 * np.pi))
                     for k in (2, 3, 5))  # a real muscle border is not a ruled line
        edge_x = np.float32(m_width) * (s**gamma + ripple * s)
        slope = np.float32(m_width / m_height) * gamma * np.maximum(s, 1e-3) ** (gamma - 1.0)
        signed = (edge_x - x) / np.sqrt(1.0 + slope * slope)
        signed = np.where(y < m_height, signed, -np.hypot(x, y - np.float32(m_height)))
        muscle = _smoothstep(signed / np.float32(rng.uniform(3.0, 6.0)) + np.float32(0.3))
        level = rng.uniform(1900.0, 2300.0)
        corner = np.exp(-np.hypot(x, y) / np.float32(0.7 * m_height))
        muscle_tissue = (np.float32(level) + np.float32(rng.uniform(250.0, 450.0)) * corner
                         + np.float32(70.0) * iso + np.float32(50.0) * fine)
        intensity = intensity + muscle * (muscle_tissue - intensity)
    return _Anatomy(factor=factor, px_mm=px_mm, depth_mm=depth_mm, muscle=muscle.astype(np.float32),
                    intensity=intensity.astype(np.float32))


def _fine_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> None:
    """Add zero-mean uniform noise of std `sigma` in place (random bytes are the cheapest draw)."""
    noise = np.frombuffer(rng.bytes(image.size), dtype=np.int8).reshape(image.shape)
    image += noise * np.float32(sigma / 73.9)  # std of uniform int8 is 73.9


def _patch_grid(image: np.ndarray, cx: float, cy: float,
                half: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Return (slices, dx, dy) of the image window around (cx, cy), or None if it is off the image."""
    rows, cols = image.shape
    x0, x1 = max(int(math.floor(cx - half)), 0), min(int(math.ceil(cx + half)) + 1, cols)
    y0, y1 = max(int(math.floor(cy - half)), 0), min(int(math.ceil(cy + half)) + 1, rows)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    return (slice(y0, y1), slice(x0, x1)), dx, dy


@dataclasses.dataclass(frozen=True)
class _Contour:
    """A closed star-shaped contour r(phi) around a centre, in full-res pixels."""

    radius_px: float
    elongation: float  # axis ratio of the underlying ellipse
    tilt: float
    harmonics: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase)

    def radius(self, phi: np.ndarray) -> np.ndarray:
        """Return r(phi) in pixels."""
        a = math.sqrt(self.elongation)
        rel = phi - np.float32(self.tilt)
        r = np.float32(self.radius_px) / np.sqrt((np.cos(rel) / np.float32(a)) ** 2
                                                 + (np.sin(rel) * np.float32(a)) ** 2)
        wobble = np.ones_like(r)
        for k, amp, phase in self.harmonics:
            wobble += np.float32(amp) * np.cos(k * phi + np.float32(phase))
        return (r * wobble).astype(np.float32)


def _mass_contour(rng: np.random.Generator, shape: str, radius_px: float) -> _Contour:
    elongation = {"round": (1.0, 1.12), "oval": (1.35, 1.9), "lobulated": (1.0, 1.4),
                  "spiculated": (1.0, 1.3)}[shape]
    harmonics: list[tuple[int, float, float]] = []
    if shape == "round":
        harmonics = [(k, rng.uniform(0.0, 0.025), rng.uniform(0, 2 * np.pi)) for k in (2, 3)]
    elif shape == "oval":
        harmonics = [(k, rng.uniform(0.0, 0.03), rng.uniform(0, 2 * np.pi)) for k in (3, 4)]
    elif shape == "lobulated":
        harmonics = [(k, rng.uniform(0.04, 0.12), rng.uniform(0, 2 * np.pi)) for k in (3, 4, 5, 6)]
    else:
        harmonics = [(k, rng.uniform(0.02, 0.07), rng.uniform(0, 2 * np.pi)) for k in range(2, 9)]
    return _Contour(radius_px=radius_px, elongation=float(rng.uniform(*elongation)),
                    tilt=float(rng.uniform(0, np.pi)), harmonics=tuple(harmonics))


def _render_blob(image: np.ndarray, cx: float, cy: float, contour: _Contour, contrast: float,
                 edge_px: float) -> None:
    """Add a dome-shaped blob bounded by `contour`, with a soft margin `edge_px` wide, in place."""
    reach = contour.radius_px * 2.2 + edge_px + 2
    grid = _patch_grid(image, cx, cy, reach)
    if grid is None:
        return
    window, dx, dy = grid
    dist = np.sqrt(dx * dx + dy * dy)
    r = contour.radius(np.arctan2(dy, dx))
    s = dist / np.maximum(r, 1e-3)
    profile = _smoothstep((r - dist) / np.float32(max(edge_px, 0.5)) + np.float32(0.5))
    profile *= np.float32(0.75) + np.float32(0.25) * np.sqrt(np.clip(1.0 - s * s, 0.0, 1.0))
    image[window] += np.float32(contrast) * profile


def _render_spicules(rng: np.random.Generator, image: np.ndarray, cx: float, cy: float,
                     contour: _Contour, contrast: float, px_mm: float) -> float:
    """Add thin bright lines radiating from a mass; return the largest reach from the centre (px)."""
    reach = contour.radius_px
    for _ in range(int(rng.integers(8, 21))):
        phi = rng.uniform(0, 2 * np.pi)
        base = float(contour.radius(np.asarray([phi], dtype=np.float32))[0]) * 0.8
        length = rng.uniform(4.0, 14.0) / px_mm
        width = max(rng.uniform(0.25, 0.6) / px_mm, 0.6)
        ux, uy = math.cos(phi), math.sin(phi)
        mid = base + length / 2
        grid = _patch_grid(image, cx + ux * mid, cy + uy * mid, length / 2 + width * 2 + 1)
        if grid is None:
            continue
        window, dx, dy = grid
        # dx, dy are relative to the segment middle; project onto the spicule direction.
        along = (dx * np.float32(ux) + dy * np.float32(uy)) / np.float32(length) + np.float32(0.5)
        across = np.abs(dx * np.float32(-uy) + dy * np.float32(ux))
        taper = np.clip(1.0 - along, 0.0, 1.0)
        local_width = np.float32(width) * (np.float32(0.25) + taper)
        line = np.exp(-((across / local_width) ** 2)) * _smoothstep(along * np.float32(20.0)) * taper
        image[window] += np.float32(contrast * rng.uniform(0.35, 0.7)) * line
        reach = max(reach, base + length)
    return reach


def _outline_points(rng: np.random.Generator, cx: float, cy: float, contour: _Contour, count: int,
                    grow: float, jitter_px: float) -> np.ndarray:
    """Return a hand-drawn-looking closed outline (count, 2) of the contour, slightly outside it."""
    start = rng.uniform(0, 2 * np.pi)
    direction = 1.0 if rng.random() < 0.5 else -1.0
    phi = (start + direction * np.linspace(0, 2 * np.pi, count, endpoint=False)).astype(np.float32)
    r = contour.radius(phi) * np.float32(grow)
    # Smooth jitter (a low-pass random walk) imitates a hand tracing the edge.
    noise = rng.standard_normal(count)
    noise = np.real(np.fft.ifft(np.fft.fft(noise) * (np.abs(np.fft.fftfreq(count)) < 0.06)))
    noise /= max(float(np.abs(noise).max()), 1e-9)
    r = r + np.float32(jitter_px) * noise.astype(np.float32)
    return np.stack([cx + r * np.cos(phi), cy + r * np.sin(phi)], axis=1)


def _oval_points(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Return the 200 points OsiriX writes for an axis-aligned oval."""
    t = np.arange(_OVAL_POINTS) * (2 * np.pi / _OVAL_POINTS)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def _roi(name: str, roi_type: int, points: np.ndarray | Sequence[tuple[float, float]]) -> SynthRoi:
    """Build a SynthRoi whose coordinates are exactly what the XML will hold."""
    return SynthRoi(name=name, roi_type=roi_type,
                    points_px=tuple((written_coordinate(x), written_coordinate(y)) for x, y in points))


def _place(rng: np.random.Generator, anatomy: _Anatomy, min_depth_mm: float, task: _ImageTask,
           margin_mm: float = 0.0) -> tuple[float, float]:
    """Return a random full-res (x, y) at least `min_depth_mm` inside the skin, off the muscle.

    Falls back to the deepest point when nothing qualifies (tiny images or huge lesions).
    """
    ok = (anatomy.depth_mm >= min_depth_mm) & (anatomy.muscle < 0.05)
    if margin_mm > 0:  # keep clear of the chest-wall image edge too
        f = anatomy.factor
        cols = anatomy.depth_mm.shape[1]
        keep = max(1, int(math.ceil(margin_mm / (anatomy.px_mm * f))))
        if task.laterality == "L":
            ok[:, :min(keep, cols)] = False
        else:
            ok[:, max(cols - keep, 0):] = False
    flat = np.flatnonzero(ok)
    if flat.size == 0:
        score = np.where(anatomy.muscle < 0.05, anatomy.depth_mm, -np.inf)
        flat = np.asarray([int(np.argmax(score))])
    index = int(flat[int(rng.integers(flat.size))])
    i, j = divmod(index, anatomy.depth_mm.shape[1])
    f = anatomy.factor
    x = (j + 0.5) * f - 0.5 + rng.uniform(-f / 2, f / 2)
    y = (i + 0.5) * f - 0.5 + rng.uniform(-f / 2, f / 2)
    return float(np.clip(x, 0, task.columns - 1)), float(np.clip(y, 0, task.rows - 1))


# At most this share of an edge mass's outline points lies past the chest-wall edge (real INbreast: a
# few points on 5 images; validate.max_out_of_bounds_share fails an image at 0.5).
_MAX_PAST_EDGE_SHARE = 0.4


def _outward(laterality: str) -> float:
    """The x direction out of the image through the chest wall: -1 for L (wall at x = 0), +1 for R."""
    return -1.0 if laterality == "L" else 1.0


def _past_chest_wall(xs: np.ndarray, columns: int, laterality: str) -> np.ndarray:
    """Return how far each x lies past the chest-wall edge (> 0 outside the image, <= 0 inside).

    Args:
        xs: (n,) x coordinates (full-resolution pixels).
        columns: the image's width; the wall is x = 0 for L, x = columns - 1 for R.
        laterality: "L" or "R".

    Returns:
        (n,) signed distances in pixels.
    """
    return -xs if laterality == "L" else xs - (columns - 1)


def _inward_shift_to_cap_past_edge(xs: np.ndarray, columns: int, laterality: str) -> float:
    """Return the smallest x shift towards the image that leaves at most _MAX_PAST_EDGE_SHARE of xs outside.

    Args:
        xs: (n,) the outline's x coordinates (full-resolution pixels).
        columns: the image's width; x < 0 or x > columns - 1 is outside.
        laterality: "L" (chest wall at x = 0) or "R" (at x = columns - 1).

    Returns:
        0.0 when the outline is already within the cap, else the shift (positive for L, negative for R).
    """
    allowed = int(_MAX_PAST_EDGE_SHARE * xs.size)
    # The (allowed+1)-th farthest point must come inside.
    deepest_kept_inside = np.sort(_past_chest_wall(xs, columns, laterality))[::-1][allowed]
    if deepest_kept_inside <= 0:
        return 0.0
    return -_outward(laterality) * float(deepest_kept_inside)


def _draw_mass_on(rng: np.random.Generator, image: np.ndarray, anatomy: _Anatomy, task: _ImageTask,
                  spec: _MassSpec) -> list[SynthRoi]:
    """Render one mass (and spicules); return its Mass outline and optional region oval."""
    px_mm = anatomy.px_mm
    radius_px = max(spec.diameter_mm * rng.uniform(0.9, 1.1) / 2 / px_mm, 1.0)
    contour = _mass_contour(rng, spec.shape, radius_px)
    radius_mm = radius_px * px_mm
    n_points = int(np.clip(2 * np.pi * radius_px / rng.uniform(4.0, 8.0), 16, 220))
    if spec.at_edge:
        # On the chest wall: centre inside the image but nearer the edge than the contour reaches,
        # so part of the outline lies at x < 0 (L) or x > columns - 1 (R), as in the real data.
        rows_ok = np.flatnonzero(anatomy.depth_mm[:, 0 if task.laterality == "L" else -1] > radius_mm + 2)
        if rows_ok.size:
            i = int(rows_ok[int(rng.integers(rows_ok.size))])
            cy = (i + 0.5) * anatomy.factor - 0.5
        else:
            cy = task.rows / 2
        offset = rng.uniform(0.2, 0.5) * radius_px
        cx = offset if task.laterality == "L" else task.columns - 1 - offset
    else:
        cx, cy = _place(rng, anatomy, radius_mm * 1.3 + 3.0, task, margin_mm=radius_mm * 1.3 + 2.0)
    outline = _outline_points(rng, cx, cy, contour, n_points, rng.uniform(1.0, 1.08),
                              min(0.6 / px_mm, radius_px * 0.05))
    if spec.at_edge:
        past = _past_chest_wall(outline[:, 0], task.columns, task.laterality).max()
        if past <= 1.0:  # guarantee the crossing whatever the contour's shape
            shift = _outward(task.laterality) * ((1.0 - past) + 0.1 * radius_px)
            cx += shift
            outline[:, 0] += shift
        # ... but most of it inside: validate rejects an image whose ROI points lie mostly outside
        # (a coordinate mix-up on real data), and a lobulated outline or the shift above could
        # otherwise put half of them past the edge.
        inward = _inward_shift_to_cap_past_edge(outline[:, 0], task.columns, task.laterality)
        cx += inward
        outline[:, 0] += inward
        # Only the chest wall is crossed: a mass on the top or bottom edge moves to within the rows.
        down = max(0.0, -float(outline[:, 1].min())) - max(0.0, float(outline[:, 1].max()) - (task.rows - 1))
        cy += down
        outline[:, 1] += down
    edge_mm = {"round": (0.15, 0.35), "oval": (0.15, 0.35), "lobulated": (0.3, 0.6),
               "spiculated": (0.8, 1.5)}[spec.shape]
    contrast = rng.uniform(200.0, 380.0)
    _render_blob(image, cx, cy, contour, contrast, rng.uniform(*edge_mm) / px_mm)
    rois = [_roi("Mass", ROI_TYPE_PENCIL, outline)]
    if spec.shape == "spiculated":
        reach = _render_spicules(rng, image, cx, cy, contour, contrast, px_mm)
        if spec.region_name:
            semi = reach * rng.uniform(0.85, 1.05)
            oval = _oval_points(cx, cy, semi * rng.uniform(0.9, 1.1), semi * rng.uniform(0.9, 1.1))
            rois.append(_roi(spec.region_name, ROI_TYPE_OVAL, oval))
    return rois


def _draw_calc_group_on(rng: np.random.Generator, image: np.ndarray, anatomy: _Anatomy, task: _ImageTask,
                        spec: _CalcGroupSpec) -> list[SynthRoi]:
    """Render a group of calcifications; return point/outline ROIs and the optional cluster oval."""
    px_mm = anatomy.px_mm
    cx, cy = _place(rng, anatomy, min(spec.spread_mm, 15.0) + 2.0, task, margin_mm=3.0)
    spread_px = spec.spread_mm / px_mm
    outlined = set(rng.choice(spec.count, size=min(spec.outlined, spec.count), replace=False).tolist())
    rois: list[SynthRoi] = []
    centres = []
    for k in range(spec.count):
        for _ in range(20):  # keep each calcification inside the breast and on the image
            ox, oy = rng.normal(0.0, spread_px / 2, size=2)
            if math.hypot(ox, oy) > spread_px:
                continue
            x, y = cx + ox, cy + oy
            if 0 <= x <= task.columns - 1 and 0 <= y <= task.rows - 1 and anatomy.sample(x, y)[0] > 1.0:
                break
        else:
            x, y = cx, cy
        # Put the centre in the first half of a pixel so truncating and rounding readers agree.
        x = math.floor(x) + rng.uniform(0.05, 0.45)
        y = math.floor(y) + rng.uniform(0.05, 0.45)
        radius = rng.uniform(*spec.diameter_mm) / 2 / px_mm
        contrast = rng.uniform(500.0, 1300.0)
        grid = _patch_grid(image, x, y, radius + 2)
        if grid is not None:
            window, dx, dy = grid
            dist = np.sqrt(dx * dx + dy * dy)
            speck = _smoothstep(np.float32(radius + 0.5) - dist)
            # At small scales a speck is smaller than a pixel: light the pixel holding its centre
            # fully, so every calcification is at least 1 px.
            speck[int(y) - window[0].start, int(x) - window[1].start] = 1.0
            image[window] += np.float32(contrast) * speck
        centres.append((x, y))
        if k in outlined:
            count = int(rng.integers(6, 15))
            ring = _Contour(radius_px=radius + max(1.0, 0.1 / px_mm), elongation=float(rng.uniform(1, 1.3)),
                            tilt=float(rng.uniform(0, np.pi)), harmonics=())
            rois.append(_roi("Calcification", ROI_TYPE_PENCIL,
                             _outline_points(rng, x, y, ring, count, 1.0, 0.2)))
        else:
            # An annotator's click lands within the speck; for specks under 2 px stay inside the
            # lit pixel so the point's pixel is the calcification at every scale.
            jitter = radius * 0.3 if radius >= 2.0 else 0.04
            rois.append(_roi("Calcification", ROI_TYPE_POINT,
                             [(x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter))]))
    if spec.outline_name:
        pts = np.asarray(centres)
        mid = (pts.max(axis=0) + pts.min(axis=0)) / 2
        # sqrt(2) x the half extent: an axis-aligned ellipse through the bounding box's corners.
        semi = (pts.max(axis=0) - pts.min(axis=0)) / 2 * 1.5 + max(1.5 / px_mm, 2.0)
        rois.append(_roi(spec.outline_name, ROI_TYPE_OVAL, _oval_points(mid[0], mid[1], semi[0], semi[1])))
    return rois


def _draw_other_on(rng: np.random.Generator, image: np.ndarray, anatomy: _Anatomy, task: _ImageTask,
                   name: str) -> list[SynthRoi]:
    """Render an asymmetry (a broad faint density) or a distortion (converging lines)."""
    px_mm = anatomy.px_mm
    radius_px = rng.uniform(8.0, 22.0) / px_mm
    cx, cy = _place(rng, anatomy, radius_px * px_mm + 3.0, task, margin_mm=radius_px * px_mm + 2.0)
    harmonics = tuple((k, rng.uniform(0.03, 0.1), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    contour = _Contour(radius_px=radius_px, elongation=float(rng.uniform(1.2, 2.0)),
                       tilt=float(rng.uniform(0, np.pi)), harmonics=harmonics)
    if name == "Asymmetry":
        _render_blob(image, cx, cy, contour, rng.uniform(90.0, 170.0), radius_px * 0.4)
    else:
        core = _Contour(radius_px=radius_px * 0.15, elongation=1.0, tilt=0.0, harmonics=())
        _render_spicules(rng, image, cx, cy, core, rng.uniform(200.0, 320.0), px_mm)
    count = int(np.clip(2 * np.pi * radius_px / rng.uniform(6.0, 12.0), 16, 200))
    return [_roi(name, ROI_TYPE_PENCIL, _outline_points(rng, cx, cy, contour, count, 1.05, radius_px * 0.03))]


def _render_image(task: _ImageTask) -> tuple[np.ndarray, tuple[SynthRoi, ...]]:
    """Draw one image and its ROIs from the task alone (the generator is seeded by seed and index).

    Returns:
        The uint16 image, shape (rows, columns), values < 4096, and the ROIs in XML order.
    """
    rng = np.random.default_rng(np.random.SeedSequence([task.seed, task.index, 0x1A6E]))
    anatomy = _anatomy(rng, task)
    image = _upsample(anatomy.intensity, anatomy.factor, task.rows, task.columns)
    _fine_noise(rng, image, rng.uniform(7.0, 12.0))
    rois: list[SynthRoi] = []
    for mass in task.findings.masses:
        rois += _draw_mass_on(rng, image, anatomy, task, mass)
    for other in task.findings.others:
        rois += _draw_other_on(rng, image, anatomy, task, other)
    for group in task.findings.calc_groups:
        rois += _draw_calc_group_on(rng, image, anatomy, task, group)
    np.clip(image, 0.0, 4095.0, out=image)
    return image.astype(np.uint16), tuple(rois)


def _write_image(task: _ImageTask) -> SynthImage:
    """Render one image and write its DICOM (and XML when it has ROIs); run in a worker process."""
    pixels, rois = _render_image(task)
    name = dicom_file_name(task.image_id, task.patient_id, task.laterality, task.view)
    write_mg_dicom(
        task.work_dir / DICOM_DIR / name, pixels, f"{task.seed}:{task.image_id}",
        ImageLaterality=task.laterality,
        StudyInstanceUID=derived_uid("study", str(task.seed), task.patient_id, task.acquisition_date))
    xml_path = None
    if rois:
        # Real files either store the clicked pixel's value for point ROIs or zeros; both occur.
        point_values = bool(np.random.default_rng([task.seed, task.index, 0x57A7]).random() < 0.4)
        write_osirix_xml(task.work_dir / XML_DIR / f"{task.image_id}.xml", rois, image=pixels,
                         point_values=point_values)
        xml_path = task.out_dir / XML_DIR / f"{task.image_id}.xml"
    return SynthImage(
        image_id=task.image_id, patient_id=task.patient_id, laterality=task.laterality, view=task.view,
        acquisition_date=task.acquisition_date, acr=task.acr, birads=task.birads, rows=task.rows,
        columns=task.columns, rois=rois, dicom_path=task.out_dir / DICOM_DIR / name, xml_path=xml_path)


# --- Orchestration --------------------------------------------------------------------------------


def _check_arguments(out_dir: Path, cases: int, seed: int, scale: float, workers: int) -> None:
    if isinstance(cases, bool) or not isinstance(cases, int) or not 1 <= cases <= MAX_CASES:
        raise UserError(f"--cases {cases!r}: must be an integer from 1 to {MAX_CASES}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed {seed!r}: must be a non-negative integer")
    if not isinstance(scale, int | float) or not math.isfinite(scale) or not 0 < scale <= 1:
        raise UserError(f"--scale {scale!r}: must be > 0 and <= 1 (1.0 gives the real image sizes)")
    if scale < MIN_SCALE:
        raise UserError(f"--scale {scale!r}: below {MIN_SCALE} the images are too small to hold lesions")
    if workers < 0:
        raise UserError(f"workers {workers!r}: must be >= 0 (0 = one per CPU core)")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / MARKER_NAME).is_file():
            raise UserError(f"{out_dir}: folder is not empty and is not a previous `mammoseg synth` output "
                            f"(no {MARKER_NAME}); choose another --out or empty it")


def synthesize(out_dir: Path, cases: int, seed: int, scale: float, workers: int = 0) -> list[SynthImage]:
    """Write an INbreast-format dataset and return what was drawn (the ground truth for tests).

    The dataset is written into a temporary folder next to `out_dir` and renamed into place, so a
    crash never leaves half a dataset; a previous synth output at `out_dir` is replaced.

    Args:
        out_dir: the folder to (re)write: AllDICOMs/, AllXML/, INbreast.csv, .mammoseg-synth.
        cases: patients; each has 2 views (one breast) or 4 views (both breasts, CC and MLO).
        seed: the seed; the same arguments give byte-identical files.
        scale: image-size factor in (0, 1]; 1.0 gives 3328 x 2560 and 4084 x 3328.
        workers: processes to render with; 0 = one per CPU core (but in this process for jobs
            smaller than ~4 full-size images), 1 = in this process. Several workers are spawned
            processes, so a calling script needs the usual `if __name__ == "__main__":` guard.

    Returns:
        One SynthImage per image, in INbreast.csv row order.

    Raises:
        UserError: an argument is out of range or `out_dir` is a foreign non-empty folder.
    """
    out_dir = Path(out_dir)
    _check_arguments(out_dir, cases, seed, scale, workers)
    scale = float(scale)
    work_dir = out_dir.parent / f".{out_dir.name}.synth-tmp-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if work_dir.exists():
            shutil.rmtree(work_dir)
        (work_dir / DICOM_DIR).mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        (work_dir / XML_DIR).mkdir()
        tasks = _plan(cases, seed, scale, work_dir, out_dir)
        if workers == 0:
            # One per core, unless the whole job is smaller than starting the processes (~1 s).
            pixels = sum(task.rows * task.columns for task in tasks)
            workers = cpu_count() if pixels > _POOL_MIN_PIXELS else 1
        workers = min(workers, len(tasks))
        log.info("synth: %d patients, %d images at scale %g, %d worker(s) -> %s",
                 cases, len(tasks), scale, workers, out_dir)
        images = list(run_jobs(_write_image, tasks, workers, "synth", initializer=_worker_init))
        write_inbreast_csv(work_dir / CSV_NAME, images)
        marker = {"generator": "mammoseg synth", "version": __version__, "cases": cases, "seed": seed,
                  "scale": scale}
        (work_dir / MARKER_NAME).write_text(json.dumps(marker, sort_keys=True) + "\n")
        replace_folder(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    log.info("synth: wrote %d images (%d with XML) of %d patients to %s", len(images),
             sum(image.xml_path is not None for image in images), cases, out_dir)
    return images


def _worker_init() -> None:
    """Make glibc keep freed memory for reuse in a render worker.

    Every image allocates a few hundred MB of full-resolution temporaries; by default glibc maps
    each large block fresh and unmaps it on free, so every image pays tens of thousands of page
    faults, which dominate the run time on virtual machines. Keeping the blocks on the heap makes
    the second and later images reuse already-mapped pages. No effect (and no error) off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from <malloc.h>
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):
        pass


def run(config: SynthConfig, out: Path) -> SynthResult:
    """Run the `mammoseg synth` stage: write `config.cases` patients to `out`."""
    images = synthesize(out, config.cases, config.seed, config.scale)
    return SynthResult(images=len(images), patients=len({image.patient_id for image in images}), out_dir=out)
