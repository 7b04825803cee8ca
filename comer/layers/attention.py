"""Multi-head self-attention over a token grid, global or in non-overlapping windows, optionally with a
BEiT relative position bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rel_pos_bias import Grid, RelativePositionBias, rel_pos_table_size, relative_position_bias


class Attention(nn.Module):
    """Multi-head self-attention (`qkv` and `proj` as in timm).

    window_size None: global attention over all tokens. window_size k: the grid is cut into k x k
    windows after projecting q, k, v; the projected grid is zero-padded bottom/right to a multiple
    of k. With mask_padding False the padded keys stay in the softmax (logit 0, value 0), exactly as
    the official ViT-CoMer detection code; with True they are masked out.

    rel_pos_grid (h, w): this block owns a relative position bias table learned on that grid
    (`relative_position_bias_table`, BEiT's per-block tables); a `shared_rel_pos` module passed to forward
    (BEiT's shared table) adds its bias too. The bias covers the attention's own extent: the whole grid,
    or one k x k window (the same bias in every window, padded positions included).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, window_size: int | None = None,
                 mask_padding: bool = False, rel_pos_grid: Grid | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        if window_size is not None and window_size < 1:
            raise ValueError(f"Attention: window_size must be a positive int or None, got {window_size}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.mask_padding = mask_padding
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_grid = None if rel_pos_grid is None else (int(rel_pos_grid[0]), int(rel_pos_grid[1]))
        if self.rel_pos_grid is None:
            self.register_parameter("relative_position_bias_table", None)
        else:  # zero at initialisation, as BEiT's
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rel_pos_table_size(self.rel_pos_grid),
                                                                         num_heads))

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int],
                shared_rel_pos: RelativePositionBias | None = None) -> torch.Tensor:
        """x [B, h*w, D] (row-major grid) -> [B, h*w, D]."""
        qkv = self.qkv(x)
        extent = grid_size if self.window_size is None else (self.window_size, self.window_size)
        bias = self._position_bias(extent, shared_rel_pos)
        if self.window_size is None:
            out = self._attend(qkv, attn_mask=bias)
        else:
            out = self._attend_windows(qkv, grid_size, bias)
        return self.proj(out)

    def _position_bias(self, extent: Grid, shared_rel_pos: RelativePositionBias | None) -> torch.Tensor | None:
        """[heads, n, n] for n = the tokens one attention call sees, or None without relative position bias."""
        bias = None
        if self.relative_position_bias_table is not None:
            bias = relative_position_bias(self.relative_position_bias_table, self.rel_pos_grid, extent)
        if shared_rel_pos is not None:
            shared = shared_rel_pos(extent)
            bias = shared if bias is None else bias + shared
        return bias

    def _attend(self, qkv: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """qkv [B', N, 3D] -> [B', N, D]; attn_mask: boolean (True = attend) or an additive logit bias."""
        batch, tokens, _ = qkv.shape
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # a float32 table under autocast: SDPA wants the query's dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B', heads, N, d]
        return out.transpose(1, 2).reshape(batch, tokens, -1)

    def _attend_windows(self, qkv: torch.Tensor, grid_size: tuple[int, int],
                        bias: torch.Tensor | None) -> torch.Tensor:
        batch, _, channels = qkv.shape
        height, width = grid_size
        size = self.window_size
        pad_h, pad_w = -height % size, -width % size
        grid = F.pad(qkv.view(batch, height, width, channels), (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // size, (width + pad_w) // size
        # [B, rows*size, cols*size, C] -> [B*rows*cols, size*size, C]
        windows = grid.view(batch, rows, size, cols, size, channels).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(batch * rows * cols, size * size, channels)
        attn_mask = bias  # [heads, size*size, size*size]: the same in every window
        if self.mask_padding and (pad_h or pad_w):
            mask = self._padding_mask(height, width, rows, cols, qkv.device)  # [rows*cols, 1, 1, size*size]
            if bias is not None:  # additive: the bias on real keys, -inf on padding [rows*cols, heads, n, n]
                mask = torch.where(mask, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device))
            attn_mask = mask.repeat(batch, 1, 1, 1)
        out = self._attend(windows, attn_mask)  # [B*rows*cols, size*size, D]
        out = out.view(batch, rows, cols, size, size, -1).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, rows * size, cols * size, -1)[:, :height, :width]
        return out.reshape(batch, height * width, -1)

    def _padding_mask(self, height: int, width: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """Boolean key mask [rows*cols, 1, 1, size*size]: True where the key is a real token."""
        size = self.window_size
        valid = torch.zeros(rows * size, cols * size, dtype=torch.bool, device=device)
        valid[:height, :width] = True
        valid = valid.view(rows, size, cols, size).permute(0, 2, 1, 3).reshape(rows * cols, 1, 1, size * size)
        return valid

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, window_size={self.window_size}, mask_padding={self.mask_padding}, "
                f"rel_pos_grid={self.rel_pos_grid}")
