"""DICOM decoding: every archive transfer syntax, LUTs, MONOCHROME1, errors, the de-identification check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pydicom.datadict
import pytest
from pydicom import uid
from pydicom.pixels import get_decoder

from mammoseg.dicom import IDENTIFYING_KEYWORDS, identifying_attributes, pixel_data_problem, read_image
from mammoseg.errors import UserError
from tests.conftest import write_dicom


@pytest.fixture
def pixels() -> np.ndarray:
    """A 12-bit image with structure and noise, so lossy codecs could not pass for lossless ones."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:96, 0:80]
    values = 400 + 30 * xx + 10 * yy + rng.integers(0, 200, (96, 80))
    values[10:20, 10:20] = 4095
    return values.astype(np.uint16)


def _compressed_copy(source: Path, syntax: pydicom.uid.UID, out: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.compress(syntax)  # pydicom 3 encoders: openjpeg (J2K), pyjpegls (JPEG-LS), pydicom/pylibjpeg (RLE)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_uncompressed_decodes_to_the_stored_values(tmp_path, pixels):
    image = read_image(write_dicom(tmp_path / "plain.dcm", pixels), apply_voi=False)
    assert image.pixels.dtype == np.float32 and image.shape == pixels.shape
    np.testing.assert_array_equal(image.pixels, pixels)
    assert (image.photometric, image.intensity, image.inverted) == ("MONOCHROME2", "modality", False)
    assert image.transfer_syntax == "Explicit VR Little Endian" and image.laterality is None


@pytest.mark.parametrize("syntax", [uid.JPEG2000Lossless, uid.JPEGLSLossless, uid.RLELossless],
                         ids=["jpeg2000-lossless", "jpeg-ls-lossless", "rle-lossless"])
def test_compressed_decodes_to_the_same_pixels(tmp_path, pixels, syntax):
    plain = write_dicom(tmp_path / "plain.dcm", pixels)
    compressed = _compressed_copy(plain, syntax, tmp_path / "compressed.dcm")
    assert pydicom.dcmread(compressed, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    image = read_image(compressed, apply_voi=False)
    assert image.transfer_syntax == syntax.name
    np.testing.assert_array_equal(image.pixels, read_image(plain, apply_voi=False).pixels)


@pytest.mark.parametrize("syntax", [
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit,
    uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
    uid.HTJ2KLossless, uid.RLELossless,
], ids=lambda s: s.name)
def test_a_decoder_is_installed_for_every_archive_syntax(syntax):
    # JPEG Lossless (Process 14) has no Python encoder to round-trip with; its decoder must exist.
    assert get_decoder(syntax).is_available


def test_monochrome1_is_inverted_so_bright_means_dense(tmp_path, pixels):
    image = read_image(write_dicom(tmp_path / "m1.dcm", pixels, PhotometricInterpretation="MONOCHROME1"),
                       apply_voi=False)
    assert image.inverted and image.photometric == "MONOCHROME1"
    # 12 bits stored: the nominal range is [0, 4095], so value v becomes 4095 - v.
    np.testing.assert_array_equal(image.pixels, 4095 - pixels.astype(np.float32))


def test_modality_rescale_is_applied(tmp_path, pixels):
    path = write_dicom(tmp_path / "rescaled.dcm", pixels, RescaleSlope="2", RescaleIntercept="-100")
    np.testing.assert_allclose(read_image(path, apply_voi=False).pixels, pixels * 2.0 - 100)


def test_voi_window_only_when_asked_and_present(tmp_path, pixels):
    windowed = write_dicom(tmp_path / "voi.dcm", pixels, WindowCenter="1500", WindowWidth="1000")
    raw = read_image(windowed, apply_voi=False)
    assert raw.intensity == "modality"
    np.testing.assert_array_equal(raw.pixels, pixels)
    voi = read_image(windowed, apply_voi=True)
    assert voi.intensity == "voi"
    assert voi.pixels[pixels <= 1000].max() == 0 and voi.pixels[pixels >= 2000].min() == 4095
    plain = read_image(write_dicom(tmp_path / "plain.dcm", pixels), apply_voi=True)
    assert plain.intensity == "modality"  # no window in the header: nothing applied


def test_laterality_comes_from_the_header(tmp_path, pixels):
    assert read_image(write_dicom(tmp_path / "r.dcm", pixels, ImageLaterality="R"), apply_voi=False) \
        .laterality == "R"


def _assert_one_line_naming(exc_info, path: Path) -> None:
    message = str(exc_info.value)
    assert str(path) in message and "\n" not in message


def test_not_a_dicom_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(UserError, match="cannot decode pixel data") as exc_info:
        read_image(path, apply_voi=False)
    _assert_one_line_naming(exc_info, path)


def test_truncated_pixel_data_is_a_user_error(tmp_path, pixels):
    path = write_dicom(tmp_path / "truncated.dcm", pixels)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UserError, match="cannot decode pixel data") as exc_info:
        read_image(path, apply_voi=False)
    _assert_one_line_naming(exc_info, path)


def test_corrupt_jpeg2000_stream_is_a_user_error(tmp_path, pixels):
    path = _compressed_copy(write_dicom(tmp_path / "plain.dcm", pixels), uid.JPEG2000Lossless,
                            tmp_path / "j2k.dcm")
    ds = pydicom.dcmread(path)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UserError, match="JPEG 2000") as exc_info:
        read_image(path, apply_voi=False)
    _assert_one_line_naming(exc_info, path)


def test_missing_file_and_multi_frame_are_user_errors(tmp_path, pixels):
    with pytest.raises(UserError, match="not found"):
        read_image(tmp_path / "absent.dcm", apply_voi=False)
    stack = np.concatenate([pixels, pixels])
    path = write_dicom(tmp_path / "frames.dcm", stack)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.NumberOfFrames = pixels.shape[0], 2
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UserError, match="2 frame"):
        read_image(path, apply_voi=False)


def test_identifying_attributes(tmp_path, pixels):
    clean = write_dicom(tmp_path / "clean.dcm", pixels)  # INbreast-like: empty PatientName/PatientID
    assert identifying_attributes(clean) == {}
    named = write_dicom(tmp_path / "named.dcm", pixels, PatientName="Doe^Jane", PatientBirthDate="19600101",
                        InstitutionName="Hospital")
    assert identifying_attributes(named) == {"PatientName": "Doe^Jane", "PatientBirthDate": "19600101",
                                             "InstitutionName": "Hospital"}
    assert identifying_attributes(pydicom.dcmread(named)) == identifying_attributes(named)
    assert identifying_attributes(named, allowed=["InstitutionName", "PatientSex"]) == {
        "PatientName": "Doe^Jane", "PatientBirthDate": "19600101"}
    (tmp_path / "bad.dcm").write_bytes(b"nope")
    with pytest.raises(UserError, match="bad.dcm"):
        identifying_attributes(tmp_path / "bad.dcm")


def test_identifying_keywords_are_the_confidentiality_profile():
    assert all(pydicom.datadict.tag_for_keyword(k) is not None for k in IDENTIFYING_KEYWORDS), [
        k for k in IDENTIFYING_KEYWORDS if pydicom.datadict.tag_for_keyword(k) is None]
    assert len(set(IDENTIFYING_KEYWORDS)) == len(IDENTIFYING_KEYWORDS) > 500  # Table E.1-1, 2024b
    # A sample of the table across its actions: X, Z, D, X/Z, Z/D, X/D, X/Z/D.
    assert {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDsSequence",
            "AccessionNumber", "StudyDate", "ContentDate", "AcquisitionDateTime", "InstitutionName",
            "ReferringPhysicianName", "OperatorsName", "DeviceSerialNumber", "StationName", "DetectorID",
            "ProtocolName", "SeriesDescription", "ImageComments", "RequestAttributesSequence",
            "GraphicAnnotationSequence"} <= set(IDENTIFYING_KEYWORDS)
    # Replaced UIDs (action U, X/Z/U*) are populated in every de-identified file; not ours to check.
    assert not {"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                "MediaStorageSOPInstanceUID", "ReferencedImageSequence", "SourceImageSequence",
                "Modality", "BurnedInAnnotation"} & set(IDENTIFYING_KEYWORDS)


def test_pixel_data_problem_in_plain_words(tmp_path, pixels):
    path = write_dicom(tmp_path / "ok.dcm", pixels)
    assert pixel_data_problem(pydicom.dcmread(path)) is None
    ds = pydicom.dcmread(path)
    ds.PixelData = b""
    ds.save_as(tmp_path / "empty.dcm")
    assert pixel_data_problem(pydicom.dcmread(tmp_path / "empty.dcm")) == "no pixel data (PixelData is empty)"
    del ds.PixelData
    assert pixel_data_problem(ds).startswith("no pixel data (PixelData is missing")
    (tmp_path / "cut.dcm").write_bytes(path.read_bytes()[:-100])
    assert pixel_data_problem(pydicom.dcmread(tmp_path / "cut.dcm")) == (
        f"truncated file (PixelData has {pixels.nbytes - 100} of its {pixels.nbytes} bytes)")
    ds = pydicom.dcmread(path)
    ds.Rows = 90
    assert pixel_data_problem(ds) == (f"Rows/Columns disagree with the pixel data: 90x80 at 16 bits needs "
                                      f"{90 * 80 * 2} bytes, PixelData has {pixels.nbytes}")
    compressed = _compressed_copy(path, uid.RLELossless, tmp_path / "rle.dcm")
    assert pixel_data_problem(pydicom.dcmread(compressed)) is None  # encapsulated: the decoder judges
