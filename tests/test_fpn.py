"""FPN: output names/strides from the backbone's output_shape, mmdet's parameter names, the
top-down path and the max-pool P6 checked numerically on hand-set weights, Xavier init."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comer import ShapeSpec
from comer.heads.fpn import FPN

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)


def backbone_shape(channels):
    return {name: ShapeSpec(channels=c, stride=s) for name, c, s in zip(LEVELS, channels, STRIDES)}


def features_for(shape, batch, height, width):
    return {
        name: torch.randn(batch, spec.channels, math.ceil(height / spec.stride), math.ceil(width / spec.stride))
        for name, spec in shape.items()
    }


def set_identity(fpn: FPN) -> None:
    """1x1 laterals and 3x3 output convs that pass their input through unchanged."""
    with torch.no_grad():
        for conv_module in (*fpn.lateral_convs, *fpn.fpn_convs):
            conv = conv_module.conv
            conv.weight.zero_()
            conv.bias.zero_()
            centre = conv.kernel_size[0] // 2
            for c in range(conv.out_channels):
                conv.weight[c, c, centre, centre] = 1.0


def test_output_shape_names_strides_and_channels():
    fpn = FPN(backbone_shape((8, 12, 16, 20)), out_channels=6)
    assert fpn.output_shape() == {
        "p2": ShapeSpec(6, 4), "p3": ShapeSpec(6, 8), "p4": ShapeSpec(6, 16),
        "p5": ShapeSpec(6, 32), "p6": ShapeSpec(6, 64),
    }
    assert [m.conv.in_channels for m in fpn.lateral_convs] == [8, 12, 16, 20]
    six = FPN(backbone_shape((4, 4, 4, 4)), out_channels=4, num_outs=6).output_shape()
    assert list(six) == ["p2", "p3", "p4", "p5", "p6", "p7"] and six["p7"].stride == 128
    three = FPN(backbone_shape((4, 4, 4, 4)), in_features=("res3", "res4", "res5"), out_channels=4, num_outs=5)
    assert {k: v.stride for k, v in three.output_shape().items()} == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


@pytest.mark.parametrize("height, width", [(64, 64), (96, 64), (70, 45)])
def test_forward_shapes_follow_output_shape(height, width):
    shape = backbone_shape((8, 12, 16, 20))
    fpn = FPN(shape, out_channels=6)
    features = features_for(shape, batch=2, height=height, width=width)
    out = fpn(features)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name in ("p2", "p3", "p4", "p5"):
        level = "res" + name[1]
        assert out[name].shape == (2, 6, *features[level].shape[2:])
    p5 = out["p5"].shape
    assert out["p6"].shape == (2, 6, math.ceil(p5[2] / 2), math.ceil(p5[3] / 2))


def test_state_dict_keys_are_mmdets():
    fpn = FPN(backbone_shape((8, 12, 16, 20)), out_channels=6)
    expected = {
        f"{group}.{i}.conv.{param}"
        for group in ("lateral_convs", "fpn_convs") for i in range(4) for param in ("weight", "bias")
    }
    assert set(fpn.state_dict()) == expected
    assert fpn.state_dict()["lateral_convs.0.conv.weight"].shape == (6, 8, 1, 1)
    assert fpn.state_dict()["fpn_convs.3.conv.weight"].shape == (6, 6, 3, 3)
    # An mmdet neck state dict (same names and shapes) loads strictly.
    fpn.load_state_dict({k: torch.zeros_like(v) for k, v in fpn.state_dict().items()}, strict=True)


def test_top_down_sum_and_p6_on_identity_convs():
    shape = backbone_shape((3, 3, 3, 3))
    fpn = FPN(shape, out_channels=3)
    set_identity(fpn)
    c2, c3, c4, c5 = (torch.randn(1, 3, n, n) for n in (16, 8, 4, 2))
    out = fpn({"res2": c2, "res3": c3, "res4": c4, "res5": c5})

    def up2(x):  # nearest x2 written out: every pixel repeated in a 2x2 block
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    p5 = c5
    p4 = c4 + up2(p5)
    p3 = c3 + up2(p4)
    p2 = c2 + up2(p3)
    torch.testing.assert_close(out["p5"], p5)
    torch.testing.assert_close(out["p4"], p4)
    torch.testing.assert_close(out["p3"], p3)
    torch.testing.assert_close(out["p2"], p2)
    torch.testing.assert_close(out["p6"], p5[:, :, ::2, ::2])


def test_top_down_to_an_odd_size_uses_nearest_to_the_lateral_size():
    """A 3x3 level upsampled onto a 5x5 lateral picks source rows/cols floor(i * 3 / 5) = 0,0,1,1,2
    (``F.interpolate(size=...)`` nearest, as mmdet)."""
    shape = backbone_shape((2, 2, 2, 2))
    fpn = FPN(shape, out_channels=2)
    set_identity(fpn)
    c4, c5 = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 3, 3)
    out = fpn({"res2": torch.randn(1, 2, 20, 20), "res3": torch.randn(1, 2, 10, 10), "res4": c4, "res5": c5})
    index = torch.tensor([0, 0, 1, 1, 2])
    torch.testing.assert_close(out["p4"], c4 + c5[:, :, index][:, :, :, index])
    torch.testing.assert_close(out["p6"], c5[:, :, ::2, ::2])


def test_biases_and_output_convs_enter_as_in_mmdet():
    """With real 3x3 output convs and biases: P_i = fpn_conv_i(lateral_i + up(P_{i+1} lateral sum))."""
    shape = backbone_shape((3, 4, 5, 6))
    fpn = FPN(shape, out_channels=4)
    with torch.no_grad():
        for p in fpn.parameters():
            p.normal_()
    feats = features_for(shape, batch=1, height=64, width=48)
    out = fpn(feats)
    lat = [F.conv2d(feats[n], m.conv.weight, m.conv.bias) for n, m in zip(LEVELS, fpn.lateral_convs)]
    for i in (2, 1, 0):
        lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[2:], mode="nearest")
    expected = [F.conv2d(x, m.conv.weight, m.conv.bias, padding=1) for x, m in zip(lat, fpn.fpn_convs)]
    for name, value in zip(("p2", "p3", "p4", "p5"), expected):
        torch.testing.assert_close(out[name], value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["p6"], expected[-1][:, :, ::2, ::2], rtol=1e-4, atol=1e-4)


def test_xavier_uniform_init_zero_bias():
    torch.manual_seed(0)
    fpn = FPN(backbone_shape((64, 64, 64, 64)), out_channels=64)
    for module in fpn.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w = module.weight
            assert w.abs().max() <= bound
            # uniform(-b, b) has std b / sqrt(3); kaiming-normal (ConvModule's default) would not fit.
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
            assert torch.count_nonzero(module.bias) == 0


def test_bad_configuration_is_rejected():
    shape = backbone_shape((4, 4, 4, 4))
    with pytest.raises(KeyError, match="res6"):
        FPN(shape, in_features=("res5", "res6"))
    with pytest.raises(ValueError, match="fine to coarse"):
        FPN(shape, in_features=("res3", "res2"))
    with pytest.raises(ValueError, match="num_outs"):
        FPN(shape, num_outs=3)
    with pytest.raises(KeyError, match="res4"):
        FPN(shape, out_channels=4)({"res2": torch.zeros(1, 4, 8, 8), "res3": torch.zeros(1, 4, 4, 4)})
