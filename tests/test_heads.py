"""UPerHead / FCNHead: shapes and strides from input_shape, mmseg parameter names, parameter counts
against the paper, initialisation, and the UPerNet graph checked against a functional re-derivation."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comer.heads import ConvModule, FCNHead, UPerHead

from comer import ShapeSpec


LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)


def pyramid_shape(channels):
    return {name: ShapeSpec(channels=c, stride=s) for name, c, s in zip(LEVELS, channels, STRIDES)}


def pyramid_features(shape, batch, height, width):
    return {
        name: torch.randn(batch, spec.channels, height // spec.stride, width // spec.stride)
        for name, spec in shape.items()
    }


@pytest.mark.parametrize("channels", [(8, 8, 8, 8), (6, 10, 12, 20), (16, 12, 8, 4)])
def test_uper_and_fcn_output_shapes_follow_input_shape(channels):
    shape = pyramid_shape(channels)
    features = pyramid_features(shape, batch=2, height=96, width=64)
    uper = UPerHead(shape, num_classes=5, channels=8).eval()
    fcn = FCNHead(shape, num_classes=5, channels=8).eval()
    assert uper(features).shape == (2, 5, 96 // 4, 64 // 4)
    assert fcn(features).shape == (2, 5, 96 // 16, 64 // 16)
    assert uper.output_stride == 4 and fcn.output_stride == 16
    assert uper.lateral_convs[1].conv.in_channels == channels[1]
    assert uper.bottleneck.conv.in_channels == channels[3] + 4 * 8
    assert fcn.convs[0].conv.in_channels == channels[2]


def test_parameter_names_mirror_mmseg():
    shape = pyramid_shape((8, 8, 8, 8))
    uper = UPerHead(shape, num_classes=3, channels=4, pool_scales=(1, 2))
    conv_module = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    prefixes = ["psp_modules.0.1", "psp_modules.1.1", "bottleneck", "lateral_convs.0", "lateral_convs.1",
                "lateral_convs.2", "fpn_convs.0", "fpn_convs.1", "fpn_convs.2", "fpn_bottleneck"]
    expected = {f"{p}.{k}" for p in prefixes for k in conv_module} | {"conv_seg.weight", "conv_seg.bias"}
    assert set(uper.state_dict()) == expected
    fcn = FCNHead(shape, num_classes=3, channels=4, num_convs=2, concat_input=True)
    expected_fcn = {f"{p}.{k}" for p in ("convs.0", "convs.1", "conv_cat") for k in conv_module}
    assert set(fcn.state_dict()) == expected_fcn | {"conv_seg.weight", "conv_seg.bias"}


# UperNet + auxiliary FCN (150 classes) minus the backbone, from the spec's parameter table:
# T 38.7 - 10.62, S 61.4 - 31.28, B 144.7 - 110.60 (millions; totals are rounded to 0.1M).
@pytest.mark.parametrize("width, expected_millions", [(192, 38.7 - 10.62), (384, 61.4 - 31.28), (768, 144.7 - 110.60)])
def test_head_parameter_count_matches_paper(width, expected_millions):
    shape = pyramid_shape((width,) * 4)
    heads = [UPerHead(shape, num_classes=150), FCNHead(shape, num_classes=150)]
    count = sum(p.numel() for head in heads for p in head.parameters())
    assert abs(count / 1e6 - expected_millions) < 0.05
    if width == 192:
        assert count == 28_095_788  # counted by hand: UPer 27,614,358 + FCN 481,430


def test_initialisation_as_mmseg():
    shape = pyramid_shape((192,) * 4)
    uper = UPerHead(shape, num_classes=150)
    assert torch.all(uper.conv_seg.bias == 0)
    assert abs(uper.conv_seg.weight.std().item() - 0.01) < 0.0005  # 76,800 samples of N(0, 0.01)
    conv = uper.fpn_bottleneck.conv
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() - (2.0 / fan_out) ** 0.5) < 0.02 * (2.0 / fan_out) ** 0.5
    assert conv.bias is None and torch.all(uper.fpn_bottleneck.bn.weight == 1)


def test_conv_module_bias_only_without_norm():
    assert ConvModule(3, 4, 3, padding=1).conv.bias is None
    plain = ConvModule(3, 4, 1, norm=None, act=None)
    assert plain.conv.bias is not None and plain.bn is None
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.conv.weight, plain.conv.bias))


def _conv(module, x):
    """ConvModule in eval mode, written out: conv, BN with running stats, ReLU."""
    y = F.conv2d(x, module.conv.weight, None, padding=module.conv.padding)
    bn = module.bn
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def test_uper_forward_matches_functional_rederivation():
    shape = pyramid_shape((6, 10, 12, 20))
    head = UPerHead(shape, num_classes=4, channels=8, pool_scales=(1, 2, 3)).eval()
    with torch.no_grad():  # non-trivial BN statistics so that every BN is exercised
        for module in head.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    features = pyramid_features(shape, batch=2, height=64, width=96)
    x = [features[name] for name in LEVELS]
    up = partial(F.interpolate, mode="bilinear", align_corners=False)

    top = x[3]
    pooled = [up(_conv(m[1], F.adaptive_avg_pool2d(top, s)), size=top.shape[2:]) for m, s in zip(head.psp_modules, (1, 2, 3))]
    p5 = _conv(head.bottleneck, torch.cat([top, *pooled], 1))
    p4 = _conv(head.lateral_convs[2], x[2]) + up(p5, size=x[2].shape[2:])
    p3 = _conv(head.lateral_convs[1], x[1]) + up(p4, size=x[1].shape[2:])
    p2 = _conv(head.lateral_convs[0], x[0]) + up(p3, size=x[0].shape[2:])
    outs = [_conv(head.fpn_convs[0], p2), _conv(head.fpn_convs[1], p3), _conv(head.fpn_convs[2], p4), p5]
    size = outs[0].shape[2:]
    fused = _conv(head.fpn_bottleneck, torch.cat([outs[0]] + [up(o, size=size) for o in outs[1:]], 1))
    expected = F.conv2d(fused, head.conv_seg.weight, head.conv_seg.bias)
    torch.testing.assert_close(head(features), expected, rtol=1e-5, atol=1e-5)


def test_fcn_forward_matches_functional_rederivation():
    shape = pyramid_shape((6, 10, 12, 20))
    head = FCNHead(shape, num_classes=4, channels=8, num_convs=2, concat_input=True).eval()
    x = pyramid_features(shape, batch=1, height=64, width=64)["res4"]
    out = _conv(head.convs[1], _conv(head.convs[0], x))
    out = _conv(head.conv_cat, torch.cat([x, out], 1))
    expected = F.conv2d(out, head.conv_seg.weight, head.conv_seg.bias)
    torch.testing.assert_close(head({"res4": x}), expected, rtol=1e-5, atol=1e-5)


def test_bad_configuration_errors_name_the_value():
    shape = pyramid_shape((8, 8, 8, 8))
    with pytest.raises(KeyError, match="res6"):
        UPerHead(shape, num_classes=3, in_features=("res2", "res6"))
    with pytest.raises(ValueError, match="fine to coarse"):
        UPerHead(shape, num_classes=3, in_features=("res5", "res2"))
    with pytest.raises(KeyError, match="res1"):
        FCNHead(shape, num_classes=3, in_feature="res1")
    with pytest.raises(ValueError, match="num_classes"):
        FCNHead(shape, num_classes=0)
    with pytest.raises(ValueError, match="num_convs=0"):
        FCNHead(shape, num_classes=3, num_convs=0, channels=16)
    head = UPerHead(shape, num_classes=3, channels=4)
    with pytest.raises(KeyError, match="res3"):
        head({"res2": torch.zeros(1, 8, 8, 8)})
