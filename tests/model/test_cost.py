"""model.cost: FLOPs and saved-activation counts against hand counts and torch's own counter."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model import LightUNet, build_variant, forward_flops, model_cost, saved_activation_bytes


@pytest.mark.parametrize(
    ("layer", "macs_per_pixel"),
    [
        (nn.Conv2d(4, 6, 3, padding=1), 6 * 4 * 9),
        (nn.Conv2d(4, 4, 3, padding=1, groups=4), 4 * 9),  # depthwise: 9 per channel, not 9 * Cin
        (nn.Conv2d(4, 8, 1), 8 * 4),
    ],
    ids=["standard", "depthwise", "pointwise"],
)
def test_conv_flops_are_twice_the_macs(layer, macs_per_pixel):
    assert forward_flops(layer, 8, 16, batch=3, in_channels=4) == 2 * macs_per_pixel * 8 * 16 * 3


def test_transposed_conv_flops_count_each_input_pixel_once():
    layer = nn.ConvTranspose2d(4, 6, 2, stride=2)
    assert forward_flops(layer, 8, 8, in_channels=4) == 2 * 8 * 8 * 4 * 6 * 2 * 2


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"depth": 3, "filters": 8, "conv": "standard"}],
    ids=["final", "standard"],
)
def test_forward_flops_match_torch_flop_counter(kwargs):
    # torch's counter is exact for forward convolutions, grouped ones included (its error is in the
    # depthwise weight gradient, which a forward pass does not have).
    net = LightUNet(**kwargs).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(2, 1, 128, 256))
    assert forward_flops(net, 128, 256, batch=2) == counter.get_total_flops()


def test_saved_activations_of_conv_relu_are_its_input_and_output():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    # The convolution keeps its input (for the weight gradient), ReLU its output; fp32 = 4 bytes.
    assert saved_activation_bytes(net, 32, 16, in_channels=1) == 4 * (1 + 4) * 32 * 16


def test_saved_activations_on_meta_equal_those_of_a_real_forward_pass():
    torch.manual_seed(0)
    net = LightUNet().train()
    weights = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    saved = {}

    def pack(tensor):
        if (key := tensor.untyped_storage().data_ptr()) not in weights:
            saved.setdefault(key, tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(torch.randn(1, 1, 256, 128))
    real = sum(t.untyped_storage().nbytes() for t in saved.values())
    assert saved_activation_bytes(net, 256, 128) == real


def test_saved_activations_scale_with_pixels_and_halve_in_bf16():
    net = LightUNet()
    small = saved_activation_bytes(net, 256, 256)
    large = saved_activation_bytes(net, 512, 512)
    assert large / small == pytest.approx(4, rel=0.01)
    bf16 = saved_activation_bytes(net, 512, 512, dtype=torch.bfloat16)
    # Not exactly half: max-pooling's indices stay int64.
    assert 0.45 < bf16 / large < 0.55


def test_costing_leaves_the_model_untouched():
    torch.manual_seed(0)
    net = LightUNet(depth=2, filters=4).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    saved_activation_bytes(net, 64, 64)
    forward_flops(net, 64, 64)
    assert not net.training
    for name, value in net.state_dict().items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, before[name], msg=name)


def test_the_final_network_costs_what_the_docs_say_at_1536():
    with torch.device("meta"):
        cost = model_cost(build_variant("separable+residual"))
    assert cost.params == 5_440_907
    assert cost.gflops == pytest.approx(71.0, abs=0.05)
    assert cost.activation_gib_fp32 == pytest.approx(6.12, abs=0.01)
    assert cost.activation_gib_bf16 == pytest.approx(3.13, abs=0.01)
