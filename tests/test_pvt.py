"""PVT v1 and v2 backbones: equal (float64, 1e-10) to a functional reading of official-key weights loaded through
the "pvt" / "pvt_v2" checkpoint formats, parameter counts against the papers, input and config errors, layer decay
without a ViT, and a few training steps of the synthetic segmentation app and of Mask R-CNN."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from app_utils import CONFIG_DIR, TINY_SYNTHETIC, compose_config
from comer.app import train
from comer.backbones import PyramidVisionTransformer, PyramidVisionTransformerV2, build_backbone
from comer.checkpoint import DEFAULT_ALLOW_MISSING, CheckpointKeyError, detect_format, load_pretrained
from comer.models import build_detector, detector_config, instantiate_detector
from comer.training.layer_decay import decay_depth
from test_mask_rcnn import CLASSES, LOSS_KEYS, NARROW, synthetic_batch

STRIDES = (4, 8, 16, 32)
LEVELS = ("res2", "res3", "res4", "res5")
BLOCK_EPS, TORCH_EPS = 1e-6, 1e-5  # the official blocks' norms; patch-embedding and spatial-reduction norms
LINEAR_SRA_POOL = 7
IMAGENET_CLASSES = 1000
TOLERANCE = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: oversubscribed intra-op threads make small models much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- official-key weights and a functional forward reading them ---------------------------------------------
def official_state(backbone, version: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float64 weights under the official whai362/PVT classification names, classifier included."""
    def rand(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + rand(dim, scale=0.1), f"{prefix}.bias": rand(dim, scale=0.1)}

    def linear(prefix, out_dim, in_dim):
        return {f"{prefix}.weight": rand(out_dim, in_dim, scale=in_dim ** -0.5), f"{prefix}.bias": rand(out_dim)}

    state, in_channels = {}, 3
    for i, stage in enumerate(backbone.stages):
        s, dim = i + 1, backbone.embed_dims[i]
        kernel = stage.patch_embed.proj.kernel_size[0]
        fan_in = in_channels * kernel ** 2
        state[f"patch_embed{s}.proj.weight"] = rand(dim, in_channels, kernel, kernel, scale=fan_in ** -0.5)
        state[f"patch_embed{s}.proj.bias"] = rand(dim)
        state.update(norm(f"patch_embed{s}.norm", dim))
        if version == 1:
            grid = stage.pos_grid[0] * stage.pos_grid[1]
            state[f"pos_embed{s}"] = rand(1, grid + (1 if s == 4 else 0), dim)  # stage 4: class-token slot first
        for j, block in enumerate(stage.blocks):
            b, hidden = f"block{s}.{j}", block.mlp.fc1.out_features
            state.update(norm(f"{b}.norm1", dim))
            state.update(linear(f"{b}.attn.q", dim, dim))
            state.update(linear(f"{b}.attn.kv", 2 * dim, dim))
            state.update(linear(f"{b}.attn.proj", dim, dim))
            if block.attn.sr is not None:
                k = block.attn.sr.kernel_size[0]
                state[f"{b}.attn.sr.weight"] = rand(dim, dim, k, k, scale=(dim * k * k) ** -0.5)
                state[f"{b}.attn.sr.bias"] = rand(dim)
                state.update(norm(f"{b}.attn.norm", dim))
            state.update(norm(f"{b}.norm2", dim))
            state.update(linear(f"{b}.mlp.fc1", hidden, dim))
            if version == 2:
                state[f"{b}.mlp.dwconv.dwconv.weight"] = rand(hidden, 1, 3, 3, scale=1 / 3)
                state[f"{b}.mlp.dwconv.dwconv.bias"] = rand(hidden)
            state.update(linear(f"{b}.mlp.fc2", dim, hidden))
        if version == 2:
            state.update(norm(f"norm{s}", dim))
        in_channels = dim
    last = backbone.embed_dims[-1]
    state.update(linear("head", IMAGENET_CLASSES, last))
    if version == 1:
        state["cls_token"] = rand(1, 1, last)
        state.update(norm("norm", last))
    return state


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _fc(x, sd, prefix):
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _to_map(tokens, height, width):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def functional_pvt(sd, images, num_heads, sr_ratios, version: int, linear: bool = False):
    """The official detection/segmentation backbones written out with torch.nn.functional on the official names."""
    outs, x = [], images
    for i in range(4):
        s = i + 1
        weight = sd[f"patch_embed{s}.proj.weight"]
        kernel = weight.shape[-1]
        stride = STRIDES[i] // (STRIDES[i - 1] if i else 1)
        padding = kernel // 2 if version == 2 else 0
        x = F.conv2d(x, weight, sd[f"patch_embed{s}.proj.bias"], stride=stride, padding=padding)
        batch, dim, height, width = x.shape
        x = _ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{s}.norm", TORCH_EPS)
        if version == 1:  # the official _get_pos_embed: bilinear resize of the pretraining grid (class slot cut)
            pos = sd[f"pos_embed{s}"][:, 1:] if s == 4 else sd[f"pos_embed{s}"]
            side = math.isqrt(pos.shape[1])
            pos = F.interpolate(pos.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(height, width),
                                mode="bilinear").reshape(1, -1, height * width).permute(0, 2, 1)
            x = x + pos
        j = 0
        while f"block{s}.{j}.norm1.weight" in sd:
            b, heads = f"block{s}.{j}", num_heads[i]
            h = _ln(x, sd, f"{b}.norm1", BLOCK_EPS)
            q = _fc(h, sd, f"{b}.attn.q").reshape(batch, -1, heads, dim // heads).permute(0, 2, 1, 3)
            if linear or sr_ratios[i] > 1:
                m = _to_map(h, height, width)
                if linear:
                    m = F.conv2d(F.adaptive_avg_pool2d(m, LINEAR_SRA_POOL), sd[f"{b}.attn.sr.weight"],
                                 sd[f"{b}.attn.sr.bias"])
                else:
                    m = F.conv2d(m, sd[f"{b}.attn.sr.weight"], sd[f"{b}.attn.sr.bias"], stride=sr_ratios[i])
                h = _ln(m.flatten(2).transpose(1, 2), sd, f"{b}.attn.norm", TORCH_EPS)
                if linear:
                    h = F.gelu(h)
            kv = _fc(h, sd, f"{b}.attn.kv").reshape(batch, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
            attn = ((q @ kv[0].transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
            x = x + _fc((attn @ kv[1]).transpose(1, 2).reshape(batch, -1, dim), sd, f"{b}.attn.proj")
            h = _fc(_ln(x, sd, f"{b}.norm2", BLOCK_EPS), sd, f"{b}.mlp.fc1")
            if version == 2:
                if linear:
                    h = F.relu(h)
                conv_w = sd[f"{b}.mlp.dwconv.dwconv.weight"]
                h = F.conv2d(_to_map(h, height, width), conv_w, sd[f"{b}.mlp.dwconv.dwconv.bias"], padding=1,
                             groups=conv_w.shape[0]).flatten(2).transpose(1, 2)
            x = x + _fc(F.gelu(h), sd, f"{b}.mlp.fc2")
            j += 1
        if version == 2:
            x = _ln(x, sd, f"norm{s}", BLOCK_EPS)
        x = _to_map(x, height, width)
        outs.append(x)
    return outs


def assert_matches(outs: dict, expected: list) -> None:
    for level, want in zip(LEVELS, expected):
        assert outs[level].shape == want.shape
        assert (outs[level] - want).abs().max().item() <= TOLERANCE, level


def build_for_parity(name: str, **overrides):
    """(float64 backbone in eval mode, its config) for variant ``name`` with ``overrides``."""
    config = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "backbone" / f"{name}.yaml"), overrides)
    return build_backbone(name, drop_path_rate=0.0, **overrides).double().eval(), config


# --- parity with the official computation ---------------------------------------------------------------------
@pytest.mark.parametrize("pretrain_img_size, size", [(224, (64, 96)), (64, (64, 64))],
                         ids=["resized-grid", "same-grid"])
def test_pvt_v1_matches_the_official_computation(pretrain_img_size, size):
    backbone, config = build_for_parity("pvt_tiny", depths=[1, 2, 1, 1], pretrain_img_size=pretrain_img_size)
    state = official_state(backbone, 1, torch.Generator().manual_seed(0))
    report = load_pretrained(backbone, state, format="pvt")
    assert sorted(report.dropped) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert report.missing == []
    assert torch.equal(backbone.stages[3].pos_embed, state["pos_embed4"][:, 1:])
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        assert_matches(backbone(images), functional_pvt(state, images, config.num_heads, config.sr_ratios, version=1))


@pytest.mark.parametrize("name, overrides", [
    ("pvt_v2_b0", {}),
    ("pvt_v2_b2_li", {"depths": [1, 1, 2, 1]}),
])
def test_pvt_v2_matches_the_official_computation(name, overrides):
    backbone, config = build_for_parity(name, **overrides)
    state = official_state(backbone, 2, torch.Generator().manual_seed(0))
    assert detect_format(state) == "pvt_v2"
    report = load_pretrained(backbone, state)  # the format is recognised
    assert report.format == "pvt_v2" and sorted(report.dropped) == ["head.bias", "head.weight"]
    assert report.missing == []
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    linear = config.linear_sra_pool_size is not None
    assert linear == name.endswith("_li") and (config.linear_sra_pool_size or LINEAR_SRA_POOL) == LINEAR_SRA_POOL
    with torch.no_grad():
        assert_matches(backbone(images), functional_pvt(state, images, config.num_heads, config.sr_ratios, 2, linear))


def test_linear_sra_keeps_seven_by_seven_keys_whatever_the_input():
    backbone = build_backbone("pvt_v2_b2_li", depths=[1, 1, 1, 1])
    attn = backbone.stages[0].blocks[0].attn
    tokens = torch.randn(1, 24 * 16, backbone.embed_dims[0])
    assert attn.reduce(tokens, (24, 16)).shape == (1, LINEAR_SRA_POOL ** 2, backbone.embed_dims[0])
    # every stage reduces (sr_ratio 1 of stage 4 is a conv-SRA setting that linear SRA does not use)
    assert all(stage.blocks[0].attn.pool is not None for stage in backbone.stages)
    assert all(stage.blocks[0].mlp.relu is not None for stage in backbone.stages)


def test_our_saved_weights_round_trip_as_comer():
    backbone = build_backbone("pvt_v2_b0")
    state = backbone.state_dict()
    assert detect_format(state) == "comer" and detect_format(build_backbone("pvt_tiny").state_dict()) == "comer"
    fresh = build_backbone("pvt_v2_b0")
    load_pretrained(fresh, state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())


def test_strict_loading_names_missing_and_unknown_keys():
    backbone = build_backbone("pvt_tiny", depths=[1, 1, 1, 1])
    state = official_state(backbone, 1, torch.Generator().manual_seed(0))
    assert detect_format(state) == "pvt"
    incomplete = {k: v for k, v in state.items() if k != "block2.0.attn.sr.weight"}
    with pytest.raises(CheckpointKeyError, match=r"stages\.1\.blocks\.0\.attn\.sr\.weight"):
        load_pretrained(backbone, incomplete, format="pvt")
    with pytest.raises(CheckpointKeyError, match=r"stages\.2\.blocks\.5\.norm1\.weight"):
        load_pretrained(backbone, {**state, "block3.5.norm1.weight": torch.ones(320)}, format="pvt")


@pytest.mark.parametrize("fmt", ["pvt", "pvt_v2"])
def test_pretrain_yaml_lists_the_code_defaults(fmt):
    cfg = OmegaConf.load(CONFIG_DIR / "pretrain" / f"{fmt}.yaml")
    assert cfg.format == fmt and cfg.path is None
    assert tuple(cfg.allow_missing) == DEFAULT_ALLOW_MISSING[fmt]


# --- sizes against the papers -----------------------------------------------------------------------------------
def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, millions", [
    ("pvt_tiny", 13.2), ("pvt_small", 24.5), ("pvt_medium", 44.2), ("pvt_large", 61.4)])
def test_pvt_v1_parameter_counts_match_the_paper(name, millions):
    """PVT paper Table 2 (ImageNet classifiers, to 0.1M): our head-less backbone plus the classifier's own parts:
    the 1000-way head, the final LayerNorm, the class token and its slot in the stage-4 position embedding."""
    with torch.device("meta"):
        backbone = build_backbone(name)
    width = backbone.embed_dims[-1]
    classifier = (width * IMAGENET_CLASSES + IMAGENET_CLASSES) + 2 * width + width + width
    assert round((_params(backbone) + classifier) / 1e6, 1) == millions


@pytest.mark.parametrize("name, millions", [
    ("pvt_v2_b0", 3.7), ("pvt_v2_b1", 14.0), ("pvt_v2_b2", 25.4), ("pvt_v2_b2_li", 22.6), ("pvt_v2_b3", 45.2),
    ("pvt_v2_b4", 62.6), ("pvt_v2_b5", 82.0)])
def test_pvt_v2_parameter_counts_match_the_paper(name, millions):
    """PVT v2 paper (ImageNet classifiers, to 0.1M): our head-less backbone plus the 1000-way head (the stage
    norms are both)."""
    with torch.device("meta"):
        backbone = build_backbone(name)
    width = backbone.embed_dims[-1]
    assert round((_params(backbone) + width * IMAGENET_CLASSES + IMAGENET_CLASSES) / 1e6, 1) == millions


# --- configuration and input errors -----------------------------------------------------------------------------
def test_every_variant_builds_with_the_declared_shapes():
    for name in ["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2",
                 "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"]:
        with torch.device("meta"):
            backbone = build_backbone(name)
        assert isinstance(backbone, (PyramidVisionTransformer, PyramidVisionTransformerV2))
        shapes = backbone.output_shape()
        assert [shapes[k].stride for k in LEVELS] == list(STRIDES)
        assert [shapes[k].channels for k in LEVELS] == backbone.embed_dims


def test_outputs_follow_the_declared_shapes():
    backbone = build_backbone("pvt_v2_b0")
    outs = backbone(torch.randn(1, 3, 64, 96))
    for level, spec in backbone.output_shape().items():
        assert outs[level].shape == (1, spec.channels, 64 // spec.stride, 96 // spec.stride)


def test_bad_inputs_and_settings_are_named():
    with pytest.raises(ValueError, match=r"unknown backbone 'pvt_huge'"):
        build_backbone("pvt_huge")
    for name in ["pvt_tiny", "pvt_v2_b0"]:
        with pytest.raises(ValueError, match=r"image size 64x72 is not allowed: both sides must be multiples of 32"):
            build_backbone(name)(torch.randn(1, 3, 64, 72))
    with pytest.raises(ValueError, match=r"exactly one of sr_ratios .* or linear_sra_pool_size"):
        build_backbone("pvt_v2_b0", linear_sra_pool_size=7)
    with pytest.raises(ValueError, match=r"per-stage settings need 4 entries .*'depths': \[2, 2, 2\]"):
        build_backbone("pvt_tiny", depths=[2, 2, 2])
    with pytest.raises(ValueError, match=r"pretrain_img_size 100 must be a multiple of 32"):
        build_backbone("pvt_tiny", pretrain_img_size=100)
    with pytest.raises(ValueError, match=r"patch_kernel_sizes \[7, 2, 3, 3\] must be odd"):
        build_backbone("pvt_v2_b0", patch_kernel_sizes=[7, 2, 3, 3])


def test_layer_decay_needs_a_vit_and_plain_training_does_not():
    model = torch.nn.Module()
    model.backbone = build_backbone("pvt_v2_b0")
    assert decay_depth(model, 1.0, None) == 0
    with pytest.raises(ValueError, match=r"module\.layer_decay=0\.9 .*PyramidVisionTransformerV2.*layer_decay=1\.0"):
        decay_depth(model, 0.9, None)


# --- the app and the detector -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["pvt_tiny", "pvt_v2_b0"])
def test_synthetic_segmentation_trains(backbone, tmp_path):
    cfg = compose_config("train", [*TINY_SYNTHETIC, f"backbone={backbone}", "backbone.depths=[1,1,1,1]"], tmp_path)
    assert cfg.module.layer_decay == 1.0
    result = train(cfg)
    assert result["global_step"] == 2 and result["metrics"]["val/mIoU"] is not None


@pytest.mark.parametrize("backbone", ["pvt_tiny", "pvt_v2_b0"])
def test_mask_rcnn_training_step(backbone):
    # test_mask_rcnn's narrow heads (CPU speed); the recipe's own widths build in build_detector below.
    config = OmegaConf.merge(detector_config(CLASSES), NARROW)
    model = instantiate_detector(config, build_backbone(backbone, depths=[1, 1, 1, 1]))
    with torch.device("meta"):
        recipe = build_detector(backbone, num_classes=CLASSES)
    assert [conv.conv.in_channels for conv in recipe.neck.lateral_convs] == recipe.backbone.embed_dims
    model.train()
    images, sizes, boxes, labels, masks = synthetic_batch()
    losses = model(images, sizes, boxes, labels, masks, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(losses[k]) for k in LOSS_KEYS)
    sum(losses[k] for k in LOSS_KEYS).backward()
    first = model.backbone.stages[0].patch_embed.proj.weight.grad
    assert first is not None and torch.count_nonzero(first) > 0
