"""Released-format ViT-CoMer weights give the official outputs.

Random state dicts with the official names and shapes (from the key manifests) are loaded through
`comer.checkpoint.load_pretrained` into `build_backbone(...)` and compared with the independent
functional re-statement of the official forward in tests/official_oracle.py.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from comer import build_backbone
from comer.checkpoint import convert_backbone_state, load_pretrained
from official_oracle import OFFICIAL_CONFIGS, cached_official_state_dict, official_forward, read_manifest, strip_prefix

OUTPUTS = ("res2", "res3", "res4", "res5")
# (manifest, our config): every released backbone shape
RELEASED = [("t", "comer_t"), ("s_det", "comer_s_det"), pytest.param("s", "comer_s", marks=pytest.mark.slow),
            pytest.param("b", "comer_b", marks=pytest.mark.slow), pytest.param("b_det", "comer_b_det", marks=pytest.mark.slow)]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compare(variant: str, backbone_name: str, size: tuple[int, int], dtype: torch.dtype, seed: int = 0):
    state = cached_official_state_dict(variant, seed=seed, dtype=dtype)
    backbone = build_backbone(backbone_name).to(dtype).eval()
    report = load_pretrained(backbone, state)
    assert report.format == "official" and report.missing == [] and len(report.loaded) == len(state)
    images = torch.randn(2, 3, *size, dtype=dtype)
    expected = official_forward(strip_prefix(state), images, OFFICIAL_CONFIGS[variant])
    with torch.no_grad():
        outputs = backbone(images)
    assert list(outputs) == list(OUTPUTS)
    return [(outputs[name], reference) for name, reference in zip(OUTPUTS, expected)]


# 64x96: 1/16 grid 4x6, 1/32 grid 2x3 (non-square, odd level; pos_embed 14x14 -> 4x6).
@pytest.mark.parametrize("variant, backbone_name, size", [("t", "comer_t", (64, 96)), ("s", "comer_s", (64, 64))])
def test_segmentation_flavour_matches_official_float64(variant, backbone_name, size):
    for ours, reference in _compare(variant, backbone_name, size, torch.float64):
        assert ours.shape == reference.shape
        assert reference.abs().max() > 1  # the random weights give non-trivial features
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)


# 64x256: 1/16 grid 4x16 -> two 14x14 windows, zero-padded bottom (10 rows) and right (12 cols).
def test_detection_flavour_with_window_padding_matches_official_float64():
    for ours, reference in _compare("s_det", "comer_s_det", (64, 256), torch.float64):
        assert reference.abs().max() > 1
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant, backbone_name, size",
                         [("t", "comer_t", (64, 96)),
                          pytest.param("s_det", "comer_s_det", (64, 256), marks=pytest.mark.slow)])
def test_matches_official_float32(variant, backbone_name, size):
    for ours, reference in _compare(variant, backbone_name, size, torch.float32):
        scale = reference.abs().max()
        assert (ours - reference).abs().max() <= 1e-4 * scale


def test_flavours_differ_on_the_same_weights():
    """The oracle's two flavours really differ (so the flavour tests above cannot pass by accident)."""
    state = strip_prefix(cached_official_state_dict("t"))
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    seg = official_forward(state, images, OFFICIAL_CONFIGS["t"])
    det = official_forward(state, images, dataclasses.replace(OFFICIAL_CONFIGS["t"], flavour="detection"))
    assert all((s - d).abs().max() > 1e-3 for s, d in zip(seg[:3], det[:3]))
    torch.testing.assert_close(seg[3], det[3], rtol=0, atol=0)  # stride 32: both add the final ViT output


@pytest.mark.slow
def test_detection_flavour_two_by_two_windows_float64():
    """288x288: 1/16 grid 18x18 -> 2x2 windows of 14, zero-padded bottom and right."""
    for ours, reference in _compare("s_det", "comer_s_det", (288, 288), torch.float64):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant, backbone_name", RELEASED)
def test_every_released_key_maps_onto_our_backbone(variant, backbone_name):
    """All five manifests convert strictly onto our configs: names and shapes."""
    target = build_backbone(backbone_name).state_dict()
    state = {e.key: torch.zeros(e.shape, dtype=torch.long if e.key.endswith("num_batches_tracked")
                                else torch.float32) for e in read_manifest(variant)}
    pos = next(e.shape for e in read_manifest(variant) if e.key == "backbone.pos_embed")
    assert tuple(target["vit.pos_embed"].shape) == pos  # the config's pretrain size is the release's
    full, report = convert_backbone_state(target, state)
    assert report.missing == [] and sorted(report.loaded) == sorted(target) and len(state) == len(target)
    assert all(full[k].shape == target[k].shape for k in target)
    assert report.resized == {}


# --- the oracle itself ---------------------------------------------------------------------------
def test_oracle_window_padding_keeps_padded_keys_in_the_softmax():
    """A 4x6 grid in one 14x14 window: each query attends to the 24 real keys plus 172 zero keys
    (logit 0, value 0), exactly as the official unfold/fold implementation does."""
    from official_oracle import _attention

    dim, heads, grid = 8, 2, (4, 6)
    tokens = grid[0] * grid[1]
    state = {"qkv.weight": torch.randn(3 * dim, dim, dtype=torch.float64),
             "qkv.bias": torch.randn(3 * dim, dtype=torch.float64),
             "proj.weight": torch.eye(dim, dtype=torch.float64), "proj.bias": torch.zeros(dim, dtype=torch.float64)}
    x = torch.randn(1, tokens, dim, dtype=torch.float64)
    state = {f"a.{k}": v for k, v in state.items()}
    windowed = _attention(state, "a", x, *grid, heads, window=14)
    q, k, v = F.linear(x, state["a.qkv.weight"], state["a.qkv.bias"]).reshape(tokens, 3, heads, dim // heads).unbind(1)
    padding = 14 * 14 - tokens
    logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim // heads)
    logits = torch.cat([logits, torch.zeros(heads, tokens, padding, dtype=logits.dtype)], dim=-1)
    values = torch.cat([v, torch.zeros(padding, heads, dim // heads, dtype=v.dtype)], dim=0)
    expected = torch.einsum("hqk,khd->qhd", logits.softmax(-1), values).reshape(1, tokens, dim)
    torch.testing.assert_close(windowed, expected, rtol=0, atol=1e-12)
    glob = _attention(state, "a", x, *grid, heads, window=None)
    assert (glob - windowed).abs().max() > 1e-3  # padding changes the result


def test_oracle_deformable_attention_matches_the_kernel_reference():
    """The oracle's MSDeformAttn (own grid_sample arrangement) agrees with comer's reference op."""
    from comer.kernels.ms_deform_attn.reference import ms_deform_attn_reference
    from official_oracle import _ms_deform_attn, _reference_points

    shapes = [(4, 6), (2, 3), (1, 2)]
    dim, heads, points, batch = 8, 2, 3, 2
    length = sum(h * w for h, w in shapes)
    g = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    state = {"m.value_proj.weight": rand(dim, dim), "m.value_proj.bias": rand(dim),
             "m.sampling_offsets.weight": rand(heads * 3 * points * 2, dim),
             "m.sampling_offsets.bias": 2 * rand(heads * 3 * points * 2),
             "m.attention_weights.weight": rand(heads * 3 * points, dim),
             "m.attention_weights.bias": rand(heads * 3 * points),
             "m.output_proj.weight": torch.eye(dim, dtype=torch.float64), "m.output_proj.bias": torch.zeros(dim, dtype=torch.float64)}
    query, feat = rand(batch, length, dim), rand(batch, length, dim)
    ours = _ms_deform_attn(state, "m", query, feat, shapes, heads, points)
    value = F.linear(feat, state["m.value_proj.weight"], state["m.value_proj.bias"]).view(batch, length, heads, -1)
    offsets = F.linear(query, state["m.sampling_offsets.weight"], state["m.sampling_offsets.bias"]).view(
        batch, length, heads, 3, points, 2)
    weights = F.linear(query, state["m.attention_weights.weight"], state["m.attention_weights.bias"]).view(
        batch, length, heads, 3 * points).softmax(-1).view(batch, length, heads, 3, points)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
    locations = _reference_points(shapes, torch.float64, "cpu")[:, :, None, None, None, :] + \
        offsets / normalizer[None, None, None, :, None, :]
    shapes_t = torch.tensor(shapes)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    expected = ms_deform_attn_reference(value, shapes_t, starts, locations, weights)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
