"""The INbreast reader against hand-written fixtures of every quirk in inbreast-format.md."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mammoseg.errors import UserError
from mammoseg.inbreast import (
    LesionClassifier,
    Roi,
    parse_dicom_name,
    rasterize,
    read_rois,
    read_table,
)
from tests.conftest import csv_bytes, roi_xml

REPO = Path(__file__).resolve().parents[2]
SPEC_EXAMPLE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
\t<key>Images</key>
\t<array>
\t\t<dict>
\t\t\t<key>ImageIndex</key>
\t\t\t<integer>0</integer>
\t\t\t<key>NumberOfROIs</key>
\t\t\t<integer>2</integer>
\t\t\t<key>ROIs</key>
\t\t\t<array>
\t\t\t\t<dict>
\t\t\t\t\t<key>Area</key>
\t\t\t\t\t<real>0.011025000456720591</real>
\t\t\t\t\t<key>Center</key>
\t\t\t\t\t<string>(0.000000, 0.000000, 0.000000)</string>
\t\t\t\t\t<key>Dev</key>
\t\t\t\t\t<real>223.88203430175781</real>
\t\t\t\t\t<key>IndexInImage</key>
\t\t\t\t\t<integer>0</integer>
\t\t\t\t\t<key>Max</key>
\t\t\t\t\t<real>2741</real>
\t\t\t\t\t<key>Mean</key>
\t\t\t\t\t<real>1860.484130859375</real>
\t\t\t\t\t<key>Min</key>
\t\t\t\t\t<real>1131</real>
\t\t\t\t\t<key>Name</key>
\t\t\t\t\t<string>Mass</string>
\t\t\t\t\t<key>NumberOfPoints</key>
\t\t\t\t\t<integer>4</integer>
\t\t\t\t\t<key>Point_mm</key>
\t\t\t\t\t<array>
\t\t\t\t\t\t<string>(0.000000, 0.000000, 0.000000)</string>
\t\t\t\t\t\t<string>(0.000000, 0.000000, 0.000000)</string>
\t\t\t\t\t\t<string>(0.000000, 0.000000, 0.000000)</string>
\t\t\t\t\t\t<string>(0.000000, 0.000000, 0.000000)</string>
\t\t\t\t\t</array>
\t\t\t\t\t<key>Point_px</key>
\t\t\t\t\t<array>
\t\t\t\t\t\t<string>(207.938004, 1937.719971)</string>
\t\t\t\t\t\t<string>(97.171097, 1803.130005)</string>
\t\t\t\t\t\t<string>(231.757996, 1611.369995)</string>
\t\t\t\t\t\t<string>(401.183014, 1757.219971)</string>
\t\t\t\t\t</array>
\t\t\t\t\t<key>Total</key>
\t\t\t\t\t<real>130859016</real>
\t\t\t\t\t<key>Type</key>
\t\t\t\t\t<integer>15</integer>
\t\t\t\t</dict>
\t\t\t\t<dict>
\t\t\t\t\t<key>Area</key>
\t\t\t\t\t<real>0.0</real>
\t\t\t\t\t<key>Center</key>
\t\t\t\t\t<string>(0.000000, 0.000000, 0.000000)</string>
\t\t\t\t\t<key>Dev</key>
\t\t\t\t\t<real>0.0</real>
\t\t\t\t\t<key>IndexInImage</key>
\t\t\t\t\t<integer>1</integer>
\t\t\t\t\t<key>Max</key>
\t\t\t\t\t<real>0.0</real>
\t\t\t\t\t<key>Mean</key>
\t\t\t\t\t<real>0.0</real>
\t\t\t\t\t<key>Min</key>
\t\t\t\t\t<real>0.0</real>
\t\t\t\t\t<key>Name</key>
\t\t\t\t\t<string>Calcification</string>
\t\t\t\t\t<key>NumberOfPoints</key>
\t\t\t\t\t<integer>1</integer>
\t\t\t\t\t<key>Point_mm</key>
\t\t\t\t\t<array>
\t\t\t\t\t\t<string>(0.000000, 0.000000, 0.000000)</string>
\t\t\t\t\t</array>
\t\t\t\t\t<key>Point_px</key>
\t\t\t\t\t<array>
\t\t\t\t\t\t<string>(1803.520020, 2311.800049)</string>
\t\t\t\t\t</array>
\t\t\t\t\t<key>Total</key>
\t\t\t\t\t<real>0.0</real>
\t\t\t\t\t<key>Type</key>
\t\t\t\t\t<integer>19</integer>
\t\t\t\t</dict>
\t\t\t</array>
\t\t</dict>
\t</array>
</dict>
</plist>
"""


@pytest.fixture
def classifier() -> LesionClassifier:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return LesionClassifier(params["ingest"]["lesion_classes"])


# --- file names -------------------------------------------------------------------------------------

def test_dicom_name_maps_ml_to_mlo():
    name = parse_dicom_name(Path("20586960_6c613a14b80a8591_MG_R_ML_ANON.dcm"))
    assert (name.image_id, name.patient_id, name.laterality, name.view) == (
        "20586960", "6c613a14b80a8591", "R", "MLO")
    assert parse_dicom_name(Path("20586908_6c613a14b80a8591_MG_L_CC_ANON.dcm")).view == "CC"


@pytest.mark.parametrize("name, problem", [
    ("20586960_6c613a14b80a8591_MG_R_ML.dcm", "file name"),           # 5 tokens
    ("2058696_6c613a14b80a8591_MG_R_ML_ANON.dcm", "8 digits"),
    ("20586960_6C613A14B80A8591_MG_R_ML_ANON.dcm", "hex"),
    ("20586960_6c613a14b80a8591_MG_X_ML_ANON.dcm", "laterality"),
    ("20586960_6c613a14b80a8591_MG_R_LAT_ANON.dcm", "view"),
])
def test_bad_dicom_names_are_named_errors(name, problem):
    with pytest.raises(UserError, match=problem) as info:
        parse_dicom_name(Path(name))
    assert name in str(info.value)


# --- the table --------------------------------------------------------------------------------------

def test_csv_quirks(tmp_path):
    (tmp_path / "INbreast.csv").write_bytes(csv_bytes([
        "removed;removed;R;CC;201001;22678622;4;1",
        "removed;removed;L;MLO;200902;22678694;2;4a",
        "removed;removed;R;FB;200901;50994300;3;2",
        "removed;removed;L;CC;200901;53582540;" + " " * 193 + ";4C",
    ]))
    rows = read_table(tmp_path)
    assert rows["22678622"].birads == "1" and rows["22678622"].acr == 4
    assert rows["22678694"].view == "MLO" and rows["22678694"].birads == "4a"
    assert rows["50994300"].view == "FB"
    assert rows["53582540"].acr is None and rows["53582540"].birads == "4c"


def test_csv_accepts_lf_line_ends(tmp_path):
    (tmp_path / "INbreast.csv").write_bytes(csv_bytes(["removed;removed;R;CC;201001;22678622;4;1"])
                                            .replace(b"\r\n", b"\n"))
    assert list(read_table(tmp_path)) == ["22678622"]


@pytest.mark.parametrize("row, problem", [
    ("removed;removed;R;CC;201001;22678622;4;7", "Bi-Rads '7'"),
    ("removed;removed;R;CC;201001;22678622;5;1", "ACR '5'"),
    ("removed;removed;R;LAT;201001;22678622;4;1", "View 'LAT'"),
    ("removed;removed;R;CC;2010-01;22678622;4;1", "YYYYMM"),
    ("removed;removed;R;CC;201001;2267862;4;1", "8-digit"),
    ("removed;removed;R;CC;201001;22678622;4", "7 fields"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, row, problem):
    (tmp_path / "INbreast.csv").write_bytes(csv_bytes([row]))
    with pytest.raises(UserError, match=problem) as info:
        read_table(tmp_path)
    assert "INbreast.csv:2" in str(info.value)


def test_csv_duplicate_id_and_bad_header(tmp_path):
    row = "removed;removed;R;CC;201001;22678622;4;1"
    (tmp_path / "INbreast.csv").write_bytes(csv_bytes([row, "removed;removed;L;CC;201001;22678646;4;1", row]))
    with pytest.raises(UserError, match=re.escape(
            "INbreast.csv:4: image id 22678622 appears twice (first at INbreast.csv:2)")):
        read_table(tmp_path)
    (tmp_path / "INbreast.csv").write_bytes(b"File Name;Bi-Rads\r\n22678622;1\r\n")
    with pytest.raises(UserError, match="header"):
        read_table(tmp_path)


ONE_ROW = csv_bytes(["removed;removed;R;CC;201001;22678622;4;1"]).decode("ascii")


@pytest.mark.parametrize("data, problem", [
    (b"\xef\xbb\xbf" + ONE_ROW.encode("ascii"),
     "starts with a UTF-8 byte-order mark (Excel's 'CSV UTF-8'); save it as plain CSV"),
    (b"\xff\xfe" + ONE_ROW.encode("utf-16-le"),
     "is UTF-16 text (little-endian byte-order mark); save it as plain CSV"),
    (b"\xfe\xff" + ONE_ROW.encode("utf-16-be"), "is UTF-16 text (big-endian byte-order mark); save it as plain CSV"),
    (ONE_ROW.encode("utf-16-le"), "is UTF-16 text (little-endian, no byte-order mark); save it as plain CSV"),
    (ONE_ROW.encode("utf-16-be"), "is UTF-16 text (big-endian, no byte-order mark); save it as plain CSV"),
    (ONE_ROW.replace("removed;removed;R", "removed;removido;R").encode("ascii") + "ç\r\n".encode(),
     "not ASCII text (byte 122, 0xc3, on line 3)"),
    (ONE_ROW.replace("201001", "2010\x0001").encode("ascii"),
     "contains a NUL byte (byte 104, on line 2); not a text file"),
    (b"", "is empty"),
    (b"\r\n", "is empty"),
])
def test_csv_encoding_problems_are_named(tmp_path, data, problem):
    (tmp_path / "INbreast.csv").write_bytes(data)
    with pytest.raises(UserError) as info:
        read_table(tmp_path)
    assert str(info.value) == f"{tmp_path / 'INbreast.csv'}: {problem}"


@pytest.mark.parametrize("header, problem", [
    ("Patient ID;Patient age;Laterality;View;Acquisition date;File Name;Bi-Rads", "lacks column(s) 'ACR'"),
    ("Patient ID;Patient age;View;Acquisition date;File Name;Bi-Rads", "lacks column(s) 'Laterality', 'ACR'"),
    ("Patient ID,Patient age,Laterality,View,Acquisition date,File Name,ACR,Bi-Rads", "separated by ','"),
    ("Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads;Mass ",
     "unexpected column(s) 'Mass' (expected"),
    ("Patient ID;Patient age;View;Laterality;Acquisition date;File Name;ACR;Bi-Rads", "out of order"),
])
def test_csv_header_problems_are_named(tmp_path, header, problem):
    (tmp_path / "INbreast.csv").write_bytes(f"{header}\r\nremoved;removed;R;CC;201001;22678622;4;1\r\n".encode())
    with pytest.raises(UserError, match=re.escape(problem)) as info:
        read_table(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'INbreast.csv'}: header ")
    assert "\n" not in str(info.value)


def test_csv_without_rows_is_an_error(tmp_path):
    (tmp_path / "INbreast.csv").write_bytes(csv_bytes([]))
    with pytest.raises(UserError, match="INbreast.csv: no image rows"):
        read_table(tmp_path)


def test_missing_table_is_named(tmp_path):
    with pytest.raises(UserError, match="neither INbreast.csv nor INbreast.xls"):
        read_table(tmp_path)


def test_xls_sheet0_with_footer_when_csv_absent(tmp_path):
    xlwt = pytest.importorskip("xlwt")
    book = xlwt.Workbook()
    sheet = book.add_sheet("Sheet1")
    header = ["Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name", "ACR",
              "Bi-Rads", "Mass ", "Micros"]
    rows = [
        ["removed", "removed", "R", "CC", "201001", 22678622.0, 4.0, 1.0, "", ""],
        ["removed", "removed", "L", "MLO", "200902", 22678694.0, " " * 193, "4b", "X", "X"],
    ]
    for col, value in enumerate(header):
        sheet.write(0, col, value)
    for r, row in enumerate(rows, start=1):
        for col, value in enumerate(row):
            sheet.write(r, col, value)
    sheet.write(4, 8, 108.0)  # the totals row after a blank row (section 4.2)
    sheet.write(4, 9, 308.0)
    book.add_sheet("Sheet2").write(0, 0, "Patient ID")
    book.save(str(tmp_path / "INbreast.xls"))
    table = read_table(tmp_path)
    assert sorted(table) == ["22678622", "22678694"]
    assert table["22678622"].acr == 4 and table["22678622"].birads == "1"
    assert table["22678694"].acr is None and table["22678694"].birads == "4b"
    assert table["22678694"].acquisition_date == "200902"


# --- the XML ----------------------------------------------------------------------------------------

def test_spec_example_xml(tmp_path):
    path = tmp_path / "20587080.xml"
    path.write_text(SPEC_EXAMPLE)
    mass, calc = read_rois(path)
    assert (mass.name, mass.roi_type, len(mass.points_px)) == ("Mass", 15, 4)
    assert mass.points_px[0] == (207.938004, 1937.719971)  # x (column) first
    assert (calc.name, calc.roi_type, calc.points_px) == ("Calcification", 19, ((1803.52002, 2311.800049),))


def test_negative_and_exponent_points(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(roi_xml([("Mass", 15, [(-3.5, 10.0), (20.0, -1.25), (1e3, 5.0)])]))
    (roi,) = read_rois(path)
    assert roi.points_px == ((-3.5, 10.0), (20.0, -1.25), (1000.0, 5.0))


def _xml_with_point(text: str) -> str:
    """A two-ROI plist whose second ROI (a Calcification) has the single Point_px string `text`."""
    return roi_xml([("Mass", 15, [(1, 1), (2, 2), (3, 1)]), ("Calcification", 19, [(7.0, 8.0)])]).replace(
        "<string>(7.000000, 8.000000)</string>", f"<string>{text}</string>")


@pytest.mark.parametrize("text, point", [
    ("(1803.520020, 2311.800049)", (1803.52002, 2311.800049)),   # as OsiriX writes it
    ("(-3.5, +1e3)", (-3.5, 1000.0)),
    ("(1E-2, 2.5e+1)", (0.01, 25.0)),
    ("( 1 ,2 )", (1.0, 2.0)),
    ("(.5, 7.)", (0.5, 7.0)),
    ("{4.25, -0.5}", (4.25, -0.5)),                              # Cocoa's notation (section 2.4)
])
def test_point_forms_that_are_read(tmp_path, text, point):
    path = tmp_path / "x.xml"
    path.write_text(_xml_with_point(text))
    assert read_rois(path)[1].points_px == (point,)


@pytest.mark.parametrize("text", [
    "(1.5.6, 200)", "(1.5, 200, 3)", "(1.5 200)", "(1.5; 200)", "1.5, 200", "(1.5, 200", "(1.5, 200}",
    "(1.5, 200) 4", "(nan, 200)", "(1e999, 200)", "(0x1f, 200)", "(1_5, 200)", "(, 200)", "()", "",
])
def test_malformed_points_name_file_roi_and_text(tmp_path, text):
    path = tmp_path / "22670094.xml"
    path.write_text(_xml_with_point(text))
    with pytest.raises(UserError) as info:
        read_rois(path)
    assert str(info.value) == f"{path}: ROI 1 ('Calcification'): Point_px[0] {text!r} is not a point '(x, y)'"


def test_point_that_is_not_a_string_is_an_error(tmp_path):
    path = tmp_path / "22670094.xml"
    path.write_text(_xml_with_point("x").replace("<string>x</string>", "<integer>7</integer>"))
    with pytest.raises(UserError, match=re.escape("ROI 1 ('Calcification'): Point_px[0] 7 is not a point")):
        read_rois(path)


def test_roi_without_points_is_an_error(tmp_path):
    path = tmp_path / "22670094.xml"
    path.write_text(roi_xml([("Mass", 15, [(1, 1), (2, 2), (3, 1)]), ("Mass", 15, [])]))
    with pytest.raises(UserError) as info:
        read_rois(path)
    assert str(info.value) == f"{path}: ROI 1 ('Mass'): Point_px is empty (every OsiriX ROI has at least one point)"


@pytest.mark.parametrize("content, problem", [
    ("<plist><dict><key>Images</key>", "not a readable plist"),
    (SPEC_EXAMPLE[: len(SPEC_EXAMPLE) // 2], "not a readable plist XML, truncated or malformed"),
    ("", "not a readable plist XML, truncated or malformed (empty file)"),
    ('<?xml version="1.0"?><plist version="1.0"><dict><key>ROIPoints</key><array/></dict></plist>',
     "no Images"),
])
def test_unreadable_xml_is_named(tmp_path, content, problem):
    path = tmp_path / "22670094.xml"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(problem)) as info:
        read_rois(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


# --- lesion names and masks -------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("Mass", "mass"), (" mass ", "mass"), ("Spiculated Region", "mass"), ("Spiculated region", "mass"),
    ("Espiculated Region", "mass"), ("Calcification", "calcification"), ("Calcifications", "calcification"),
    ("Point 3", "calcification"), ("Unnamed", "calcification"), ("Cluster", "other"), ("Asymmetry", "other"),
    ("Assymetry", "other"), ("Distortion", "other"), ("Point 1", "other"), ("", "other"),
])
def test_lesion_name_table(classifier, name, expected):
    assert classifier.classify(name) == expected
    assert not classifier.unknown_names


def test_unknown_name_is_other_and_recorded(classifier):
    assert classifier.classify("Nodule?") == "other"
    assert classifier.unknown_names == {"Nodule?"}


def test_rasterize_clips_counts_and_orients(classifier):
    rois = [
        Roi("Mass", 15, ((40.0, 5.0), (60.0, 5.0), (60.0, 15.0), (40.0, 15.0))),  # runs past x = 47
        Roi("Calcification", 19, ((10.0, 20.0),)),
        Roi("Cluster", 9, ((0.0, 0.0), (5.0, 0.0), (5.0, 5.0))),
    ]
    raster = rasterize(rois, rows=32, columns=48, point_radius_px=2, classifier=classifier)
    assert raster.counts == {"mass": 1, "calcification": 1, "other": 1}
    assert raster.points_out_of_bounds == 2  # (60, 5) and (60, 15)
    assert raster.mass[5:16, 40:48].all() and raster.mass.sum() == 11 * 8
    assert raster.calcification[20, 10] and not raster.calcification[10, 20]  # x is the column
    assert raster.calcification.sum() == 21  # radius 2: pixel centres within 2.5 px (1+4+4+4+8)
    assert not raster.mass[0:6, 0:6].any() and not raster.calcification[0:6, 0:6].any()


def test_single_point_survives_at_radius_zero(classifier):
    raster = rasterize([Roi("Calcification", 19, ((3.4, 2.6),))], 8, 8, 0, classifier)
    assert np.argwhere(raster.calcification).tolist() == [[3, 3]]


def test_unknown_lesion_class_in_params_is_an_error():
    with pytest.raises(UserError, match="unknown class"):
        LesionClassifier({"tumour": ["mass"]})


def test_warns_on_points_count_mismatch(tmp_path, caplog):
    path = tmp_path / "x.xml"
    path.write_text(roi_xml([("Mass", 15, [(1, 1), (2, 2), (3, 1)])]).replace(
        "<integer>3</integer>", "<integer>4</integer>"))
    with caplog.at_level(logging.WARNING):
        read_rois(path)
    assert "declares 4 points but lists 3" in caplog.text
