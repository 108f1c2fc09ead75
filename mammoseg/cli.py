"""The `mammoseg` command: parser, subcommands, logging set-up; parse -> config -> stage function.

Each stage's flags come from two places: its path arguments (declared here, inputs named for what
they are, outputs ending in `-out`) and its params.yaml block (every scalar or list becomes a flag of
the same name, so the defaults are written once); train and register also take LINEAGE_FLAGS, what
they record they were made from. Stage modules are imported only when their subcommand runs, so
`mammoseg --help` never imports torch. The Kubeflow pipeline has a command of its own
(`mammoseg-pipeline`, in pipelines/): nothing here imports kfp, which a stage image need not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mammoseg import __version__
from mammoseg.config import (
    STAGE_CONFIGS,
    field_types,
    flag_type,
    load_params,
    overridable_fields,
    stage_config,
)
from mammoseg.errors import UserError

log = logging.getLogger("mammoseg")


@dataclasses.dataclass(frozen=True)
class PathArg:
    """A path-like argument of a stage: its flag, help text and argparse options."""

    flag: str
    help: str
    nargs: str | None = None
    required: bool = True
    path: bool = True  # False: a plain string (a name, a URI)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A subcommand: the module whose `run(config, **paths)` it calls, and its path arguments."""

    module: str
    help: str
    paths: tuple[PathArg, ...]
    lineage: bool = False  # takes the LINEAGE_FLAGS (it records what it was made from)


# What train tags its run with and register its version's own register_* tags (mammoseg.tracking.Lineage).
# Orchestrators whose stages run without the checkout (KFP pods: no .git, no data.dvc) give them; a
# stage without them reads the checkout it runs in (cwd): its HEAD, whether tracked files differ from
# it, data.dvc's hash. "" means the orchestrator does not know either.
LINEAGE_FLAGS: tuple[tuple[str, str], ...] = (
    ("--git-commit", "commit of the code (default: the checkout's HEAD, 'unknown' outside one)"),
    ("--git-dirty", "true|false: the code differs from the commit (default: the checkout's state, with its HEAD)"),
    ("--data-dvc-hash", "DVC hash of the raw data, <md5>.dir (default: data.dvc's, else 'untracked')"),
    ("--image-digest", "sha256 digest of the image the stage runs in (default: 'none', not in an image)"),
)


# The stages that every orchestrator runs, in order (dvc.yaml, MLproject, KFP components).
PIPELINE_STAGES = ("ingest", "validate", "preprocess", "train", "evaluate", "export", "register")

STAGES: dict[str, StageSpec] = {
    "synth": StageSpec(
        "mammoseg.synth",
        "write a generated dataset in the INbreast Release 1.0 layout",
        (PathArg("--out", "folder to write the dataset into (AllDICOMs/, AllXML/, INbreast.csv)"),),
    ),
    "ingest": StageSpec(
        "mammoseg.stages.ingest",
        "read an INbreast folder into a manifest (Parquet) and full-resolution lesion masks",
        (
            PathArg("--inbreast", "INbreast folder (AllDICOMs/, AllXML/, INbreast.csv or .xls)"),
            PathArg("--manifest-out", "manifest to write (Parquet, one row per image)"),
            PathArg("--masks-out", "folder for the <image_id>_mass.png / _calcification.png masks"),
        ),
    ),
    "validate": StageSpec(
        "mammoseg.stages.validate",
        "check the manifest and its DICOMs against the Great Expectations data contract",
        (
            PathArg("--inbreast", "the INbreast folder ingest read (the manifest's DICOM paths are relative to it)"),
            PathArg("--manifest", "manifest written by ingest (Parquet)"),
            PathArg("--report-out", "folder for the Data Docs HTML and summary.json"),
        ),
    ),
    "preprocess": StageSpec(
        "mammoseg.stages.preprocess",
        "decode, orient, crop and resize every image and its masks; assign patient-level splits",
        (
            PathArg("--inbreast", "the INbreast folder ingest read (the manifest's DICOM paths are relative to it)"),
            PathArg("--manifest", "manifest written by ingest (Parquet)"),
            PathArg("--masks", "full-resolution masks written by ingest"),
            PathArg("--dataset-out", "folder for the training dataset and its index.parquet"),
        ),
    ),
    "train": StageSpec(
        "mammoseg.stages.train",
        "train LightUNet on the preprocessed dataset, tracked in one MLflow run",
        (
            PathArg("--dataset", "preprocessed dataset (index.parquet, dataset.json)"),
            PathArg("--model-out", "folder for model.pt, checkpoint.pt, history.csv and the MLflow run id"),
            PathArg("--metrics-out", "JSON summary of the training (best epoch, validation Dice, threshold)"),
            PathArg("--validation-report", "validate's report folder, attached to the run", required=False),
        ),
        lineage=True,
    ),
    "evaluate": StageSpec(
        "mammoseg.stages.evaluate",
        "Dice, lesion detection and a threshold baseline on the test split, logged to the training run",
        (
            PathArg("--dataset", "preprocessed dataset (index.parquet, dataset.json)"),
            PathArg("--model", "trained model folder (model.pt and the MLflow run id)"),
            PathArg("--metrics-out", "JSON with the test metrics and their 95% intervals"),
            PathArg("--report-out", "folder for the per-image CSV, overlays and summary.md"),
        ),
    ),
    "export": StageSpec(
        "mammoseg.stages.export",
        "export the model to ONNX with its I/O contract; parity gate against PyTorch on the test split",
        (
            PathArg("--model", "trained model folder (model.pt and the MLflow run id)"),
            PathArg("--dataset", "preprocessed dataset (test split for parity, val for calibration)"),
            PathArg("--onnx-out", "the fp32 .onnx to write; variants and <stem>.export.json go beside it"),
        ),
    ),
    "register": StageSpec(
        "mammoseg.stages.register",
        "register the ONNX model in the MLflow Model Registry (@challenger; @champion by a gate)",
        (
            PathArg("--onnx", "the .onnx written by export"),
            PathArg("--dataset", "preprocessed dataset the model was tested on (re-scores the champion)"),
            PathArg("--decision-out", "JSON with the version and the promotion decision", required=False),
        ),
        lineage=True,
    ),
    "predict": StageSpec(
        "mammoseg.stages.predict",
        "segment DICOM mammograms with a registered (or local) ONNX model",
        (
            PathArg("--model", "models:/NAME@ALIAS, models:/NAME/VERSION, or a local .onnx", path=False),
            PathArg("--input", "DICOM files, or folders searched recursively for them", nargs="+"),
            PathArg("--out", "folder for masks (PNG), overlays and DICOM SEG objects"),
        ),
    ),
}


def _add_config_flags(parser: argparse.ArgumentParser, stage: str, defaults: dict[str, Any]) -> None:
    """Add one flag per overridable field of the stage's config, defaulting to params.yaml's value."""
    config_type = STAGE_CONFIGS[stage]
    hints = field_types(config_type)
    group = parser.add_argument_group(f"parameters (defaults from params.yaml '{stage}:')")
    for field in overridable_fields(config_type):
        element, is_list = flag_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        # `mlflow run -P batch_size=2` appends `--batch_size 2`: accept the underscore spelling too.
        aliases = [flag] if "_" not in field.name else [flag, "--" + field.name]
        default = defaults.get(field.name)
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": f"default: {default!r}"}
        if element is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=element, metavar=field.name.upper())
            if is_list:
                kwargs["nargs"] = "+"
        group.add_argument(*aliases, **kwargs)


def build_parser(params: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """Build the full `mammoseg` parser.

    Args:
        params: params.yaml contents, used only to show defaults in --help; None shows none.
    """
    params = params or {}
    parser = argparse.ArgumentParser(
        prog="mammoseg",
        description="Full-resolution mammography segmentation pipeline (INbreast, lightweight U-Net).",
    )
    parser.add_argument("--version", action="version", version=f"mammoseg {__version__}")
    parser.add_argument("--params", type=Path, default=None,
                        help="params.yaml to read defaults from (default: $MAMMOSEG_PARAMS or ./params.yaml)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    summary = subparsers.add_parser("model-summary", help="the paper's network variants: parameters, GFLOPs, memory",
                                    description="The paper's four network variants with our parameter counts "
                                    "next to the paper's, forward GFLOPs and saved activations at 1536x1536.")
    summary.add_argument("--json", action="store_true", dest="as_json", help="print JSON instead of a table")
    job = subparsers.add_parser("job-summary", help="what the main job shipped: native Dice with CIs, the gate",
                                description="Print evaluate's headline numbers and register's decision.")
    job.add_argument("--metrics", type=Path, required=True, help="evaluate's metrics JSON")
    job.add_argument("--registration", type=Path, default=None, help="register's decision JSON")
    for name, spec in STAGES.items():
        sub = subparsers.add_parser(name, help=spec.help, description=spec.help)
        for path in spec.paths:
            # argparse %-formats help texts: a literal "95%" must be "95%%".
            sub.add_argument(path.flag, type=Path if path.path else str, nargs=path.nargs,
                             required=path.required, help=path.help.replace("%", "%%"))
        if name in STAGE_CONFIGS:
            _add_config_flags(sub, name, params.get(name) or {})
        if spec.lineage:
            group = sub.add_argument_group("lineage: what train tags its run with, register its register_* tags")
            for flag, text in LINEAGE_FLAGS:
                group.add_argument(flag, default=None, metavar=flag.lstrip("-").split("-")[-1].upper(), help=text)
    return parser


def _params_for_help(argv: Sequence[str]) -> tuple[dict[str, Any], Path | None]:
    """Read params.yaml early (before parsing) so flag help can show defaults; tolerate its absence."""
    path = None
    for index, token in enumerate(argv):
        if token == "--params" and index + 1 < len(argv):
            path = Path(argv[index + 1])
        elif token.startswith("--params="):  # the one-token spelling must not fall back to ./params.yaml
            path = Path(token.split("=", 1)[1])
    try:
        return load_params(path), path
    except UserError:
        if path is not None:
            raise
        return {}, None


def _setup_logging(level: str) -> None:
    """Log to stderr with rich formatting when attached to a terminal, plain lines otherwise."""
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    # Libraries that narrate every step at INFO: keep their warnings, drop the chatter.
    for name in ("highdicom", "onnx_ir", "onnxscript", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _dest(flag: str) -> str:
    """Return the argparse destination of a flag (`--model-out` -> `model_out`)."""
    return flag.lstrip("-").replace("-", "_")


def run_stage(name: str, args: argparse.Namespace, params: dict[str, Any], params_path: Path | None) -> int:
    """Build the stage config from params + flags and call the stage's run(config, **paths)."""
    spec = STAGES[name]
    config = None
    if name in STAGE_CONFIGS:
        overrides = {f.name: getattr(args, f.name) for f in overridable_fields(STAGE_CONFIGS[name])}
        config = stage_config(name, params, overrides, params_path)
    paths = {_dest(p.flag): getattr(args, _dest(p.flag)) for p in spec.paths}
    module = importlib.import_module(spec.module)
    if spec.lineage:
        from mammoseg import tracking

        with tracking.given_lineage(**{_dest(flag): getattr(args, _dest(flag)) for flag, _ in LINEAGE_FLAGS}):
            result = module.run(config, **paths)
    else:
        result = module.run(config, **paths)
    exit_code = getattr(result, "exit_code", 0)
    return int(exit_code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mammoseg` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        params, params_path = _params_for_help(argv)
        args = build_parser(params).parse_args(argv)
        _setup_logging(args.log_level)
        if args.params is not None:
            params_path = args.params
        if args.command == "model-summary":
            from mammoseg import model_summary

            model_summary.run(None, as_json=args.as_json)
            return 0
        if args.command == "job-summary":
            from mammoseg import job_summary

            sys.stdout.write(job_summary.run(args.metrics, args.registration))
            return 0
        return run_stage(args.command, args, params, params_path)
    except UserError as exc:
        # User errors are one line, no traceback: the message names the file and the problem.
        print(f"mammoseg: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        print("mammoseg: interrupted", file=sys.stderr)  # noqa: T201
        return 130


if __name__ == "__main__":
    sys.exit(main())
