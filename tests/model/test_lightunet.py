"""LightUNet: the paper's parameter counts, shapes, the size rule, gradients, checkpointing, deep supervision."""

import copy

import pytest
import torch

from model import PAPER_VARIANTS, DeepSupervision, LightUNet, build_variant, count_parameters

# Exact counts of our design (see model/lightunet.py's docstring); a change here is a change of network.
EXPECTED_PARAMS = {
    "unet-depth7-64f": 591_368_258,
    "16-filters": 36_973_586,
    "separable": 4_214_699,
    "separable+residual": 5_440_907,
}
FINAL = "separable+residual"


@pytest.fixture
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(PAPER_VARIANTS))
def test_parameter_count_is_exact_and_near_the_paper(name):
    with torch.device("meta"):  # the 600M variant would take 2.4 GB anywhere else
        net = build_variant(name)
    params = count_parameters(net)
    assert params == EXPECTED_PARAMS[name]
    tolerance = 0.05 if name == FINAL else 0.10
    assert abs(params / PAPER_VARIANTS[name].paper_params - 1) <= tolerance


def test_variants_are_in_paper_order_and_defaults_are_the_final_network():
    assert list(PAPER_VARIANTS) == list(EXPECTED_PARAMS)
    with torch.device("meta"):
        assert count_parameters(LightUNet()) == EXPECTED_PARAMS[FINAL]


def test_build_variant_applies_overrides_and_rejects_unknown_names():
    assert build_variant(FINAL, checkpointing=True).checkpointing
    with pytest.raises(KeyError, match="unknown variant"):
        build_variant("unet-depth9")


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, (1, 1, 128, 128)),
        ({}, (2, 1, 128, 256)),
        ({}, (1, 1, 256, 128)),
        ({"depth": 3, "filters": 4, "conv": "standard"}, (3, 1, 8, 40)),
        ({"depth": 4, "filters": 8, "max_filters": 16, "residual": False}, (1, 1, 48, 16)),
        ({"depth": 2, "filters": 4, "in_channels": 3, "out_channels": 5}, (2, 3, 12, 4)),
    ],
)
def test_output_has_the_input_size_and_one_channel_per_class(seeded, kwargs, shape):
    net = LightUNet(**kwargs).eval()
    with torch.no_grad():
        y = net(torch.randn(shape))
    assert y.shape == (shape[0], net.out_channels, *shape[2:])
    assert y.dtype == torch.float32


def test_channels_double_per_level_up_to_the_cap():
    assert LightUNet(depth=7, filters=16, max_filters=512).channels == (16, 32, 64, 128, 256, 512, 512, 512)
    assert LightUNet(depth=3, filters=4, max_filters=None).channels == (4, 8, 16, 32)


@pytest.mark.parametrize("size", [(100, 128), (128, 200), (64, 64), (130, 130)])
def test_a_size_off_the_rule_is_a_clear_value_error(size):
    net = LightUNet().eval()
    height, width = size
    with pytest.raises(ValueError, match=rf"multiples of 2\*\*7 = 128; got {height}x{width}"):
        net(torch.zeros(1, 1, height, width))


def test_a_tensor_that_is_not_nchw_is_a_value_error():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        LightUNet()(torch.zeros(1, 128, 128))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 0}, "depth"),
        ({"filters": 0}, "filters"),
        ({"filters": 32, "max_filters": 16}, "max_filters"),
        ({"conv": "dilated"}, "conv must be one of standard, separable"),
    ],
)
def test_constructor_checks_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LightUNet(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"depth": 3, "filters": 4, "conv": "standard"}, {"depth": 3, "filters": 4, "residual": False}],
    ids=["final", "standard-residual", "separable-plain"],
)
def test_gradients_reach_every_parameter(seeded, kwargs):
    net = LightUNet(**kwargs).train()
    # Batch 2: at 128x128 a depth-7 network's bottom is 1x1, and BatchNorm needs > 1 value per channel.
    x = torch.randn(2, 1, 128, 128)
    net(x).square().mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_checkpointing_gives_the_same_outputs_gradients_and_batchnorm_statistics(seeded):
    plain = LightUNet().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    x = torch.randn(2, 1, 128, 128)
    outputs = []
    for net in (plain, checkpointed):
        y = net(x)
        y.square().mean().backward()
        outputs.append(y.detach())
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # The recomputation in backward must not update BatchNorm's running statistics a second time.
    for (name, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_checkpointing_is_off_in_eval_and_without_grad(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("checkpoint() called outside training with grad")

    monkeypatch.setattr("model.lightunet.checkpoint", fail)
    net = LightUNet(depth=3, filters=4, checkpointing=True)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        net.train()(x)
    net.eval()(x).sum().backward()


def test_deep_supervision_adds_logits_per_scale_and_leaves_the_network_unchanged(seeded):
    net = LightUNet(depth=4, filters=4, in_channels=2)
    plain_keys = set(net.state_dict())
    supervised = DeepSupervision(net, levels=2).train()
    x = torch.randn(2, 2, 64, 64)
    outputs = supervised(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 64, 64), (2, 2, 32, 32), (2, 2, 16, 16)]
    # The finest output is the network's own head on its own decoder.
    torch.testing.assert_close(outputs[0], net.train()(x))
    sum(o.square().mean() for o in outputs).backward()
    for name, parameter in supervised.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # What is saved and exported: the network alone, its keys untouched; eval gives its logits.
    assert set(net.state_dict()) == plain_keys
    supervised.eval()
    torch.testing.assert_close(supervised(x), net(x))


@pytest.mark.parametrize("levels", [0, 4])
def test_deep_supervision_levels_must_lie_inside_the_decoder(levels):
    with pytest.raises(ValueError, match=r"deep supervision levels must be in \[1, 3\]"):
        DeepSupervision(LightUNet(depth=4, filters=4), levels)
