"""Ingest on hand-built INbreast folders: manifest contents, masks, rejections, errors."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mammoseg.config import stage_config
from mammoseg.data import mask_path
from mammoseg.errors import UserError
from mammoseg.stages.ingest import MANIFEST_COLUMNS, rejected_list_path, run

REPO = Path(__file__).resolve().parents[2]
PATIENT_A = "6c613a14b80a8591"
PATIENT_B = "069212ec65a94339"
PATIENT_COPY = "0000000000000000"  # sorts before PATIENT_A, as the stray copy in the bug report did


@pytest.fixture
def config():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return stage_config("ingest", params, {"workers": 1})


def _two_patient_folder(folder):
    square = [(10.0, 10.0), (19.0, 10.0), (19.0, 19.0), (10.0, 19.0)]
    folder.add("20586908", PATIENT_A, "R", "CC", birads="5",
               rois=[("Mass", 15, square), ("Calcification", 19, [(30.2, 40.7)]),
                     ("Cluster", 9, [(25, 35), (35, 35), (35, 45)])])
    folder.add("20586960", PATIENT_A, "R", "MLO", birads="1")  # normal: no XML
    folder.add("22678646", PATIENT_B, "L", "CC", birads="4a", acr=" " * 193,
               rois=[("Spiculated Region", 9, [(40.0, 50.0), (60.0, 50.0), (60.0, 60.0), (40.0, 60.0)]),
                     ("Nodule?", 15, [(1, 1), (2, 2), (3, 1)])])
    folder.write_csv()
    return folder


def test_manifest_and_masks(inbreast_folder, tmp_path, config, caplog):
    folder = _two_patient_folder(inbreast_folder)
    result = run(config, folder.root, tmp_path / "out" / "manifest.parquet", tmp_path / "out" / "masks")
    manifest = pd.read_parquet(result.manifest)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest["image_id"].tolist() == ["20586908", "20586960", "22678646"]
    first, normal, spiculated = manifest.itertuples()
    assert (first.patient_id, first.laterality, first.view, first.birads) == (PATIENT_A, "R", "CC", "5")
    assert (first.n_mass, first.n_calcification, first.n_other) == (1, 1, 1)
    assert first.mass_px == 100 and first.calc_px == 37  # 10x10 square; radius-3 disc (centres within 3.5 px)
    assert normal.view == "MLO" and normal.n_mass + normal.n_calcification + normal.mass_px == 0
    assert pd.isna(spiculated.acr) and spiculated.n_mass == 1 and spiculated.n_other == 1
    assert spiculated.n_points_out_of_bounds == 2 and spiculated.mass_px == 11 * 8  # clipped at x = 47
    assert (first.rows, first.columns) == (64, 48)
    # Named inside the INbreast folder, never by an absolute path (validate and preprocess join them).
    assert first.dicom_path == f"AllDICOMs/20586908_{PATIENT_A}_MG_R_CC_ANON.dcm"
    assert len(first.dicom_sha256) == 64 and (folder.root / first.dicom_path).is_file()
    mass = np.array(Image.open(mask_path(result.masks_dir, "20586908", "mass")))
    assert mass.dtype == bool and mass.shape == (64, 48) and mass[10:20, 10:20].all() and mass.sum() == 100
    calc = np.array(Image.open(mask_path(result.masks_dir, "20586908", "calcification")))
    assert calc[41, 30] and calc.sum() == 37
    assert "'Nodule?' is not in params.yaml" in caplog.text
    assert result.rejected == 0 and pd.read_csv(result.rejected_list).empty


def test_rejects_what_is_bad_and_keeps_the_rest(inbreast_folder, tmp_path, config):
    folder = _two_patient_folder(inbreast_folder)
    folder.add("30000001", PATIENT_B, "L", "MLO", csv_row=False)              # DICOM without a row
    folder.add("30000002", PATIENT_B, "R", "CC", dicom=False)                 # row without a DICOM
    folder.add("30000003", PATIENT_B, "R", "MLO", rois=[])                     # XML replaced below
    (folder.root / "AllXML" / "30000003.xml").write_text("<plist><dict>")
    folder.add("30000004", PATIENT_B, "L", "CC", file_view="ML")               # name disagrees
    bad = folder.add("30000005", PATIENT_B, "L", "CC")
    bad.write_bytes(b"not a dicom")                                            # not DICOM at all
    (folder.root / "AllDICOMs" / "readme_MG.dcm").write_bytes(b"")             # bad file name
    folder.add("30000006", PATIENT_B, "R", "MLO", rois=[("Calcification", 19, [(7.0, 8.0)])])
    xml = folder.root / "AllXML" / "30000006.xml"                              # malformed point
    xml.write_text(xml.read_text().replace("(7.000000, 8.000000)", "(1.5.6, 200)"))
    folder.add("30000007", PATIENT_B, "L", "MLO", rois=[("Mass", 15, [])])     # ROI without points
    folder.write_csv()
    result = run(config, folder.root, tmp_path / "manifest.parquet", tmp_path / "masks")
    assert result.images == 3
    rejected = pd.read_csv(rejected_list_path(tmp_path / "manifest.parquet"), dtype=str).fillna("")
    reasons = dict(zip(rejected["image_id"], rejected["reason"], strict=True))
    assert "no row for image id 30000001" in reasons["30000001"]
    assert "has no DICOM file" in reasons["30000002"]
    assert "30000003.xml: not a readable plist" in reasons["30000003"]
    assert "file name says L MLO, the table says L CC" in reasons["30000004"]
    assert "not a DICOM file" in reasons["30000005"]
    assert "file name is not" in reasons[""]
    # Stored inside the INbreast folder, as every path in the list.
    assert reasons["30000006"] == ("AllXML/30000006.xml: ROI 0 ('Calcification'): "
                                   "Point_px[0] '(1.5.6, 200)' is not a point '(x, y)'")
    # The row without a DICOM names the folder; the others their files.
    assert {"AllDICOMs", "AllDICOMs/readme_MG.dcm"} <= set(rejected["file"])
    assert all(not Path(file).is_absolute() and (folder.root / file).exists() for file in rejected["file"])
    assert "30000007.xml: ROI 0 ('Mass'): Point_px is empty" in reasons["30000007"]
    for image_id in ("30000003", "30000006", "30000007"):
        assert not mask_path(tmp_path / "masks", image_id, "calcification").exists()


def _rejections_by_file(manifest: Path) -> dict[str, str]:
    """The rejected list as {file: reason}; files are named inside the INbreast folder (AllDICOMs/...)."""
    rejected = pd.read_csv(rejected_list_path(manifest), dtype=str).fillna("")
    return dict(zip(rejected["file"], rejected["reason"], strict=True))


def _listed(path: Path) -> str:
    """How the rejected list names a file of the INbreast folder."""
    return f"AllDICOMs/{path.name}"


def test_duplicate_image_id_that_cannot_be_told_apart_rejects_every_file(inbreast_folder, tmp_path, config,
                                                                         caplog):
    folder = _two_patient_folder(inbreast_folder)
    genuine = folder.root / "AllDICOMs" / f"20586908_{PATIENT_A}_MG_R_CC_ANON.dcm"
    copy = folder.add("20586908", PATIENT_COPY, "R", "CC", csv_row=False)  # same side and view: no way to tell
    with caplog.at_level(logging.WARNING):
        result = run(config, folder.root, tmp_path / "manifest.parquet", tmp_path / "masks")
    manifest = pd.read_parquet(result.manifest)
    assert manifest["image_id"].tolist() == ["20586960", "22678646"]
    assert set(manifest["patient_id"]) == {PATIENT_A, PATIENT_B}  # no patient made up by the copy
    reasons = _rejections_by_file(result.manifest)
    assert set(reasons) == {_listed(genuine), _listed(copy)}  # one row per file, no "row without a DICOM"
    assert reasons[_listed(genuine)] == (f"image id 20586908 is also used by {copy.name}; cannot tell which file is "
                                     "the image (all of them match the table row (R CC)), all rejected")
    assert genuine.name in reasons[_listed(copy)] and "all rejected" in reasons[_listed(copy)]
    summary = [r.getMessage() for r in caplog.records if "is used by 2 DICOM files" in r.getMessage()]
    assert summary == [f"image id 20586908 is used by 2 DICOM files ({copy.name}, {genuine.name}): all rejected, "
                       "all of them match the table row (R CC)"]


def test_duplicate_image_id_keeps_the_only_file_that_matches_the_table(inbreast_folder, tmp_path, config, caplog):
    folder = _two_patient_folder(inbreast_folder)
    genuine = folder.root / "AllDICOMs" / f"20586908_{PATIENT_A}_MG_R_CC_ANON.dcm"
    copy = folder.add("20586908", PATIENT_COPY, "L", "MLO", csv_row=False)  # the table says R CC
    with caplog.at_level(logging.WARNING):
        result = run(config, folder.root, tmp_path / "manifest.parquet", tmp_path / "masks")
    manifest = pd.read_parquet(result.manifest).set_index("image_id")
    assert manifest.loc["20586908", "patient_id"] == PATIENT_A and manifest.loc["20586908", "n_mass"] == 1
    assert manifest.loc["20586908", "dicom_path"] == _listed(genuine)
    assert _rejections_by_file(result.manifest) == {_listed(copy): (
        f"image id 20586908 is also used by {genuine.name}, kept because it matches the table row (R CC); "
        "this file says L MLO")}
    summary = [r.getMessage() for r in caplog.records if "is used by 2 DICOM files" in r.getMessage()]
    assert summary == [f"image id 20586908 is used by 2 DICOM files ({copy.name}, {genuine.name}): kept "
                       f"{genuine.name}, the only one that matches the table row (R CC)"]


def _without_csv(folder):
    (folder.root / "INbreast.csv").unlink()


def _without_dicoms(folder):
    for path in (folder.root / "AllDICOMs").iterdir():
        path.unlink()


def _csv_with_bom(folder):
    path = folder.root / "INbreast.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def _csv_without_acr(folder):
    path = folder.root / "INbreast.csv"
    lines = path.read_text().split("\r\n")
    path.write_text("\r\n".join(";".join(line.split(";")[:6] + line.split(";")[7:]) for line in lines))


def _csv_with_repeated_row(folder):
    path = folder.root / "INbreast.csv"
    path.write_bytes(path.read_bytes() + path.read_bytes().split(b"\r\n")[1] + b"\r\n")


@pytest.mark.parametrize("damage, where, problem", [
    (_without_csv, "", "neither INbreast.csv nor INbreast.xls found"),
    (_without_dicoms, "/AllDICOMs", "no .dcm files (the folder is empty)"),
    (_csv_with_bom, "/INbreast.csv",
     "starts with a UTF-8 byte-order mark (Excel's 'CSV UTF-8'); save it as plain CSV"),
    (_csv_without_acr, "/INbreast.csv", "header lacks column(s) 'ACR'"),
    (_csv_with_repeated_row, "/INbreast.csv:5", "image id 20586908 appears twice (first at INbreast.csv:2)"),
])
def test_dataset_level_problems_are_one_line_errors(inbreast_folder, tmp_path, config, damage, where, problem):
    folder = _two_patient_folder(inbreast_folder)
    damage(folder)
    with pytest.raises(UserError) as info:
        run(config, folder.root, tmp_path / "manifest.parquet", tmp_path / "masks")
    message = str(info.value)
    assert message.startswith(f"{folder.root}{where}: {problem}") and "\n" not in message
    assert not (tmp_path / "manifest.parquet").exists()


def test_failure_keeps_previous_outputs(inbreast_folder, tmp_path, config):
    folder = _two_patient_folder(inbreast_folder)
    manifest, masks = tmp_path / "manifest.parquet", tmp_path / "masks"
    run(config, folder.root, manifest, masks)
    before = manifest.read_bytes()
    (folder.root / "INbreast.csv").write_bytes(b"garbage\r\n")
    with pytest.raises(UserError, match="INbreast.csv: header"):
        run(config, folder.root, manifest, masks)
    assert manifest.read_bytes() == before
    assert mask_path(masks, "20586908", "mass").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parallel_workers_give_the_same_manifest(inbreast_folder, tmp_path, config):
    folder = _two_patient_folder(inbreast_folder)
    one = run(config, folder.root, tmp_path / "a.parquet", tmp_path / "a")
    two = run(stage_config("ingest", {"ingest": {**config.__dict__, "workers": 2}}), folder.root,
              tmp_path / "b.parquet", tmp_path / "b")
    pd.testing.assert_frame_equal(pd.read_parquet(one.manifest), pd.read_parquet(two.manifest))


def _empty_folder(inbreast_folder, tmp_path) -> tuple[Path, str]:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", f"{tmp_path / 'empty'}: no AllDICOMs/ folder (is this an INbreast Release 1.0 folder?)"


def _folder_with_bom(inbreast_folder, tmp_path) -> tuple[Path, str]:
    folder = _two_patient_folder(inbreast_folder)
    _csv_with_bom(folder)
    return folder.root, (f"{folder.root / 'INbreast.csv'}: starts with a UTF-8 byte-order mark "
                         "(Excel's 'CSV UTF-8'); save it as plain CSV")


@pytest.mark.parametrize("make", [_empty_folder, _folder_with_bom], ids=["no-alldicoms", "csv-bom"])
def test_cli_user_error_is_one_line(make, inbreast_folder, tmp_path):
    root, message = make(inbreast_folder, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "mammoseg.cli", "ingest", "--inbreast", str(root),
         "--manifest-out", str(tmp_path / "m.parquet"), "--masks-out", str(tmp_path / "masks")],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mammoseg: error: {message}"]


def test_cli_runs_ingest(inbreast_folder, tmp_path):
    folder = _two_patient_folder(inbreast_folder)
    proc = subprocess.run(
        [sys.executable, "-m", "mammoseg.cli", "ingest", "--inbreast", str(folder.root),
         "--manifest-out", str(tmp_path / "m.parquet"), "--masks-out", str(tmp_path / "masks"),
         "--point-radius-px", "0", "--workers", "1"],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert pd.read_parquet(tmp_path / "m.parquet")["calc_px"].tolist() == [1, 0, 0]
