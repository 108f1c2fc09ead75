"""Read mammogram DICOMs: decode pixel data of any archive transfer syntax into bright = dense arrays.

Also lists the populated identifying attributes of a header (the de-identification check). Writes
nothing.

Decoding goes through pydicom 3's pixel backend (`pydicom.pixels.pixel_array`), which tries every
installed plugin for the file's transfer syntax in turn. With this project's dependencies every
syntax a mammography archive uses is covered:

=====================================  ==========================  ====================================
transfer syntax                        UID                         decoders (pydicom 3.0 plugin names)
=====================================  ==========================  ====================================
Implicit / Explicit VR Little Endian   1.2.840.10008.1.2, .1.2.1   pydicom (native)
Deflated Explicit VR Little Endian     1.2.840.10008.1.2.1.99      pydicom (native, zlib)
Explicit VR Big Endian (retired)       1.2.840.10008.1.2.2         pydicom (native)
JPEG Lossless (Process 14, and SV1)    1.2.840.10008.1.2.4.57/.70  pylibjpeg (pylibjpeg-libjpeg)
JPEG Baseline / Extended               1.2.840.10008.1.2.4.50/.51  pylibjpeg (libjpeg), pillow
JPEG-LS Lossless / Near-Lossless       1.2.840.10008.1.2.4.80/.81  pyjpegls, pylibjpeg (libjpeg)
JPEG 2000 Lossless / lossy             1.2.840.10008.1.2.4.90/.91  pylibjpeg (openjpeg), pillow
HTJ2K Lossless / lossy                 1.2.840.10008.1.2.4.201-3   pylibjpeg (openjpeg)
RLE Lossless                           1.2.840.10008.1.2.5         pydicom (native), pylibjpeg-rle
=====================================  ==========================  ====================================

Intensity pipeline (in DICOM's order, PS3.3 C.11): stored values -> Modality LUT (Rescale
Slope/Intercept or a Modality LUT Sequence) -> optionally the VOI LUT -> MONOCHROME1 inversion.

- The Modality LUT is always applied: it gives the detector's values, the same quantity for every
  image of a system. INbreast has none, so its values are the stored values.
- The VOI LUT (Window Center/Width or a VOI LUT Sequence) is a display choice; for segmentation we
  keep the modality values (`apply_voi=False`, params.yaml) because the per-image percentile
  normalisation that follows already adapts the contrast, and a narrow window would clip dense
  tissue and calcifications to one value. With `apply_voi=True` the first window (or LUT) is applied
  where the header has one and nothing is done where it has none.
- MONOCHROME1 (low = white) is inverted as `low + high - value`, with (low, high) the output range of
  the nominal stored range through the same LUTs, so bright always means dense. Any positive affine
  map is undone by the percentile normalisation, so only the sign matters downstream.
"""

from __future__ import annotations

import dataclasses
import logging
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.tag import Tag

from mammoseg.errors import UserError

log = logging.getLogger(__name__)

# Attributes that identify a patient, an exam or the people and place involved: the names, IDs,
# dates, addresses and numbers of DICOM PS3.15 Table E.1-1 (Basic Application Level Confidentiality
# Profile) that a mammography header carries in practice. PatientSex is left out on purpose (every
# mammogram of this dataset is of a woman); private tags are not inspected.
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate",
    "PatientBirthTime", "PatientAge", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation", "AdditionalPatientHistory",
    "PatientComments", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate",
    "ContentDate", "AcquisitionDateTime", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PhysiciansOfRecord",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "RequestingPhysician",
    "StationName", "DeviceSerialNumber", "RequestAttributesSequence",
)

# Read with the pixels besides group 0028 (which pixel_array always returns): the laterality tags.
_EXTRA_TAGS = (Tag("ImageLaterality"), Tag("Laterality"))


@dataclasses.dataclass(frozen=True)
class DicomImage:
    """A decoded single-frame grayscale image, bright = dense.

    Attributes:
        pixels: (rows, columns) float32 modality values (or VOI output when `intensity` is "voi"),
            inverted for MONOCHROME1.
        photometric: the header's PhotometricInterpretation (MONOCHROME1 or MONOCHROME2).
        transfer_syntax: name of the transfer syntax the pixel data was stored in.
        intensity: "modality" or "voi": which LUT stage the values come from.
        inverted: whether MONOCHROME1 inversion was applied.
        laterality: "L" or "R" from ImageLaterality (or Laterality), None where the header has neither.
    """

    pixels: np.ndarray
    photometric: str
    transfer_syntax: str
    intensity: str
    inverted: bool
    laterality: str | None

    @property
    def shape(self) -> tuple[int, int]:
        """Return (rows, columns)."""
        return self.pixels.shape  # type: ignore[return-value]


def _one_line(exc: BaseException) -> str:
    """Return an exception as `Type: message` on one line, shortened for a one-line error.

    pydicom lists each plugin's failure on a line of its own; they are joined, not dropped.
    """
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _transfer_syntax_name(ds: Dataset) -> str:
    """Return the name of the dataset's transfer syntax, or 'unknown transfer syntax'."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "unknown transfer syntax"


def _syntax_of_file(path: Path) -> str:
    """Return the transfer syntax name from a file's header, for error messages; never raises."""
    try:
        return _transfer_syntax_name(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception:  # the header itself is unreadable: say so instead of failing differently
        return "not a readable DICOM header"


def laterality_of(ds: Dataset) -> str | None:
    """Return "L" or "R" from ImageLaterality, else Laterality; None where neither says L or R."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _stored_range(ds: Dataset) -> np.ndarray:
    """Return the nominal [min, max] stored value, shape (2,), from BitsStored and PixelRepresentation."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)


def _modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT; rescale in float32 (pydicom's own path goes through float64)."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _has_voi(ds: Dataset) -> bool:
    """Tell whether the header carries a VOI window or VOI LUT."""
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def read_image(path: str | PathLike[str], *, apply_voi: bool) -> DicomImage:
    """Decode a single-frame grayscale DICOM into bright = dense float32 values.

    Args:
        path: the DICOM file.
        apply_voi: apply the header's first VOI window / VOI LUT when it has one (see the module
            docstring); False keeps the modality values.

    Returns:
        The decoded image and what was done to it.

    Raises:
        UserError: the file is not DICOM, has no or undecodable pixel data (no installed decoder, a
            corrupt stream), or is not a single-frame grayscale image.
    """
    path = Path(path)
    ds = Dataset()
    try:
        # pixel_array(path) reads the file once and fills ds with the file meta, the image pixel
        # module (group 0028: LUTs, windows, photometric) and the tags asked for.
        arr = pixel_array(path, ds_out=ds, specific_tags=list(_EXTRA_TAGS))
    except FileNotFoundError:
        raise UserError(f"{path}: DICOM file not found") from None
    except Exception as exc:  # pydicom and its plugins raise many types; all mean "cannot decode"
        raise UserError(f"{path}: cannot decode pixel data ({_syntax_of_file(path)}; {_one_line(exc)})") \
            from None
    syntax = _transfer_syntax_name(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1 or arr.ndim != 2:
        raise UserError(f"{path}: expected one 2D grayscale frame, got pixel array of shape {arr.shape} "
                        f"({frames} frame(s); tomosynthesis or colour is not supported)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UserError(f"{path}: PhotometricInterpretation {photometric or '(missing)'!r} is not "
                        "MONOCHROME1 or MONOCHROME2")
    try:
        pixels = _modality(arr, ds)
        value_range = _modality(_stored_range(ds), ds)
        intensity = "modality"
        if apply_voi and _has_voi(ds):
            pixels = apply_voi_lut(pixels, ds, index=0).astype(np.float32)
            value_range = apply_voi_lut(value_range, ds, index=0).astype(np.float32)
            intensity = "voi"
    except Exception as exc:  # a malformed LUT or window in the header
        raise UserError(f"{path}: cannot apply the Modality/VOI LUT ({_one_line(exc)})") from None
    inverted = photometric == "MONOCHROME1"
    if inverted:
        low, high = float(value_range.min()), float(value_range.max())
        pixels = np.float32(low + high) - pixels
    return DicomImage(np.ascontiguousarray(pixels, dtype=np.float32), photometric, syntax, intensity,
                      inverted, laterality_of(ds))


def identifying_attributes(source: str | PathLike[str] | Dataset) -> dict[str, str]:
    """List the populated identifying attributes of a DICOM header (the de-identification check).

    Args:
        source: a DICOM file (only the header is read) or an already read dataset.

    Returns:
        keyword -> value as text, for each keyword of IDENTIFYING_KEYWORDS present with a non-empty
        value; an empty dict means the header passes.

    Raises:
        UserError: the file cannot be read as DICOM.
    """
    if isinstance(source, Dataset):
        ds = source
    else:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
        except FileNotFoundError:
            raise UserError(f"{source}: DICOM file not found") from None
        except Exception as exc:  # any parse failure means "not readable DICOM"
            raise UserError(f"{source}: not a readable DICOM file ({_one_line(exc)})") from None
    found: dict[str, str] = {}
    for keyword in IDENTIFYING_KEYWORDS:
        element = ds.get(keyword)
        if element is None:
            continue
        value = element.value if hasattr(element, "value") else element
        if value is None or (hasattr(value, "__len__") and len(value) == 0):
            continue
        text = str(value).strip()
        if text:
            found[keyword] = text
    return found
