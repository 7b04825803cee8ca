"""Bad configurations and inputs fail early with a message naming the value and what is allowed."""
import re
from pathlib import Path

import pytest
import torch

from comer import build_backbone
from comer.backbones import ViTCoMer
from comer.layers import MRFP

SMALL = dict(embed_dim=48, depth=4, num_heads=3, deform_num_heads=3, num_interactions=4, mrfp_ratio=1.0)


def build_on_meta(name="comer_t", **overrides):
    with torch.device("meta"):
        return build_backbone(name, **overrides)


@pytest.mark.parametrize("name", ["comer_t", "vit_t"])
def test_image_sides_must_be_multiples_of_32(name):
    model = build_backbone(name, **(SMALL if name == "comer_t" else {"depth": 4, "out_indices": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match=r"64x80 is not allowed.*multiples of 32"):
        model(torch.zeros(1, 3, 64, 80))


def test_num_interactions_must_divide_depth():
    with pytest.raises(ValueError, match=r"num_interactions 5 must be a positive divisor of depth 12"):
        build_on_meta(num_interactions=5)


@pytest.mark.parametrize("indexes, shown", [
    ([[0, 2], [2, 5], [6, 8], [9, 11]], r"\[2, 5\] should start at 3"),      # overlap
    ([[0, 2], [4, 5], [6, 8], [9, 11]], r"\[4, 5\] should start at 3"),      # gap
    ([[0, 2], [3, 5], [6, 8], [9, 12]], r"\[9, 12\] should start at 9 and end in 9..11"),  # out of range
    ([[0, 2], [3, 5], [6, 8], [9, 10]], r"end at block 10, must cover all blocks 0..11"),  # not covering
    ([[0, 2, 3]], r"\[first, last\] block pairs, got \[0, 2, 3\]"),
])
def test_bad_interaction_indexes(indexes, shown):
    with pytest.raises(ValueError, match=shown):
        build_on_meta(num_interactions=None, interaction_indexes=indexes)


def test_exactly_one_way_to_split_blocks():
    with pytest.raises(ValueError, match="exactly one of num_interactions or interaction_indexes"):
        build_on_meta(interaction_indexes=[[0, 5], [6, 11]])


def test_unknown_backbone_lists_available_names():
    names = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "backbone").glob("*.yaml"))
    assert {"comer_t", "comer_s_det", "vit_b"} <= set(names)
    with pytest.raises(ValueError, match=re.escape(f"unknown backbone 'comer_xl'; available: {', '.join(names)}")):
        build_backbone("comer_xl")


def test_unknown_override_names_the_key():
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['mrfp_ration'\]"):
        build_backbone("comer_t", mrfp_ration=2.0)


def test_even_kernel_sizes_rejected():
    with pytest.raises(ValueError, match=r"positive odd ints.*\[3, 4\]"):
        build_on_meta(mrfp_kernel_sizes=[3, 4])


def test_more_kernel_groups_than_hidden_channels():
    with pytest.raises(ValueError, match=r"4 kernel groups \[3, 5, 7, 9\] but only 3 hidden channels"):
        MRFP(dim=8, hidden_dim=3, kernel_sizes=(3, 5, 7, 9))


def test_hidden_channels_not_divisible_by_groups():
    # D 48 x ratio 0.5 = 24 hidden channels cannot be split into 5 kernel groups.
    with pytest.raises(ValueError, match=r"hidden channels 24 must be divisible by the number of kernel groups 5"):
        build_on_meta(**{**SMALL, "mrfp_ratio": 0.5}, mrfp_kernel_sizes=[3, 5, 7, 9, 11])


def test_bad_vit_feature_mode_and_stage_count():
    with pytest.raises(ValueError, match=r"vit_feature_mode 'all' is not one of \('per_stage', 'final'\)"):
        build_on_meta(vit_feature_mode="all")
    with pytest.raises(ValueError, match=r"needs exactly 4 stages, got 2"):
        build_on_meta(num_interactions=2)
    assert len(build_on_meta(num_interactions=2, vit_feature_mode="final").interactions) == 2


def test_window_block_indexes_out_of_range():
    with pytest.raises(ValueError, match=r"window_block_indexes: block indexes \[12\] out of range; allowed 0..11"):
        build_on_meta(window_block_indexes=[0, 12])


def test_deform_heads_must_divide_value_channels():
    with pytest.raises(ValueError, match=r"ViTCoMer: deform_num_heads 5 must divide the deformable attention's value "
                                         r"channels int\(embed_dim \* deform_ratio\) = int\(48 \* 0.5\) = 24"):
        ViTCoMer(**{**SMALL, "deform_num_heads": 5}, deform_ratio=0.5, drop_path_rate=0.0)


@pytest.mark.parametrize("name, overrides, shown", [
    ("comer_t", dict(depth=0), "ViTCoMer: depth must be >= 1, got 0"),
    ("comer_t", dict(num_points=0), "ViTCoMer: num_points must be >= 1, got 0"),
    ("comer_t", dict(num_heads=0), "ViTCoMer: num_heads must be >= 1, got 0"),
    ("comer_t", dict(deform_num_heads=0), "ViTCoMer: deform_num_heads must be >= 1, got 0"),
    ("comer_t", dict(embed_dim=0), "ViTCoMer: embed_dim must be >= 1, got 0"),
    ("comer_t", dict(conv_inplanes=0), "ViTCoMer: conv_inplanes must be >= 1, got 0"),
    ("comer_t", dict(num_heads=5), "VisionTransformer: embed_dim 192 must be divisible by num_heads 5"),
    ("comer_t", dict(ffn_ratio=0.0), r"ViTCoMer: ffn_ratio 0.0 gives int\(embed_dim \* ffn_ratio\) = int\(192 \* 0.0\) = 0"),
    ("comer_t", dict(deform_ratio=0.001), r"ViTCoMer: deform_ratio 0.001 gives .* = 0 channels, must be >= 1"),
    ("comer_t", dict(mlp_ratio=0.0), r"VisionTransformer: mlp_ratio 0.0 gives .* = 0 channels"),
    ("vit_t", dict(depth=0), "ViTPyramid: depth must be >= 1, got 0"),
    ("vit_t", dict(num_heads=0), "ViTPyramid: num_heads must be >= 1, got 0"),
    ("vit_t", dict(num_heads=5), "VisionTransformer: embed_dim 192 must be divisible by num_heads 5"),
    ("vit_t", dict(upsample_norm_groups=0), "ViTPyramid: upsample_norm_groups must be >= 1, got 0"),
    ("vit_t", dict(out_indices=[2, 5, 8, 12]), r"ViTPyramid: out_indices: block indexes \[12\] out of range"),
])
def test_nonsensical_sizes_are_refused_naming_the_key(name, overrides, shown):
    with pytest.raises(ValueError, match=shown):
        build_on_meta(name, **overrides)


def test_mrfp_ratio_is_checked_only_with_mrfp():
    with pytest.raises(ValueError, match=r"ViTCoMer: mrfp_ratio 0.001 gives .* = 0 channels"):
        build_on_meta(mrfp_ratio=0.001)
    assert build_on_meta(mrfp_ratio=0.001, use_mrfp=False).interactions[0].mrfp is None


@pytest.mark.parametrize("name", ["comer_t", "vit_t", "pvt_tiny", "pvt_v2_b0", "conv2former_n"])
@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 4, 64, 64), (3, 64, 64)])
def test_forward_names_the_expected_image_shape(name, shape):
    """The check runs before any computation, so the meta device is enough."""
    model = build_on_meta(name)
    with pytest.raises(ValueError, match=re.escape(f"expected images [B, 3, H, W], got shape {shape}")):
        model(torch.zeros(shape, device="meta"))
