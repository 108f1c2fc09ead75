"""Validate: read the manifest and the DICOMs (and ROI XMLs) it names; write a report and Data Docs.

The manifest names each DICOM relative to the INbreast folder, which validate takes as an input of its
own (`--inbreast`): the report stores those relative paths (and the manifest by name and sha256), so
it says the same wherever the folders lie; log lines name the files as given, under that folder.

The data contract is a Great Expectations suite over one table: the manifest joined with per-image
facts that need the files (sha256 actually computed, why a file is unreadable, DICOM Modality, size,
BitsAllocated, BitsStored, pixel range, the keywords of populated identifying attributes,
BurnedInAnnotation, ROI point counts). Gathering the facts is the slow part and runs in a process
pool; Great Expectations then checks the table with standard expectations, each carrying a name and
a severity. Critical failures make the stage fail (exit code 1); warnings are reported and let it
pass. Every failed expectation names the offending images (id, DICOM path and, for one-column rules,
the offending value: a reason, a size, attribute keywords, never an identifying value), in the log
for the first few and in summary.json for all.

The report folder is self-contained so the training stage can attach it to its MLflow run as is:
`summary.json` (machine-readable), `index.html` (a plain page that reads offline) and `data_docs/`
(the Great Expectations site: suite and validation-result pages, with the CSS/JS that GX loads from
CDNs copied in by `mammoseg.data_docs`, so they render offline too). A failing report replaces the
previous one (people must read it, and DVC tracks that folder); if the previous one passed, it is
kept beside it as `<report>.last-passing/` until a run passes again.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pydicom.datadict
from pydicom.errors import InvalidDicomError

from mammoseg.config import ValidateConfig
from mammoseg.data_docs import make_offline
from mammoseg.dicom import (
    IDENTIFYING_KEYWORDS,
    NOT_DICOM,
    identifying_attributes,
    missing_from_header,
    pixel_data_problem,
)
from mammoseg.errors import UserError
from mammoseg.fileio import replace_folder, sha256_of, staging_folder
from mammoseg.inbreast import BIRADS_VALUES, VIEWS, XML_DIR, read_rois
from mammoseg.parallel import run_jobs
from mammoseg.stages.ingest import MANIFEST_COLUMNS, dicom_file, rejected_list_path

log = logging.getLogger(__name__)

SUITE_NAME = "inbreast_contract"
SUMMARY_NAME = "summary.json"
INDEX_NAME = "index.html"
DATA_DOCS_DIR = "data_docs"
LAST_PASSING_SUFFIX = ".last-passing"  # <report_out>.last-passing: the last passing report, while one fails
LOG_IDS = 5  # offending images named per log line (summary.json lists them all)
# Checked by mammoseg itself, beside the Great Expectations suite: the files are not manifest rows.
# Ingest rejects a bad file and carries on (one broken file should not hide the others' problems);
# the contract is where a shrunken dataset stops the pipeline. Real INbreast ingests all 410 files.
REJECTED_RULE = "no_rejected_files"
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
# Per-image facts read from the files. `identifying_attributes` holds the keywords (never the values)
# of the populated attributes: the report must not carry the identifying data it catches.
_INT_FACTS = ("dicom_rows", "dicom_columns", "bits_allocated", "bits_stored", "pixel_min", "pixel_max",
              "pixel_floor", "pixel_ceiling", "roi_points")
FACT_COLUMNS = ("file_sha256", "read_error", "modality", "identifying_attributes", "burned_in_annotation",
                *_INT_FACTS, "xml_error")


@dataclasses.dataclass(frozen=True)
class ValidateResult:
    """What validate found and wrote."""

    success: bool
    exit_code: int
    images: int
    failed_critical: int
    failed_warning: int
    summary: Path
    report: Path
    data_docs_index: Path
    last_passing: Path | None = None  # where the previous passing report is kept while this one fails


@dataclasses.dataclass(frozen=True)
class Rule:
    """One clause of the data contract, as plain data (Great Expectations objects are built later).

    Attributes:
        name: short stable name, used in params.yaml (`warnings`), logs and summary.json.
        expectation: the Great Expectations class name, e.g. "ExpectColumnValuesToBeInSet".
        kwargs: its arguments.
        sentence: what must hold, for people reading the Data Docs.
        condition: (column, operator, value): check only the rows where this holds; None for all rows.
    """

    name: str
    expectation: str
    kwargs: dict[str, Any]
    sentence: str
    condition: tuple[str, str, Any] | None = None

    def describe(self) -> str:
        """Return the sentence, with the rows it applies to when the rule has a condition."""
        if self.condition is None:
            return self.sentence
        column, operator, value = self.condition
        return f"{self.sentence} (rows where {column} {operator} {value!r})"


@dataclasses.dataclass(frozen=True)
class _Job:
    """One manifest row's files: everything a worker needs to gather that image's facts."""

    image_id: str
    dicom_path: Path
    xml_path: Path
    privacy_allowed: tuple[str, ...]


def parse_sizes(sizes: Sequence[str]) -> list[str]:
    """Check that every allowed size is written ROWSxCOLUMNS (e.g. "3328x2560") and return them.

    Raises:
        UserError: a size is not of that form.
    """
    for size in sizes:
        if not _SIZE_RE.match(size):
            raise UserError(f"validate: allowed size {size!r} is not ROWSxCOLUMNS (e.g. 3328x2560)")
    return list(sizes)


def parse_bits_stored_range(bounds: Sequence[int]) -> tuple[int, int]:
    """Check that the BitsStored range is [min, max] with 1 <= min <= max <= 32 and return it.

    Raises:
        UserError: it is not two such numbers.
    """
    if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1] <= 32:
        raise UserError(f"validate: bits_stored_range {list(bounds)!r} is not [min, max] with 1 <= min <= max <= 32")
    return bounds[0], bounds[1]


def parse_privacy_allowed(keywords: Sequence[str]) -> list[str]:
    """Check that every allow-listed keyword is an attribute of IDENTIFYING_KEYWORDS and return them.

    Raises:
        UserError: a keyword is not a DICOM keyword, or not one the privacy rule checks.
    """
    for keyword in keywords:
        if pydicom.datadict.tag_for_keyword(keyword) is None:
            raise UserError(f"validate: privacy_allowed names {keyword!r}, which is not a DICOM keyword")
        if keyword not in IDENTIFYING_KEYWORDS:
            raise UserError(f"validate: privacy_allowed names {keyword!r}, which the privacy rule does not check "
                            "(not in mammoseg.dicom.IDENTIFYING_KEYWORDS)")
    return list(keywords)


def contract(config: ValidateConfig) -> list[Rule]:
    """Return the data contract's rules, in the order the report lists them.

    Columns named here that the manifest lacks are per-image facts (see `_image_facts`) or derived
    in `_checked_table`.
    """
    sizes = parse_sizes(config.allowed_sizes)
    bits_low, bits_high = parse_bits_stored_range(config.bits_stored_range)
    allowed = parse_privacy_allowed(config.privacy_allowed)
    bits_allocated = sorted(config.allowed_bits_allocated)
    birads = sorted(BIRADS_VALUES)
    rules = [
        # keys
        Rule("image_id_unique", "ExpectColumnValuesToBeUnique", {"column": "image_id"},
             "every image id appears once"),
        Rule("image_id_format", "ExpectColumnValuesToMatchRegex",
             {"column": "image_id", "regex": r"^\d{8}$"}, "image ids are 8 digits"),
        Rule("patient_id_format", "ExpectColumnValuesToMatchRegex",
             {"column": "patient_id", "regex": r"^[0-9a-f]{16}$"}, "patient ids are 16 lowercase hex digits"),
        Rule("laterality_known", "ExpectColumnValuesToBeInSet",
             {"column": "laterality", "value_set": ["L", "R"]}, "laterality is L or R"),
        Rule("view_known", "ExpectColumnValuesToBeInSet", {"column": "view", "value_set": sorted(VIEWS)},
             f"view is one of {', '.join(sorted(VIEWS))}"),
        Rule("birads_known", "ExpectColumnValuesToBeInSet", {"column": "birads", "value_set": birads},
             f"BI-RADS is one of INbreast's categories {', '.join(birads)}"),
        Rule("acr_range", "ExpectColumnValuesToBeInSet", {"column": "acr", "value_set": [1, 2, 3, 4]},
             "ACR breast density is 1-4 where given"),
        Rule("acr_present", "ExpectColumnValuesToNotBeNull", {"column": "acr"},
             "ACR breast density is given (INbreast has one blank)"),
        Rule("acquisition_date_format", "ExpectColumnValuesToMatchRegex",
             {"column": "acquisition_date", "regex": r"^(?:19|20)\d\d(?:0[1-9]|1[0-2])$"},
             "acquisition date is YYYYMM"),
        # files
        Rule("dicom_readable", "ExpectColumnValuesToBeNull", {"column": "read_error"},
             "the DICOM file exists and pydicom reads its header and pixels"),
        Rule("dicom_sha256_matches", "ExpectColumnPairValuesToBeEqual",
             {"column_A": "dicom_sha256", "column_B": "file_sha256"},
             "the DICOM's sha256 equals the one ingest recorded (the file has not changed)"),
        # images
        Rule("modality_mg", "ExpectColumnValuesToBeInSet", {"column": "modality", "value_set": ["MG"]},
             "DICOM Modality is MG"),
        Rule("size_allowed", "ExpectColumnValuesToBeInSet", {"column": "dicom_size", "value_set": sizes},
             f"DICOM Rows x Columns is one of {', '.join(sizes)}"),
        Rule("size_matches_manifest", "ExpectColumnPairValuesToBeEqual",
             {"column_A": "manifest_size", "column_B": "dicom_size",
              "ignore_row_if": "either_value_is_missing"},
             "the manifest's rows x columns equal the DICOM's"),
        Rule("bits_allocated_allowed", "ExpectColumnValuesToBeInSet",
             {"column": "bits_allocated", "value_set": bits_allocated},
             f"DICOM BitsAllocated is one of {', '.join(map(str, bits_allocated))}"),
        Rule("bits_stored_in_range", "ExpectColumnValuesToBeBetween",
             {"column": "bits_stored", "min_value": bits_low, "max_value": bits_high},
             f"DICOM BitsStored is {bits_low}-{bits_high}"),
        Rule("pixel_max_within_bits_stored", "ExpectColumnPairValuesAToBeGreaterThanB",
             {"column_A": "pixel_ceiling", "column_B": "pixel_max", "or_equal": True,
              "ignore_row_if": "either_value_is_missing"},
             "the largest pixel value fits in BitsStored"),
        Rule("pixel_min_within_bits_stored", "ExpectColumnPairValuesAToBeGreaterThanB",
             {"column_A": "pixel_min", "column_B": "pixel_floor", "or_equal": True,
              "ignore_row_if": "either_value_is_missing"},
             "the smallest pixel value fits in BitsStored (and PixelRepresentation)"),
        Rule("pixels_not_constant", "ExpectColumnPairValuesAToBeGreaterThanB",
             {"column_A": "pixel_max", "column_B": "pixel_min", "or_equal": False,
              "ignore_row_if": "either_value_is_missing"},
             "the image is not one constant value"),
        # annotations
        Rule("roi_xml_readable", "ExpectColumnValuesToBeNull", {"column": "xml_error"},
             "the lesion XML beside the DICOM folder, where there is one, parses"),
        Rule("birads1_no_lesion", "ExpectColumnValuesToBeInSet", {"column": "n_rois", "value_set": [0]},
             "BI-RADS 1 (normal) images have no ROI", ("birads", "==", "1")),
        Rule("mass_has_mask", "ExpectColumnValuesToBeBetween", {"column": "mass_px", "min_value": 1},
             "images with a mass ROI have a non-empty mass mask", ("n_mass", ">", 0)),
        Rule("calcification_has_mask", "ExpectColumnValuesToBeBetween", {"column": "calc_px", "min_value": 1},
             "images with a calcification ROI have a non-empty calcification mask",
             ("n_calcification", ">", 0)),
        Rule("mask_has_roi", "ExpectColumnValuesToBeInSet", {"column": "lesion_px", "value_set": [0]},
             "images without mass or calcification ROIs have empty masks", ("n_lesions", "==", 0)),
        Rule("roi_points_mostly_inside", "ExpectColumnValuesToBeBetween",
             {"column": "out_of_bounds_share", "min_value": 0.0, "max_value": config.max_out_of_bounds_share},
             f"at most {config.max_out_of_bounds_share:.0%} of an image's ROI points lie outside the image"),
        Rule("roi_points_inside", "ExpectColumnValuesToBeInSet",
             {"column": "n_points_out_of_bounds", "value_set": [0]},
             "no ROI point lies outside the image (INbreast has a few; ingest clips them)"),
        Rule("mask_fraction_bounded", "ExpectColumnValuesToBeBetween",
             {"column": "mask_fraction", "min_value": 0.0, "max_value": config.max_mask_fraction},
             f"lesion masks cover at most {config.max_mask_fraction:.0%} of the image"),
    ]
    # privacy: INbreast is anonymised; a file that is not must stop here, before any tracking server.
    rules += [
        Rule("no_identifying_attributes", "ExpectColumnValuesToBeNull", {"column": "identifying_attributes"},
             "no attribute of DICOM PS3.15's Basic Application Level Confidentiality Profile has a value"
             + (f" (allowed: {', '.join(allowed)})" if allowed else "")),
        Rule("no_burned_in_annotation", "ExpectColumnValuesToNotBeInSet",
             {"column": "burned_in_annotation", "value_set": ["YES"]},
             "BurnedInAnnotation is not YES (text burned into the pixels may identify the patient)"),
        # dataset
        Rule("min_images", "ExpectTableRowCountToBeBetween", {"min_value": config.min_images},
             f"at least {config.min_images} images"),
        Rule("min_patients", "ExpectColumnUniqueValueCountToBeBetween",
             {"column": "patient_id", "min_value": config.min_patients},
             f"at least {config.min_patients} patients"),
        Rule("mass_present", "ExpectColumnMaxToBeBetween", {"column": "mass_px", "min_value": 1},
             "some image has a mass mask"),
        Rule("calcification_present", "ExpectColumnMaxToBeBetween", {"column": "calc_px", "min_value": 1},
             "some image has a calcification mask"),
    ]
    return rules


def severities(config: ValidateConfig, rules: Sequence[Rule]) -> dict[str, str]:
    """Return each rule's severity: warning for the names in `config.warnings`, critical otherwise.

    Raises:
        UserError: `config.warnings` names a rule that does not exist.
    """
    names = [*(rule.name for rule in rules), REJECTED_RULE]
    unknown = sorted(set(config.warnings) - set(names))
    if unknown:
        raise UserError(f"validate: warnings names unknown expectation(s) {', '.join(unknown)}; "
                        f"known: {', '.join(names)}")
    return {name: "warning" if name in config.warnings else "critical" for name in names}


def _image_facts(job: _Job) -> dict[str, Any]:
    """Read one image's DICOM (and ROI XML) and return the facts the contract needs.

    Never raises for a bad file: the problem is recorded in `read_error` / `xml_error` and the facts
    that could not be read stay None.
    """
    facts: dict[str, Any] = dict.fromkeys(FACT_COLUMNS)
    _dicom_facts(job.dicom_path, job.privacy_allowed, facts)
    # An image without an ROI XML has no ROI.
    if job.xml_path.is_file():
        try:
            facts["roi_points"] = sum(len(roi.points_px) for roi in read_rois(job.xml_path))
        except UserError as exc:
            facts["xml_error"] = str(exc)
    else:
        facts["roi_points"] = 0
    return facts


def _exception_text(exc: BaseException) -> str:
    """Return `Type: first line of the message`, at most 160 characters, for a read_error."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"[:160] if message else type(exc).__name__


def _dicom_facts(path: Path, privacy_allowed: Sequence[str], facts: dict[str, Any]) -> None:
    """Fill the DICOM facts of one image into `facts`; say in plain words what went wrong in `read_error`."""
    try:
        facts["file_sha256"] = sha256_of(path)
    except FileNotFoundError:
        facts["read_error"] = "file not found"
        return
    except OSError as exc:
        facts["read_error"] = f"cannot read file ({exc.strerror or exc})"
        return
    try:
        # A second read of the file, from the page cache: cheaper than copying it into a BytesIO.
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        facts["read_error"] = NOT_DICOM
        return
    except Exception as exc:  # a header cut short or garbled: pydicom raises many types
        facts["read_error"] = f"unreadable DICOM header ({_exception_text(exc)})"
        return
    # Before anything touches PixelData: its declared length is known only while it is still raw.
    pixel_problem = pixel_data_problem(ds)
    try:
        # Privacy first: a header that reads is enough to catch a named patient, pixels or not.
        facts["identifying_attributes"] = ", ".join(identifying_attributes(ds, allowed=privacy_allowed)) or None
        facts["burned_in_annotation"] = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() or None
        facts["modality"] = str(ds.get("Modality", "")).strip() or None
        missing = missing_from_header(ds, ("Rows", "Columns", "BitsAllocated", "BitsStored"))
        if missing:
            facts["read_error"] = missing
            return
        facts["dicom_rows"], facts["dicom_columns"] = int(ds.Rows), int(ds.Columns)
        facts["bits_allocated"] = int(ds.BitsAllocated)
        facts["bits_stored"] = bits_stored = int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
    except Exception as exc:  # a header value pydicom cannot convert
        facts["read_error"] = f"unreadable DICOM header ({_exception_text(exc)})"
        return
    if pixel_problem is not None:
        facts["read_error"] = pixel_problem
        return
    try:
        # Raw stored values: pydicom would otherwise mask them to BitsStored and hide the fault.
        ds.pixel_array_options(correct_unused_bits=False)
        pixels = ds.pixel_array
        facts["pixel_min"], facts["pixel_max"] = int(pixels.min()), int(pixels.max())
        facts["pixel_floor"] = -(1 << (bits_stored - 1)) if signed else 0
        facts["pixel_ceiling"] = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
    except Exception as exc:  # pydicom and its decoders raise many types for a damaged stream
        facts["read_error"] = f"cannot decode pixel data ({_exception_text(exc)})"


def read_manifest(manifest: Path) -> pd.DataFrame:
    """Read the manifest and check it has ingest's columns.

    Raises:
        UserError: the file is missing, is not Parquet, or lacks columns.
    """
    if not manifest.is_file():
        raise UserError(f"{manifest}: manifest not found")
    try:
        frame = pd.read_parquet(manifest)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{manifest}: not a readable Parquet manifest ({type(exc).__name__})") from None
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise UserError(f"{manifest}: missing manifest column(s) {', '.join(missing)}")
    return frame.reset_index(drop=True)


def _checked_table(manifest: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """Join the manifest with the image facts (row by row) and add the derived columns the rules use."""
    table = pd.concat([manifest, facts], axis=1)
    for column in _INT_FACTS:
        table[column] = pd.array(table[column], dtype="Int64")
    table["manifest_size"] = table["rows"].astype(str) + "x" + table["columns"].astype(str)
    table["dicom_size"] = (table["dicom_rows"].astype("string") + "x"
                           + table["dicom_columns"].astype("string")).astype(object)
    table["n_lesions"] = table["n_mass"] + table["n_calcification"]
    table["n_rois"] = table["n_lesions"] + table["n_other"]
    table["lesion_px"] = table["mass_px"] + table["calc_px"]
    area = (table["rows"] * table["columns"]).astype(float)
    table["mask_fraction"] = table["lesion_px"] / area.where(area > 0)
    # Points said to be out of bounds with no points in the XML is as wrong as it gets: share 1.
    points = table["roi_points"].astype(float)
    out = table["n_points_out_of_bounds"].astype(float)
    share = np.where(points > 0, out / points.where(points > 0), np.where(out > 0, 1.0, 0.0))
    table["out_of_bounds_share"] = pd.Series(share, index=table.index).where(table["xml_error"].isna())
    # pandas' nullable string columns become object columns with None: the form GX handles everywhere.
    for column in table.columns:
        if isinstance(table[column].dtype, pd.StringDtype):
            table[column] = table[column].astype(object).where(table[column].notna(), None)
    return table


def _build_suite_run(table: pd.DataFrame, rules: Sequence[Rule], severity: dict[str, str], docs_dir: Path,
                     run_name: str, run_time: datetime.datetime) -> Any:
    """Check the table against the rules with Great Expectations; build Data Docs into docs_dir.

    One ephemeral context per run (creating one is slow); its only persistent output is the Data Docs
    site, made to render offline. Returns the ExpectationSuiteValidationResult.
    """
    # GX logs its start-up at INFO; keep the stage's log to our own lines unless someone asked for GX's.
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:
        gx_log.setLevel(logging.WARNING)
    # Imported here: GX takes seconds to import and only this step needs it.
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.expectations.row_conditions import Column

    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
    }
    context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"report": site},
        analytics_enabled=False,  # no network from a pipeline stage
        progress_bars=ProgressBarsConfig(globally=False),  # our own bar covers the slow part
    ))
    batch = (context.data_sources.add_pandas("manifest")
             .add_dataframe_asset("images_with_dicom_facts")
             .add_batch_definition_whole_dataframe("all_rows"))
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, meta={"notes": (
        "INbreast data contract: the manifest written by ingest, joined with facts read from each DICOM "
        "and ROI XML. Critical failures stop the pipeline; warnings are reported.")}))
    operators = {"==": Column.__eq__, "!=": Column.__ne__, ">": Column.__gt__, ">=": Column.__ge__,
                 "<": Column.__lt__, "<=": Column.__le__}
    for rule in rules:
        kwargs = dict(rule.kwargs)
        if rule.condition is not None:
            column, operator, value = rule.condition
            kwargs["row_condition"] = operators[operator](Column(column), value)
        level = severity[rule.name]
        suite.add_expectation(getattr(gxe, rule.expectation)(
            **kwargs, severity=level, meta={"name": rule.name, "severity": level},
            description=f"[{level}] {rule.name}: {rule.describe()}"))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest_contract", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["image_id", "dicom_path"]}))
    run_id = RunIdentifier(run_name=run_name, run_time=run_time)
    result = checkpoint.run(batch_parameters={"dataframe": table}, run_id=run_id)
    (validation,) = result.run_results.values()
    make_offline(docs_dir)
    return validation


def _jsonable(value: Any) -> Any:
    """Turn numpy/pandas scalars (and containers of them) into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA:
        return None
    return value


def _describe_failure(outcome: Any, rules: dict[str, Rule], severity: dict[str, str]) -> dict[str, Any]:
    """Summarise one failed expectation result: its name, severity, offending images and values.

    `images` lists each offending row's image id, DICOM path (relative to the INbreast folder, as the
    manifest has it) and, for a one-column rule, its value in that column (a read error's reason, a
    size, keywords of identifying attributes).
    """
    config = outcome.expectation_config
    name = config.meta["name"]
    kwargs = config.kwargs
    columns = [kwargs[key] for key in ("column", "column_A", "column_B") if kwargs.get(key)]
    index_list = [item for item in outcome.result.get("unexpected_index_list") or []
                  if isinstance(item, dict) and "image_id" in item]
    ids = [str(item["image_id"]) for item in index_list]
    column = kwargs.get("column")
    images = [{"image_id": str(item["image_id"]), "dicom_path": item.get("dicom_path"),
               **({"value": item.get(column)} if column and column in item else {})} for item in index_list]
    failure = {
        "name": name,
        "severity": severity[name],
        "expectation": f"{config.type}({', '.join(columns)})" if columns else config.type,
        "description": rules[name].describe(),
        "unexpected_count": outcome.result.get("unexpected_count"),
        "observed_value": outcome.result.get("observed_value"),
        "expected": {key: kwargs[key] for key in ("min_value", "max_value") if kwargs.get(key) is not None},
        "image_ids": ids,
        "images": images,
        "unexpected_values": (outcome.result.get("unexpected_list") or [])[:50],
    }
    if outcome.exception_info and outcome.exception_info.get("raised_exception"):
        failure["error"] = outcome.exception_info.get("exception_message")
    return _jsonable(failure)


def _one_line(value: Any) -> str:
    """Return a value as text on one line (a log line must stay one line whatever a file holds)."""
    return " ".join(str(value).split())


def _rejected_failure(manifest: Path, severity: dict[str, str]) -> dict[str, Any] | None:
    """Turn ingest's rejected list beside the manifest into a failure record (None when it is empty).

    Each rejected file is named with ingest's reason, in the same shape as a failed expectation.
    """
    path = rejected_list_path(manifest)
    if not path.is_file():
        log.warning("%s: no rejected list beside the manifest; %s not checked", path, REJECTED_RULE)
        return None
    try:
        rejected = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable rejected list ({exc})") from None
    if rejected.empty:
        return None
    images = [{"image_id": row.image_id, "dicom_path": row.file, "value": row.reason}
              for row in rejected.itertuples(index=False)]
    return {"name": REJECTED_RULE, "severity": severity[REJECTED_RULE],
            "expectation": f"ingest accepted every file ({path.name})",
            "description": "ingest rejected no file of the INbreast folder",
            "unexpected_count": len(images), "observed_value": len(images), "expected": {},
            "image_ids": [image["image_id"] for image in images], "images": images, "unexpected_values": []}


def _log_line(failure: dict[str, Any], inbreast: Path) -> str:
    """One line per failed expectation: severity, name, expectation and up to LOG_IDS offending images.

    Each image shows as `id (path: value)`: the DICOM file to open (the report's relative path under
    `inbreast`, as the user gave that folder) and, for one-column rules, what was wrong (the reason a
    file is unreadable, the keywords of identifying attributes).
    """
    head = f"FAILED {failure['severity']} {failure['name']} {failure['expectation']}"
    if failure.get("error"):
        return f"{head}: could not be evaluated ({_one_line(failure['error'])})"
    ids = failure["image_ids"]
    if ids:
        first: dict[tuple[str, Any], dict[str, Any]] = {}
        for image in failure["images"]:
            # One entry per file: a duplicated id is shown once per DICOM that carries it.
            first.setdefault((image["image_id"], image.get("dicom_path")), image)
        distinct = list(first.values())
        shown = []
        for image in distinct[:LOG_IDS]:
            detail = [str(inbreast / image["dicom_path"])] if image.get("dicom_path") else []
            if image.get("value") is not None:
                detail.append(_one_line(image["value"]))
            shown.append(f"{image['image_id']} ({': '.join(detail)})" if detail else image["image_id"])
        more = ", ..." if len(distinct) > LOG_IDS else ""
        return f"{head}: {len(ids)} image{'s' if len(ids) != 1 else ''}, e.g. {', '.join(shown)}{more}"
    expected = ", ".join(f"{key} {value}" for key, value in failure["expected"].items())
    return f"{head}: observed {failure['observed_value']!r}" + (f" ({expected})" if expected else "")


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; } td, th { border: 1px solid #ccc; padding: .3rem .5rem;
vertical-align: top; text-align: left; } th { background: #f3f3f3; }
.critical { color: #b00020; font-weight: 600; } .warning { color: #a15c00; font-weight: 600; }
.ok { color: #1b7f3b; } code { font-size: .9em; }
"""


def _report_page(summary: dict[str, Any], links: dict[str, str]) -> str:
    """Render summary.json as one self-contained HTML page (no scripts, no external assets).

    GX's Data Docs fill their index with JavaScript (local copies, see `mammoseg.data_docs`); this
    page needs none, reads in any viewer (MLflow's artifact view too), and links to them.
    """
    esc = html.escape
    counts = summary["counts"]
    verdict = "PASSED" if summary["success"] else "FAILED"
    rows = []
    for failure in summary["failed"]:
        ids = list(dict.fromkeys(failure["image_ids"]))
        shown = ", ".join(ids[:20]) + (f", ... ({len(ids)} ids)" if len(ids) > 20 else "")
        found = (f"{len(failure['image_ids'])} image(s): {shown}" if ids
                 else f"observed {failure.get('error') or failure['observed_value']!r}")
        rows.append(f"<tr><td class='{failure['severity']}'>{failure['severity']}</td>"
                    f"<td><code>{esc(failure['name'])}</code></td><td>{esc(failure['description'])}<br>"
                    f"<code>{esc(failure['expectation'])}</code></td><td>{esc(found)}</td></tr>")
    header = "<tr><th>severity</th><th>name</th><th>expectation</th><th>offending images</th></tr>"
    failed_table = (f"<table>{header}{''.join(rows)}</table>" if rows
                    else "<p class='ok'>No expectation failed.</p>")
    every = "".join(
        f"<tr><td><code>{esc(e['name'])}</code></td><td>{e['severity']}</td>"
        f"<td class='{'ok' if e['success'] else e['severity']}'>{'passed' if e['success'] else 'FAILED'}"
        "</td></tr>" for e in summary["expectations"])
    link_items = "".join(f"<li><a href='{esc(href)}'>{esc(text)}</a></li>" for text, href in links.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(summary['suite'])}: {verdict}</title>
<style>{_PAGE_STYLE}</style></head><body>
<h1>Data contract <code>{esc(summary['suite'])}</code>:
<span class="{'ok' if summary['success'] else 'critical'}">{verdict}</span></h1>
<p>Manifest <code>{esc(summary['manifest'])}</code>, checked {esc(summary['run_time'])}.
{counts['images']} images of {counts['patients']} patients; {counts['expectations_evaluated']} expectations,
{counts['failed_critical']} critical and {counts['failed_warning']} warning failures.
Critical failures fail the stage; warnings are reported only.</p>
<h2>Failed expectations</h2>{failed_table}
<h2>Great Expectations Data Docs</h2><ul>{link_items}</ul>
<h2>All expectations</h2><table><tr><th>name</th><th>severity</th><th>result</th></tr>{every}</table>
</body></html>
"""


def last_passing_path(report_out: Path) -> Path:
    """Return where the last passing report is kept while report_out holds a failing one."""
    return report_out.with_name(report_out.name + LAST_PASSING_SUFFIX)


def _report_passed(report: Path) -> bool:
    """Tell whether a report folder holds a summary.json that says success; False if none or unreadable."""
    try:
        return json.loads((report / SUMMARY_NAME).read_text()).get("success") is True
    except (OSError, ValueError, AttributeError):  # no report yet, or a damaged one: nothing to keep
        return False


def _install_report(staging: Path, report_out: Path, success: bool) -> Path | None:
    """Put the new report at report_out, keeping the last passing one beside a failing one.

    A failing run whose predecessor passed moves that report to `<report_out>.last-passing/`
    (replacing an older one there); a failing run after a failing one leaves `.last-passing` as it
    is, so it always holds the newest passing report. A passing run removes `.last-passing`: the
    report at report_out is then itself the last passing one.

    Returns:
        The `.last-passing` folder when it holds a report after this call, else None.
    """
    kept = last_passing_path(report_out)
    if success:
        replace_folder(staging, report_out)
        if kept.exists():
            shutil.rmtree(kept)
        return None
    if _report_passed(report_out):
        replace_folder(report_out, kept)  # report_out itself is the staging folder here
    replace_folder(staging, report_out)
    return kept if kept.exists() else None


def run(config: ValidateConfig, inbreast: Path, manifest: Path, report_out: Path) -> ValidateResult:
    """Check a manifest and the files it points to against the data contract.

    The new report always replaces report_out: a failing one must be read, and DVC tracks that
    folder. When it fails and the report it replaces had passed, the passing one is kept at
    `<report_out>.last-passing/` (see `_install_report`); a later passing run removes that folder.

    Args:
        config: thresholds, allowed sizes and bit depths, the privacy allow-list, warning-level rule
            names, workers.
        inbreast: the INbreast folder that ingest read (the manifest's DICOM paths are relative to it).
        manifest: the Parquet manifest written by ingest.
        report_out: folder to (re)write with `summary.json` and `data_docs/` (Great Expectations HTML).

    Returns:
        Success, exit code (1 when a critical expectation fails), counts and the report paths.

    Raises:
        UserError: the manifest is missing or unreadable, or names its DICOMs by absolute paths; the
            INbreast folder is missing or holds none of them; or the config names unknown rules or
            keywords or has a malformed size or bit range.
    """
    rules = contract(config)
    severity = severities(config, rules)
    frame = read_manifest(manifest)
    if not inbreast.is_dir():
        raise UserError(f"{inbreast}: INbreast folder not found (--inbreast is the folder ingest read)")
    jobs = [_Job(str(row.image_id), dicom_file(inbreast, str(row.dicom_path), manifest),
                 inbreast / XML_DIR / f"{row.image_id}.xml", tuple(config.privacy_allowed))
            for row in frame[["image_id", "dicom_path"]].itertuples(index=False)]
    # One missing file is a contract failure (dicom_readable); all of them is the wrong folder.
    if jobs and not any(job.dicom_path.is_file() for job in jobs):
        raise UserError(f"{manifest}: none of its {len(jobs)} DICOMs is in {inbreast} (e.g. "
                        f"{frame['dicom_path'].iloc[0]}): is --inbreast the folder ingest read?")
    start = time.perf_counter()
    facts = pd.DataFrame(list(run_jobs(_image_facts, jobs, config.workers, "validate")),
                         columns=list(FACT_COLUMNS), index=frame.index)
    log.info("read %d DICOMs in %.1f s", len(jobs), time.perf_counter() - start)
    table = _checked_table(frame, facts)

    report_out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(report_out)
    run_time = datetime.datetime.now(datetime.UTC)
    try:
        docs = staging / DATA_DOCS_DIR
        validation = _build_suite_run(table, rules, severity, docs, f"validate-{manifest.stem}", run_time)
        order = {rule.name: index for index, rule in enumerate(rules)}
        outcomes = sorted(validation.results, key=lambda r: order[r.expectation_config.meta["name"]])
        by_name = {rule.name: rule for rule in rules}
        failures = [_describe_failure(o, by_name, severity) for o in outcomes if not o.success]
        rejected = _rejected_failure(manifest, severity)
        failures += [rejected] if rejected else []
        critical = [f for f in failures if f["severity"] == "critical"]
        warnings = [f for f in failures if f["severity"] == "warning"]
        success = not critical
        summary = {
            "success": success,
            "suite": SUITE_NAME,
            # By name and content: a path would be the machine's (a task's input path on a cluster).
            "manifest": manifest.name,
            "manifest_sha256": sha256_of(manifest),
            "run_time": run_time.isoformat(timespec="seconds"),
            "report": INDEX_NAME,
            "data_docs": f"{DATA_DOCS_DIR}/index.html",
            "counts": {
                "images": len(table),
                "patients": int(table["patient_id"].nunique()),
                "expectations_evaluated": len(outcomes),
                "failed_critical": len(critical),
                "failed_warning": len(warnings),
            },
            "failed": failures,
            "expectations": [{"name": o.expectation_config.meta["name"],
                              "severity": severity[o.expectation_config.meta["name"]],
                              "success": bool(o.success)} for o in outcomes]
                            + [{"name": REJECTED_RULE, "severity": severity[REJECTED_RULE],
                                "success": rejected is None}],
        }
        links = {"Data Docs home": f"{DATA_DOCS_DIR}/index.html"}
        for page in sorted(docs.glob("validations/**/*.html")):
            links[f"Validation result: {page.parent.parent.name} {page.parent.name}"] = (
                page.relative_to(staging).as_posix())
        links.update({f"Expectation suite: {page.stem}": page.relative_to(staging).as_posix()
                      for page in sorted(docs.glob("expectations/*.html"))})
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (staging / INDEX_NAME).write_text(_report_page(summary, links))
        kept = _install_report(staging, report_out, success)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

    for failure in critical:
        log.error("%s", _log_line(failure, inbreast))
    for failure in warnings:
        log.warning("%s", _log_line(failure, inbreast))
    if kept is not None:
        log.info("previous passing report kept at %s", kept / INDEX_NAME)
    verdict = "passed" if success else "FAILED"
    log.info("validation %s: %d expectations, %d critical and %d warning failures; report %s",
             verdict, len(outcomes), len(critical), len(warnings), report_out / INDEX_NAME)
    return ValidateResult(success, 0 if success else 1, len(table), len(critical), len(warnings),
                          report_out / SUMMARY_NAME, report_out / INDEX_NAME,
                          report_out / DATA_DOCS_DIR / "index.html", kept)
