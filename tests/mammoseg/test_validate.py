"""Validate on generated data: a clean dataset passes; each broken copy fails naming the fault and the image.

The clean dataset (synth at scale 0.1, then ingest) is built once per module; every fault works on
its own copy, so one test's damage never leaks into another.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from mammoseg.config import stage_config
from mammoseg.errors import UserError
from mammoseg.fileio import sha256_of
from mammoseg.stages import ingest
from mammoseg.stages.validate import SUITE_NAME, contract, run
from mammoseg.synth import IMAGE_SIZES, scaled_size, synthesize
from tests.conftest import tree_digest

REPO = Path(__file__).resolve().parents[2]
SCALE = 0.1
SIZES = [f"{r}x{c}" for r, c in (scaled_size(rows, columns, SCALE) for rows, columns in IMAGE_SIZES)]
# The tiny dataset has its own sizes and fewer images and patients than the real INbreast.
OVERRIDES = {"allowed_sizes": SIZES, "min_images": 8, "min_patients": 3, "workers": 1}


def _params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _config(**overrides):
    return stage_config("validate", _params(), {**OVERRIDES, **overrides})


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A generated dataset: root/inbreast (files), root/manifest.parquet, root/masks."""
    root = tmp_path_factory.mktemp("clean")
    synthesize(root / "inbreast", cases=4, seed=0, scale=SCALE, workers=1)
    result = ingest.run(stage_config("ingest", _params(), {"workers": 1}), root / "inbreast",
                        root / "manifest.parquet", root / "masks")
    manifest = pd.read_parquet(result.manifest)
    # The faults below need these kinds of images; a generator change that drops one must say so.
    assert result.rejected == 0 and len(manifest) >= 8 and manifest["patient_id"].nunique() >= 3
    assert (manifest["n_mass"] > 0).any() and (manifest["n_calcification"] > 0).any()
    assert (manifest["birads"] == "1").any() and (manifest["n_mass"] == 0).any()
    return root


class Dataset:
    """A private copy of the clean dataset, with helpers that break it one way.

    The copy needs no edit to be read where it lies: the manifest names its DICOMs inside the INbreast
    folder, which validate gets as an argument.
    """

    def __init__(self, clean: Path, tmp_path: Path) -> None:
        self.root = tmp_path / "data"
        shutil.copytree(clean, self.root)
        self.inbreast = self.root / "inbreast"
        self.manifest_path = self.root / "manifest.parquet"
        self.manifest = pd.read_parquet(self.manifest_path)

    def save(self, manifest: pd.DataFrame | None = None) -> None:
        frame = self.manifest if manifest is None else manifest
        frame.astype(ingest.MANIFEST_COLUMNS).to_parquet(self.manifest_path, index=False)

    def image(self, query: str) -> str:
        """The first image id whose manifest row matches a pandas query."""
        return str(self.manifest.query(query)["image_id"].iloc[0])

    def row(self, image_id: str) -> int:
        return int(self.manifest.index[self.manifest["image_id"] == image_id][0])

    def relative(self, image_id: str) -> str:
        """The DICOM's path as the manifest and the report store it: inside the INbreast folder."""
        return str(self.manifest.at[self.row(image_id), "dicom_path"])

    def dicom(self, image_id: str) -> Path:
        return self.inbreast / self.relative(image_id)

    def set(self, image_id: str, **values) -> None:
        for column, value in values.items():
            self.manifest.at[self.row(image_id), column] = value
        self.save()

    def rewrite_dicom(self, image_id: str, shape: tuple[int, int] | None = None, **attributes) -> None:
        """Change one DICOM (attributes, or crop to shape); record its new sha256 and size in the manifest."""
        path = self.dicom(image_id)
        ds = pydicom.dcmread(path)
        if shape is not None:
            ds.PixelData = np.ascontiguousarray(ds.pixel_array[: shape[0], : shape[1]]).tobytes()
            ds.Rows, ds.Columns = shape
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
        self.set(image_id, dicom_sha256=sha256_of(path), rows=int(ds.Rows), columns=int(ds.Columns))


def _validate(dataset: Dataset, caplog, **overrides):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mammoseg"):
        result = run(_config(**overrides), dataset.inbreast, dataset.manifest_path, dataset.root.parent / "report")
    summary = json.loads(result.summary.read_text())
    return result, summary, {f["name"]: f for f in summary["failed"]}


@pytest.mark.slow
def test_clean_dataset_passes_and_the_report_reads(clean, tmp_path, caplog):
    dataset = Dataset(clean, tmp_path)
    result, summary, failed = _validate(dataset, caplog, workers=2)
    assert result.exit_code == 0 and result.success, summary["failed"]
    assert all(f["severity"] == "warning" for f in failed.values())  # synth copies INbreast's quirks
    counts = summary["counts"]
    assert counts["images"] == len(dataset.manifest) and counts["patients"] == 4
    assert counts["expectations_evaluated"] == len(contract(_config())) and counts["failed_critical"] == 0
    report = tmp_path / "report"
    index = (report / "data_docs" / "index.html").read_text()
    assert SUITE_NAME in index and f"validations/{SUITE_NAME}/" in index
    (page,) = (report / "data_docs" / "validations").rglob("*.html")
    text = page.read_text()
    assert SUITE_NAME in text and "birads_known" in text and "Succeeded" in text
    own = (report / "index.html").read_text()
    assert "PASSED" in own and SUITE_NAME in own and page.relative_to(report).as_posix() in own

    # A second run rewrites the report completely and leaves no temporary folders behind.
    dataset.set(dataset.image("birads == '2' or birads == '3'"), birads="7")
    result, _, failed = _validate(dataset, caplog)
    assert result.exit_code == 1 and "birads_known" in failed
    assert len(list((report / "data_docs" / "validations").rglob("*.html"))) == 1
    assert "FAILED" in (report / "index.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "report", "report.last-passing"]


def _corrupt_header(dataset: Dataset, image_id: str) -> None:
    path = dataset.dicom(image_id)
    data = bytearray(path.read_bytes())
    data[:400] = b"\xff" * 400  # preamble, DICM prefix and file meta: unreadable
    path.write_bytes(bytes(data))


def _corrupt_pixels(dataset: Dataset, image_id: str) -> None:
    path = dataset.dicom(image_id)
    data = bytearray(path.read_bytes())
    data[-100:] = b"\x00" * 100  # still a valid DICOM, different content
    path.write_bytes(bytes(data))


def _to_8_bit(dataset: Dataset, image_id: str) -> None:
    """Rewrite one DICOM as an 8-bit export: the top 8 of its 12 bits, BitsAllocated = BitsStored = 8."""
    pixels = pydicom.dcmread(dataset.dicom(image_id)).pixel_array
    dataset.rewrite_dicom(image_id, BitsAllocated=8, BitsStored=8, HighBit=7,
                          PixelData=(pixels >> 4).astype(np.uint8).tobytes())


def _duplicate(dataset: Dataset, image_id: str) -> None:
    dataset.save(pd.concat([dataset.manifest, dataset.manifest.iloc[[dataset.row(image_id)]]],
                           ignore_index=True))


# (fault, which image, how to break it, the expectations that must fail)
FAULTS = [
    ("duplicate_id", "n_mass > 0", _duplicate, ["image_id_unique"]),
    ("corrupt_header", "n_mass > 0", _corrupt_header, ["dicom_readable", "dicom_sha256_matches"]),
    ("corrupt_pixels", "n_mass > 0", _corrupt_pixels, ["dicom_sha256_matches"]),
    ("wrong_modality", "birads == '1'", lambda d, i: d.rewrite_dicom(i, Modality="CT"), ["modality_mg"]),
    ("patient_name", "birads == '1'", lambda d, i: d.rewrite_dicom(i, PatientName="Doe^Jane"),
     ["no_identifying_attributes"]),
    ("birth_date", "birads == '1'", lambda d, i: d.rewrite_dicom(i, PatientBirthDate="19600101"),
     ["no_identifying_attributes"]),
    ("burned_in_annotation", "birads == '1'", lambda d, i: d.rewrite_dicom(i, BurnedInAnnotation="YES"),
     ["no_burned_in_annotation"]),
    ("8_bit", "birads == '1'", _to_8_bit, ["bits_allocated_allowed", "bits_stored_in_range"]),
    ("birads_7", "birads == '1'", lambda d, i: d.set(i, birads="7"), ["birads_known"]),
    ("birads_1_with_lesion", "n_mass > 0", lambda d, i: d.set(i, birads="1"), ["birads1_no_lesion"]),
    ("lesion_without_mask", "n_mass == 0 and birads != '1'", lambda d, i: d.set(i, n_mass=1, mass_px=0),
     ["mass_has_mask"]),
    ("roi_outside_image", "n_mass > 0", lambda d, i: d.set(i, n_points_out_of_bounds=10_000),
     ["roi_points_mostly_inside"]),
    ("wrong_size", "birads == '1'", lambda d, i: d.rewrite_dicom(i, shape=(300, 200)), ["size_allowed"]),
    # 10 bits is within bits_stored_range; the generated values reach 4095.
    ("pixels_beyond_bits_stored", "birads == '1'", lambda d, i: d.rewrite_dicom(i, BitsStored=10, HighBit=9),
     ["pixel_max_within_bits_stored"]),
    ("mask_covers_image", "n_calcification > 0", lambda d, i: d.set(i, calc_px=10**6),
     ["mask_fraction_bounded"]),
]


@pytest.mark.parametrize(("fault", "query", "damage", "expected"), FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_fails_naming_the_image(clean, tmp_path, caplog, fault, query, damage, expected):
    dataset = Dataset(clean, tmp_path)
    image_id = dataset.image(query)
    damage(dataset, image_id)
    result, summary, failed = _validate(dataset, caplog)
    assert result.exit_code == 1 and not summary["success"]
    critical = {name for name, f in failed.items() if f["severity"] == "critical"}
    assert critical == set(expected), summary["failed"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for name in expected:
        assert image_id in failed[name]["image_ids"]
        assert any(line.startswith(f"FAILED critical {name} ") and image_id in line
                   for line in errors), errors
    if fault in ("patient_name", "birth_date"):
        # The report names the image, never the identifying value it caught.
        pages = [p for p in (tmp_path / "report").rglob("*") if p.suffix in (".html", ".json")]
        text = "".join(p.read_text() for p in pages)
        assert "Doe" not in text and "19600101" not in text


def _error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


def _report_text(report: Path) -> str:
    return "".join(p.read_text() for p in report.rglob("*") if p.suffix in (".html", ".json"))


def test_identifying_attribute_fails_naming_the_keyword_not_the_value(clean, tmp_path, caplog):
    dataset = Dataset(clean, tmp_path)
    image_id = dataset.image("birads == '1'")
    dataset.rewrite_dicom(image_id, InstitutionName="Hospital Elsewhere")
    result, summary, failed = _validate(dataset, caplog)
    assert result.exit_code == 1 and "no_identifying_attributes" in failed
    (image,) = failed["no_identifying_attributes"]["images"]
    assert image == {"image_id": image_id, "dicom_path": dataset.relative(image_id), "value": "InstitutionName"}
    (line,) = [line for line in _error_lines(caplog) if line.startswith("FAILED critical no_identifying_attributes ")]
    assert f"{image_id} ({dataset.dicom(image_id)}: InstitutionName)" in line
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Elsewhere" not in logged and "Elsewhere" not in _report_text(tmp_path / "report")


def test_allow_listed_attributes_pass(clean, tmp_path, caplog):
    dataset = Dataset(clean, tmp_path)
    # PatientSex is allow-listed in params.yaml (every mammogram is of a woman); InstitutionName here.
    dataset.rewrite_dicom(dataset.image("birads == '1'"), PatientSex="F")
    dataset.rewrite_dicom(dataset.image("n_mass > 0"), InstitutionName="Hospital Elsewhere")
    result, summary, failed = _validate(dataset, caplog,
                                        privacy_allowed=[*_params()["validate"]["privacy_allowed"], "InstitutionName"])
    assert result.exit_code == 0 and "no_identifying_attributes" not in failed, summary["failed"]
    assert "InstitutionName" in next(e for e in contract(_config(privacy_allowed=["InstitutionName"]))
                                     if e.name == "no_identifying_attributes").describe()


def _empty_pixel_data(dataset: Dataset, image_id: str) -> None:
    dataset.rewrite_dicom(image_id, PixelData=b"")


def _truncate(dataset: Dataset, image_id: str) -> None:
    path = dataset.dicom(image_id)
    path.write_bytes(path.read_bytes()[:-1000])


def _rows_disagree(dataset: Dataset, image_id: str) -> None:
    ds = pydicom.dcmread(dataset.dicom(image_id))
    dataset.rewrite_dicom(image_id, Rows=int(ds.Rows) - 2)


READ_ERRORS = [
    ("empty_pixel_data", _empty_pixel_data, "no pixel data (PixelData is empty)"),
    ("truncated", _truncate, "truncated file (PixelData has "),
    ("not_dicom", _corrupt_header, "not a DICOM file (no 'DICM' prefix or file meta header)"),
    ("rows_disagree", _rows_disagree, "Rows/Columns disagree with the pixel data: "),
]


@pytest.mark.parametrize(("damage", "reason"), [f[1:] for f in READ_ERRORS], ids=[f[0] for f in READ_ERRORS])
def test_unreadable_file_names_the_path_and_the_reason(clean, tmp_path, caplog, damage, reason):
    dataset = Dataset(clean, tmp_path)
    image_id = dataset.image("n_mass > 0")
    damage(dataset, image_id)
    result, summary, failed = _validate(dataset, caplog)
    assert result.exit_code == 1 and "dicom_readable" in failed
    (image,) = failed["dicom_readable"]["images"]
    assert image["image_id"] == image_id and image["dicom_path"] == dataset.relative(image_id)
    assert image["value"].startswith(reason), image
    (line,) = [line for line in _error_lines(caplog) if line.startswith("FAILED critical dicom_readable ")]
    assert f"1 image, e.g. {image_id} ({dataset.dicom(image_id)}: {reason}" in line
    assert "Error" not in image["value"]  # plain words, not a Python exception


def test_failing_run_keeps_the_last_passing_report(clean, tmp_path, caplog):
    dataset = Dataset(clean, tmp_path)
    report, kept = tmp_path / "report", tmp_path / "report.last-passing"
    result, _, _ = _validate(dataset, caplog)
    assert result.success and result.last_passing is None and not kept.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    passing = tree_digest(report)

    image_id = dataset.image("birads == '1'")
    dataset.set(image_id, birads="7")
    for _ in range(2):  # the second failure must not replace the passing report with the first failure
        result, summary, _ = _validate(dataset, caplog)
        assert not result.success and not summary["success"] and result.last_passing == kept
        assert tree_digest(kept) == passing
        assert f"previous passing report kept at {kept / 'index.html'}" in caplog.messages

    dataset.set(image_id, birads="1")
    result, _, _ = _validate(dataset, caplog)
    assert result.success and not kept.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "report"]


def test_warnings_are_reported_and_do_not_fail(clean, tmp_path, caplog):
    dataset = Dataset(clean, tmp_path)
    image_id = dataset.image("birads == '1'")
    dataset.set(image_id, birads="7")
    result, summary, failed = _validate(dataset, caplog, warnings=["birads_known", "acr_present",
                                                                   "roi_points_inside"])
    assert result.exit_code == 0 and summary["success"]
    assert failed["birads_known"]["severity"] == "warning" and summary["counts"]["failed_warning"] >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(line.startswith("FAILED warning birads_known ") and image_id in line for line in warnings)


def test_bad_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        run(_config(), tmp_path, tmp_path / "missing.parquet", tmp_path / "report")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="bad.parquet: not a readable Parquet manifest"):
        run(_config(), tmp_path, tmp_path / "bad.parquet", tmp_path / "report")
    pd.DataFrame({"image_id": ["20586908"]}).to_parquet(tmp_path / "short.parquet")
    with pytest.raises(UserError, match="short.parquet: missing manifest column"):
        run(_config(), tmp_path, tmp_path / "short.parquet", tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_wrong_inbreast_folder_is_a_user_error(clean, tmp_path, caplog):
    dataset = Dataset(clean, tmp_path)
    report = tmp_path / "report"
    with pytest.raises(UserError, match=f"^{tmp_path / 'nowhere'}: INbreast folder not found"):
        run(_config(), tmp_path / "nowhere", dataset.manifest_path, report)
    (tmp_path / "empty").mkdir()
    first = str(dataset.manifest["dicom_path"].iloc[0])
    with pytest.raises(UserError) as error:  # every file missing: the folder is wrong, not the data
        run(_config(), tmp_path / "empty", dataset.manifest_path, report)
    assert str(error.value) == (f"{dataset.manifest_path}: none of its {len(dataset.manifest)} DICOMs is in "
                                f"{tmp_path / 'empty'} (e.g. {first}): is --inbreast the folder ingest read?")
    # A manifest from before relative paths is refused, not read from wherever it once pointed.
    dataset.manifest["dicom_path"] = [str(dataset.inbreast / path) for path in dataset.manifest["dicom_path"]]
    dataset.save()
    with pytest.raises(UserError, match="is not a path inside the INbreast folder"):
        run(_config(), dataset.inbreast, dataset.manifest_path, report)
    assert not report.exists()


def test_one_missing_dicom_fails_the_contract_naming_it(clean, tmp_path, caplog):
    dataset = Dataset(clean, tmp_path)
    image_id = dataset.image("n_mass > 0")
    dataset.dicom(image_id).unlink()
    result, summary, failed = _validate(dataset, caplog)
    assert result.exit_code == 1 and "dicom_readable" in failed
    (image,) = failed["dicom_readable"]["images"]
    assert image == {"image_id": image_id, "dicom_path": dataset.relative(image_id), "value": "file not found"}
    assert summary["manifest"] == "manifest.parquet" and summary["manifest_sha256"] == sha256_of(dataset.manifest_path)
    # The log names the file where the user can open it: under the folder as given.
    (line,) = [line for line in _error_lines(caplog) if line.startswith("FAILED critical dicom_readable ")]
    assert f"{image_id} ({dataset.dicom(image_id)}: file not found)" in line


@pytest.mark.parametrize(("overrides", "message"), [
    ({"allowed_sizes": ["333x"]}, "allowed size '333x' is not ROWSxCOLUMNS"),
    ({"warnings": ["no_such_rule"]}, "unknown expectation.*no_such_rule"),
    ({"privacy_allowed": ["PatientNme"]}, "privacy_allowed names 'PatientNme', which is not a DICOM keyword"),
    ({"privacy_allowed": ["Modality"]}, "'Modality', which the privacy rule does not check"),
    ({"bits_stored_range": [16, 10]}, r"bits_stored_range \[16, 10\] is not \[min, max\]"),
])
def test_bad_config_is_a_user_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run(_config(**overrides), tmp_path, tmp_path / "missing.parquet", tmp_path / "report")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mammoseg.cli", "validate", *args],
                          capture_output=True, text=True, cwd=REPO, check=False)


@pytest.mark.slow
def test_cli_exit_codes(clean, tmp_path):
    dataset = Dataset(clean, tmp_path)
    image_id = dataset.image("birads == '1'")
    dataset.set(image_id, birads="7")
    proc = _cli("--inbreast", str(dataset.inbreast), "--manifest", str(dataset.manifest_path),
                "--report-out", str(tmp_path / "report"),
                "--allowed-sizes", *SIZES, "--min-images", "8", "--min-patients", "3")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "FAILED critical" in line]
    assert len(failed) == 1 and "birads_known expect_column_values_to_be_in_set(birads)" in failed[0]
    assert f"1 image, e.g. {image_id}" in failed[0]

    proc = _cli("--inbreast", str(dataset.inbreast), "--manifest", str(tmp_path / "nope.parquet"),
                "--report-out", str(tmp_path / "report"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mammoseg: error: {tmp_path / 'nope.parquet'}: manifest not found"]
