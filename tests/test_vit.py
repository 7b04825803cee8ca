"""Plain ViT pieces: attention (global / windowed), position-embedding resize, blocks, feature taps."""
import math

import pytest
import torch
import torch.nn.functional as F

from comer.backbones import VisionTransformer
from comer.layers import Attention, DropPath, drop_path_rates, resize_pos_embed


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: oversubscribed intra-op threads make tiny models 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _copy_weights(dst: Attention, src: Attention) -> None:
    dst.load_state_dict(src.state_dict())


def windowed_attention_oracle(attn: Attention, x: torch.Tensor, grid, window: int, mask_padding: bool):
    """Loop over windows of the zero-padded projected grid, softmax written out by hand."""
    batch, _, dim = x.shape
    height, width = grid
    heads = attn.num_heads
    qkv = attn.qkv(x).view(batch, height, width, 3 * dim)
    pad_h, pad_w = -height % window, -width % window
    padded = torch.zeros(batch, height + pad_h, width + pad_w, 3 * dim, dtype=x.dtype)
    padded[:, :height, :width] = qkv
    valid = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool)
    valid[:height, :width] = True
    out = torch.zeros(batch, height + pad_h, width + pad_w, dim, dtype=x.dtype)
    for top in range(0, height + pad_h, window):
        for left in range(0, width + pad_w, window):
            win = padded[:, top:top + window, left:left + window].reshape(batch, window * window, 3, heads, -1)
            q, k, v = win.unbind(2)  # [B, n, heads, d]
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
            if mask_padding:
                keep = valid[top:top + window, left:left + window].reshape(-1)
                logits = logits.masked_fill(~keep, float("-inf"))
            mixed = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(batch, window, window, dim)
            out[:, top:top + window, left:left + window] = mixed
    return attn.proj(out[:, :height, :width].reshape(batch, height * width, dim))


def test_windowed_equals_global_when_window_is_the_grid():
    torch.manual_seed(1)
    glob = Attention(32, 4).double()
    win = Attention(32, 4, window_size=6).double()
    _copy_weights(win, glob)
    x = torch.randn(2, 36, 32, dtype=torch.float64)
    torch.testing.assert_close(win(x, (6, 6)), glob(x, (6, 6)), rtol=0, atol=1e-12)


def test_masked_window_covering_grid_equals_global_but_official_padding_does_not():
    torch.manual_seed(2)
    glob = Attention(32, 4).double()
    masked = Attention(32, 4, window_size=7, mask_padding=True).double()
    official = Attention(32, 4, window_size=7).double()
    _copy_weights(masked, glob)
    _copy_weights(official, glob)
    x = torch.randn(2, 4 * 5, 32, dtype=torch.float64)
    torch.testing.assert_close(masked(x, (4, 5)), glob(x, (4, 5)), rtol=0, atol=1e-12)
    # Padded keys (logit 0, value 0) dilute the softmax: the official form differs from global.
    assert (official(x, (4, 5)) - glob(x, (4, 5))).abs().max() > 1e-3


@pytest.mark.parametrize("mask_padding", [False, True])
def test_windowed_attention_matches_loop_oracle(mask_padding):
    torch.manual_seed(3)
    attn = Attention(24, 3, window_size=4, mask_padding=mask_padding).double()
    x = torch.randn(2, 5 * 9, 24, dtype=torch.float64)
    expected = windowed_attention_oracle(attn, x, (5, 9), 4, mask_padding)
    torch.testing.assert_close(attn(x, (5, 9)), expected, rtol=0, atol=1e-12)


def test_global_attention_matches_softmax_formula():
    torch.manual_seed(4)
    attn = Attention(16, 2).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(1, 6, 3, 2, 8).unbind(2)
    weights = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)).softmax(-1)
    expected = attn.proj(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, 6, 16))
    torch.testing.assert_close(attn(x, (2, 3)), expected, rtol=0, atol=1e-12)


def test_resize_pos_embed_identity_when_grids_match():
    pos = torch.randn(1, 1 + 7 * 7, 8)
    assert torch.equal(resize_pos_embed(pos, (7, 7)), pos)
    # Bicubic at scale 1 is the identity too, so skipping it changes nothing.
    grid = pos[:, 1:].reshape(1, 7, 7, 8).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    assert torch.equal(same, grid)


def test_resize_pos_embed_keeps_prefix_and_matches_bicubic():
    pos = torch.randn(1, 1 + 4 * 4, 8, dtype=torch.float64)
    out = resize_pos_embed(pos, (6, 2))
    assert out.shape == (1, 1 + 12, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    # Spot value: bicubic, align_corners=False, A=-0.75 along one axis (width 4 -> 2: source x = 0.5 + 2*j).
    column = F.interpolate(grid, size=(4, 2), mode="bicubic", align_corners=False)[0, 0, 0, 0]
    row = grid[0, 0, 0]
    a = -0.75
    w_near = ((a + 2) * 0.5 - (a + 3)) * 0.5 * 0.5 + 1  # |t| = 0.5
    w_far = ((a * 1.5 - 5 * a) * 1.5 + 8 * a) * 1.5 - 4 * a  # |t| = 1.5
    expected = w_far * row[0] + w_near * row[0] + w_near * row[1] + w_far * row[2]  # x=-1 clamps to 0
    torch.testing.assert_close(column, expected)
    constant = torch.ones(1, 1 + 16, 3)
    torch.testing.assert_close(resize_pos_embed(constant, (5, 9)), torch.ones(1, 1 + 45, 3))


def test_resize_pos_embed_rejects_non_square():
    with pytest.raises(ValueError, match="not a square"):
        resize_pos_embed(torch.zeros(1, 1 + 12, 4), (3, 3))


def test_vit_parameter_names_are_timm_compatible():
    vit = VisionTransformer(embed_dim=32, depth=2, num_heads=2, pretrain_img_size=64)
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]
    expected = {"patch_embed.proj.weight": (32, 3, 16, 16), "patch_embed.proj.bias": (32,),
                "pos_embed": (1, 1 + 16, 32)}
    names = set(expected) | {f"blocks.{i}.{name}" for i in range(2) for name in per_block}
    state = vit.state_dict()
    assert set(state) == names
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape
    assert tuple(state["blocks.1.mlp.fc1.weight"].shape) == (128, 32)
    assert torch.equal(state["blocks.0.ls1.gamma"], torch.ones(32))


def test_layer_scale_is_optional_and_its_init_configurable():
    plain = VisionTransformer(embed_dim=16, depth=1, num_heads=2, pretrain_img_size=32, layer_scale_init=None)
    assert not any("ls" in k for k in plain.state_dict())
    scaled = VisionTransformer(embed_dim=16, depth=1, num_heads=2, pretrain_img_size=32, layer_scale_init=1e-5)
    assert torch.equal(scaled.blocks[0].ls2.gamma.detach(), torch.full((16,), 1e-5))


def test_forward_features_taps_given_blocks_in_order():
    torch.manual_seed(5)
    vit = VisionTransformer(embed_dim=16, depth=3, num_heads=2, pretrain_img_size=32).eval()
    images = torch.randn(2, 3, 48, 32)
    taps = vit.forward_features(images, [2, 0])
    tokens, grid = vit.embed(images)
    assert grid == (3, 2)
    after0 = vit.blocks[0](tokens, grid)
    after2 = vit.blocks[2](vit.blocks[1](after0, grid), grid)
    torch.testing.assert_close(taps[1], after0.transpose(1, 2).reshape(2, 16, 3, 2))
    torch.testing.assert_close(taps[0], after2.transpose(1, 2).reshape(2, 16, 3, 2))
    torch.testing.assert_close(vit(images), taps[0])
    # The position grid (2x2 from pretraining size 32) is resized to the 3x2 input grid.
    pos = resize_pos_embed(vit.pos_embed, (3, 2))[:, 1:]
    torch.testing.assert_close(tokens, vit.patch_embed(images)[0] + pos)


def test_windowed_blocks_are_the_ones_named():
    vit = VisionTransformer(embed_dim=16, depth=4, num_heads=2, pretrain_img_size=32, window_block_indexes=[0, 2],
                            window_size=3)
    assert [b.attn.window_size for b in vit.blocks] == [3, None, 3, None]


def test_drop_path_rates_follow_linear_rule():
    rates = drop_path_rates(0.3, 4)
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    vit = VisionTransformer(embed_dim=16, depth=4, num_heads=2, pretrain_img_size=32, drop_path_rate=0.3)
    assert [b.drop_path.drop_prob for b in vit.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    out = drop(torch.ones(1000, 3, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 400 < int((per_sample[:, 0] == 2.0).sum()) < 600
    assert torch.equal(drop.eval()(torch.ones(4, 2)), torch.ones(4, 2))


def test_vit_gradients_reach_every_parameter():
    torch.manual_seed(6)
    vit = VisionTransformer(embed_dim=16, depth=2, num_heads=2, pretrain_img_size=32, window_block_indexes=[0],
                            window_size=2)
    out = vit(torch.randn(2, 3, 48, 48))
    (out * torch.randn_like(out)).sum().backward()
    for name, param in vit.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
