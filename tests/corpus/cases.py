"""The bad-input corpus: each case breaks one thing of a good generated dataset or of a stage's inputs.

A case runs the real command line (`python -m mammoseg.cli`, a subprocess, so a traceback or an exit
code is what a user would see) through the stages in order, each writing into a folder pre-filled with
the good output of that stage. The first stage that exits non-zero must:

- print a line that names the broken file (or option) and matches the case's problem pattern,
- print no Python traceback,
- leave its pre-filled good output byte-identical (validate keeps the last passing report beside the
  failing one, at `<report>.last-passing`; that copy is what is compared).

A case that every stage accepts is a silent success, unless the case expects success (register twice).
`python -m tests.corpus` runs every case and prints the totals table quoted in the issue notes.
"""

from __future__ import annotations

import dataclasses
import os
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

from tests.conftest import tree_digest

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = REPO_ROOT / "params.yaml"
# Generated data at --scale 0.1 has these two sizes; the corpus datasets are small on purpose.
VALIDATE_FLAGS = ["--allowed-sizes", "332x256", "408x332", "--min-images", "1", "--min-patients", "1",
                  "--workers", "1"]
PREPROCESS_FLAGS = ["--size", "128", "--workers", "1"]
INGEST_FLAGS = ["--workers", "1"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a case's inputs and pre-filled outputs live (one folder per case)."""

    root: Path

    @property
    def inbreast(self) -> Path:
        return self.root / "inbreast"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    def dicoms(self) -> list[Path]:
        return sorted((self.inbreast / "AllDICOMs").glob("*.dcm"))

    def xmls(self) -> list[Path]:
        return sorted((self.inbreast / "AllXML").glob("*.xml"))

    @property
    def csv(self) -> Path:
        return self.inbreast / "INbreast.csv"

    def manifest_args(self) -> list[str]:
        """The flags validate and preprocess read ingest's output by: the manifest and the raw folder it names."""
        return ["--inbreast", str(self.inbreast), "--manifest", str(self.manifest)]


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a case: its arguments and the output it must not damage when it fails."""

    stage: str
    argv: list[str]
    output: list[Path]            # what the stage writes; compared before/after when it fails
    compare_after: list[Path] | None = None  # where the preserved copy is afterwards (default: output)
    env: dict[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """A broken input, the problem a user must be told of, and the commands that meet it."""

    name: str
    problem: str                  # regex the error line must match (case-insensitive)
    names: Callable[[Layout], str]  # the file (or option) the error line must name
    break_input: Callable[[Layout], None]
    steps: Callable[[Layout, dict[str, str]], list[Step]]
    expect_success: bool = False


@dataclasses.dataclass
class Outcome:
    """What a case did: which stage stopped it, how, and whether good output survived."""

    case: str
    stage: str | None
    exit_code: int
    clear: bool
    traceback: bool
    data_lost: bool
    message: str

    @property
    def silent_success(self) -> bool:
        return self.stage is None


# --- the stage chains ----------------------------------------------------------------------------------

def data_steps(layout: Layout, env: dict[str, str]) -> list[Step]:
    """ingest -> validate -> preprocess, each into its pre-filled good output."""
    last_passing = layout.report.with_name(layout.report.name + ".last-passing")
    return [
        Step("ingest", ["ingest", "--inbreast", str(layout.inbreast), "--manifest-out", str(layout.manifest),
                        "--masks-out", str(layout.masks), *INGEST_FLAGS],
             [layout.manifest, layout.masks, layout.manifest.with_name("manifest.rejected.csv")]),
        Step("validate", ["validate", *layout.manifest_args(), "--report-out", str(layout.report),
                          *VALIDATE_FLAGS], [layout.report], [last_passing]),
        Step("preprocess", ["preprocess", *layout.manifest_args(), "--masks", str(layout.masks),
                            "--dataset-out", str(layout.dataset), *PREPROCESS_FLAGS], [layout.dataset]),
    ]


def _preprocess_with(*flags: str) -> Callable[[Layout, dict[str, str]], list[Step]]:
    def steps(layout: Layout, env: dict[str, str]) -> list[Step]:
        return [Step("preprocess", ["preprocess", *layout.manifest_args(), "--masks", str(layout.masks),
                                    "--dataset-out", str(layout.dataset), *PREPROCESS_FLAGS, *flags],
                     [layout.dataset])]
    return steps


def _preprocess_with_params(params: str) -> Callable[[Layout, dict[str, str]], list[Step]]:
    def steps(layout: Layout, env: dict[str, str]) -> list[Step]:
        return [Step("preprocess", [f"--params={params}", "preprocess", *layout.manifest_args(),
                                    "--masks", str(layout.masks), "--dataset-out", str(layout.dataset),
                                    *PREPROCESS_FLAGS], [layout.dataset])]
    return steps


# --- breaking DICOMs -----------------------------------------------------------------------------------

def _first_dicom(layout: Layout) -> Path:
    return layout.dicoms()[0]


def _edit_dicom(edit: Callable[[pydicom.Dataset], None]) -> Callable[[Layout], None]:
    def apply(layout: Layout) -> None:
        path = _first_dicom(layout)
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)
    return apply


def _truncate(layout: Layout) -> None:
    path = _first_dicom(layout)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_dicom(layout: Layout) -> None:
    _first_dicom(layout).write_text("this is a scanned request form, not a DICOM file\n")


def _empty_pixels(ds: pydicom.Dataset) -> None:
    ds.PixelData = b""


def _ct(ds: pydicom.Dataset) -> None:
    ds.Modality = "CT"


def _rgb(ds: pydicom.Dataset) -> None:
    grey = (ds.pixel_array >> 4).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()


def _eight_bit(ds: pydicom.Dataset) -> None:
    pixels = (ds.pixel_array >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixels.tobytes()


def _above_bits_stored(ds: pydicom.Dataset) -> None:
    pixels = ds.pixel_array.copy()
    pixels[: pixels.shape[0] // 4] = 40000  # BitsStored 12: nothing above 4095 is a valid value
    ds.PixelData = pixels.tobytes()


def _rows_disagree(ds: pydicom.Dataset) -> None:
    ds.Rows = int(ds.Rows) + 16


def _patient_name(ds: pydicom.Dataset) -> None:
    ds.PatientName = "Doe^Jane"


def _institution(ds: pydicom.Dataset) -> None:
    ds.InstitutionName = "St Elsewhere Breast Centre"


def _duplicate_id(layout: Layout) -> None:
    genuine = _first_dicom(layout)
    tokens = genuine.name.split("_")
    tokens[1] = "0123456789abcdef"  # another patient's hash, the same image id
    shutil.copy2(genuine, genuine.with_name("_".join(tokens)))


def _empty_alldicoms(layout: Layout) -> None:
    for path in layout.dicoms():
        path.unlink()


# --- breaking XML and the CSV --------------------------------------------------------------------------

def _first_xml(layout: Layout) -> Path:
    return layout.xmls()[0]


def _edit_plist(edit: Callable[[dict], None]) -> Callable[[Layout], None]:
    def apply(layout: Layout) -> None:
        path = _first_xml(layout)
        with path.open("rb") as handle:
            plist = plistlib.load(handle)
        edit(plist["Images"][0]["ROIs"][0])
        with path.open("wb") as handle:
            plistlib.dump(plist, handle)
    return apply


def _zero_points(roi: dict) -> None:
    roi["Point_px"], roi["Point_mm"], roi["NumberOfPoints"] = [], [], 0


def _malformed_point(roi: dict) -> None:
    roi["Point_px"][0] = "(1.5.6, 200)"


def _truncate_plist(layout: Layout) -> None:
    path = _first_xml(layout)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _csv_edit(edit: Callable[[bytes], bytes]) -> Callable[[Layout], None]:
    def apply(layout: Layout) -> None:
        layout.csv.write_bytes(edit(layout.csv.read_bytes()))
    return apply


def _drop_birads_column(data: bytes) -> bytes:
    lines = data.decode("ascii").splitlines(keepends=True)
    return "".join(";".join(line.rstrip("\r\n").split(";")[:-1]) + "\n" for line in lines).encode()


def _duplicate_row(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join([*lines, lines[1]])


def _remove_csv(layout: Layout) -> None:
    layout.csv.unlink()


def _first_dicom_name(layout: Layout) -> str:
    return _first_dicom(layout).name


def _first_image_id(layout: Layout) -> str:
    return _first_dicom(layout).name.split("_")[0]


def _first_xml_name(layout: Layout) -> str:
    return _first_xml(layout).name


def _csv_name(layout: Layout) -> str:
    return "INbreast.csv"


def _dicom_case(name: str, problem: str, edit: Callable[[pydicom.Dataset], None] | Callable[[Layout], None],
                whole_file: bool = False) -> Case:
    return Case(name, problem, _first_dicom_name, edit if whole_file else _edit_dicom(edit), data_steps)


CASES: list[Case] = [
    _dicom_case("truncated_dicom", r"truncat|ends|incomplete|short", _truncate, whole_file=True),
    _dicom_case("zero_length_pixel_data", r"no pixel data|pixeldata is empty|pixel data", _empty_pixels),
    _dicom_case("not_dicom", r"not a dicom|not dicom", _not_dicom, whole_file=True),
    _dicom_case("ct_modality", r"modality", _ct),
    _dicom_case("rgb", r"rgb|photometric|samplesperpixel|samples per pixel", _rgb),
    _dicom_case("eight_bit", r"bitsallocated|bits allocated|8-bit|bit", _eight_bit),
    _dicom_case("values_above_bits_stored", r"bitsstored|bits stored|bits_stored", _above_bits_stored),
    _dicom_case("rows_disagree_with_pixels", r"rows|pixel data|length|size", _rows_disagree),
    _dicom_case("patient_name", r"PatientName", _patient_name),
    _dicom_case("institution_name", r"InstitutionName", _institution),
    Case("duplicate_image_id", r"duplicate|same image id|share", _first_dicom_name, _duplicate_id, data_steps),
    Case("empty_alldicoms", r"AllDICOMs|no \.dcm|no dicom|empty", lambda layout: "AllDICOMs",
         _empty_alldicoms, data_steps),
    Case("truncated_plist", r"plist|xml", _first_xml_name, _truncate_plist, data_steps),
    Case("roi_with_zero_points", r"no points|0 points|zero points|empty", _first_xml_name,
         _edit_plist(_zero_points), data_steps),
    Case("malformed_point", r"Point_px|point", _first_xml_name, _edit_plist(_malformed_point), data_steps),
    Case("csv_missing_column", r"column", _csv_name, _csv_edit(_drop_birads_column), data_steps),
    Case("csv_utf16", r"utf-16", _csv_name, _csv_edit(lambda data: data.decode("ascii").encode("utf-16")),
         data_steps),
    Case("csv_byte_order_mark", r"byte-order mark|BOM", _csv_name, _csv_edit(lambda data: b"\xef\xbb\xbf" + data),
         data_steps),
    Case("csv_duplicate_row", r"duplicate|twice|more than once", _csv_name, _csv_edit(_duplicate_row), data_steps),
    Case("missing_csv", r"INbreast\.csv|INbreast\.xls|table", _csv_name, _remove_csv, data_steps),
    Case("negative_size", r"positive|must be", lambda layout: "size", lambda layout: None,
         _preprocess_with("--size", "-128")),
    Case("odd_size", r"multiple", lambda layout: "size", lambda layout: None, _preprocess_with("--size", "129")),
    Case("params_file_missing", r"params file not found", lambda layout: "nowhere.yaml", lambda layout: None,
         _preprocess_with_params("/no/such/dir/nowhere.yaml")),
]


# --- running a case ------------------------------------------------------------------------------------

def digest(paths: list[Path]) -> list[dict[str, str]]:
    """The tree digest of each output, in order (a preserved copy elsewhere compares position-wise)."""
    return [tree_digest(path) for path in paths]


def run_cli(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `mammoseg ARGV` as a user would (default params file unless ARGV names one)."""
    params = [] if any(a.startswith("--params") for a in argv) else ["--params", str(PARAMS)]
    return subprocess.run([sys.executable, "-m", "mammoseg.cli", *params, *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=timeout, check=False)


def run_case(case: Case, layout: Layout, env: dict[str, str]) -> Outcome:
    """Break the inputs in layout, run the case's commands, and judge what the first failure did."""
    case.break_input(layout)
    return run_steps(case.name, case.steps(layout, env), case.names(layout), case.problem, env,
                     case.expect_success)


def run_steps(name: str, steps: list[Step], names: str, problem: str, env: dict[str, str],
              expect_success: bool = False) -> Outcome:
    """Run steps in order until one fails; judge its message, traceback and the output it kept.

    Args:
        name: the case's name, for the report.
        steps: the commands, each with the output it must leave intact when it fails.
        names: text (a file name, a path, an option) the error line must contain.
        problem: regex (case-insensitive) the same line must match.
        env: extra environment for every command.
        expect_success: the case is unusual but valid: every step must succeed.
    """
    for step in steps:
        before = digest(step.output)
        result = run_cli(step.argv, {**env, **(step.env or {})})
        if result.returncode == 0:
            continue
        after = digest(step.compare_after or step.output)
        text = result.stdout + result.stderr
        lines = [line for line in text.splitlines()
                 if names in line and re.search(problem, line, re.IGNORECASE)]
        last = text.strip().splitlines()[-1] if text.strip() else ""
        return Outcome(name, step.stage, result.returncode, clear=bool(lines) and not expect_success,
                       traceback="Traceback (most recent call last)" in text, data_lost=after != before,
                       message=lines[0] if lines else last)
    return Outcome(name, None, 0, clear=expect_success, traceback=False, data_lost=False,
                   message="every step succeeded")


def totals(outcomes: list[Outcome]) -> str:
    """The table the issue asks for: cases, clear errors, tracebacks, silent successes, data lost."""
    rows = [("cases", len(outcomes)),
            ("clear errors", sum(o.clear and not o.silent_success for o in outcomes)),
            ("expected successes", sum(o.clear and o.silent_success for o in outcomes)),
            ("tracebacks", sum(o.traceback for o in outcomes)),
            ("silent successes", sum(o.silent_success and not o.clear for o in outcomes)),
            ("unclear messages", sum(not o.clear and not o.silent_success for o in outcomes)),
            ("data lost", sum(o.data_lost for o in outcomes))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>4}" for name, value in rows)
