"""BEiT relative position bias: table layout, bicubic resize (hand-computed), attention with the bias
(global and windowed) against loops written here."""
import math

import pytest
import torch

from comer.layers import Attention, RelativePositionBias, relative_position_bias, resize_rel_pos_table
from comer.layers.rel_pos_bias import (
    relative_position_index,
    relative_position_index_with_class_token,
    rel_pos_table_size,
    square_grid_of_table,
)

KEYS_A = -0.75  # the cubic convolution constant of PyTorch's bicubic


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the table layout ----------------------------------------------------------------------------
def test_index_of_a_2x2_grid_by_hand():
    """Row (dy + 1) * 3 + (dx + 1) for dy, dx = query - key; tokens (0,0), (0,1), (1,0), (1,1)."""
    assert relative_position_index((2, 2)).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    # BEiT's buffer: token 0 is the class token; its rows are the last three of the 9 + 3 table.
    full = relative_position_index_with_class_token((2, 2))
    assert full[0].tolist() == [11, 9, 9, 9, 9] and full[:, 0].tolist() == [11, 10, 10, 10, 10]
    assert full[1:, 1:].tolist() == relative_position_index((2, 2)).tolist()


def test_index_of_a_non_square_grid():
    """Grid 2 x 3: 3 x 5 offsets; query (1, 2) against key (0, 0) is dy 1, dx 2 -> (1 + 1) * 5 + (2 + 2)."""
    index = relative_position_index((2, 3))
    assert index.shape == (6, 6) and index[5, 0] == 14 and index[0, 5] == 0 and index.diagonal().eq(7).all()
    assert rel_pos_table_size((2, 3)) == 3 * 5 + 3


def test_square_grid_of_table():
    assert square_grid_of_table(27 * 27 + 3) == (14, 14)
    assert square_grid_of_table(63 * 63 + 3) == (32, 32)
    with pytest.raises(ValueError, match="732 rows|733 rows"):
        square_grid_of_table(733)


# --- the resize ----------------------------------------------------------------------------------
# Bicubic resampling 3 -> 5 (align_corners=False) by hand: output i samples the source at 0.6 i - 0.2
# (-0.2, 0.4, 1.0, 1.6, 2.2), Keys' kernel (a = -0.75) on the 4 neighbours, indices clamped to 0..2.
# E.g. i = 1: t = 0.4, W(1.4) = -0.108 and W(0.4) = 0.72 both on v0 (the first clamped), W(0.6) = 0.46,
# W(1.6) = -0.072. i = 0: t = 0.8 on neighbours -2, -1, 0, 1: W(1.8) + W(0.8) + W(0.2) = 1.096 on v0,
# W(1.2) = -0.096 on v1. The centre maps onto itself.
HAND_3_TO_5 = torch.tensor([[1.096, -0.096, 0.0],
                            [0.612, 0.46, -0.072],
                            [0.0, 1.0, 0.0],
                            [-0.072, 0.46, 0.612],
                            [0.0, -0.096, 1.096]], dtype=torch.float64)


def _keys_kernel(x: float) -> float:
    x = abs(x)
    if x <= 1:
        return (KEYS_A + 2) * x ** 3 - (KEYS_A + 3) * x ** 2 + 1
    if x < 2:
        return KEYS_A * x ** 3 - 5 * KEYS_A * x ** 2 + 8 * KEYS_A * x - 4 * KEYS_A
    return 0.0


def cubic_matrix(source: int, target: int) -> torch.Tensor:
    """[target, source] weights of 1-D bicubic resampling with align_corners=False and clamped borders,
    from Keys' formula (the independent reference of the resize)."""
    weights = torch.zeros(target, source, dtype=torch.float64)
    for i in range(target):
        position = (i + 0.5) * source / target - 0.5
        base = math.floor(position)
        for j in range(base - 1, base + 3):
            weights[i, min(max(j, 0), source - 1)] += _keys_kernel(position - j)
    return weights


def _table(offsets: torch.Tensor, class_rows: torch.Tensor) -> torch.Tensor:
    """[heads, rows, cols] offset grids + [3, heads] class rows -> a BEiT table."""
    return torch.cat([offsets.flatten(1).transpose(0, 1), class_rows])


def test_cubic_reference_matches_the_hand_values():
    torch.testing.assert_close(cubic_matrix(3, 5), HAND_3_TO_5, rtol=0, atol=1e-12)


def test_resize_2x2_to_3x3_grid_by_hand():
    """Grid 2 -> 3: each head's 3 x 3 offset grid V becomes M V M^T (M the hand matrix above); the three
    class rows are kept as they are."""
    offsets = torch.randn(2, 3, 3, dtype=torch.float64)
    class_rows = torch.randn(3, 2, dtype=torch.float64)
    resized = resize_rel_pos_table(_table(offsets, class_rows), (2, 2), (3, 3))
    expected = _table(HAND_3_TO_5 @ offsets @ HAND_3_TO_5.T, class_rows)
    assert resized.shape == (rel_pos_table_size((3, 3)), 2)
    torch.testing.assert_close(resized, expected, rtol=0, atol=1e-12)
    assert torch.equal(resized[-3:], class_rows)
    assert torch.equal(resized[12], _table(offsets, class_rows)[4])  # zero offset: centre of 5x5 = centre of 3x3


def test_resize_per_axis_and_unchanged_grid():
    """Grid 2 x 2 -> 3 x 2: rows 3 -> 5 (the hand matrix), columns unchanged; the same grid is the identity."""
    offsets = torch.randn(4, 3, 3, dtype=torch.float64)
    table = _table(offsets, torch.randn(3, 4, dtype=torch.float64))
    resized = resize_rel_pos_table(table, (2, 2), (3, 2))
    torch.testing.assert_close(resized[:-3], _table(HAND_3_TO_5 @ offsets, table[-3:])[:-3], rtol=0, atol=1e-12)
    assert resize_rel_pos_table(table, (2, 2), (2, 2)) is table
    with pytest.raises(ValueError, match=r"table \(12, 4\) is not \[28, heads\]"):
        resize_rel_pos_table(table, (3, 3), (2, 2))


def test_resize_to_a_larger_grid_matches_the_reference():
    """14 -> 32 (BEiT's 224 pretraining -> 512 crops): 27 x 27 -> 63 x 63 offsets."""
    offsets = torch.randn(3, 27, 27, dtype=torch.float64)
    table = _table(offsets, torch.randn(3, 3, dtype=torch.float64))
    rows = cubic_matrix(27, 63)
    expected = _table(rows @ offsets @ rows.T, table[-3:])
    torch.testing.assert_close(resize_rel_pos_table(table, (14, 14), (32, 32)), expected, rtol=0, atol=1e-12)


# --- attention with the bias ---------------------------------------------------------------------
def beit_bias_by_loops(table: torch.Tensor, table_grid, window) -> torch.Tensor:
    """[heads, n, n] for a (h, w) window: the (dy, dx) row of the table (resized with cubic_matrix when the
    window differs from the table's grid), looked up pair by pair."""
    heads = table.shape[1]
    rows, cols = 2 * table_grid[0] - 1, 2 * table_grid[1] - 1
    offsets = table[:-3].transpose(0, 1).reshape(heads, rows, cols)
    new_rows, new_cols = 2 * window[0] - 1, 2 * window[1] - 1
    offsets = cubic_matrix(rows, new_rows) @ offsets @ cubic_matrix(cols, new_cols).T
    positions = [(y, x) for y in range(window[0]) for x in range(window[1])]
    bias = torch.empty(heads, len(positions), len(positions), dtype=table.dtype)
    for i, (yq, xq) in enumerate(positions):
        for j, (yk, xk) in enumerate(positions):
            bias[:, i, j] = offsets[:, yq - yk + window[0] - 1, xq - xk + window[1] - 1]
    return bias


def attention_by_loops(attn: Attention, x, grid, bias_fn, window=None, mask_padding=False):
    """Softmax(q k^T / sqrt(d) + bias) v, window by window over the zero-padded projected grid."""
    batch, _, dim = x.shape
    height, width = grid
    size_h, size_w = (height, width) if window is None else (window, window)
    qkv = attn.qkv(x).view(batch, height, width, 3 * dim)
    pad_h, pad_w = -height % size_h, -width % size_w
    padded = torch.zeros(batch, height + pad_h, width + pad_w, 3 * dim, dtype=x.dtype)
    padded[:, :height, :width] = qkv
    valid = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool)
    valid[:height, :width] = True
    bias = bias_fn((size_h, size_w))
    out = torch.zeros(batch, height + pad_h, width + pad_w, dim, dtype=x.dtype)
    for top in range(0, height + pad_h, size_h):
        for left in range(0, width + pad_w, size_w):
            win = padded[:, top:top + size_h, left:left + size_w].reshape(batch, size_h * size_w, 3, attn.num_heads, -1)
            q, k, v = win.unbind(2)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias
            if mask_padding:
                keep = valid[top:top + size_h, left:left + size_w].reshape(-1)
                logits = logits.masked_fill(~keep, float("-inf"))
            mixed = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(batch, size_h, size_w, dim)
            out[:, top:top + size_h, left:left + size_w] = mixed
    return attn.proj(out[:, :height, :width].reshape(batch, height * width, dim))


def _random_table(module) -> None:
    with torch.no_grad():
        module.relative_position_bias_table.normal_()


@pytest.mark.parametrize("grid", [(4, 4), (5, 3)])
def test_global_attention_with_per_block_table(grid):
    """Table learned on 4x4; the 4x4 input uses it as it is, the 5x3 one through the bicubic resize."""
    attn = Attention(24, 3, rel_pos_grid=(4, 4)).double()
    _random_table(attn)
    x = torch.randn(2, grid[0] * grid[1], 24, dtype=torch.float64)
    expected = attention_by_loops(attn, x, grid, lambda w: beit_bias_by_loops(attn.relative_position_bias_table,
                                                                              (4, 4), w))
    torch.testing.assert_close(attn(x, grid), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_windowed_attention_with_bias(mask_padding):
    """Windows of 3 on a 5x4 grid (padded to 6x6), a table learned on 2x2: the window's bias (resized
    2 -> 3) in every window; padded keys keep logit 0 + bias, or are masked out."""
    attn = Attention(16, 2, window_size=3, mask_padding=mask_padding, rel_pos_grid=(2, 2)).double()
    _random_table(attn)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    expected = attention_by_loops(attn, x, (5, 4), lambda w: beit_bias_by_loops(attn.relative_position_bias_table,
                                                                                (2, 2), w),
                                  window=3, mask_padding=mask_padding)
    torch.testing.assert_close(attn(x, (5, 4)), expected, rtol=0, atol=1e-10)


def test_shared_and_own_tables_add_up():
    attn = Attention(16, 2, rel_pos_grid=(3, 3)).double()
    shared = RelativePositionBias((3, 3), 2).double()
    _random_table(attn)
    _random_table(shared)
    x = torch.randn(1, 12, 16, dtype=torch.float64)

    def both(window):
        return (beit_bias_by_loops(attn.relative_position_bias_table, (3, 3), window)
                + beit_bias_by_loops(shared.relative_position_bias_table, (3, 3), window))

    torch.testing.assert_close(attn(x, (4, 3), shared), attention_by_loops(attn, x, (4, 3), both), rtol=0, atol=1e-10)
    torch.testing.assert_close(shared((4, 3)), relative_position_bias(shared.relative_position_bias_table, (3, 3),
                                                                      (4, 3)), rtol=0, atol=0)


def test_table_learns_and_runs_under_autocast():
    """The table gets a gradient (through the resize too) and a float32 table meets bf16 queries under
    autocast; a fresh table is zero (BEiT's initialisation)."""
    attn = Attention(16, 2, rel_pos_grid=(3, 3))
    assert attn.relative_position_bias_table.abs().sum() == 0
    x = torch.randn(2, 20, 16)
    attn(x, (5, 4)).square().sum().backward()
    grad = attn.relative_position_bias_table.grad
    assert grad.shape == (rel_pos_table_size((3, 3)), 2) and grad[:-3].abs().sum() > 0
    assert grad[-3:].abs().sum() == 0  # no class token in our forward: its rows take no part
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, (5, 4))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
