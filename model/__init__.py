"""The network: LightUNet, the paper's four variants, its static cost and its ONNX export (torch only)."""

from model.cost import ModelCost, count_parameters, forward_flops, model_cost, saved_activation_bytes
from model.lightunet import PAPER_VARIANTS, DeepSupervision, LightUNet, PaperVariant, build_variant
from model.onnx_export import export_onnx

__all__ = [
    "PAPER_VARIANTS",
    "DeepSupervision",
    "LightUNet",
    "ModelCost",
    "PaperVariant",
    "build_variant",
    "count_parameters",
    "export_onnx",
    "forward_flops",
    "model_cost",
    "saved_activation_bytes",
]
