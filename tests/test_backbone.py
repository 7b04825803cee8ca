"""ViT-CoMer and the plain-ViT pyramid: parameter counts and names against the official manifests,
outputs, gradients, ablation switches, the level layout, MSDeformAttn and MRFP against oracles."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import comer.layers.ms_deform_attn as ms_deform_attn_module
from comer import ShapeSpec, build_backbone
from comer.kernels import ms_deform_attn_reference
from comer.layers import MRFP, LevelLayout, MSDeformAttn

REFERENCE = Path(__file__).parent / "data" / "official_keys"  # copies of ../shared/reference
# Test-only small model; no stochastic depth so gradient checks cannot hit a dropped branch.
TINY = dict(embed_dim=48, depth=4, num_heads=3, deform_num_heads=3, num_interactions=4, mrfp_ratio=1.0,
            drop_path_rate=0.0)


@pytest.fixture(autouse=True)
def _one_thread_and_reference_sampling(monkeypatch):
    # 2 shared cores: oversubscribed intra-op threads make tiny models 20x slower. The sampling op is
    # pinned to the pure-PyTorch reference so these tests check the module, not the kernel under work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn", ms_deform_attn_reference)
    yield
    torch.set_num_threads(threads)


def official_to_ours(key: str) -> str:
    """Independent rendering of the name map in docs/contracts.md (two MRFP kernel groups)."""
    key = key.removeprefix("backbone.")
    key = re.sub(r"^blocks\.(\d+)\.gamma([12])$", r"vit.blocks.\1.ls\2.gamma", key)
    key = re.sub(r"^(patch_embed|pos_embed|blocks)", r"vit.\1", key)
    key = key.replace("cti_tov", "cti_to_vit").replace("cti_toc", "cti_to_cnn").replace("cfinter", "cnn_interaction")
    key = key.replace("extra_CTIs", "extra_ctis").replace("ffn.dwconv.dwconv", "ffn.dwconv")
    match = re.search(r"mrfp\.dwconv\.dwconv(\d+)", key)
    if match:
        index = int(match.group(1)) - 1
        key = key.replace(match.group(0), f"mrfp.dwconvs.{index // 2}.{index % 2}")
    key = re.sub(r"mrfp\.dwconv\.bn(\d)", lambda m: f"mrfp.norms.{int(m.group(1)) - 1}", key)
    key = re.sub(r"^norm(\d)\.", lambda m: f"out_norms.{int(m.group(1)) - 1}.", key)
    return key


def official_manifest(variant: str) -> dict[str, tuple[int, ...]]:
    rows = (REFERENCE / f"official_vit_comer_{variant}_keys.tsv").read_text().splitlines()[1:]
    shapes = {}
    for row in rows:
        key, shape, _ = row.split("\t")
        shapes[official_to_ours(key)] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return shapes


def build_on_meta(name: str, **overrides):
    with torch.device("meta"):
        return build_backbone(name, **overrides)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, millions", [("comer_t", 10.62), ("comer_s", 31.28), ("comer_b", 110.60)])
def test_parameter_counts_match_paper(name, millions):
    assert round(num_params(build_on_meta(name)) / 1e6, 2) == millions


@pytest.mark.parametrize("variant", ["t", "s", "b", "s_det", "b_det"])
def test_state_dict_matches_official_manifest(variant):
    model = build_on_meta(f"comer_{variant}")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_manifest(variant)
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


@pytest.mark.parametrize("name", ["comer_t", "vit_t"])
def test_outputs_names_shapes_strides(name):
    model = build_backbone(name, **({"depth": 4, "out_indices": [0, 1, 2, 3]} if name == "vit_t" else TINY)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    channels = 48 if name == "comer_t" else 192
    spec = model.output_shape()
    assert spec == {f"res{i}": ShapeSpec(channels, 2 ** i) for i in range(2, 6)}
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for key, tensor in out.items():
        assert tensor.shape == (2, channels, 64 // spec[key].stride, 96 // spec[key].stride)
        assert torch.isfinite(tensor).all()


def test_full_comer_t_runs_on_64x64():
    model = build_backbone("comer_t").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape) for t in out.values()] == [(1, 192, 16, 16), (1, 192, 8, 8), (1, 192, 4, 4),
                                                       (1, 192, 2, 2)]


def _perturb(model, keep_zero_gamma: bool = False):
    """Move off the init: zero-initialised offset/weight projections would hide the query's gradient."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not (keep_zero_gamma and name.endswith("cti_to_vit.gamma")):
                param.add_(0.02 * torch.randn_like(param))
    return model


def _grad_missing(model, images):
    out = model(images)
    torch.manual_seed(123)
    # A random projection: a plain square would be constant after the output BatchNorms.
    loss = sum((t * torch.randn_like(t)).sum() for t in out.values())
    loss.backward()
    return sorted(n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0)


def test_gamma_zero_still_trains_cnn_branch_and_gamma():
    model = _perturb(build_backbone("comer_t", **TINY), keep_zero_gamma=True)
    missing = _grad_missing(model, torch.randn(2, 3, 64, 64))
    # gamma = 0 blocks only what feeds CTI-to-ViT's fused output; gamma itself and the CNN side learn.
    assert missing and all(re.search(r"cti_to_vit\.(query_norm|feat_norm|attn|ffn|ffn_norm)\.", n) for n in missing)
    assert not any(n.endswith("cti_to_vit.gamma") for n in missing)
    assert not any(n.startswith(("spm.", "level_embed", "up.")) or ".mrfp." in n or ".extra_ctis." in n
                   for n in missing)


@pytest.mark.parametrize("overrides", [
    {},
    {"use_mrfp": False},
    {"use_cti_to_vit": False},
    {"use_cti_to_cnn": False},
    {"cnn_feature_interaction": False},
    {"num_extra_ctis": 0},
    {"vit_feature_mode": "final", "window_block_indexes": [0, 2], "window_size": 3},
])
def test_gradients_reach_every_parameter(overrides):
    model = _perturb(build_backbone("comer_t", **{**TINY, "cti_init_value": 0.1, **overrides}))
    assert _grad_missing(model, torch.randn(2, 3, 64, 64)) == []


@pytest.mark.parametrize("switch, removed", [
    ({"use_mrfp": False}, r"\.mrfp\."),
    ({"use_cti_to_vit": False}, r"\.cti_to_vit\."),
    ({"use_cti_to_cnn": False}, r"\.cti_to_cnn\."),
    ({"cnn_feature_interaction": False}, r"(cti_to_cnn|extra_ctis\.\d+)\.(query_norm|feat_norm|cnn_interaction)\."),
    ({"num_extra_ctis": 0}, r"\.extra_ctis\."),
    ({"num_extra_ctis": 2}, r"\.extra_ctis\.[23]\."),
])
def test_each_switch_removes_exactly_its_modules(switch, removed):
    full = set(build_on_meta("comer_t").state_dict())
    reduced = set(build_on_meta("comer_t", **switch).state_dict())
    assert reduced < full
    gone = full - reduced
    assert all(re.search(removed, k) for k in gone)
    assert not any(re.search(removed, k) for k in reduced)


def test_interaction_indexes_equal_num_interactions():
    by_count = build_backbone("comer_t", **TINY)
    explicit = {**TINY, "num_interactions": None, "interaction_indexes": [[0, 0], [1, 1], [2, 2], [3, 3]]}
    by_index = build_backbone("comer_t", **explicit)
    assert [s.blocks for s in by_count.interactions] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    by_index.load_state_dict(by_count.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = by_count.eval()(images), by_index.eval()(images)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    large = build_on_meta("comer_l")
    assert [s.blocks for s in large.interactions] == [(0, 6), (6, 12), (12, 18), (18, 24)]


def test_checkpointing_gives_same_outputs_and_gradients():
    torch.manual_seed(7)
    plain = build_backbone("comer_t", **TINY, cti_init_value=0.1)
    ckpt = build_backbone("comer_t", **TINY, cti_init_value=0.1, with_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    outs = []
    for model in (plain, ckpt):
        out = model(images)
        sum((t * t.detach().sign()).sum() for t in out.values()).backward()
        outs.append(out)
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # MRFP BatchNorms run outside the checkpoint: one running-stat update per step, as without it.
    for key, value in plain.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(ckpt.state_dict()[key]) == 1, key


def test_vit_feature_modes():
    seg = build_backbone("comer_t", **TINY).eval()
    det = build_backbone("comer_t", **TINY, vit_feature_mode="final").eval()
    det.load_state_dict(seg.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = seg(images), det(images)
    torch.testing.assert_close(a["res5"], b["res5"])  # stage 4 output == final output
    assert (a["res2"] - b["res2"]).abs().max() > 1e-4
    det_cfg = build_on_meta("comer_s_det")
    assert det_cfg.vit_feature_mode == "final"
    assert [b.attn.window_size for b in det_cfg.vit.blocks] == [14, 14, None] * 4
    assert det_cfg.vit.pos_embed.shape == (1, 1 + 37 * 37, 384)


def test_level_layout_numbers():
    layout = LevelLayout.from_image_size(64, 96)
    assert layout.sizes == ((8, 12), (4, 6), (2, 3)) and layout.vit_grid == (4, 6)
    assert layout.spatial_shapes.tolist() == [[8, 12], [4, 6], [2, 3]]
    assert layout.level_start_index.tolist() == [0, 96, 120]
    points = layout.reference_points()
    assert points.shape == (1, 126, 1, 2)
    torch.testing.assert_close(points[0, 0, 0], torch.tensor([0.5 / 12, 0.5 / 8]))
    torch.testing.assert_close(points[0, 96 + 7, 0], torch.tensor([1.5 / 6, 1.5 / 4]))  # level 1, row 1, col 1
    tokens = torch.randn(2, 126, 5)
    assert torch.equal(layout.merge(layout.split(tokens)), tokens)
    assert torch.equal(layout.from_maps(layout.to_maps(tokens)), tokens)
    maps = layout.to_maps(tokens)
    assert torch.equal(maps[2][1, :, 1, 2], tokens[1, 120 + 5])
    added = layout.add_to_vit_level(tokens, torch.ones(2, 24, 5))
    torch.testing.assert_close(added - tokens, torch.cat([torch.zeros(2, 96, 5), torch.ones(2, 24, 5),
                                                          torch.zeros(2, 6, 5)], 1))


def test_ms_deform_attn_init_and_identity_sampling():
    attn = MSDeformAttn(dim=16, num_heads=4, num_levels=3, num_points=2, value_ratio=0.5).double()
    assert attn.value_proj.weight.shape == (8, 16) and attn.output_proj.weight.shape == (16, 8)
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    # Head h points along angle 2*pi*h/4 scaled to the unit square, point p at distance p + 1.
    expected_dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(bias[:, 1, 0], expected_dirs, atol=1e-7, rtol=0)
    torch.testing.assert_close(bias[:, 2, 1], 2 * expected_dirs, atol=1e-6, rtol=0)  # float32 sin/cos
    assert torch.all(attn.attention_weights.weight == 0) and torch.all(attn.attention_weights.bias == 0)
    # With zero offsets every point samples its own pixel centre: output = output_proj(value_proj(feat)).
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    one_level = MSDeformAttn(dim=16, num_heads=4, num_levels=1, num_points=2).double()
    torch.nn.init.zeros_(one_level.sampling_offsets.bias)
    layout = LevelLayout(sizes=((3, 5),), vit_level=0, device=torch.device("cpu"))
    feat = torch.randn(2, 15, 16, dtype=torch.float64)
    out = one_level(torch.randn(2, 15, 16, dtype=torch.float64), feat, layout,
                    layout.reference_points(torch.float64))
    # Reference points are float32 (as Deformable DETR): 0.5/5 is off by ~1e-8 of the width, hence 1e-5.
    torch.testing.assert_close(out, one_level.output_proj(one_level.value_proj(feat)), rtol=0, atol=1e-5)


def test_ms_deform_attn_offsets_are_in_pixels_of_each_level():
    torch.manual_seed(8)
    attn = MSDeformAttn(dim=8, num_heads=1, num_levels=1, num_points=1).double()
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))  # one pixel to the right
    layout = LevelLayout(sizes=((2, 4),), vit_level=0, device=torch.device("cpu"))
    feat = torch.randn(1, 8, 8, dtype=torch.float64)
    out = attn(torch.randn(1, 8, 8, dtype=torch.float64), feat, layout, layout.reference_points(torch.float64))
    value = attn.value_proj(feat).view(1, 2, 4, 8)
    shifted = torch.cat([value[:, :, 1:], torch.zeros(1, 2, 1, 8, dtype=torch.float64)], 2)  # zero padding
    torch.testing.assert_close(out, attn.output_proj(shifted.reshape(1, 8, 8)), rtol=0, atol=1e-12)


def test_mrfp_matches_official_form():
    torch.manual_seed(9)
    mrfp = MRFP(dim=8, hidden_dim=12, kernel_sizes=(3, 5)).double().eval()
    for norm in mrfp.norms:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    layout = LevelLayout.from_image_size(64, 32)
    x = torch.randn(2, layout.num_tokens, 8, dtype=torch.float64)
    hidden = mrfp.fc1(x)
    levels = []
    for level, (h, w) in enumerate(layout.sizes):
        start = layout.level_start_index[level]
        grid = hidden[:, start:start + h * w].transpose(1, 2).reshape(2, 12, h, w)
        small = F.conv2d(grid[:, :6], mrfp.dwconvs[level][0].weight, mrfp.dwconvs[level][0].bias, padding=1, groups=6)
        large = F.conv2d(grid[:, 6:], mrfp.dwconvs[level][1].weight, mrfp.dwconvs[level][1].bias, padding=2, groups=6)
        mixed = F.gelu(mrfp.norms[level](torch.cat([small, large], 1)))
        levels.append(mixed.flatten(2).transpose(1, 2))
    expected = mrfp.fc2(F.gelu(torch.cat(levels, 1)))  # the official code applies GELU twice
    torch.testing.assert_close(mrfp(x, layout), expected, rtol=0, atol=1e-12)
    assert [tuple(c.weight.shape) for c in mrfp.dwconvs[2]] == [(6, 1, 3, 3), (6, 1, 5, 5)]


def test_vit_pyramid_strides_come_from_the_right_blocks():
    torch.manual_seed(10)
    model = build_backbone("vit_t", depth=4, out_indices=[0, 1, 2, 3]).eval()
    assert build_on_meta("vit_t").out_indices == [2, 5, 8, 11]
    assert build_on_meta("vit_l").out_indices == [5, 11, 17, 23]
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        taps = model.vit.forward_features(images, [2, 3])
    normed = [model.norms[i](t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i, t in zip((2, 3), taps)]
    torch.testing.assert_close(out["res4"], normed[0])
    torch.testing.assert_close(out["res5"], F.max_pool2d(normed[1], 2))
