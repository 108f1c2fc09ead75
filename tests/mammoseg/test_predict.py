"""predict takes what a PACS sends: sparse headers, MONOCHROME1, compressed syntaxes, folders.

Every SEG written here is checked with dicom3tools' dciodvfy where it is installed (.ci/run installs
it); without it those checks skip, naming the package.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from mammoseg.errors import UserError
from mammoseg.stages import predict
from tests.conftest import stage_config_for

pytestmark = pytest.mark.slow
DCIODVFY = shutil.which("dciodvfy")


def _source(prepared_data) -> Path:
    return sorted((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))[0]


def _predict(exported: Path, inputs: list[Path], out: Path, **overrides) -> predict.PredictResult:
    return predict.run(stage_config_for("predict", threads=1, **overrides), str(exported), inputs, out)


def _mask(out: Path, stem: str) -> np.ndarray:
    return np.asarray(Image.open(out / f"{stem}_mask.png"))


def dciodvfy_errors(path: Path) -> list[str]:
    """Return dciodvfy's Error lines for a file (warnings are allowed)."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def _rewrite(source: Path, target: Path, edit) -> Path:
    ds = pydicom.dcmread(source)
    edit(ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_a_header_without_patient_and_study_attributes_gets_a_valid_seg(exported, prepared_data, tmp_path):
    keywords = ("PatientBirthDate", "PatientName", "PatientID", "PatientSex", "StudyDate", "StudyTime",
                "AccessionNumber", "StudyID", "ReferringPhysicianName")

    def strip(ds):
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    sparse = _rewrite(_source(prepared_data), tmp_path / "in" / "sparse.dcm", strip)
    _predict(exported, [sparse], tmp_path / "out")
    seg = pydicom.dcmread(tmp_path / "out" / "sparse_seg.dcm")
    assert seg.Modality == "SEG" and all(keyword in seg and not seg.get(keyword) for keyword in keywords)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        pydicom.dcmread(sparse).SOPInstanceUID)
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    assert dciodvfy_errors(tmp_path / "out" / "sparse_seg.dcm") == []


def _monochrome1(ds):
    ceiling = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = (ceiling - ds.pixel_array).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"


@pytest.mark.parametrize("variant", ["monochrome1", "rle", "jpeg-ls", "jpeg2000"])
def test_stored_differently_the_same_image_gets_the_same_mask(variant, exported, prepared_data, tmp_path):
    source = _source(prepared_data)
    edits = {"monochrome1": _monochrome1,
             "rle": lambda ds: ds.compress(RLELossless),
             "jpeg-ls": lambda ds: ds.compress(JPEGLSLossless),
             "jpeg2000": lambda ds: ds.compress(JPEG2000Lossless)}
    other = _rewrite(source, tmp_path / "in" / f"{variant}.dcm", edits[variant])
    if variant != "monochrome1":
        assert pydicom.dcmread(other).file_meta.TransferSyntaxUID.is_compressed
    _predict(exported, [source, other], tmp_path / "out")
    reference, mask = _mask(tmp_path / "out", source.stem), _mask(tmp_path / "out", variant)
    assert mask.shape == reference.shape and np.array_equal(mask, reference)
    if DCIODVFY is not None:
        assert dciodvfy_errors(tmp_path / "out" / f"{variant}_seg.dcm") == []


def test_for_processing_is_refused_unless_allowed(exported, prepared_data, tmp_path):
    def raw(ds):
        ds.PresentationIntentType = "FOR PROCESSING"

    image = _rewrite(_source(prepared_data), tmp_path / "in" / "raw.dcm", raw)
    with pytest.raises(UserError, match=r"raw\.dcm: a FOR PROCESSING .*--allow-for-processing"):
        _predict(exported, [image], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    _predict(exported, [image], tmp_path / "allowed", allow_for_processing=True)
    assert (tmp_path / "allowed" / "raw_mask.png").is_file()


def test_a_folder_is_searched_and_other_files_are_skipped(exported, prepared_data, tmp_path, caplog):
    folder = tmp_path / "export"
    sources = sorted((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))[:3]
    for index, source in enumerate(sources):
        target = folder / f"series{index % 2}" / f"IM{index:04d}"  # PACS exports drop the extension
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (folder / "README.TXT").write_text("exported by a PACS\n")
    caplog.set_level(logging.INFO, logger="mammoseg.stages.predict")
    result = _predict(exported, [folder], tmp_path / "out")
    assert result.images == 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.dcm")) == [f"IM{i:04d}_seg.dcm" for i in range(3)]
    assert "3 DICOM files, 1 other files skipped" in caplog.text
    assert "images/s" in caplog.text


def test_bad_inputs_name_the_file(exported, prepared_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    with pytest.raises(UserError, match=r"empty: no DICOM file in this folder"):
        _predict(exported, [empty], tmp_path / "out")
    no_uid = _rewrite(_source(prepared_data), tmp_path / "in" / "no-uid.dcm",
                      lambda ds: delattr(ds, "StudyInstanceUID"))
    with pytest.raises(UserError, match=r"no-uid\.dcm: StudyInstanceUID missing"):
        _predict(exported, [no_uid], tmp_path / "out")
    a, b = tmp_path / "a" / "same.dcm", tmp_path / "b" / "same.dcm"
    for target in (a, b):
        target.parent.mkdir()
        shutil.copy2(_source(prepared_data), target)
    with pytest.raises(UserError, match="share the file name 'same'"):
        _predict(exported, [a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
