"""export: ONNX with its I/O contract, parity-gated against PyTorch; variants beside it."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.common import IMAGE, STAGE_COMMAND, stage_args

# The onnx artifact is a folder: model.onnx plus the int8/fp16 variants and model.export.json that
# export writes beside it (register reads the report next to the .onnx it is given).
ONNX_FILE = "model.onnx"


@dsl.container_component
def export(params: str, model: Input[Model], dataset: Input[Dataset], onnx: Output[Model], image_digest: str):
    """Run `mammoseg export`.

    Args:
        params: the `export:` block of params.yaml (one-line JSON).
        model: train's model folder.
        dataset: preprocess's dataset folder (test split for parity, val for calibration).
        onnx: folder with model.onnx, its variants and model.export.json.
        image_digest: the image's digest; unused by the command, part of KFP's cache key.
    """
    return dsl.ContainerSpec(image=IMAGE, command=STAGE_COMMAND, args=stage_args(
        "export", params, "--model", model.path, "--dataset", dataset.path,
        "--onnx-out", f"{onnx.path}/{ONNX_FILE}"))
