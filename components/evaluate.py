"""evaluate: test-split Dice, lesion detection and the threshold baseline, logged to the training run."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import IMAGE, STAGE_COMMAND, stage_args

METRICS_FILE = "metrics.json"


@dsl.container_component
def evaluate(params: str, dataset: Input[Dataset], model: Input[Model], metrics: Output[Artifact],
             report: Output[Artifact], image_digest: str):
    """Run `mammoseg evaluate`.

    Args:
        params: the `evaluate:` block of params.yaml (one-line JSON).
        dataset: preprocess's dataset folder.
        model: train's model folder.
        metrics: folder with metrics.json (test metrics with 95% intervals).
        report: folder with the per-image CSV, overlays and summary.md.
        image_digest: the image's digest; unused by the command, part of KFP's cache key.
    """
    return dsl.ContainerSpec(image=IMAGE, command=STAGE_COMMAND, args=stage_args(
        "evaluate", params, "--dataset", dataset.path, "--model", model.path,
        "--metrics-out", f"{metrics.path}/{METRICS_FILE}", "--report-out", report.path))
