"""KFP v2 components: one per pipeline stage, each running `mammoseg <stage>` in the project image.

Artifacts map to the CLI's paths: an input artifact is passed to the flag named for what it is
(`--manifest`, `--dataset`, `--model`), an output artifact to the `-out` flag of the same name
(`--manifest-out` -> output `manifest`). File outputs are folders holding the file under its dvc.yaml
name (manifest/manifest.parquet, onnx/model.onnx, ...), so what a stage writes beside a file
(manifest.rejected.csv, the ONNX variants and model.export.json) travels with it. This package imports
kfp only; it knows the CLI by name, and tests/test_wiring.py checks every command line against
mammoseg's own parser.
"""

from __future__ import annotations

from components.checkpoints import check_checkpoint_volume, remove_run_checkpoints
from components.data import data
from components.evaluate import evaluate
from components.export import export
from components.ingest import ingest
from components.preprocess import preprocess
from components.register import register
from components.train import train
from components.train_job import train_job
from components.validate import validate

# The stage components in pipeline order (the same names as mammoseg.cli.PIPELINE_STAGES).
STAGE_COMPONENTS = {"ingest": ingest, "validate": validate, "preprocess": preprocess, "train": train,
                    "evaluate": evaluate, "export": export, "register": register}

__all__ = ["STAGE_COMPONENTS", "check_checkpoint_volume", "data", "evaluate", "export", "ingest", "preprocess",
           "register", "remove_run_checkpoints", "train", "train_job", "validate"]
