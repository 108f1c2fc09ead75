"""Deployment variants: which engine runs which exported file at which precision (reads export reports).

export writes the fp32 model `<stem>.onnx`, the files its variants need beside it (`<stem>.int8.onnx`,
static int8 QDQ; `<stem>.fp16.onnx`) and `<stem>.export.json`, the report: per variant its engine,
precision, file, gate result (native-grid Dice difference against fp32 on the test split) and latency
at full resolution. register ships the folder with the version; predict and serving find the fp32
model in it with `exported_model_in`, and predict's `--engine auto` takes the fastest variant that
passed its gate and can run on this machine (`choose`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from mammoseg import openvino_runtime
from mammoseg.errors import UserError
from mammoseg.onnx_runtime import EngineSession, open_session, variant_of

log = logging.getLogger(__name__)

REPORT_SUFFIX = ".export.json"
ENGINES = ("auto", "onnxruntime", "openvino")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run an exported model.

    Attributes:
        name: its key in the export report and predict's audit record.
        engine: "onnxruntime" or "openvino".
        precision: what its arithmetic is: "fp32", "int8", "fp16" or "bf16".
        file: the exported file it runs: "fp32" (the model itself), "int8" (QDQ) or "fp16".
    """

    name: str
    engine: str
    precision: str
    file: str


VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (
    Variant("fp32", "onnxruntime", "fp32", "fp32"),
    Variant("int8", "onnxruntime", "int8", "int8"),
    Variant("fp16", "onnxruntime", "fp16", "fp16"),  # a GPU path: ONNX Runtime's CPU provider lacks fp16 kernels
    Variant("openvino_fp32", "openvino", "fp32", "fp32"),
    Variant("openvino_bf16", "openvino", "bf16", "fp32"),
    Variant("openvino_int8", "openvino", "int8", "int8"),
)}
OPENVINO_PRECISIONS = tuple(v.precision for v in VARIANTS.values() if v.engine == "openvino")


def report_path_for(onnx_path: Path) -> Path:
    """Return the export report written beside an exported fp32 model."""
    return onnx_path.with_name(onnx_path.stem + REPORT_SUFFIX)


def variant_path(onnx_path: Path, file: str) -> Path:
    """Return the file a variant runs: the fp32 model itself, or `<stem>.<file>.onnx` beside it."""
    return onnx_path if file == "fp32" else onnx_path.with_name(f"{onnx_path.stem}.{file}.onnx")


def exported_model_in(folder: Path) -> Path:
    """Return the fp32 .onnx of an export's files in a folder (a downloaded registered version).

    The report names the model (`<stem>.export.json` beside `<stem>.onnx`); a folder without one
    (a version registered before variants travelled with it) holds the model alone.

    Raises:
        UserError: the folder holds no exported model, or several.
    """
    reports = sorted(folder.rglob("*" + REPORT_SUFFIX))
    models = [report.with_name(report.name.removesuffix(REPORT_SUFFIX) + ".onnx") for report in reports]
    models = [model for model in models if model.is_file()] or sorted(folder.rglob("*.onnx"))
    if len(models) != 1:
        raise UserError(f"{folder}: expected one exported .onnx model, found {len(models)}")
    return models[0]


def read_report(onnx_path: Path, sha256: str) -> dict[str, Any] | None:
    """Return the export report of this very fp32 model, or None (no report, or one of another model).

    Raises:
        UserError: the report exists but is not JSON.
    """
    path = report_path_for(onnx_path)
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: export report is not valid JSON") from None
    return report if report.get("sha256") == sha256 else None


def cannot_run_here(variant: Variant) -> str | None:
    """Return why a variant cannot run on this machine, or None when it can."""
    if variant.engine == "openvino":
        if not openvino_runtime.available():
            return f"OpenVINO is not installed ({openvino_runtime.INSTALL_HINT})"
        if not openvino_runtime.cpu_supports(variant.precision):
            return f"this CPU has no native {variant.precision}"
        return None
    if variant.precision == "fp16":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "no CUDA execution provider here"
    return None


def open_variant(path: Path, variant: Variant, threads: int = 0) -> EngineSession:
    """Open the session that runs a variant.

    Args:
        path: the variant's file (variant_path of the fp32 model, or a variant's file given directly).
        variant: which variant.
        threads: intra-op threads (0 = the engine's default, one per core).

    Raises:
        UserError: the engine is not installed or cannot read the file.
    """
    if variant.engine == "openvino":
        return openvino_runtime.open_openvino(path, variant.precision, threads)
    return open_session(path, threads=threads)


def choose(onnx_path: Path, report: dict[str, Any] | None, engine: str) -> Variant:
    """Pick the variant predict runs: the fastest that passed its export gate and can run here.

    Args:
        onnx_path: the model predict was given: an exported fp32 model, or a variant's file itself.
        report: the fp32 model's export report (read_report); None for a model without one, which
            then runs as the file it is.
        engine: "auto" (any engine), "onnxruntime" or "openvino".

    Raises:
        UserError: the engine is unknown, not installed, or none of its variants passed and runs here.
    """
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "openvino":
        openvino_runtime.require()
    if report is None:
        file = variant_of(onnx_path)
        name = file if engine in ("auto", "onnxruntime") else f"openvino_{file}"
        if name not in VARIANTS:
            raise UserError(f"{onnx_path}: OpenVINO does not run the {file} variant; use --engine onnxruntime")
        return VARIANTS[name]
    candidates, refused = [], []
    for name, entry in report["variants"].items():
        variant = VARIANTS.get(name)
        if variant is None or engine not in ("auto", variant.engine):
            continue
        reason = None if entry.get("passed") else entry.get("skipped", "missed its export gate")
        reason = reason or cannot_run_here(variant)
        if reason:
            refused.append(f"{name}: {reason}")
        else:
            candidates.append((float(entry["latency_s"]), variant))
    if not candidates:
        which = "" if engine == "auto" else f"{engine} "
        raise UserError(f"{report_path_for(onnx_path)}: no {which}variant passed its export gate and runs here "
                        f"({'; '.join(refused) or 'none exported'})")
    candidates.sort(key=lambda candidate: candidate[0])
    chosen = candidates[0][1]
    size = "x".join(str(side) for side in report.get("latency_shape", [])[-2:])
    log.info("engine %s runs %s, the fastest variant that passed its gate (s per %s image at export: %s)%s",
             engine, chosen.name, size, ", ".join(f"{variant.name} {latency:.3f}" for latency, variant in candidates),
             "; not eligible: " + "; ".join(refused) if refused else "")
    return chosen
