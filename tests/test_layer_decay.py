from functools import partial

import pytest
import torch
import torch.nn as nn

from comer.training.layer_decay import build_optimizer, layer_id, param_groups_layer_decay

DEPTH = 4
DIM = 8


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, 4, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, DIM))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, DIM)) for _ in range(DEPTH))


class TinyComer(nn.Module):
    """Parameter names as ViTCoMer inside an EncoderDecoder: backbone.vit.*, CNN branch, heads."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.vit = TinyViT()
        self.backbone.level_embed = nn.Parameter(torch.zeros(3, DIM))
        self.backbone.spm = nn.Conv2d(3, DIM, 3)
        self.backbone.interactions = nn.ModuleList([nn.Linear(DIM, DIM)])
        self.decode_head = nn.Module()
        self.decode_head.conv_seg = nn.Conv2d(DIM, 5, 1)


def _groups_by_param(groups):
    out = {}
    for g in groups:
        for name in g["param_names"]:
            out[name] = g
    return out


def test_layer_ids_follow_the_spec_rule():
    assert layer_id("backbone.vit.patch_embed.proj.weight", DEPTH) == 0
    assert layer_id("backbone.vit.pos_embed", DEPTH) == 0
    assert layer_id("backbone.vit.blocks.0.1.weight", DEPTH) == 1
    assert layer_id("backbone.vit.blocks.3.0.bias", DEPTH) == 4
    assert layer_id("backbone.interactions.0.weight", DEPTH) == DEPTH + 1
    assert layer_id("backbone.level_embed", DEPTH) == DEPTH + 1
    assert layer_id("decode_head.conv_seg.weight", DEPTH) == DEPTH + 1
    # "blocks" outside the ViT (e.g. a head's sub-module) is not a ViT depth.
    assert layer_id("decode_head.blocks.0.weight", DEPTH) == DEPTH + 1


def test_block_beyond_num_layers_is_an_error():
    with pytest.raises(ValueError, match="num_layers=2"):
        layer_id("backbone.vit.blocks.3.0.weight", 2)


def test_lr_scale_and_weight_decay_per_parameter():
    model = TinyComer()
    lr, wd, decay = 1e-3, 0.05, 0.9
    groups = param_groups_layer_decay(model, lr, wd, decay, DEPTH, no_weight_decay_names=("pos_embed",))
    by_name = _groups_by_param(groups)
    expected_scale = {
        "backbone.vit.patch_embed.proj.weight": 0.9 ** 5,
        "backbone.vit.patch_embed.proj.bias": 0.9 ** 5,
        "backbone.vit.pos_embed": 0.9 ** 5,
        "backbone.vit.blocks.0.1.weight": 0.9 ** 4,
        "backbone.vit.blocks.1.0.weight": 0.9 ** 3,
        "backbone.vit.blocks.2.1.weight": 0.9 ** 2,
        "backbone.vit.blocks.3.1.bias": 0.9 ** 1,
        "backbone.level_embed": 1.0,
        "backbone.spm.weight": 1.0,
        "backbone.interactions.0.weight": 1.0,
        "decode_head.conv_seg.weight": 1.0,
    }
    for name, scale in expected_scale.items():
        assert by_name[name]["lr_scale"] == pytest.approx(scale, rel=1e-12), name
        assert by_name[name]["lr"] == pytest.approx(lr * scale, rel=1e-12), name
    no_decay = {"backbone.vit.patch_embed.proj.bias", "backbone.vit.pos_embed", "backbone.vit.blocks.0.0.weight",
                "backbone.vit.blocks.3.1.bias", "backbone.spm.bias"}
    # level_embed is 2-D: decayed unless listed by name (the detection recipe lists it).
    decayed = {"backbone.level_embed", "backbone.vit.patch_embed.proj.weight", "backbone.vit.blocks.0.1.weight", "backbone.spm.weight",
               "decode_head.conv_seg.weight"}
    for name in no_decay:
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in decayed:
        assert by_name[name]["weight_decay"] == wd, name
    # Every trainable parameter exactly once; groups are (lr_scale, wd)-unique: 6 ids x {decay, no decay}.
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len({(g["lr_scale"], g["weight_decay"]) for g in groups}) == len(groups) == 12
    assert by_name["backbone.vit.blocks.1.0.weight"]["name"] == "layer_2_no_decay"
    assert by_name["decode_head.conv_seg.weight"]["name"] == "layer_5_decay"


def test_no_layer_decay_merges_into_two_groups_and_skips_frozen():
    model = TinyComer()
    model.backbone.vit.patch_embed.proj.weight.requires_grad_(False)
    groups = param_groups_layer_decay(model, 1e-3, 0.01, 1.0, DEPTH)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.0), (1.0, 0.01)]
    names = {n for g in groups for n in g["param_names"]}
    assert "backbone.vit.patch_embed.proj.weight" not in names
    assert len(names) == sum(1 for _ in model.parameters()) - 1
    # pos_embed / level_embed are 3-D / 2-D: decayed unless listed by name (the detection recipe lists them).
    assert {"backbone.vit.pos_embed", "backbone.level_embed"} <= set(groups[1]["param_names"])
    listed = param_groups_layer_decay(model, 1e-3, 0.01, 1.0, DEPTH, no_weight_decay_names=("level_embed",))
    assert "backbone.level_embed" in listed[0]["param_names"]
    assert "backbone.vit.pos_embed" in listed[1]["param_names"]


def test_plain_vit_baseline_names():
    vit = nn.Module()
    vit.vit = TinyViT()
    vit.fpn = nn.Conv2d(DIM, DIM, 1)
    groups = _groups_by_param(param_groups_layer_decay(vit, 1.0, 0.0, 0.5, DEPTH))
    assert groups["vit.blocks.2.1.weight"]["lr_scale"] == 0.5 ** 2
    assert groups["vit.pos_embed"]["lr_scale"] == 0.5 ** 5
    assert groups["fpn.weight"]["lr_scale"] == 1.0


def test_build_optimizer_uses_the_factory_lr_and_weight_decay():
    model = TinyComer()
    factory = partial(torch.optim.AdamW, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.01)
    optimizer = build_optimizer(model, factory, 0.95, DEPTH)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["layer_5_decay"] == pytest.approx(2e-4)
    assert lrs["layer_0_decay"] == pytest.approx(2e-4 * 0.95 ** 5)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.01}
    # One step moves the head's weight by the full lr (AdamW's first step is lr * sign(grad) + decay).
    head = model.decode_head.conv_seg.weight
    before = head.detach().clone()
    head.grad = torch.ones_like(head)
    optimizer.step()
    expected = before * (1 - 2e-4 * 0.01) - 2e-4
    torch.testing.assert_close(head.detach(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [(dict(layer_decay=0.0), "layer_decay"),
                                           (dict(layer_decay=1.5), "layer_decay"),
                                           (dict(num_layers=0), "num_layers")])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(lr=1e-3, weight_decay=0.01, layer_decay=0.9, num_layers=DEPTH) | kwargs
    with pytest.raises(ValueError, match=match):
        param_groups_layer_decay(TinyComer(), **args)
