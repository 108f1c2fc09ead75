"""Export: the trained model to ONNX with its I/O contract, gated by parity with PyTorch on the test split.

Writes `--onnx-out` (fp32), deployment variants beside it (`<stem>.int8.onnx` for CPUs: static
int8 QDQ calibrated on validation images; `<stem>.fp16.onnx` for GPUs) and `<stem>.export.json`
with the parity results, the execution provider actually used and the latency of each variant.
The fp32 export fails (and writes nothing) unless ONNX Runtime matches PyTorch; a variant that
misses its looser gate is reported and not kept.
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
from model import export_onnx

log = logging.getLogger(__name__)

IO_SPEC_FORMAT = "mammoseg.io_spec/1"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What export wrote and whether each variant passed its gate."""

    onnx_path: Path
    report_path: Path
    variants: dict[str, bool]


def report_path_for(onnx_path: Path) -> Path:
    """Return the export report written beside an exported model."""
    return onnx_path.with_name(onnx_path.stem + ".export.json")


def variant_path(onnx_path: Path, variant: str) -> Path:
    """Return where a deployment variant of an exported model is written."""
    return onnx_path.with_name(f"{onnx_path.stem}.{variant}.onnx")


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
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"run_id": run_id, "tolerances": dataclasses.asdict(config), "variants": {}}
    with tempfile.TemporaryDirectory(dir=onnx_out.parent) as tmp:
        staged = Path(tmp) / "model.onnx"
        export_onnx(trained.network, staged, metadata=metadata)
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise UserError(f"{onnx_out}: exported model fails onnx.checker ({str(exc).splitlines()[0]})") \
                from None
        session = open_session(staged, threads=config.threads)
        fp32 = parity(session, trained, examples, reference)
        fp32["passed"] = bool(fp32["max_abs_logit_diff"] <= config.parity_logit_atol
                          and fp32["max_image_dice_diff"] <= config.parity_dice_tolerance)
        fp32["latency_s"] = latency_seconds(session, (1, *examples[0][0].shape), config.latency_repeats)
        report["variants"]["fp32"] = fp32
        if not fp32["passed"]:
            raise UserError(
                f"{onnx_out}: ONNX Runtime disagrees with PyTorch on the test split (max |logit diff| "
                f"{fp32['max_abs_logit_diff']:.2e} > {config.parity_logit_atol:g} or max per-image Dice diff "
                f"{fp32['max_image_dice_diff']:.4f} > {config.parity_dice_tolerance:g}); not exported")
        staged.replace(onnx_out)
        _variants(config, onnx_out, trained, examples, reference, dataset, index, report)
    report["sha256"] = sha256_of(onnx_out)
    report_path = report_path_for(onnx_out)
    write_atomically(report_path, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    with tracking.continue_run(run_id) as mlflow_run:
        mlflow_run.log_metrics({f"export_{name}_{key}": float(value)
                                for name, result in report["variants"].items()
                                for key, value in result.items()
                                if isinstance(value, int | float) and not isinstance(value, bool)})
        mlflow_run.set_tags({"export_parity": "passed", "onnx_sha256": report["sha256"]})
        mlflow_run.log_artifact(report_path, "export")
    for name, result in report["variants"].items():
        log.info("%s: %s on %s, max |logit diff| %s, max Dice diff %s, latency %s", name,
                 "passed" if result.get("passed") else result.get("skipped", "FAILED"), result.get("provider"),
                 _fmt(result.get("max_abs_logit_diff")), _fmt(result.get("max_image_dice_diff")),
                 _fmt(result.get("latency_s")))
    return ExportResult(onnx_out, report_path,
                        {name: bool(result.get("passed")) for name, result in report["variants"].items()})


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _variants(config: ExportConfig, onnx_out: Path, trained: TrainedModel, examples, reference, dataset: Path,
              index: pd.DataFrame, report: dict[str, Any]) -> None:
    """Build, gate and time the reduced-precision variants; drop those that miss the Dice gate."""
    import onnxruntime as ort

    builders = {}
    if config.int8:
        val_rows = index[index["split"] == "val"].head(config.calibration_images)
        calibration = [image for image, _ in load_examples(dataset, val_rows)] or [examples[0][0]]
        builders["int8"] = lambda path: _quantize_int8(onnx_out, path, calibration)
    if config.fp16:
        builders["fp16"] = lambda path: _convert_fp16(onnx_out, path)
    for name, build in builders.items():
        path = variant_path(onnx_out, name)
        path.unlink(missing_ok=True)
        if name == "fp16" and "CUDAExecutionProvider" not in ort.get_available_providers():
            # fp16 kernels are a GPU path: ONNX Runtime's CPU provider lacks most of them.
            report["variants"][name] = {"skipped": "no CUDA execution provider here", "passed": False}
            continue
        build(path)
        session = open_session(path, threads=config.threads)
        result = parity(session, trained, examples, reference)
        result["passed"] = bool(result["max_image_dice_diff"] <= config.variant_dice_tolerance)
        result["latency_s"] = latency_seconds(session, (1, *examples[0][0].shape), config.latency_repeats)
        result["sha256"] = sha256_of(path)
        report["variants"][name] = result
        if not result["passed"]:
            log.warning("%s variant misses the Dice gate (%.4f > %g): not kept", name,
                        result["max_image_dice_diff"], config.variant_dice_tolerance)
            path.unlink()
