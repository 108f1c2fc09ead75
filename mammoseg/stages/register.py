"""Register: an exported ONNX model into the MLflow Model Registry, with lineage and a promotion gate.

Logs the ONNX file (MLflow ONNX flavour, signature, input example) into its training run, creates
a model version tagged with its lineage, points @challenger at it and moves @champion only when
its test Dice beats the champion's on the same test split by a margin (or there is no champion).
Registering the same model from the same run again changes nothing. Aliases only: the deprecated
registry stages are never used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mammoseg import tracking
from mammoseg.config import RegisterConfig
from mammoseg.errors import UserError
from mammoseg.fileio import sha256_of, write_atomically
from mammoseg.onnx_runtime import read_io_spec
from mammoseg.stages.export import report_path_for

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"


@dataclasses.dataclass(frozen=True)
class RegisterResult:
    """The version registered (or found) and the promotion decision."""

    name: str
    version: str
    promoted: bool
    decision: str
    already_registered: bool


def _metric(metrics: dict[str, float], tags: dict[str, str], key: str) -> float | None:
    value = metrics.get(key, tags.get(key))
    return None if value is None else float(value)


def run(config: RegisterConfig, onnx: Path, decision_out: Path | None = None) -> RegisterResult:
    """Register the model and apply the promotion gate.

    Args:
        config: the registered model name, the promotion margin and the metric it compares.
        onnx: the fp32 .onnx written by export (its export report must sit beside it).
        decision_out: optional JSON file for the decision (for orchestrators).

    Raises:
        UserError: the file is not an exported model, its export did not pass parity, or the run has
            no test metric.
    """
    name = config.name
    if not onnx.is_file():
        raise UserError(f"{onnx}: no such file")
    spec = read_io_spec(onnx)
    run_id = spec["training_run_id"]
    report_path = report_path_for(onnx)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{report_path}: export report missing or unreadable (run `mammoseg export`)") from None
    if not report.get("variants", {}).get("fp32", {}).get("passed"):
        raise UserError(f"{report_path}: the export did not pass the parity gate; not registering")
    onnx_sha = sha256_of(onnx)
    tags, metrics = tracking.run_data(run_id)
    score = _metric(metrics, tags, config.metric)
    if score is None:
        raise UserError(f"MLflow run {run_id} has no {config.metric} (run `mammoseg evaluate` first)")

    existing = [v for v in tracking.find_versions(name, run_id) if v.tags.get("onnx_sha256") == onnx_sha]
    decided = [v for v in existing if "promotion_decision" in v.tags]
    if decided:
        version = decided[0]
        log.info("%s version %s already holds this model (run %s): nothing to do", name, version.version, run_id)
        result = RegisterResult(name, version.version, version.tags.get("promoted") == "true",
                                version.tags["promotion_decision"], True)
        _write_decision(decision_out, result, score, None)
        return result
    if existing:
        # A previous run registered the version but stopped before the gate: finish its job.
        version = existing[0]
        log.info("%s version %s was registered but not gated: resuming", name, version.version)
    else:
        lineage = {"run_id": run_id, "data_dvc_hash": spec.get("data_dvc_hash") or "untracked",
                   "git_commit": spec.get("git_commit"), "dataset_digest": spec.get("dataset_digest"),
                   "onnx_sha256": onnx_sha, "validation_success": tags.get("validation_success", "unknown"),
                   "parity": "passed",
                   "parity_max_abs_logit_diff": report["variants"]["fp32"]["max_abs_logit_diff"],
                   config.metric: f"{score:.6f}", "threshold": spec.get("threshold")}
        multiple = int(spec["input"]["size_multiple"])
        example = np.zeros((1, 1, multiple, multiple), np.float32)
        # Upload first, register second: an interrupted upload leaves no version behind.
        model_uri = tracking.log_onnx_model(run_id, onnx, example)
        version = tracking.create_version(name, model_uri, run_id,
                                          {k: v for k, v in lineage.items() if v is not None})
    tracking.set_alias(name, CHALLENGER, version.version)

    champion = tracking.version_by_alias(name, CHAMPION)
    champion_score = None if champion is None else _metric({}, champion.tags, config.metric)
    if champion is None:
        promoted, decision = True, "promoted: no champion yet"
    elif champion.tags.get("dataset_digest") != spec.get("dataset_digest"):
        other = champion.tags.get("dataset_digest", "?")[:12]
        promoted, decision = False, (f"kept champion v{champion.version}: it was tested on another split "
                                     f"(dataset {other}); re-evaluate to compare")
    elif champion_score is not None and score > champion_score + config.promotion_margin:
        promoted, decision = True, (f"promoted: {config.metric} {score:.4f} beats champion v{champion.version} "
                                    f"{champion_score:.4f} by more than {config.promotion_margin}")
    else:
        promoted, decision = False, (f"kept champion v{champion.version}: {config.metric} {score:.4f} does not beat "
                                     f"{champion_score if champion_score is not None else float('nan'):.4f} "
                                     f"+ {config.promotion_margin}")
    if promoted:
        tracking.set_alias(name, CHAMPION, version.version)
    tracking.set_version_tags(name, version.version, {
        "promoted": str(promoted).lower(), "promotion_decision": decision,
        "champion_before": "none" if champion is None else champion.version,
        "champion_score_before": "none" if champion_score is None else f"{champion_score:.6f}"})
    log.info("%s version %s @%s; %s", name, version.version, CHALLENGER, decision)
    result = RegisterResult(name, version.version, promoted, decision, False)
    _write_decision(decision_out, result, score, champion_score)
    return result


def _write_decision(path: Path | None, result: RegisterResult, score: float, champion_score: float | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {**dataclasses.asdict(result), "score": score, "champion_score": champion_score}
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
