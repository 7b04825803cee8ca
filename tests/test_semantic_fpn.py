"""Semantic FPN (the PVT paper's ADE20K segmentor): shapes and mmseg's names, equality (float64) with a functional
FPN + FPNHead, the loss through the segmentor, and model=semantic_fpn composing and training a few steps."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from app_utils import CONFIG_DIR, TINY_SYNTHETIC, compose_config
from comer import ShapeSpec
from comer.app import train
from comer.app.builders import check_config
from comer.backbones import build_backbone
from comer.heads import FPN, SemanticFPNHead
from comer.models import build_segmentor

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
CHANNELS = (8, 12, 16, 20)
CLASSES = 5
BN_EPS = 1e-5
TOLERANCE = 1e-10
# The tiny run's overrides minus the one sizing UperNet's auxiliary head (Semantic FPN has none).
SEMANTIC_FPN_RUN = [o for o in TINY_SYNTHETIC if not o.startswith("model.auxiliary_head")] + [
    "model=semantic_fpn", "model.decode_head.neck.out_channels=16"]


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: oversubscribed intra-op threads make small models much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backbone_shape():
    return {name: ShapeSpec(channels=c, stride=s) for name, c, s in zip(LEVELS, CHANNELS, STRIDES)}


def features(batch, height, width, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, c, height // s, width // s, generator=g, dtype=dtype)
            for name, c, s in zip(LEVELS, CHANNELS, STRIDES)}


def head(fpn_channels=16, channels=8) -> SemanticFPNHead:
    neck = partial(FPN, in_features=LEVELS, out_channels=fpn_channels, num_outs=len(LEVELS))
    return SemanticFPNHead(backbone_shape(), CLASSES, neck=neck, channels=channels)


def test_names_and_layout_follow_mmseg():
    module = head()
    assert module.output_stride == 4
    # log2(stride / 4) conv steps per level (at least one), each followed by a 2x upsampling on coarser levels
    convs = [[type(m).__name__ for m in scale_head] for scale_head in module.scale_heads]
    assert convs == [["ConvModule"], ["ConvModule", "Upsample"], ["ConvModule", "Upsample"] * 2,
                     ["ConvModule", "Upsample"] * 3]
    keys = set(module.state_dict())
    for key in ["neck.lateral_convs.3.conv.weight", "neck.fpn_convs.0.conv.bias", "scale_heads.0.0.conv.weight",
                "scale_heads.0.0.bn.running_var", "scale_heads.3.4.conv.weight", "conv_seg.weight"]:
        assert key in keys, key
    assert "scale_heads.0.0.conv.bias" not in keys  # no conv bias before a norm (mmcv's bias="auto")


def test_output_shape_is_the_finest_stride():
    logits = head()(features(2, 64, 96))
    assert logits.shape == (2, CLASSES, 16, 24)


def functional_semantic_fpn(sd, feats):
    """mmseg's FPN (no extra levels) and FPNHead in eval mode, written out on the state dict's names."""
    inputs = [feats[name] for name in LEVELS]
    laterals = [F.conv2d(x, sd[f"neck.lateral_convs.{i}.conv.weight"], sd[f"neck.lateral_convs.{i}.conv.bias"])
                for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    levels = [F.conv2d(x, sd[f"neck.fpn_convs.{i}.conv.weight"], sd[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
              for i, x in enumerate(laterals)]
    out = None
    for i, x in enumerate(levels):
        steps = max(1, int(math.log2(STRIDES[i] / STRIDES[0])))
        for k in range(steps):
            index = 2 * k if i else k
            p = f"scale_heads.{i}.{index}"
            x = F.conv2d(x, sd[f"{p}.conv.weight"], padding=1)
            x = F.relu(F.batch_norm(x, sd[f"{p}.bn.running_mean"], sd[f"{p}.bn.running_var"], sd[f"{p}.bn.weight"],
                                    sd[f"{p}.bn.bias"], training=False, eps=BN_EPS))
            if i:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = x if out is None else out + F.interpolate(x, size=out.shape[2:], mode="bilinear", align_corners=False)
    return F.conv2d(out, sd["conv_seg.weight"], sd["conv_seg.bias"])


def test_matches_mmseg_fpn_and_fpn_head():
    module = head().double().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial norms and biases everywhere
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=g, dtype=value.dtype) + 0.5 if "running_var" in name
                            else 0.3 * torch.randn(value.shape, generator=g, dtype=value.dtype))
    feats = features(2, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        difference = (module(feats) - functional_semantic_fpn(module.state_dict(), feats)).abs().max().item()
    assert difference <= TOLERANCE


def test_loss_through_the_segmentor_reaches_the_backbone():
    config = OmegaConf.load(CONFIG_DIR / "model" / "semantic_fpn.yaml")
    decode_head = instantiate(config.decode_head, _convert_="all")
    segmentor = build_segmentor(build_backbone("pvt_v2_b0"), decode_head, None, num_classes=CLASSES)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, CLASSES, (2, 64, 64))
    labels[0, :8] = 255  # ignored pixels
    losses = segmentor.loss(images, labels)
    assert set(losses) == {"loss_seg"} and torch.isfinite(losses["loss_seg"])
    assert losses["loss_seg"].item() == pytest.approx(math.log(CLASSES), rel=0.3)  # near-uniform at initialisation
    losses["loss_seg"].backward()
    grad = segmentor.backbone.stages[0].patch_embed.proj.weight.grad
    assert grad is not None and torch.count_nonzero(grad) > 0
    assert segmentor(images).shape == (2, CLASSES, 64, 64)


def test_recipe_values_of_the_model_config():
    config = OmegaConf.load(CONFIG_DIR / "model" / "semantic_fpn.yaml")
    assert config.auxiliary_head is None
    assert (config.decode_head.neck.out_channels, config.decode_head.neck.num_outs) == (256, 4)
    assert (config.decode_head.channels, config.decode_head.dropout) == (128, 0.1)


def test_synthetic_task_and_toy_scale_size_the_semantic_fpn(tmp_path):
    """task=synthetic_seg and scale=toy slim whichever segmentor model= chooses (conf/head_widths/), and add
    no auxiliary head to one that has none."""
    for overrides, width in (([], 64), (["scale=toy"], 16)):
        cfg = compose_config("train", ["model=semantic_fpn", *overrides], tmp_path)
        check_config(cfg)
        assert cfg.model.auxiliary_head is None
        assert (cfg.model.decode_head.neck.out_channels, cfg.model.decode_head.channels) == (width, width)


def test_model_semantic_fpn_composes_and_trains(tmp_path):
    cfg = compose_config("train", [*SEMANTIC_FPN_RUN, "backbone=pvt_v2_b0", "backbone.depths=[1,1,1,1]"], tmp_path)
    check_config(cfg)
    assert cfg.model.decode_head._target_ == "comer.heads.SemanticFPNHead" and cfg.model.auxiliary_head is None
    result = train(cfg)
    assert result["global_step"] == 2 and result["metrics"]["val/mIoU"] is not None


def test_bad_settings_are_named():
    with pytest.raises(KeyError, match=r"FPN: feature\(s\) \['res6'\] not in the backbone's output_shape"):
        SemanticFPNHead(backbone_shape(), CLASSES, neck=partial(FPN, in_features=["res5", "res6"], num_outs=2))
    with pytest.raises(ValueError, match=r"num_classes must be >= 1"):
        SemanticFPNHead(backbone_shape(), 0, neck=partial(FPN, num_outs=4))
    with pytest.raises(KeyError, match=r"FPN: feature\(s\) \['res2'\] missing from the input"):
        head()({name: value for name, value in features(1, 64, 64).items() if name != "res2"})
