"""Export: the trained model to ONNX with its I/O contract, gated by parity with PyTorch on the test split.

Writes `--onnx-out` (fp32), the files of its deployment variants beside it (`<stem>.int8.onnx`:
static int8 QDQ calibrated on validation images, run by ONNX Runtime and by OpenVINO;
`<stem>.fp16.onnx` for GPUs) and `<stem>.export.json`: per variant (mammoseg.variants) its engine,
precision, file, gate result and latency at `latency_size` (the network is fully convolutional),
and the execution provider actually used. The fp32 export fails (and writes nothing) unless ONNX
Runtime matches PyTorch. Every other variant is gated by its per-image native-grid Dice difference
from fp32 on the test split; one that misses it is reported and never chosen, and a file that no
passing variant runs is not kept. Beside the gate, the report says how far the fp32 model's own
masks move when all its logits shift by each of +-`gate_probe_logit_shifts` (`logit_shift_probe`):
the size of logit error the model's decisions tolerate, against which a variant's miss can be read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mammoseg import tracking
from mammoseg.config import ExportConfig
from mammoseg.data import CLASSES, load_examples, read_dataset
from mammoseg.errors import UserError
from mammoseg.fileio import sha256_of, write_atomically
from mammoseg.inference import TrainedModel, load_model, threshold_map
from mammoseg.metrics import dice_counts, dice_from_counts
from mammoseg.onnx_runtime import IO_SPEC_KEY, open_session, sigmoid
from mammoseg.stages.evaluate import TARGETS, NativeScores, score_native_many
from mammoseg.variants import (
    OPENVINO_PRECISIONS,
    VARIANTS,
    Variant,
    cannot_run_here,
    open_variant,
    report_path_for,
    variant_path,
)
from model import export_onnx

log = logging.getLogger(__name__)

IO_SPEC_FORMAT = "mammoseg.io_spec/1"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What export wrote and whether each variant passed its gate."""

    onnx_path: Path
    report_path: Path
    variants: dict[str, bool]


def io_spec(trained: TrainedModel, run_id: str, tags: dict[str, str]) -> dict[str, Any]:
    """The I/O contract embedded in the model: what goes in, what comes out, how it was made."""
    multiple = trained.network.size_multiple
    return {
        "format": IO_SPEC_FORMAT,
        "input": {"name": "image", "shape": ["batch", trained.network.in_channels, "height", "width"],
                  "dtype": "float32", "channels": ["block mean", "block maximum"][:trained.network.in_channels],
                  "value_range": [0.0, 1.0],
                  "shape_rule": f"height and width are multiples of {multiple}",
                  "size_multiple": multiple},
        "output": {"name": "logits", "shape": ["batch", 2, "height", "width"], "dtype": "float32",
                   "channels": list(CLASSES), "activation": "sigmoid"},
        "threshold": list(trained.threshold),
        "preprocessing": trained.preprocessing,
        "parameters": trained.parameters,
        "architecture": trained.architecture,
        "training_run_id": run_id,
        "data_dvc_hash": tags.get("data_dvc_hash"),
        "dataset_digest": tags.get("dataset_digest"),
        "git_commit": tags.get("git_commit"),
    }


@torch.no_grad()
def _torch_logits(trained: TrainedModel, image: np.ndarray) -> np.ndarray:
    return trained.network(torch.from_numpy(image[None])).numpy()[0]


def _image_dice(logits: np.ndarray, truth: np.ndarray, threshold: Sequence[float]) -> float:
    """Dice of all lesions (both classes merged) of one image; nan when both are empty."""
    predicted = (sigmoid(logits) >= threshold_map(threshold)).any(0)
    return dice_from_counts(*dice_counts(predicted, truth.any(0)))


def parity(session, trained: TrainedModel, examples: Sequence[tuple[np.ndarray, np.ndarray]],
           reference: Sequence[np.ndarray]) -> dict[str, Any]:
    """Compare a session's logits and per-image Dice with PyTorch's on the same images."""
    max_abs, dice_diffs = 0.0, []
    for (image, mask), torch_logits in zip(examples, reference, strict=True):
        onnx_logits = session.run(image[None])[0]
        max_abs = max(max_abs, float(np.max(np.abs(onnx_logits - torch_logits))))
        a, b = _image_dice(onnx_logits, mask, trained.threshold), _image_dice(torch_logits, mask, trained.threshold)
        if not (np.isnan(a) and np.isnan(b)):
            dice_diffs.append(float(abs(np.nan_to_num(a) - np.nan_to_num(b))))
    return {"images": len(examples), "max_abs_logit_diff": max_abs,
            "max_image_dice_diff": max(dice_diffs, default=0.0), "provider": session.provider,
            "provider_fell_back": session.fell_back}


def latency_seconds(session, shape: tuple[int, ...], repeats: int) -> float:
    """Median wall time of one forward pass at `shape` after a warm-up run."""
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    session.run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _CalibrationReader:
    """Feeds validation images to ONNX Runtime's static quantisation calibrator."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self._batches = iter([{"image": image[None]} for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize_int8(fp32_path: Path, out_path: Path, calibration: Sequence[np.ndarray]) -> None:
    """Static int8 QDQ quantisation (per-channel weights), calibrated on validation images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), _CalibrationReader(calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)


def _convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 weights and activations with fp32 input/output (for GPUs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))


def run(config: ExportConfig, model: Path, dataset: Path, onnx_out: Path) -> ExportResult:
    """Export, check and gate the model; write the variants and the export report.

    Args:
        config: tolerances, variants and latency settings.
        model: the trained model folder (model.pt and its MLflow run id).
        dataset: the preprocessed dataset (test split for parity, val split for calibration).
        onnx_out: the fp32 .onnx file to write.

    Raises:
        UserError: the export does not pass onnx.checker or the fp32 parity gate.
    """
    import onnx

    trained = load_model(model)
    multiple = trained.network.size_multiple
    if config.latency_size <= 0 or config.latency_size % multiple:
        raise UserError(f"export.latency_size must be a positive multiple of {multiple} (the network's size "
                        f"multiple), got {config.latency_size}")
    unknown = sorted(set(config.openvino) - set(OPENVINO_PRECISIONS))
    if unknown:
        raise UserError(f"export.openvino lists {', '.join(unknown)}; OpenVINO variants are "
                        f"{', '.join(OPENVINO_PRECISIONS)}")
    run_id = tracking.read_run_id(model)
    tags, _ = tracking.run_data(run_id)
    index, _ = read_dataset(dataset)
    test_rows = index[index["split"] == "test"]
    if config.parity_images:
        test_rows = test_rows.head(config.parity_images)
    if test_rows.empty:
        raise UserError(f"{dataset / 'index.parquet'}: the test split is empty: nothing to check parity on")
    examples = load_examples(dataset, test_rows)
    reference = [_torch_logits(trained, image) for image, _ in examples]
    spec = io_spec(trained, run_id, tags)
    metadata = {IO_SPEC_KEY: json.dumps(spec, sort_keys=True), "threshold": json.dumps(list(trained.threshold)),
                "training_run_id": run_id, "parameters": str(trained.parameters)}
    latency_shape = (1, trained.network.in_channels, config.latency_size, config.latency_size)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"run_id": run_id, "tolerances": dataclasses.asdict(config),
                              "latency_shape": list(latency_shape), "variants": {}}
    with tempfile.TemporaryDirectory(dir=onnx_out.parent) as tmp:
        staged = Path(tmp) / "model.onnx"
        export_onnx(trained.network, staged, metadata=metadata)
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise UserError(f"{onnx_out}: exported model fails onnx.checker ({str(exc).splitlines()[0]})") \
                from None
        session = open_session(staged, threads=config.threads)
        fp32 = {**_describe(VARIANTS["fp32"], onnx_out), **parity(session, trained, examples, reference)}
        fp32["passed"] = bool(fp32["max_abs_logit_diff"] <= config.parity_logit_atol
                          and fp32["max_image_dice_diff"] <= config.parity_dice_tolerance)
        fp32["latency_s"] = latency_seconds(session, latency_shape, config.latency_repeats)
        report["variants"]["fp32"] = fp32
        if not fp32["passed"]:
            raise UserError(
                f"{onnx_out}: ONNX Runtime disagrees with PyTorch on the test split (max |logit diff| "
                f"{fp32['max_abs_logit_diff']:.2e} > {config.parity_logit_atol:g} or max per-image Dice diff "
                f"{fp32['max_image_dice_diff']:.4f} > {config.parity_dice_tolerance:g}); not exported")
        staged.replace(onnx_out)
        variants_started = time.perf_counter()
        _variants(config, onnx_out, session, trained.threshold, dataset, index, test_rows, latency_shape, report)
        log.info("variants built, gated and timed in %.1f s", time.perf_counter() - variants_started)
    report["sha256"] = fp32["sha256"] = sha256_of(onnx_out)
    report_path = report_path_for(onnx_out)
    write_atomically(report_path, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    with tracking.continue_run(run_id) as mlflow_run:
        mlflow_run.log_metrics({f"export_{name}_{key}": float(value)
                                for name, result in report["variants"].items()
                                for key, value in result.items()
                                if isinstance(value, int | float) and not isinstance(value, bool)})
        if "logit_shift_probe" in report:
            mlflow_run.log_metrics({f"export_logit_shift_{shift}_max_native_dice_diff": diff
                                    for shift, diff in report["logit_shift_probe"]["max_native_dice_diff"].items()})
        mlflow_run.set_tags({"export_parity": "passed", "onnx_sha256": report["sha256"]})
        mlflow_run.log_artifact(report_path, "export")
    for name, result in report["variants"].items():
        log.info("%s (%s %s): %s on %s, max Dice diff %s (native, vs fp32) / %s (vs PyTorch), %s s per %dx%d image",
                 name, result["engine"], result["precision"],
                 "passed" if result.get("passed") else result.get("skipped", "FAILED"), result.get("provider", "-"),
                 _fmt(result.get("max_native_dice_diff")), _fmt(result.get("max_image_dice_diff")),
                 _fmt(result.get("latency_s")), config.latency_size, config.latency_size)
    return ExportResult(onnx_out, report_path,
                        {name: bool(result.get("passed")) for name, result in report["variants"].items()})


def _describe(variant: Variant, onnx_out: Path) -> dict[str, Any]:
    """The report fields that say what a variant is: its engine, precision and the file it runs."""
    return {"engine": variant.engine, "precision": variant.precision,
            "file": variant_path(onnx_out, variant.file).name}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


class _ShiftedLogits:
    """The fp32 model's probabilities with every logit moved by a constant (export's logit-shift probe).

    A reduced-precision variant errs in its logits (bf16 keeps 8 significant bits, and its roundings
    add up over the network's 82 convolutions). How far the fp32 model's own masks move when all its
    logits shift by a constant says how much error its decisions tolerate: where a shift of a few
    hundredths already moves them beyond the gate's tolerance, the decisions sit on flat logits and
    the cure is a model with sharper outputs, not another engine. fp32 (shift 0) and all probes share
    this object: score_native_many hands every model the same batch, so the fp32 logits are computed
    once per batch.
    """

    def __init__(self, fp32_session) -> None:
        self._session = fp32_session
        self._images: np.ndarray | None = None
        self._logits: np.ndarray | None = None

    def shifted(self, shift: float):
        """Return a probability function: sigmoid(fp32 logits + shift) of a batch of images."""

        def probabilities(images: np.ndarray) -> np.ndarray:
            if self._images is not images:
                self._images, self._logits = images, self._session.run(images)
            return sigmoid(self._logits + np.float32(shift))

        return probabilities


def max_native_dice_diff(variant: NativeScores, fp32: NativeScores) -> float:
    """Largest per-image native-grid Dice difference between a variant and fp32, over every target.

    An image where both find nothing of a target (Dice undefined for both) does not count; where
    only one does, its Dice is taken as 0.
    """
    diffs = [0.0]
    for target in TARGETS:
        for ours, theirs in zip(variant.counts[target], fp32.counts[target], strict=True):
            a, b = dice_from_counts(*ours), dice_from_counts(*theirs)
            if not (np.isnan(a) and np.isnan(b)):
                diffs.append(float(abs(np.nan_to_num(a) - np.nan_to_num(b))))
    return max(diffs)


def _variants(config: ExportConfig, onnx_out: Path, fp32_session, threshold: Sequence[float], dataset: Path,
              index: pd.DataFrame, test_rows: pd.DataFrame, latency_shape: tuple[int, ...],
              report: dict[str, Any]) -> None:
    """Build, gate and time the deployment variants; keep only the files a passing variant runs.

    The gate: each variant's per-image Dice on the DICOM grid (evaluate's scoring) differs from the
    fp32 model's by at most `variant_dice_tolerance` on every test image and target.
    """
    wanted = [name for name, on in (("int8", config.int8), ("fp16", config.fp16)) if on]
    wanted += [f"openvino_{precision}" for precision in config.openvino]
    runnable = []
    for name in wanted:
        variant = VARIANTS[name]
        reason = cannot_run_here(variant)
        if reason:
            report["variants"][name] = {**_describe(variant, onnx_out), "skipped": reason, "passed": False}
        else:
            runnable.append(variant)
    files = {variant.file for variant in runnable} - {"fp32"}
    for file in {variant.file for variant in VARIANTS.values()} - {"fp32"}:
        variant_path(onnx_out, file).unlink(missing_ok=True)  # a previous export's: it describes another model
    for file in files:
        path = variant_path(onnx_out, file)
        if file == "int8":
            val_rows = index[index["split"] == "val"].head(config.calibration_images)
            calibration = [image for image, _ in load_examples(dataset, val_rows)] or \
                [load_examples(dataset, test_rows.head(1))[0][0]]
            _quantize_int8(onnx_out, path, calibration)
        else:
            _convert_fp16(onnx_out, path)
    sessions = {variant.name: open_variant(variant_path(onnx_out, variant.file), variant, config.threads)
                for variant in runnable}
    if not sessions:
        return
    shifts = sorted({abs(shift) for shift in config.gate_probe_logit_shifts} - {0.0})
    # fp32 itself is the unshifted probe (bit-equal to fp32_session.probabilities), so its logits are
    # computed once per batch for it and every probe.
    logits = _ShiftedLogits(fp32_session)
    probes = {shift: {f"fp32 logits {delta:+g}": logits.shifted(delta) for delta in (shift, -shift)}
              for shift in shifts}
    # Batches of one: an OpenVINO session compiles once per input shape.
    scores = score_native_many(dataset, test_rows, {"fp32": logits.shifted(0.0),
                                                    **{name: f for pair in probes.values() for name, f in pair.items()},
                                                    **{name: s.probabilities for name, s in sessions.items()}},
                               np.asarray(threshold, np.float32), batch_size=1, desc="gate variants")
    if probes:
        tolerance = config.variant_dice_tolerance
        moved = {shift: max(max_native_dice_diff(scores[name], scores["fp32"]) for name in pair)
                 for shift, pair in probes.items()}
        # The largest shift up to which every probed shift keeps the masks within the tolerance.
        tolerated = None
        for shift, diff in moved.items():
            if diff > tolerance:
                break
            tolerated = shift
        report["logit_shift_probe"] = {"max_native_dice_diff": {f"{shift:g}": diff for shift, diff in moved.items()},
                                       "largest_within_tolerance": tolerated}
        log.info("fp32 masks under a logit shift of +-%s: max per-image native Dice diff %s (gate %g)",
                 "/".join(f"{shift:g}" for shift in moved), "/".join(f"{diff:.4f}" for diff in moved.values()),
                 tolerance)
    for variant in runnable:
        session = sessions[variant.name]
        diff = max_native_dice_diff(scores[variant.name], scores["fp32"])
        report["variants"][variant.name] = {
            **_describe(variant, onnx_out), "images": len(test_rows), "max_native_dice_diff": diff,
            "passed": bool(diff <= config.variant_dice_tolerance), "provider": session.provider,
            "provider_fell_back": session.fell_back,
            "latency_s": latency_seconds(session, latency_shape, config.latency_repeats),
            "sha256": sha256_of(variant_path(onnx_out, variant.file))}
        if diff > config.variant_dice_tolerance:
            log.warning("%s variant misses the Dice gate (%.4f > %g): never chosen", variant.name, diff,
                        config.variant_dice_tolerance)
    kept = {VARIANTS[name].file for name, result in report["variants"].items() if result.get("passed")}
    for file in files - kept:
        variant_path(onnx_out, file).unlink()
