"""comer.flops: parameter counts against the spec, FLOPs against hand counts, the analytic deformable part."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from comer import build_backbone
from comer.flops import (DEFORM_SAMPLING_FLOPS, build_model_from_config, compose_model_config, main,
                         model_complexity)
from comer.layers import LevelLayout, MSDeformAttn

# /work/shared/spec/vit-comer.md: "UperNet (+ auxiliary FCN head, 150 classes): T 38.7M, S 61.4M, B 144.7M.
# Backbone alone T 10.62M, S 31.28M, B 110.60M."
SPEC_PARAMS = {"comer_t": (10.62, 38.7), "comer_s": (31.28, 61.4), "comer_b": (110.60, 144.7)}


def component(result: dict, name: str) -> dict:
    (found,) = [c for c in result["components"] if c["name"] == name]
    return found


def vit_hand_count(depth: int, dim: int, tokens: int) -> tuple[int, int]:
    """(patch embedding, ViT blocks) FLOPs of one image, a multiply-add = 2: per block the four Linears
    (qkv D->3D, proj D->D, fc1 D->4D, fc2 4D->D: 12 D^2 weights, 2 FLOPs per weight and token) and the
    attention (Q K^T and A V: 2 N^2 D each); the patch embedding is a 16x16x3 -> D conv per token."""
    per_block = 2 * tokens * 12 * dim * dim + 2 * 2 * tokens * tokens * dim
    return 2 * tokens * (3 * 16 * 16) * dim, depth * per_block


@pytest.fixture(scope="module")
def comer_s_segmentor():
    cfg = compose_model_config(["backbone=comer_s", "task=ade20k"])
    assert cfg.data.num_classes == 150
    return build_model_from_config(cfg)


@pytest.mark.parametrize("size", [(64, 64), (64, 128)])
def test_vit_part_matches_the_hand_count(comer_s_segmentor, size):
    """ViT-S (D 384, 12 blocks) inside ViT-CoMer-S: FlopCounterMode's count of the ViT blocks and the patch
    embedding equals 2*params*tokens per Linear plus the attention terms, square or not."""
    result = model_complexity(comer_s_segmentor.backbone, size)
    tokens = (size[0] // 16) * (size[1] // 16)
    patch, blocks = vit_hand_count(depth=12, dim=384, tokens=tokens)
    assert component(result, "ViT blocks")["flops"] == blocks
    assert component(result, "patch embed")["flops"] == patch
    # the same count written as 2 * (Linear weights) * tokens + attention, from the model's own Linears
    vit = comer_s_segmentor.backbone.vit
    linear_weights = sum(m.weight.numel() for m in vit.blocks.modules() if isinstance(m, nn.Linear))
    assert blocks == 2 * linear_weights * tokens + 12 * 4 * tokens * tokens * 384
    assert component(result, "ViT blocks")["analytic_flops"] == 0


def test_parameter_counts_match_the_spec_and_components_add_up(comer_s_segmentor):
    result = model_complexity(comer_s_segmentor, 32)
    backbone = [c for c in result["components"] if c["group"] == "backbone"]
    assert round(sum(c["params"] for c in backbone) / 1e6, 2) == SPEC_PARAMS["comer_s"][0]
    assert round(result["params"] / 1e6, 1) == SPEC_PARAMS["comer_s"][1]
    assert result["params"] == sum(p.numel() for p in comer_s_segmentor.parameters())
    assert sum(c["params"] for c in result["components"]) == result["params"]
    # inference FLOPs: everything but the auxiliary head, which only runs in training
    aux = component(result, "auxiliary head")
    assert aux["train_only"] and aux["flops"] > 0
    assert result["flops"] == sum(c["flops"] for c in result["components"] if not c["train_only"])
    names = [c["name"] for c in backbone]
    assert names == ["patch embed", "ViT blocks", "SPM", "MRFP", "CTI to ViT (injector)", "CTI to CNN (extractor)",
                     "extra CTIs", "outputs (deconv, norms)"]
    assert all(c["params"] > 0 and c["flops"] > 0 for c in backbone)
    assert not any(c["name"] == "other" for c in result["components"]), "every parameter and FLOP has its component"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["comer_t", "comer_b"])
def test_parameter_counts_of_the_other_variants(variant):
    model = build_model_from_config(compose_model_config([f"backbone={variant}", "task=ade20k"]))
    backbone, total = SPEC_PARAMS[variant]
    assert round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 2) == backbone
    assert round(model_complexity(model, 32)["params"] / 1e6, 1) == total


def test_flop_counter_misses_the_deformable_sampling_and_we_count_it():
    """FlopCounterMode sees MSDeformAttn's four Linears and nothing of its sampling (grid_sample and a weighted
    sum on the reference path, a custom op on the Triton one); model_complexity adds 2*(4+1) FLOPs per value
    channel, sampling point, level, head and query."""
    dim, heads, levels, points = 64, 4, 3, 4
    attn = MSDeformAttn(dim, heads, levels, points, value_ratio=0.5)
    layout = LevelLayout.from_image_size(64, 64)  # levels 8x8, 4x4, 2x2: 84 tokens
    tokens = layout.num_tokens
    x = torch.randn(2, tokens, dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        attn(x, x, layout, layout.reference_points())
    value_dim = dim // 2
    linears = 2 * 2 * tokens * (dim * heads * levels * points * 2 + dim * heads * levels * points
                                + dim * value_dim + value_dim * dim)
    assert counter.get_total_flops() == linears

    backbone = build_backbone("comer_t")  # D 192, 6 deform heads, deform ratio 1.0, 4 points, 4 stages
    result = model_complexity(backbone, 64)
    per_call = tokens * levels * 4 * 192 * DEFORM_SAMPLING_FLOPS  # queries = all of c in every attention
    assert DEFORM_SAMPLING_FLOPS == 10
    assert component(result, "CTI to ViT (injector)")["analytic_flops"] == 4 * per_call
    assert component(result, "CTI to CNN (extractor)")["analytic_flops"] == 4 * per_call
    assert component(result, "extra CTIs")["analytic_flops"] == 4 * per_call
    assert component(result, "MRFP")["analytic_flops"] == 0
    assert result["flops"] == sum(c["flops"] for c in result["components"])


def test_counting_leaves_the_model_as_it_was():
    """One eval-mode forward without gradients: training mode, BatchNorm statistics and the RNG are untouched."""
    backbone = build_backbone("comer_t").train()
    backbone.spm.eval()  # a frozen part stays in eval mode
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    first = model_complexity(backbone, 64)
    assert backbone.training and backbone.vit.blocks[0].training and not backbone.spm.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert model_complexity(backbone, 64, batch_size=2) == first  # deterministic, and per image
    with pytest.raises(ValueError, match="image_size"):
        model_complexity(backbone, (64, 64, 3))


def test_plain_vit_baseline_components():
    result = model_complexity(build_backbone("vit_s"), 64)
    names = [c["name"] for c in result["components"]]
    assert names == ["patch embed", "ViT blocks", "pyramid (norms, resampling)"]
    assert component(result, "ViT blocks")["flops"] == vit_hand_count(12, 384, 16)[1]


def test_cli_prints_the_table(capsys):
    assert main(["backbone=comer_t", "task=synthetic_seg", "64x96"]) == 0
    out = capsys.readouterr().out
    for row in ("ViT blocks", "SPM", "MRFP", "CTI to ViT (injector)", "extra CTIs", "decode head",
                "auxiliary head (training only)", "backbone total", "total (inference)"):
        assert row in out, row
    assert "64x96 input" in out and "7 classes" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
            if line.startswith("|")}
    model = build_model_from_config(compose_model_config(["backbone=comer_t", "task=synthetic_seg"]))
    assert rows["total (inference)"][0] == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
    assert rows["ViT blocks"][1] == f"{vit_hand_count(depth=12, dim=192, tokens=4 * 6)[1] / 1e9:.2f}"


def test_training_records_the_model_counts_in_metrics_json(tmp_path):
    """train() writes the parameters and FLOPs of its model at the slide window into metrics.json (`model`),
    the same numbers comer.flops gives for the model built from the run's config."""
    from app_utils import TINY_SYNTHETIC, compose_config

    from comer.app import train
    from comer.app.builders import build_model

    cfg = compose_config("train", TINY_SYNTHETIC, tmp_path)
    result = train(cfg)
    recorded = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())["model"]
    model = build_model(cfg)
    assert recorded["params"] == sum(p.numel() for p in model.parameters())
    assert recorded["image_size"] == list(cfg.module.crop_size) == [64, 64]
    assert recorded["flops"] == model_complexity(model, (64, 64))["flops"] > 0


def test_detection_counts_at_the_padded_test_scale(tmp_path):
    """Mask R-CNN needs sides padded to the size divisor: the test scale (187, 112) is counted at 128x192."""
    from app_utils import compose_config

    from comer.app.complexity_record import complexity_image_size

    cfg = compose_config("train", ["task=synthetic_det"], tmp_path)
    assert list(cfg.data.test_scale) == [187, 112] and cfg.data.size_divisor == 32
    assert complexity_image_size(cfg) == (128, 192)
