"""model.export_onnx: a dynamic-shape ONNX model that ONNX Runtime runs as PyTorch does."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model import LightUNet, export_onnx

pytestmark = [
    pytest.mark.slow,  # the export itself takes ~10 s on 2 cores
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # inside torch.export, not ours
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = LightUNet().train()
    # A few training passes give BatchNorm non-trivial running statistics, which eval mode uses.
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, 256, 256))
    # Exported from training mode on purpose: export_onnx must export eval mode and restore the flag.
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "lightunet.onnx",
                       metadata={"mammoseg.classes": "mass,calcification"})
    assert net.training
    return net.eval(), path


def test_the_model_is_valid_with_dynamic_batch_height_and_width(exported):
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (image,) = proto.graph.input
    (logits,) = proto.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    dims = image.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:2]] == [1]
    # Batch, height and width are symbols; height and width carry the size rule in their names.
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]
    assert "128*" in dims[2].dim_param
    assert {p.key: p.value for p in proto.metadata_props}["mammoseg.classes"] == "mass,calcification"


@pytest.mark.parametrize("shape", [(1, 1, 128, 256), (2, 1, 256, 128)])
def test_onnx_runtime_matches_pytorch(exported, shape):
    net, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x).numpy()
    (actual,) = session.run(None, {"image": x.numpy()})
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)

