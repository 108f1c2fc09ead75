"""predict takes what a PACS sends (sparse headers, MONOCHROME1, compressed syntaxes, folders) and
records what ran (registered version, alias, sha256, engine, variant, preprocessing transform).

Every SEG written here is checked with dicom3tools' dciodvfy where it is installed (.ci/run installs
it); without it those checks skip, naming the package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from mammoseg.errors import UserError
from mammoseg.onnx_runtime import read_io_spec
from mammoseg.preprocessing import PreprocessParams, Transform
from mammoseg.stages import predict
from mammoseg.variants import VARIANTS, report_path_for, variant_path
from tests.conftest import SERVED_MODEL, stage_config_for

pytestmark = pytest.mark.slow
DCIODVFY = shutil.which("dciodvfy")


def _source(prepared_data) -> Path:
    return sorted((prepared_data.inbreast / "AllDICOMs").glob("*.dcm"))[0]


def _predict(model: Path | str, inputs: list[Path], out: Path, **overrides) -> predict.PredictResult:
    return predict.run(stage_config_for("predict", threads=1, **overrides), str(model), inputs, out)


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


def _record(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


def _fastest_passing(exported: Path, engine: str | None = None) -> tuple[str, str, str]:
    """(variant, engine, sha256 of its file): the export report's fastest variant that passed its gate."""
    report = json.loads(report_path_for(exported).read_text())
    passed = {name: result for name, result in report["variants"].items()
              if result["passed"] and engine in (None, result["engine"])}
    name = min(passed, key=lambda candidate: passed[candidate]["latency_s"])
    file = exported.with_name(passed[name]["file"])
    return name, passed[name]["engine"], hashlib.sha256(file.read_bytes()).hexdigest()


def test_the_json_records_the_model_engine_variant_and_transform_that_ran(served_champion, exported, prepared_data,
                                                                       tracking_env, tmp_path):
    source = _source(prepared_data)
    spec = read_io_spec(exported)
    uri = f"models:/{SERVED_MODEL}@champion"
    # The registered version carries the variants: auto runs the fastest that passed, from its files.
    variant, engine, digest = _fastest_passing(exported)
    _predict(uri, [source], tmp_path / "alias")
    record = _record(tmp_path / "alias", source.stem)
    assert record["model"] == {"uri": uri, "registered_name": SERVED_MODEL, "version": served_champion,
                               "alias": "champion", "onnx_sha256": digest, "variant": variant,
                               "training_run_id": spec["training_run_id"]}
    assert record["engine"] == engine and record["precision"] == VARIANTS[variant].precision
    assert record["provider"] == ("CPU" if engine == "openvino" else "CPUExecutionProvider")
    params = PreprocessParams.from_dict(spec["preprocessing"])
    assert record["preprocessing"]["contract"] == params.to_dict()
    prepared = predict.network_input(source, params).prepared
    assert Transform.from_record(record["preprocessing"]["transform"]) == prepared.transform
    assert record["preprocessing"]["intensity_window"] == [prepared.intensity_low, prepared.intensity_high]

    by_version = f"models:/{SERVED_MODEL}/{served_champion}"
    _predict(by_version, [source], tmp_path / "version", engine="onnxruntime")
    variant, _, digest = _fastest_passing(exported, "onnxruntime")
    assert _record(tmp_path / "version", source.stem)["model"] | {"uri": uri, "alias": "champion"} == {
        **record["model"], "variant": variant, "onnx_sha256": digest}
    _predict(exported, [source], tmp_path / "file", engine="onnxruntime")
    assert _record(tmp_path / "file", source.stem)["model"] == {
        "uri": str(exported), "registered_name": None, "version": None, "alias": None, "onnx_sha256": digest,
        "variant": variant, "training_run_id": spec["training_run_id"]}
    int8 = variant_path(exported, "int8")
    if int8.exists():  # kept only where a variant that runs it passed its Dice gate
        _predict(int8, [source], tmp_path / "int8")  # a variant's file given directly runs as itself
        assert _record(tmp_path / "int8", source.stem)["model"]["variant"] == "int8"


def test_a_registered_model_whose_file_changed_is_refused(served_champion, prepared_data, tracking_env, tmp_path):
    # The registry's onnx_sha256 tag no longer matching the artifact is what a replaced file looks like.
    client = mlflow.MlflowClient(tracking_env.url)
    recorded = client.get_model_version(SERVED_MODEL, served_champion).tags["onnx_sha256"]
    client.set_model_version_tag(SERVED_MODEL, served_champion, "onnx_sha256", "0" * 64)
    try:
        with pytest.raises(UserError, match=rf"version {served_champion}'s .onnx has sha256 .* refusing"):
            _predict(f"models:/{SERVED_MODEL}@champion", [_source(prepared_data)], tmp_path / "out")
    finally:
        client.set_model_version_tag(SERVED_MODEL, served_champion, "onnx_sha256", recorded)
    assert not list((tmp_path / "out").glob("*.json"))
