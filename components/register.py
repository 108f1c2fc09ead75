"""register: a Model Registry version of the ONNX model, @challenger, and @champion by the gate."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import IMAGE, STAGE_COMMAND, lineage_args, stage_args
from components.export import ONNX_FILE

DECISION_FILE = "registration.json"


@dsl.container_component
def register(params: str, onnx: Input[Model], dataset: Input[Dataset], decision: Output[Artifact],
             image_digest: str, git_commit: str, git_dirty: str, data_dvc_hash: str):
    """Run `mammoseg register` (the pipeline runs it after evaluate logged the gate's metric).

    The version's lineage tags are the training run's; the lineage given here (the image holds no
    checkout) becomes its register_* tags, naming the code that applied the gate.

    Args:
        params: the `register:` block of params.yaml (one-line JSON), with the registered model's name.
        onnx: export's folder.
        dataset: preprocess's dataset folder (the gate re-scores the champion on its test split).
        decision: folder with registration.json (the version and the promotion decision).
        image_digest: the image's digest: the version's register_image_digest tag.
        git_commit: the commit the pipeline was compiled from ("unknown" outside a checkout).
        git_dirty: "True" or "False": whether tracked files differed from it then ("unknown").
        data_dvc_hash: the raw data's directory hash (the pipeline's data_hash).
    """
    return dsl.ContainerSpec(image=IMAGE, command=STAGE_COMMAND, args=stage_args(
        "register", params, "--onnx", f"{onnx.path}/{ONNX_FILE}", "--dataset", dataset.path,
        "--decision-out", f"{decision.path}/{DECISION_FILE}",
        *lineage_args(git_commit, git_dirty, data_dvc_hash, image_digest)))
