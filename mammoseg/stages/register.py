"""Register: an exported ONNX model into the MLflow Model Registry, with lineage and a promotion gate.

Reads the .onnx and its export report, the training run's test metrics (written by evaluate) and the
preprocessed dataset (to re-score a champion); writes a model version, its aliases, tags and
description (mammoseg.model_card: test metrics with CIs, the gate, lineage), the registered model's
card, the run's note and the test metrics on the logged model, and optionally a decision JSON. The
version is a pyfunc model (mammoseg.serving) that holds the .onnx byte for byte, so
`mlflow models serve` answers the probabilities predict computes, with its export report and the files
of the deployment variants that passed their export gates, so predict can run the fastest of them; one
`variant_<name>` tag per variant says what export found. Its lineage tags (git_commit, git_dirty,
data_dvc_hash, image_digest) are its training run's, the same wherever it was trained; `register_<tag>`
records register's own (mammoseg.tracking.lineage).

The gate (params.yaml `register:`): every new version becomes @challenger. @champion moves to it only when

(a) it beats the intensity-threshold baseline on the same test patients: the lower bound of the
    paired 95 % patient-bootstrap interval of the difference in `metric` is above 0, and each
    target's native Dice (the same statistic) reaches its floor in `dice_floors`; and
(b) it beats the current champion the same way: both ONNX models are re-scored with evaluate's own
    code (`score_native`) on the challenger's test split, wherever the champion was scored before,
    and the paired interval of challenger minus champion must lie above 0.

A model that fails stays @challenger only; register still exits 0 and logs which condition failed.
Registering the same model from the same run again changes nothing. Aliases only: the deprecated
registry stages are never used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mammoseg import model_card, serving, tracking
from mammoseg.config import RegisterConfig
from mammoseg.data import read_dataset
from mammoseg.errors import UserError
from mammoseg.fileio import sha256_of, write_atomically
from mammoseg.metrics import paired_bootstrap
from mammoseg.onnx_runtime import open_session, read_io_spec
from mammoseg.preprocessing import PreprocessParams
from mammoseg.stages.evaluate import TARGETS, TEST_METRIC_PREFIX, score_native
from mammoseg.variants import VARIANTS, exported_model_in, report_path_for, variant_path

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
_METRIC = re.compile(r"^test_unet_dice_native_(mean_image|pooled)_all$")


@dataclasses.dataclass(frozen=True)
class RegisterResult:
    """The version registered (or found) and the promotion decision."""

    name: str
    version: str
    promoted: bool
    decision: str
    already_registered: bool


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One condition of the gate, as a table row: what was compared, the numbers, pass or fail."""

    condition: str
    value: float
    reference: str
    passed: bool

    def row(self) -> str:
        """Return the condition as a markdown table row."""
        return f"| {self.condition} | {self.value:.4f} | {self.reference} | {'pass' if self.passed else 'FAIL'} |"


def _statistic(metric: str) -> str:
    match = _METRIC.match(metric)
    if not match:
        raise UserError(f"register.metric must be test_unet_dice_native_mean_image_all or "
                        f"test_unet_dice_native_pooled_all (evaluate's native all-lesion Dice), got {metric!r}")
    return match.group(1)


def baseline_checks(metrics: dict[str, float], config: RegisterConfig) -> list[GateCheck]:
    """Condition (a): the paired comparison with the baseline and the per-target floors.

    Raises:
        UserError: the run lacks a metric the gate needs (evaluate was not run, or an older evaluate).
    """
    kind = _statistic(config.metric)

    def need(key: str) -> float:
        if key not in metrics:
            raise UserError(f"the training run has no {key} (run `mammoseg evaluate` first)")
        return float(metrics[key])

    prefix = f"test_unet_vs_baseline_native_{kind}_all"
    low, high = need(f"{prefix}_ci_low"), need(f"{prefix}_ci_high")
    checks = [GateCheck(f"U-Net minus baseline, all lesions ({kind}, paired patient bootstrap)",
                        need(f"{prefix}_difference"), f"95% CI [{low:+.4f}, {high:+.4f}]; lower bound must be > 0",
                        low > 0)]
    for target in TARGETS:
        if target in config.dice_floors:
            value = need(f"test_unet_dice_native_{kind}_{target}")
            floor = float(config.dice_floors[target])
            baseline = metrics.get(f"test_baseline_dice_native_{kind}_{target}", float("nan"))
            checks.append(GateCheck(f"native Dice {target} ({kind})", value,
                                    f">= floor {floor:.3f} (baseline {baseline:.4f})", value >= floor))
    return checks


@dataclasses.dataclass(frozen=True)
class ChampionComparison:
    """Condition (b): challenger minus champion on the challenger's test split, both re-scored."""

    comparable: bool
    reason: str
    challenger: float = float("nan")
    champion: float = float("nan")
    difference: float = float("nan")
    ci95: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def passed(self) -> bool:
        """Whether the challenger beats the champion (lower bound of the paired interval above 0)."""
        return self.comparable and self.ci95[0] > 0

    def check(self, version: str) -> GateCheck:
        """Return the comparison as a gate row."""
        if not self.comparable:
            return GateCheck(f"beats champion v{version}", float("nan"), self.reason, False)
        return GateCheck(f"challenger minus champion v{version}, re-scored on this test split", self.difference,
                         f"95% CI [{self.ci95[0]:+.4f}, {self.ci95[1]:+.4f}] (champion {self.champion:.4f}); "
                         "lower bound must be > 0", self.passed)


def compare_with_champion(config: RegisterConfig, dataset: Path, onnx: Path, spec: dict[str, Any],
                          champion: tracking.ModelVersion) -> ChampionComparison:
    """Re-score the champion's and the challenger's ONNX models on the challenger's test split.

    Raises:
        UserError: the dataset is unreadable or the champion's model cannot be downloaded.
    """
    index, contract = read_dataset(dataset)
    test_rows = index[index["split"] == "test"]
    if test_rows.empty:
        raise UserError(f"{dataset / 'index.parquet'}: the test split is empty")
    kind = _statistic(config.metric)
    with tempfile.TemporaryDirectory() as work:
        local = tracking.download_model_artifacts(f"models:/{config.name}/{champion.version}", Path(work))
        champion_onnx = exported_model_in(local) if local.is_dir() else local
        champion_spec = read_io_spec(champion_onnx)
        if PreprocessParams.from_dict(champion_spec["preprocessing"]) != PreprocessParams.from_dict(contract):
            # Another input size or normalisation: this dataset's stored images are not its input.
            return ChampionComparison(False, f"champion v{champion.version} uses another preprocessing contract "
                                             f"(size {champion_spec['preprocessing'].get('size')} vs "
                                             f"{contract.get('size')}); register it under another name")
        scores = {}
        for role, path, model_spec in (("challenger", onnx, spec), ("champion", champion_onnx, champion_spec)):
            scores[role] = score_native(dataset, test_rows, open_session(path, threads=config.threads).probabilities,
                                        np.asarray(model_spec["threshold"], np.float32), config.batch_size,
                                        desc=f"re-score {role}")
    paired = paired_bootstrap(scores["challenger"].counts["all"], scores["champion"].counts["all"],
                              scores["challenger"].patients, kind, config.bootstrap_resamples, config.bootstrap_seed)
    return ChampionComparison(True, "re-scored", paired.a, paired.b, paired.difference, paired.ci95)


def run(config: RegisterConfig, onnx: Path, dataset: Path, decision_out: Path | None = None) -> RegisterResult:
    """Register the model and apply the promotion gate.

    Args:
        config: the registered model name, the gate's metric, floors and bootstrap.
        onnx: the fp32 .onnx written by export (its export report must sit beside it).
        dataset: the preprocessed dataset the model was tested on (to re-score the champion).
        decision_out: optional JSON file for the decision (for orchestrators).

    Raises:
        UserError: the file is not an exported model, its export did not pass parity, or the run has
            no test metrics.
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
    if not dataset.is_dir():
        raise UserError(f"{dataset}: dataset folder not found")
    onnx_sha = sha256_of(onnx)
    if report.get("sha256") != onnx_sha:
        raise UserError(f"{report_path}: this export report describes another model than {onnx.name} (sha256 "
                        "differs); run `mammoseg export` again")
    tags, metrics = tracking.run_data(run_id)
    if config.metric not in metrics:
        raise UserError(f"MLflow run {run_id} has no {config.metric} (run `mammoseg evaluate` first)")
    score = float(metrics[config.metric])
    checks = baseline_checks(metrics, config)

    existing = [v for v in tracking.find_versions(name, run_id) if v.tags.get("onnx_sha256") == onnx_sha]
    decided = [v for v in existing if "promotion_decision" in v.tags]
    if decided:
        version = decided[0]
        log.info("%s version %s already holds this model (run %s): nothing to do", name, version.version, run_id)
        result = RegisterResult(name, version.version, version.tags.get("promoted") == "true",
                                version.tags["promotion_decision"], True)
        _write_decision(decision_out, result, score, None, [])
        return result
    # The model's lineage is its training run's (train tagged it with the code, data and image it ran
    # on); register's own, under register_*, names the code that applied the gate.
    lineage = {"run_id": run_id, **tracking.Lineage.from_tags(tags).tags(),
               **{f"register_{k}": v for k, v in tracking.lineage().tags().items()},
               "dataset_digest": spec.get("dataset_digest"),
               "onnx_sha256": onnx_sha, "validation_success": tags.get("validation_success", "unknown"),
               "parity": "passed",
               "parity_max_abs_logit_diff": report["variants"]["fp32"]["max_abs_logit_diff"],
               config.metric: f"{score:.6f}", "threshold": json.dumps(spec.get("threshold"))}
    lineage.update(variant_tags(report))
    if existing:
        # A previous run registered the version but stopped before the gate: finish its job.
        version = existing[0]
        log.info("%s version %s was registered but not gated: resuming", name, version.version)
    else:
        # Upload first, register second: an interrupted upload leaves no version behind. Evaluate's
        # test metrics go onto the logged model too (the UI's model page shows the logged model's).
        test_metrics = {key: value for key, value in metrics.items() if key.startswith(TEST_METRIC_PREFIX)}
        with tempfile.TemporaryDirectory() as staging:
            folder = deployment_folder(onnx, report, Path(staging) / "export")
            model_uri = tracking.log_pyfunc_model(run_id, serving.pyfunc_model(folder, spec), test_metrics)
        version = tracking.create_version(name, model_uri, run_id,
                                          {k: v for k, v in lineage.items() if v is not None})
    tracking.set_alias(name, CHALLENGER, version.version)

    champion = tracking.version_by_alias(name, CHAMPION)
    if champion is not None and champion.version == version.version:
        champion = None  # re-gating the champion itself: nothing to compare against
    failed = [check.condition for check in checks if not check.passed]
    comparison = None
    if failed:
        promoted, decision = False, "stays @challenger: fails " + "; ".join(failed)
    elif champion is None:
        promoted, decision = True, "promoted: beats the baseline and every floor; no champion yet"
    else:
        comparison = compare_with_champion(config, dataset, onnx, spec, champion)
        checks.append(comparison.check(champion.version))
        if comparison.passed:
            promoted, decision = True, (f"promoted: beats the baseline, every floor and champion v{champion.version} "
                                        f"({comparison.difference:+.4f}, 95% CI [{comparison.ci95[0]:+.4f}, "
                                        f"{comparison.ci95[1]:+.4f}])")
        elif comparison.comparable:
            promoted, decision = False, (f"stays @challenger: does not beat champion v{champion.version} "
                                         f"({comparison.difference:+.4f}, 95% CI [{comparison.ci95[0]:+.4f}, "
                                         f"{comparison.ci95[1]:+.4f}] includes 0 or lies below)")
        else:
            promoted, decision = False, f"stays @challenger: {comparison.reason}"
    if promoted:
        tracking.set_alias(name, CHAMPION, version.version)
    tracking.set_version_tags(name, version.version, {
        "promoted": str(promoted).lower(), "promotion_decision": decision,
        "champion_before": "none" if champion is None else champion.version,
        **{f"gate_{i}": f"{'pass' if c.passed else 'fail'}: {c.condition} = {c.value:.4f} ({c.reference})"
           for i, c in enumerate(checks)}})
    tracking.set_version_description(name, version.version, model_card.version_description(
        metrics, [check.row() for check in checks], decision, {**lineage, **version.tags}))
    tracking.set_model_description(name, model_card.registered_model_description(name, spec))
    alias = f"@{CHAMPION}" if promoted else f"@{CHALLENGER} only"
    tracking.set_run_note(run_id, model_card.run_note(tags, metrics, f"{name} version {version.version}, {alias}: "
                                                                     f"{decision}"))
    (log.info if promoted else log.warning)("%s version %s @%s%s; %s", name, version.version, CHALLENGER,
                                            f" @{CHAMPION}" if promoted else "", decision)
    result = RegisterResult(name, version.version, promoted, decision, False)
    _write_decision(decision_out, result, score, comparison, checks)
    return result


def deployment_folder(onnx: Path, report: dict[str, Any], folder: Path) -> Path:
    """Copy what a version ships into folder: the fp32 .onnx, its export report, the passing variants' files.

    Raises:
        UserError: a file the report says a passing variant runs is missing.
    """
    folder.mkdir(parents=True)
    files = {onnx, report_path_for(onnx)}
    files |= {variant_path(onnx, VARIANTS[name].file) for name, result in report["variants"].items()
              if result.get("passed") and name in VARIANTS}
    for path in sorted(files):
        if not path.is_file():
            raise UserError(f"{path}: missing, yet its export report lists a variant that runs it (run `mammoseg "
                            "export` again)")
        shutil.copy2(path, folder / path.name)
    return folder


def variant_tags(report: dict[str, Any]) -> dict[str, str]:
    """One tag per variant of the export report: engine, precision, its gate and its latency."""
    size = "x".join(str(side) for side in report.get("latency_shape", [])[-2:]) or "?"
    tags = {}
    for name, result in report["variants"].items():
        what = f"{result.get('engine', 'onnxruntime')} {result.get('precision', name)}"
        if "skipped" in result:
            tags[f"variant_{name}"] = f"{what}: skipped ({result['skipped']})"
            continue
        diff = result.get("max_native_dice_diff", result.get("max_image_dice_diff", float("nan")))
        latency = result.get("latency_s", float("nan"))
        tags[f"variant_{name}"] = (f"{what}: {'passed' if result.get('passed') else 'FAILED'} its gate (max Dice "
                                   f"diff {diff:.4f}), {latency:.3f} s per {size} image")
    return tags


def _write_decision(path: Path | None, result: RegisterResult, score: float,
                    comparison: ChampionComparison | None, checks: list[GateCheck]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {**dataclasses.asdict(result), "score": score,
                               "gate": [dataclasses.asdict(check) for check in checks],
                               "champion_comparison": None if comparison is None else dataclasses.asdict(comparison)}
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n"))
