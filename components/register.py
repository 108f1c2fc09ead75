"""register: a Model Registry version of the ONNX model, @challenger, and @champion by the gate."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import IMAGE, STAGE_COMMAND, stage_args
from components.export import ONNX_FILE

DECISION_FILE = "registration.json"


@dsl.container_component
def register(params: str, onnx: Input[Model], dataset: Input[Dataset], decision: Output[Artifact],
             image_digest: str):
    """Run `mammoseg register` (the pipeline runs it after evaluate logged the gate's metric).

    Args:
        params: the `register:` block of params.yaml (one-line JSON), with the registered model's name.
        onnx: export's folder.
        dataset: preprocess's dataset folder (the gate re-scores the champion on its test split).
        decision: folder with registration.json (the version and the promotion decision).
        image_digest: the image's digest; unused by the command, part of KFP's cache key.
    """
    return dsl.ContainerSpec(image=IMAGE, command=STAGE_COMMAND, args=stage_args(
        "register", params, "--onnx", f"{onnx.path}/{ONNX_FILE}", "--dataset", dataset.path,
        "--decision-out", f"{decision.path}/{DECISION_FILE}"))
