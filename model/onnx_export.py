"""Export a segmentation network to ONNX with a dynamic batch, height and width (writes one .onnx file).

Uses the current exporter (`torch.onnx.export(..., dynamo=True)`, i.e. torch.export then translation to
ONNX). Height and width are exported as `multiple * Dim`, so the ONNX graph's input shape states the
size rule itself: `[batch, C, 128*h_blocks, 128*w_blocks]` for a depth-7 LightUNet.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example: torch.Tensor | None = None,
    size_multiple: int | None = None,
    metadata: Mapping[str, str] | None = None,
    opset_version: int | None = None,
) -> Path:
    """Write model to path as ONNX, in eval mode, with input "image" and output "logits".

    Args:
        model: the network, (N, C, H, W) -> (N, K, H, W); its training flag is restored afterwards.
        path: the .onnx file to write (its folder must exist).
        example: an input to trace with; default zeros (2, model.in_channels, 2m, 2m), m = size_multiple.
            Batch, height and width of the example must not be 1 at any level (the exporter would fix
            a size-1 dimension as a constant), hence 2 and 2m.
        size_multiple: height and width of the exported model are multiples of this; default
            model.size_multiple (2**depth for LightUNet).
        metadata: key-value pairs stored in the ONNX model's metadata_props (e.g. an I/O spec).
        opset_version: ONNX opset; None for the exporter's recommended one.

    Returns:
        The path written.
    """
    path = Path(path)
    multiple = size_multiple if size_multiple is not None else model.size_multiple
    if example is None:
        example = torch.zeros(2, model.in_channels, 2 * multiple, 2 * multiple)
    # torch.export keys dynamic_shapes by forward's parameter name, which peers' networks choose.
    (input_arg, *_) = inspect.signature(model.forward).parameters
    dynamic_shapes = {
        input_arg: {
            0: Dim("batch", min=1, max=1024),
            2: multiple * Dim("h_blocks", min=1, max=1024),
            3: multiple * Dim("w_blocks", min=1, max=1024),
        }
    }
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset_version,
            verbose=False,
        )
    finally:
        model.train(was_training)
    if metadata:
        program.model.metadata_props.update(metadata)
    program.save(path)
    return path
