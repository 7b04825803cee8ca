"""Relative position bias (BEiT): a learned per-head logit offset for every (dy, dx) between a query and a key.

The table of a grid (h, w) holds (2h - 1) * (2w - 1) rows, one per offset, row (dy + h - 1) * (2w - 1) +
(dx + w - 1) for dy = y_query - y_key, dx = x_query - x_key, then three rows for the class token
(class -> token, token -> class, class -> class), each row one value per head. That is the layout of
BEiT / BEiTv2 checkpoints (`relative_position_bias_table`), so their tables load unchanged. Our ViT has
no class token in its forward: the three class rows are kept (loaded, saved, carried through a resize)
but take no part in the attention.

A table learned on one grid serves another (a larger input, a window) after `resize_rel_pos_table`:
the offset grid is resized bicubically (align_corners=False), per head, the class rows kept; the centre
(zero offset) maps onto itself. This is the plain bicubic resize of BEiT's segmentation checkpoint loader;
that loader first tries a geometric-progression spline (scipy) that keeps short offsets nearly 1:1, which
we do not reproduce: a table loaded at its own grid (pretrain_img_size) is used as it is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASS_TOKEN_ROWS = 3  # class -> token, token -> class, class -> class (BEiT's order, last in the table)

Grid = tuple[int, int]


def offset_grid(grid: Grid) -> Grid:
    """(2h - 1, 2w - 1): the relative offsets a (h, w) grid has per axis."""
    height, width = grid
    return 2 * height - 1, 2 * width - 1


def rel_pos_table_size(grid: Grid) -> int:
    """Rows of the table of a (h, w) grid: one per offset plus the class-token rows."""
    rows, cols = offset_grid(grid)
    return rows * cols + NUM_CLASS_TOKEN_ROWS


def square_grid_of_table(num_rows: int, key: str = "relative_position_bias_table") -> Grid:
    """The square grid (g, g) whose table has ``num_rows`` rows (checkpoints store square tables)."""
    side = math.isqrt(max(num_rows - NUM_CLASS_TOKEN_ROWS, 0))
    if side * side != num_rows - NUM_CLASS_TOKEN_ROWS or side % 2 == 0:
        raise ValueError(f"{key}: {num_rows} rows is not (2g - 1)^2 + {NUM_CLASS_TOKEN_ROWS} for a square grid g")
    return (side + 1) // 2, (side + 1) // 2


def relative_position_index(grid: Grid, device: torch.device | str | None = None) -> torch.Tensor:
    """[h*w, h*w] int64 table row of every (query, key) pair of a row-major (h, w) grid."""
    height, width = grid
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (height - 1)
    dx = xs[:, None] - xs[None, :] + (width - 1)
    return dy * offset_grid(grid)[1] + dx


def relative_position_index_with_class_token(grid: Grid) -> torch.Tensor:
    """[1 + h*w, 1 + h*w] int64: BEiT's `relative_position_index` buffer (token 0 the class token), used to
    check that a checkpoint's tables are laid out as we read them."""
    size = rel_pos_table_size(grid)
    class_to_token, token_to_class, class_to_class = range(size - NUM_CLASS_TOKEN_ROWS, size)
    tokens = grid[0] * grid[1]
    index = torch.empty(tokens + 1, tokens + 1, dtype=torch.int64)
    index[1:, 1:] = relative_position_index(grid)
    index[0, 1:] = class_to_token
    index[1:, 0] = token_to_class
    index[0, 0] = class_to_class
    return index


def resize_rel_pos_table(table: torch.Tensor, source_grid: Grid, target_grid: Grid) -> torch.Tensor:
    """[rel_pos_table_size(source_grid), heads] -> [rel_pos_table_size(target_grid), heads]: the offset grid
    resized bicubically (align_corners=False) per head, the class-token rows kept as they are."""
    if table.dim() != 2 or table.shape[0] != rel_pos_table_size(source_grid):
        raise ValueError(f"resize_rel_pos_table: table {tuple(table.shape)} is not [{rel_pos_table_size(source_grid)}, "
                         f"heads] for grid {tuple(source_grid)}")
    if tuple(source_grid) == tuple(target_grid):
        return table
    heads = table.shape[1]
    offsets, class_rows = table[:-NUM_CLASS_TOKEN_ROWS], table[-NUM_CLASS_TOKEN_ROWS:]
    offsets = offsets.transpose(0, 1).reshape(1, heads, *offset_grid(source_grid))
    offsets = F.interpolate(offsets, size=offset_grid(target_grid), mode="bicubic", align_corners=False)
    return torch.cat([offsets.reshape(heads, -1).transpose(0, 1), class_rows])


def relative_position_bias(table: torch.Tensor, table_grid: Grid, window: Grid) -> torch.Tensor:
    """[heads, h*w, h*w] logit bias for attention among the tokens of a row-major (h, w) window, from a table
    learned on ``table_grid`` (resized when the window differs)."""
    table = resize_rel_pos_table(table, table_grid, window)
    tokens = window[0] * window[1]
    bias = table[relative_position_index(window, table.device).reshape(-1)]  # [tokens * tokens, heads]
    return bias.reshape(tokens, tokens, -1).permute(2, 0, 1)


class RelativePositionBias(nn.Module):
    """One table shared by every block (BEiT `use_shared_rel_pos_bias`); state key
    `relative_position_bias_table`, zero at initialisation as BEiT's.

    forward(window (h, w)) -> [heads, h*w, h*w]."""

    def __init__(self, grid: Grid, num_heads: int):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rel_pos_table_size(self.grid), num_heads))

    def forward(self, window: Grid) -> torch.Tensor:
        return relative_position_bias(self.relative_position_bias_table, self.grid, window)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_heads={self.relative_position_bias_table.shape[1]}"
