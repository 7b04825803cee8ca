"""comer.checkpoint: format recognition, key conversion, strict loading, the pretrain config group."""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from comer import build_backbone
from comer.checkpoint import (
    DEFAULT_ALLOW_MISSING,
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointShapeError,
    PretrainConfigError,
    apply_pretrain,
    detect_format,
    load_pretrained,
    load_segmentor_checkpoint,
)
from official_oracle import cached_official_state_dict

CONF = Path(__file__).resolve().parent.parent / "conf" / "pretrain"
DIM, DEPTH = 192, 12  # comer_t / vit_t
# Our plain-ViT names -> timm names (DeiT has no layer scale)
VIT_KEY = re.compile(r"^vit\.(?!.*\.ls[12]\.gamma$)(.*)$")


@pytest.fixture(scope="module")
def comer_t_small():
    """Factory of fresh comer_t backbones with a 64x64 pretraining grid (4x4 position grid); one is
    built per module and copied (building is the slow part)."""
    prototype = build_backbone("comer_t", pretrain_img_size=64)
    return lambda: copy.deepcopy(prototype)


def _timm_vit_state(backbone: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random timm/DeiT-format ViT state dict with the shapes of ``backbone``'s ViT."""
    state = {}
    for key, value in backbone.state_dict().items():
        match = VIT_KEY.match(key)
        if match:
            state[match[1]] = torch.randn(value.shape, generator=generator)
    return state


def _deit_checkpoint(backbone, seed=0, distilled=False):
    g = torch.Generator().manual_seed(seed)
    model = _timm_vit_state(backbone, g)
    model.update({"cls_token": torch.randn(1, 1, DIM, generator=g), "norm.weight": torch.ones(DIM),
                  "norm.bias": torch.zeros(DIM), "head.weight": torch.randn(1000, DIM, generator=g),
                  "head.bias": torch.zeros(1000)})
    if distilled:
        grid = model["pos_embed"][:, 1:]
        model["pos_embed"] = torch.cat([model["pos_embed"][:, :1], torch.randn(1, 1, DIM, generator=g), grid], 1)
        model.update({"dist_token": torch.randn(1, 1, DIM, generator=g),
                      "head_dist.weight": torch.randn(1000, DIM, generator=g), "head_dist.bias": torch.zeros(1000)})
    return {"model": model}


# --- DeiT / timm ---------------------------------------------------------------------------------
def test_deit_file_round_trips_into_comer(tmp_path, comer_t_small):
    source = comer_t_small()
    checkpoint = _deit_checkpoint(source)
    path = tmp_path / "deit_tiny.pth"
    torch.save(checkpoint, path)
    target = comer_t_small()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_pretrained(target, path)
    assert report.format == "timm" and report.source == str(path)
    after = target.state_dict()
    for key, value in checkpoint["model"].items():
        if key in ("cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"):
            assert key in report.dropped
            continue
        assert torch.equal(after[f"vit.{key}"], value), key  # same grid: pos_embed unchanged, class slot kept
    # everything outside the ViT (and the layer scales) keeps its initialisation
    untouched = [k for k in after if not VIT_KEY.match(k)]
    assert sorted(report.missing) == sorted(untouched)
    assert any(k.startswith("interactions.") for k in untouched) and "vit.blocks.0.ls1.gamma" in untouched
    assert all(torch.equal(after[k], before[k]) for k in untouched)
    assert report.resized == {} and report.extra == {}


def test_deit_pos_embed_resized_to_model_grid():
    backbone = build_backbone("comer_t", pretrain_img_size=64)  # grid 4x4, pos_embed [1, 17, D]
    source = build_backbone("comer_t")  # DeiT grid 14x14, [1, 197, D]
    checkpoint = _deit_checkpoint(source, distilled=True)  # [1, 198, D]: cls + dist + 14x14
    report = load_pretrained(backbone, checkpoint, format="deit")
    pos = checkpoint["model"]["pos_embed"]
    grid = pos[:, 2:].reshape(1, 14, 14, DIM).permute(0, 3, 1, 2)
    expected_grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    loaded = backbone.state_dict()["vit.pos_embed"]
    assert torch.equal(loaded[:, :1], pos[:, :1])  # class slot kept, distillation slot dropped
    torch.testing.assert_close(loaded[:, 1:], expected_grid, rtol=0, atol=1e-6)
    assert report.resized == {"vit.pos_embed": ((1, 198, DIM), (1, 17, DIM))}
    assert {"dist_token", "head_dist.weight", "cls_token"} <= set(report.dropped)


def test_plain_vit_pyramid_takes_deit(comer_t_small):
    vit = build_backbone("vit_t", pretrain_img_size=64)
    checkpoint = _deit_checkpoint(comer_t_small())
    report = load_pretrained(vit, checkpoint)
    assert torch.equal(vit.state_dict()["vit.blocks.11.mlp.fc2.weight"], checkpoint["model"]["blocks.11.mlp.fc2.weight"])
    assert all(k.startswith(("ups.", "norms.")) or ".ls" in k for k in report.missing)


def test_missing_and_unexpected_keys_are_listed(comer_t_small):
    backbone = comer_t_small()
    checkpoint = _deit_checkpoint(backbone)
    del checkpoint["model"]["blocks.3.mlp.fc1.weight"]
    with pytest.raises(CheckpointKeyError, match=r"vit\.blocks\.3\.mlp\.fc1\.weight"):
        load_pretrained(backbone, checkpoint)
    checkpoint = _deit_checkpoint(backbone)
    checkpoint["model"]["blocks.0.attn.rel_bias"] = torch.zeros(3)
    checkpoint["model"]["extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointKeyError, match=r"(?s)2 checkpoint keys.*vit\.blocks\.0\.attn\.rel_bias.*extra_layer"):
        load_pretrained(backbone, checkpoint)


def test_empty_allow_list_makes_every_missing_key_an_error(comer_t_small):
    backbone = comer_t_small()
    missing = len(backbone.state_dict()) - (3 + DEPTH * 12)  # all but pos_embed, patch_embed, 12 x 6 layers
    with pytest.raises(CheckpointKeyError, match=rf"(?s){missing} model keys are missing.*interactions\.0\..*spm\.\* \(\d+\)"):
        load_pretrained(backbone, _deit_checkpoint(backbone), allow_missing=[])


def test_shape_mismatch_names_key_and_shapes():
    """DeiT-B (768 wide) into comer_s (384 wide); zero-stride tensors keep the fake checkpoint free."""
    backbone = build_backbone("comer_s")
    deit_b = {key: torch.zeros(()).expand(*[768 if d == 384 else 4 * 768 if d == 4 * 384 else 3 * 768 if d == 3 * 384
                                            else d for d in value.shape])
              for key, value in ((m[1], v) for k, v in backbone.state_dict().items() for m in [VIT_KEY.match(k)] if m)}
    with pytest.raises(CheckpointShapeError) as error:
        load_pretrained(backbone, {"model": deit_b}, format="deit")
    message = str(error.value)
    assert "vit.patch_embed.proj.weight: checkpoint (768, 3, 16, 16) vs model (384, 3, 16, 16)" in message
    assert "vit.blocks.0.attn.qkv.weight: checkpoint (2304, 768) vs model (1152, 384)" in message
    assert "vit.pos_embed: checkpoint (1, 197, 768) vs model (1, 197, 384)" in message


# --- DINOv2, BEiT, MAE ---------------------------------------------------------------------------
def test_dinov2_conversion(comer_t_small):
    backbone = comer_t_small()
    g = torch.Generator().manual_seed(3)
    state = _timm_vit_state(backbone, g)
    state["patch_embed.proj.weight"] = torch.randn(DIM, 3, 14, 14, generator=g)
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, DIM, generator=g)
    for i in range(DEPTH):  # layer scales, with the block-chunk naming of the DINOv2 code (chunks of 6)
        for j in (1, 2):
            state[f"blocks.{i}.ls{j}.gamma"] = torch.randn(DIM, generator=g)
    state = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // 6}.{m[1]}.", k): v for k, v in state.items()}
    state.update({"cls_token": torch.randn(1, 1, DIM), "mask_token": torch.randn(1, DIM),
                  "register_tokens": torch.randn(1, 4, DIM), "norm.weight": torch.ones(DIM), "norm.bias": torch.zeros(DIM)})
    assert detect_format(state) == "dinov2"
    report = load_pretrained(backbone, state)
    loaded = backbone.state_dict()
    kernel = F.interpolate(state["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(loaded["vit.patch_embed.proj.weight"], kernel, rtol=0, atol=0)
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, DIM).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(loaded["vit.pos_embed"][:, 1:], grid, rtol=0, atol=1e-6)
    assert torch.equal(loaded["vit.blocks.7.ls2.gamma"], state["blocks.1.7.ls2.gamma"])
    assert torch.equal(loaded["vit.blocks.7.attn.qkv.weight"], state["blocks.1.7.attn.qkv.weight"])
    assert {"mask_token", "register_tokens", "cls_token", "norm.weight"} <= set(report.dropped)
    assert report.resized["vit.patch_embed.proj.weight"] == ((DIM, 3, 14, 14), (DIM, 3, 16, 16))
    assert not any(".ls" in k for k in report.missing)  # DINOv2 layer scales must load


def test_beit_conversion():
    from comer.layers.rel_pos_bias import relative_position_index_with_class_token

    # BEiT's geometry: no absolute position embedding, a relative position bias table per block (4x4 grid)
    backbone = build_backbone("comer_t", pretrain_img_size=64, use_abs_pos_embed=False, use_rel_pos_bias=True)
    g = torch.Generator().manual_seed(4)
    state = _timm_vit_state(backbone, g)
    for i in range(DEPTH):
        del state[f"blocks.{i}.attn.qkv.bias"]
        state[f"blocks.{i}.attn.q_bias"] = torch.randn(DIM, generator=g)
        state[f"blocks.{i}.attn.v_bias"] = torch.randn(DIM, generator=g)
        state[f"blocks.{i}.gamma_1"] = torch.randn(DIM, generator=g)
        state[f"blocks.{i}.gamma_2"] = torch.randn(DIM, generator=g)
        state[f"blocks.{i}.attn.relative_position_bias_table"] = torch.randn(7 * 7 + 3, 3, generator=g)
        state[f"blocks.{i}.attn.relative_position_index"] = relative_position_index_with_class_token((4, 4))
    state["cls_token"] = torch.randn(1, 1, DIM)
    report = load_pretrained(backbone, {"model": state})
    assert report.format == "beit"
    loaded = backbone.state_dict()
    bias = loaded["vit.blocks.5.attn.qkv.bias"]
    assert torch.equal(bias[:DIM], state["blocks.5.attn.q_bias"]) and torch.equal(bias[2 * DIM:], state["blocks.5.attn.v_bias"])
    assert torch.equal(bias[DIM:2 * DIM], torch.zeros(DIM))
    assert torch.equal(loaded["vit.blocks.5.ls1.gamma"], state["blocks.5.gamma_1"])
    assert torch.equal(loaded["vit.blocks.5.ls2.gamma"], state["blocks.5.gamma_2"])
    assert torch.equal(loaded["vit.blocks.5.attn.relative_position_bias_table"],
                       state["blocks.5.attn.relative_position_bias_table"])  # loaded, not dropped
    index_keys = {f"blocks.{i}.attn.relative_position_index" for i in range(DEPTH)}
    assert set(report.dropped) == {"cls_token"} | index_keys
    assert not any(k.startswith("vit.") for k in report.missing) and report.notes == []


def test_mae_decoder_is_dropped(comer_t_small):
    backbone = comer_t_small()
    state = _timm_vit_state(backbone, torch.Generator().manual_seed(5))
    state.update({"mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(128, DIM),
                  "decoder_blocks.0.norm1.weight": torch.zeros(128), "cls_token": torch.zeros(1, 1, DIM)})
    assert detect_format(state) == "mae"
    report = load_pretrained(backbone, {"model": state}, format="mae")
    assert {"mask_token", "decoder_embed.weight", "decoder_blocks.0.norm1.weight"} <= set(report.dropped)


def test_format_errors(tmp_path, comer_t_small):
    backbone = comer_t_small()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(backbone, tmp_path / "nowhere.pth")
    with pytest.raises(CheckpointFormatError, match="cannot recognise"):
        load_pretrained(backbone, {"foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointFormatError, match="'swin'"):
        load_pretrained(backbone, _deit_checkpoint(backbone), format="swin")


# --- official and full checkpoints ---------------------------------------------------------------
def test_official_loads_bn_statistics_and_returns_head_keys():
    backbone = build_backbone("comer_t")
    state = cached_official_state_dict("t", dtype=torch.float32)
    state["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1)
    state["auxiliary_head.conv_seg.bias"] = torch.randn(150)
    report = load_pretrained(backbone, {"state_dict": state, "meta": {"iter": 160000}})
    loaded = backbone.state_dict()
    assert torch.equal(loaded["out_norms.2.running_var"], state["backbone.norm3.running_var"])
    assert torch.equal(loaded["interactions.1.mrfp.norms.2.running_mean"], state["backbone.interactions.1.mrfp.dwconv.bn3.running_mean"])
    assert torch.equal(loaded["interactions.2.mrfp.dwconvs.1.1.weight"], state["backbone.interactions.2.mrfp.dwconv.dwconv4.weight"])
    assert torch.equal(loaded["interactions.3.extra_ctis.2.cnn_interaction.attn.value_proj.bias"],
                       state["backbone.interactions.3.extra_CTIs.2.cfinter.attn.value_proj.bias"])
    assert torch.equal(loaded["vit.blocks.4.ls1.gamma"], state["backbone.blocks.4.gamma1"])
    assert report.head_keys == ["auxiliary_head.conv_seg.bias", "decode_head.conv_seg.weight"]
    assert report.missing == []


def test_official_pos_embed_resized_from_another_pretrain_size():
    """Official checkpoints keep the class slot in pos_embed (no cls_token key): 1 + 8x8 -> 1 + 14x14."""
    backbone = build_backbone("comer_t")
    state = cached_official_state_dict("t", dtype=torch.float32)
    state["backbone.pos_embed"] = torch.randn(1, 1 + 8 * 8, DIM)
    report = load_pretrained(backbone, state)
    grid = state["backbone.pos_embed"][:, 1:].reshape(1, 8, 8, DIM).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    loaded = backbone.state_dict()["vit.pos_embed"]
    assert torch.equal(loaded[:, :1], state["backbone.pos_embed"][:, :1])
    torch.testing.assert_close(loaded[:, 1:], grid, rtol=0, atol=1e-6)
    assert report.resized == {"vit.pos_embed": ((1, 65, DIM), (1, 197, DIM))}


def test_official_into_wrong_variant_raises():
    with pytest.raises(CheckpointShapeError, match=r"interactions\.0\.mrfp\.fc1\.weight: checkpoint \(1152, 192\)"):
        load_pretrained(build_backbone("comer_t", mrfp_ratio=0.5), cached_official_state_dict("t", dtype=torch.float32))


def test_load_segmentor_checkpoint():
    from comer.heads.fcn_head import FCNHead
    from comer.models.segmentor import build_segmentor

    head = functools.partial(FCNHead, channels=8, dropout=0.0)
    prototype = build_segmentor(build_backbone("comer_t"), head, functools.partial(head, in_feature="res3"),
                                num_classes=5)
    segmentor = functools.partial(copy.deepcopy, prototype)
    source = segmentor()
    g = torch.Generator().manual_seed(6)
    heads = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in source.state_dict().items() if k.startswith(("decode_head.", "auxiliary_head."))}
    state = cached_official_state_dict("t", dtype=torch.float32) | heads
    target = segmentor()
    report = load_segmentor_checkpoint(target, {"state_dict": state})
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in heads.items())
    assert torch.equal(loaded["backbone.level_embed"], state["backbone.level_embed"])
    assert report.head_keys == sorted(heads)
    del state["decode_head.conv_seg.weight"]
    state["decode_head.unknown.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match=r"(?s)unexpected:.*decode_head\.unknown\.weight.*missing:.*conv_seg"):
        load_segmentor_checkpoint(segmentor(), {"state_dict": state})


# --- the pretrain config group -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["deit", "augreg", "mae", "beit", "dinov2", "official", "comer"])
def test_pretrain_yaml_lists_the_code_defaults(fmt):
    cfg = OmegaConf.load(CONF / f"{fmt}.yaml")
    assert cfg.format == fmt and cfg.path is None
    assert tuple(cfg.allow_missing) == DEFAULT_ALLOW_MISSING[fmt]


def test_apply_pretrain(tmp_path, comer_t_small):
    backbone = comer_t_small()
    assert apply_pretrain(backbone, OmegaConf.load(CONF / "none.yaml")) is None
    deit = OmegaConf.load(CONF / "deit.yaml")
    with pytest.raises(PretrainConfigError, match=r"pretrain\.path="):
        apply_pretrain(backbone, deit)
    deit.path = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        apply_pretrain(backbone, deit)
    with pytest.raises(PretrainConfigError, match="'imagenet'"):
        apply_pretrain(backbone, {"format": "imagenet", "path": None})
    with pytest.raises(PretrainConfigError, match="format=none"):
        apply_pretrain(backbone, {"format": "none", "path": str(tmp_path)})
    torch.save(_deit_checkpoint(backbone, seed=9), tmp_path / "deit.pth")
    deit.path = str(tmp_path / "deit.pth")
    report = apply_pretrain(backbone, deit)
    assert report.format == "deit" and len(report.loaded) == 3 + DEPTH * 12  # pos, patch w/b; 6 layers x w/b
    assert torch.equal(backbone.state_dict()["vit.blocks.0.norm1.weight"],
                       torch.load(tmp_path / "deit.pth")["model"]["blocks.0.norm1.weight"])


def test_our_lightning_checkpoint_initialises_a_backbone(tmp_path):
    """A checkpoint of our SegmentationModule (`model.backbone.*`, `model.decode_head.*`) loads strictly as
    pretrained weights: the backbone part by name, the head keys returned for the task's loader."""
    source = build_backbone("comer_t")
    with torch.no_grad():
        for value in source.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn_like(value))
    state = {f"model.backbone.{k}": v for k, v in source.state_dict().items()}
    state["model.decode_head.conv_seg.weight"] = torch.zeros(7, 16, 1, 1)
    torch.save({"pytorch-lightning_version": "2.6.6", "global_step": 10, "state_dict": state}, tmp_path / "run.ckpt")
    target = build_backbone("comer_t")
    report = load_pretrained(target, tmp_path / "run.ckpt")
    assert report.format == "comer" and list(report.extra) == ["decode_head.conv_seg.weight"]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
