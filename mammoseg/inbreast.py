"""Read the real INbreast Release 1.0 format: DICOM file names, INbreast.csv/.xls, OsiriX XML ROIs.

Everything here follows ../shared/inbreast-format.md (section numbers below refer to it). The
functions return plain records; they never decide what to do with a bad image (ingest does), but
every problem they find is raised as a one-line `UserError` naming the file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import plistlib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from xml.parsers.expat import ExpatError

import numpy as np
from skimage.draw import disk, polygon

from mammoseg.errors import UserError

log = logging.getLogger(__name__)

CSV_NAME = "INbreast.csv"
XLS_NAME = "INbreast.xls"
DICOM_DIR = "AllDICOMs"
XML_DIR = "AllXML"
CSV_HEADER = ("Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name", "ACR",
              "Bi-Rads")
BIRADS_VALUES = frozenset({"1", "2", "3", "4a", "4b", "4c", "5", "6"})
VIEWS = frozenset({"CC", "MLO", "FB"})
# File names say ML where the table says MLO (section 1.2).
FILE_VIEW_TO_TABLE_VIEW = {"CC": "CC", "ML": "MLO", "MLO": "MLO", "FB": "FB"}
LESION_CLASSES = ("mass", "calcification", "other")

_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# OsiriX writes Point_px as "(%f, %f)" (section 2.3); "{x, y}" is Cocoa's own point notation, used by
# the ROIPoints variant of the same exporter (section 2.4). Nothing else is a point: a looser pattern
# read "(1.5.6, 200)" as (1.5, 0.6), a calcification in the image corner.
_POINT_RE = re.compile(rf"\s*(?:\(\s*({_FLOAT})\s*,\s*({_FLOAT})\s*\)|\{{\s*({_FLOAT})\s*,\s*({_FLOAT})\s*\}})\s*")
_IMAGE_ID_RE = re.compile(r"^\d{8}$")
_PATIENT_RE = re.compile(r"^[0-9a-f]{16}$")
_DATE_RE = re.compile(r"^\d{6}$")
# What a table re-saved by Excel or a text editor starts with instead of the real file's ASCII.
_BOMS = (
    (b"\xef\xbb\xbf", "starts with a UTF-8 byte-order mark (Excel's 'CSV UTF-8')"),
    (b"\xff\xfe", "is UTF-16 text (little-endian byte-order mark)"),
    (b"\xfe\xff", "is UTF-16 text (big-endian byte-order mark)"),
)


@dataclasses.dataclass(frozen=True)
class DicomName:
    """The fields encoded in an `AllDICOMs` file name (section 1.2)."""

    image_id: str
    patient_id: str
    laterality: str
    view: str  # in the table's vocabulary: CC, MLO or FB


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One image's row of INbreast.csv (or sheet 0 of INbreast.xls)."""

    image_id: str
    laterality: str
    view: str
    acquisition_date: str
    acr: int | None
    birads: str


@dataclasses.dataclass(frozen=True)
class Roi:
    """One OsiriX ROI: its raw name, tool type and (x, y) points in pixels (x = column)."""

    name: str
    roi_type: int
    points_px: tuple[tuple[float, float], ...]


def parse_dicom_name(path: Path) -> DicomName:
    """Split `<id>_<patienthash>_MG_<L|R>_<CC|ML>_ANON.dcm` into its fields.

    Raises:
        UserError: the name does not have that form.
    """
    tokens = path.stem.split("_")
    if len(tokens) != 6 or tokens[2] != "MG" or tokens[5] != "ANON":
        raise UserError(f"{path}: file name is not <id>_<patienthash>_MG_<side>_<view>_ANON.dcm")
    image_id, patient_id, _, laterality, view, _ = tokens
    if not _IMAGE_ID_RE.match(image_id):
        raise UserError(f"{path}: image id {image_id!r} is not 8 digits")
    if not _PATIENT_RE.match(patient_id):
        raise UserError(f"{path}: patient hash {patient_id!r} is not 16 lowercase hex characters")
    if laterality not in ("L", "R"):
        raise UserError(f"{path}: laterality {laterality!r} is not L or R")
    if view not in FILE_VIEW_TO_TABLE_VIEW:
        raise UserError(f"{path}: view {view!r} is not CC, ML or FB")
    return DicomName(image_id, patient_id, laterality, FILE_VIEW_TO_TABLE_VIEW[view])


def read_table(root: Path) -> dict[str, TableRow]:
    """Read the image table: INbreast.csv, or sheet 0 of INbreast.xls when the CSV is absent.

    Returns:
        image id -> row.

    Raises:
        UserError: neither file exists; the CSV is empty, not ASCII (a UTF-8 or UTF-16 byte-order mark,
            UTF-16 without one, other bytes) or its header lacks, adds or reorders columns; a row is
            malformed or its image id repeats an earlier row's; there are no rows. The whole table is
            unusable in each case, so these are dataset-level errors, not per-image rejections.
    """
    csv_path, xls_path = root / CSV_NAME, root / XLS_NAME
    if csv_path.is_file():
        return _rows_by_id(csv_path, _csv_records(csv_path))
    if xls_path.is_file():
        return _rows_by_id(xls_path, _xls_records(xls_path))
    raise UserError(f"{root}: neither {CSV_NAME} nor {XLS_NAME} found")


def _csv_records(path: Path) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number, fields) of a `;`-separated, CRLF INbreast.csv (section 4.1)."""
    lines = _csv_text(path).replace("\r\n", "\n").split("\n")
    header = [field.strip() for field in lines[0].split(";")]
    if tuple(header) != CSV_HEADER:
        raise UserError(_header_problem(path, lines[0], header))
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            yield number, line.split(";")


def _csv_text(path: Path) -> str:
    """Return the text of INbreast.csv, naming the encoding when it is not the real file's ASCII.

    Re-saving the table in Excel is the usual way it goes wrong, and a byte offset does not tell the
    user that, so the byte-order marks and UTF-16 are named (the whole table is unusable either way).
    """
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: is empty")
    for bom, problem in _BOMS:
        if data.startswith(bom):
            raise UserError(f"{path}: {problem}; save it as plain CSV")
    if b"\x00" in data:
        # NUL is valid ASCII, so UTF-16 text without a byte-order mark would otherwise reach the
        # header check and be reported as a garbled header.
        byte_order = _utf16_byte_order(data)
        if byte_order:
            raise UserError(f"{path}: is UTF-16 text ({byte_order}, no byte-order mark); save it as plain CSV")
        start = data.index(b"\x00")
        raise UserError(f"{path}: contains a NUL byte (byte {start}, on line {_line_of(data, start)}); "
                        "not a text file")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not ASCII text (byte {exc.start}, 0x{data[exc.start]:02x}, "
                        f"on line {_line_of(data, exc.start)})") from None


def _line_of(data: bytes, offset: int) -> int:
    """Return the 1-based line number of a byte offset."""
    return data.count(b"\n", 0, offset) + 1


def _utf16_byte_order(data: bytes) -> str | None:
    """Tell whether mostly-ASCII data is UTF-16 without a BOM: NULs in every other byte, one parity only."""
    sample = data[:4096]
    even, odd = sample[0::2], sample[1::2]
    if not odd:
        return None
    if odd.count(0) >= 0.9 * len(odd) and even.count(0) <= 0.1 * len(even):
        return "little-endian"
    if even.count(0) >= 0.9 * len(even) and odd.count(0) <= 0.1 * len(odd):
        return "big-endian"
    return None


def _header_problem(path: Path, line: str, header: list[str]) -> str:
    """Say what is wrong with a CSV header that is not exactly `CSV_HEADER`."""
    expected = ";".join(CSV_HEADER)
    if ";" not in line and ("," in line or "\t" in line):
        separator = "TAB" if "\t" in line else "','"
        return f"{path}: header is separated by {separator}, not ';' (expected {expected!r})"
    missing = [column for column in CSV_HEADER if column not in header]
    if missing:
        return f"{path}: header lacks column(s) {', '.join(map(repr, missing))} (expected {expected!r})"
    extra = [column for column in header if column not in CSV_HEADER]
    if extra:
        return f"{path}: header has unexpected column(s) {', '.join(map(repr, extra))} (expected {expected!r})"
    return f"{path}: header columns are out of order or repeated: {';'.join(header)!r}, expected {expected!r}"


def _xls_records(path: Path) -> Iterable[tuple[int, list[str]]]:
    """Yield (row number, fields) of sheet 0 of INbreast.xls, stopping at the blank row before totals."""
    import xlrd

    try:
        sheet = xlrd.open_workbook(str(path)).sheet_by_index(0)
    except Exception as exc:  # xlrd raises several unrelated types for a damaged file
        raise UserError(f"{path}: cannot read as an Excel workbook ({exc})") from None
    header = [str(sheet.cell_value(0, col)).strip() for col in range(min(sheet.ncols, len(CSV_HEADER)))]
    if tuple(header) != CSV_HEADER:
        raise UserError(f"{path}: sheet 0 header starts {header!r}, expected {list(CSV_HEADER)!r}")
    for row in range(1, sheet.nrows):
        values = [sheet.cell_value(row, col) for col in range(len(CSV_HEADER))]
        if str(values[5]).strip() == "":
            break  # the blank row; the totals row below it is not an image (section 4.2)
        # Numeric cells come back as floats (22678622.0); text cells (4a, the blank ACR) as str.
        yield row + 1, [_xls_text(value) for value in values]


def _xls_text(value: object) -> str:
    """Render an xlrd cell value the way the CSV writes it (integral floats without `.0`)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _rows_by_id(path: Path, records: Iterable[tuple[int, list[str]]]) -> dict[str, TableRow]:
    """Validate each record and index it by image id."""
    rows: dict[str, TableRow] = {}
    first_seen: dict[str, int] = {}
    for number, fields in records:
        where = f"{path}:{number}"
        if len(fields) != len(CSV_HEADER):
            raise UserError(f"{where}: {len(fields)} fields, expected {len(CSV_HEADER)}")
        _, _, laterality, view, date, image_id, acr, birads = (field.strip() for field in fields)
        if not _IMAGE_ID_RE.match(image_id):
            raise UserError(f"{where}: File Name {image_id!r} is not an 8-digit image id")
        if image_id in rows:
            raise UserError(f"{where}: image id {image_id} appears twice (first at {path.name}:"
                            f"{first_seen[image_id]})")
        first_seen[image_id] = number
        if laterality not in ("L", "R"):
            raise UserError(f"{where}: Laterality {laterality!r} is not L or R")
        if view not in VIEWS:
            raise UserError(f"{where}: View {view!r} is not one of CC, MLO, FB")
        if not _DATE_RE.match(date):
            raise UserError(f"{where}: Acquisition date {date!r} is not YYYYMM")
        birads = birads.lower()
        if birads not in BIRADS_VALUES:
            raise UserError(f"{where}: Bi-Rads {birads!r} is not one of {', '.join(sorted(BIRADS_VALUES))}")
        if acr == "":  # one real row has an ACR of 193 spaces (section 4.1)
            acr_value = None
        elif acr in ("1", "2", "3", "4"):
            acr_value = int(acr)
        else:
            raise UserError(f"{where}: ACR {acr!r} is not 1-4 or blank")
        rows[image_id] = TableRow(image_id, laterality, view, date, acr_value, birads)
    if not rows:
        raise UserError(f"{path}: no image rows below the header")
    return rows


def read_rois(path: Path) -> list[Roi]:
    """Read the ROIs of an OsiriX XML plist (`Images[0].ROIs`, section 2.2).

    The file is read strictly: a point that is not "(x, y)" (or Cocoa's "{x, y}") or an ROI without
    points makes the whole file unusable, because the image's mask would silently lose or misplace
    a lesion. OsiriX writes at least one point for every tool (a Calcification is one point,
    section 3.2) and no ROI without points is known in the real set, so an empty `Point_px` means a
    damaged file rather than an annotation to skip.

    Raises:
        UserError: the file is not a plist of that shape (unreadable, truncated, no `Images[0].ROIs`),
            an ROI has no points, or a point string is not "(x, y)"; the message names the file, the
            ROI (position and name) and the offending text.
    """
    try:
        with path.open("rb") as handle:
            document = plistlib.load(handle, fmt=plistlib.FMT_XML)
        raw_rois = document["Images"][0]["ROIs"]
    except (ExpatError, plistlib.InvalidFileException, ValueError) as exc:
        empty = " (empty file)" if path.stat().st_size == 0 else ""
        raise UserError(f"{path}: not a readable plist XML, truncated or malformed{empty} ({exc})") from None
    except (KeyError, IndexError, TypeError):
        raise UserError(f"{path}: no Images[0].ROIs array (not an INbreast lesion XML)") from None
    if not isinstance(raw_rois, list):
        raise UserError(f"{path}: Images[0].ROIs is a {type(raw_rois).__name__}, not an array")
    return [_read_roi(path, index, raw) for index, raw in enumerate(raw_rois)]


def _read_roi(path: Path, index: int, raw: object) -> Roi:
    """Check and convert one ROI dictionary of `Images[0].ROIs`."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: ROI {index} is a {type(raw).__name__}, not a dictionary")
    name = str(raw.get("Name", ""))
    where = f"{path}: ROI {index} ({name!r})"
    try:
        roi_type = int(raw.get("Type", -1))
    except (TypeError, ValueError):
        raise UserError(f"{where}: Type {raw.get('Type')!r} is not an integer") from None
    texts = raw.get("Point_px")
    if not isinstance(texts, list):
        raise UserError(f"{where}: no Point_px array")
    if not texts:
        raise UserError(f"{where}: Point_px is empty (every OsiriX ROI has at least one point)")
    points = []
    for number, text in enumerate(texts):
        point = _parse_point(text)
        if point is None:
            raise UserError(f"{where}: Point_px[{number}] {text!r} is not a point '(x, y)'")
        points.append(point)
    declared = raw.get("NumberOfPoints")
    if declared is not None and declared != len(points):
        # Loaders that ran over the whole dataset assert this; keep the points, say so.
        log.warning("%s: ROI %d declares %s points but lists %d", path, index, declared, len(points))
    return Roi(name, roi_type, tuple(points))


def _parse_point(text: object) -> tuple[float, float] | None:
    """Parse "(x, y)" or "{x, y}" with signed, possibly exponent, floats; None for anything else.

    Coordinates may be negative or past the edge (section 3.4), but never NaN or infinite.
    """
    match = _POINT_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    x, y = (float(group) for group in match.groups() if group is not None)
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return x, y


class LesionClassifier:
    """Map raw ROI names to mass / calcification / other with the table from params.yaml.

    Names are compared after `strip().lower()` (real names vary in case and spelling, section 3.1).
    Unknown names count as other; `unknown_names` collects them so the caller can warn once.
    """

    def __init__(self, lesion_classes: Mapping[str, Sequence[str]]) -> None:
        unknown_classes = set(lesion_classes) - set(LESION_CLASSES)
        if unknown_classes:
            raise UserError(f"params: lesion_classes has unknown class(es) {sorted(unknown_classes)}; "
                            f"allowed: {', '.join(LESION_CLASSES)}")
        self._class_of: dict[str, str] = {}
        for lesion_class, names in lesion_classes.items():
            for name in names:
                key = name.strip().lower()
                if key in self._class_of and self._class_of[key] != lesion_class:
                    raise UserError(f"params: lesion name {name!r} is mapped to both "
                                    f"{self._class_of[key]} and {lesion_class}")
                self._class_of[key] = lesion_class
        self.unknown_names: set[str] = set()

    def classify(self, name: str) -> str:
        """Return the lesion class of a raw ROI name."""
        key = name.strip().lower()
        lesion_class = self._class_of.get(key)
        if lesion_class is None:
            self.unknown_names.add(name)
            return "other"
        return lesion_class


@dataclasses.dataclass
class RasterizedImage:
    """Full-resolution lesion masks of one image and what went into them.

    Attributes:
        mass: (rows, columns) bool mask of masses.
        calcification: (rows, columns) bool mask of calcifications.
        counts: ROIs per class (mass, calcification, other).
        points_out_of_bounds: ROI points outside the image (kept in the XML, clipped in the mask).
    """

    mass: np.ndarray
    calcification: np.ndarray
    counts: dict[str, int]
    points_out_of_bounds: int


def point_out_of_bounds(x: float, y: float, rows: int, columns: int) -> bool:
    """Tell whether (x, y) lies outside the pixel grid; pixel (r, c) spans [c, c+1) x [r, r+1)."""
    return not (0.0 <= x < columns and 0.0 <= y < rows)


def rasterize(rois: Sequence[Roi], rows: int, columns: int, point_radius_px: int,
              classifier: LesionClassifier) -> RasterizedImage:
    """Draw the mass and calcification ROIs of one image at full resolution.

    Polygons (3 points or more) are filled with skimage's even-odd rule on pixel-centre coordinates
    (x = column, y = row) and clipped to the image. ROIs of one or two points (OsiriX single points)
    are discs around each rounded point: every pixel whose centre lies within `point_radius_px` + 0.5
    of it, so radius 0 is one pixel and a point is never lost. Points past the edge are counted.

    Args:
        rois: the image's ROIs.
        rows: image height in pixels.
        columns: image width in pixels.
        point_radius_px: disc radius for single-point ROIs, in pixels.
        classifier: maps ROI names to classes.

    Returns:
        The (rows, columns) bool masks, ROI counts per class and the out-of-bounds point count.
    """
    masks = {"mass": np.zeros((rows, columns), bool), "calcification": np.zeros((rows, columns), bool)}
    counts = dict.fromkeys(LESION_CLASSES, 0)
    out_of_bounds = 0
    for roi in rois:
        lesion_class = classifier.classify(roi.name)
        counts[lesion_class] += 1
        out_of_bounds += sum(point_out_of_bounds(x, y, rows, columns) for x, y in roi.points_px)
        if lesion_class == "other":
            continue
        mask = masks[lesion_class]
        xs = np.array([x for x, _ in roi.points_px])
        ys = np.array([y for _, y in roi.points_px])
        if len(roi.points_px) >= 3:
            rr, cc = polygon(ys, xs, shape=(rows, columns))
            mask[rr, cc] = True
        else:
            for x, y in roi.points_px:
                rr, cc = disk((round(y), round(x)), point_radius_px + 0.5, shape=(rows, columns))
                mask[rr, cc] = True
    return RasterizedImage(masks["mass"], masks["calcification"], counts, out_of_bounds)
