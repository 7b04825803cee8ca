"""Plain Vision Transformer with timm parameter names, used as the trunk of every backbone here."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from comer.layers import Block, PatchEmbed, RelativePositionBias, drop_path_rates, resize_pos_embed

from .arg_checks import check_counts, check_width_ratios

NUM_PREFIX_TOKENS = 1  # the class-token slot kept in pos_embed so checkpoints load as they are


def check_block_indexes(name: str, indexes: Sequence[int], depth: int) -> list[int]:
    indexes = [int(i) for i in indexes]
    bad = [i for i in indexes if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{name}: block indexes {bad} out of range; allowed 0..{depth - 1} (depth {depth})")
    if len(set(indexes)) != len(indexes):
        raise ValueError(f"{name}: block indexes {indexes} contain duplicates")
    return indexes


class VisionTransformer(nn.Module):
    """Patch embedding + learned absolute position embedding + `depth` pre-norm blocks (no class
    token in the forward, no final norm: the consumers take features after chosen blocks).

    pos_embed is [1, 1 + G*G, D] with G = pretrain_img_size / patch_size; its grid is resized
    bicubically to the input grid. Blocks in window_block_indexes use windowed attention.
    layer_scale_init None disables layer scale.

    BEiT geometry: use_abs_pos_embed False (no pos_embed), use_rel_pos_bias (a relative position bias
    table per block, `blocks.i.attn.relative_position_bias_table`) and/or use_shared_rel_pos_bias (one
    table for all blocks, `rel_pos_bias.relative_position_bias_table`); tables are learned on the G x G
    grid and resized to the attention's extent (the input grid, or the window) when it differs.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_size: int = 16,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        layer_scale_init: float | None = 1.0,
        drop_path_rate: float = 0.0,
        window_size: int = 14,
        window_block_indexes: Sequence[int] = (),
        window_mask_padding: bool = False,
        norm_eps: float = 1e-6,
        use_abs_pos_embed: bool = True,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = False,
    ):
        super().__init__()
        check_counts("VisionTransformer", embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                     in_chans=in_chans)
        check_width_ratios("VisionTransformer", embed_dim, mlp_ratio=mlp_ratio)
        if pretrain_img_size % patch_size:
            raise ValueError(
                f"VisionTransformer: pretrain_img_size {pretrain_img_size} must be a multiple of patch_size "
                f"{patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"VisionTransformer: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        windowed = set(check_block_indexes("window_block_indexes", window_block_indexes, depth))
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.pretrain_grid = pretrain_img_size // patch_size
        pretrain_grid = (self.pretrain_grid, self.pretrain_grid)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if use_abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + self.pretrain_grid ** 2, embed_dim))
        else:
            self.register_parameter("pos_embed", None)
        self.rel_pos_bias = RelativePositionBias(pretrain_grid, num_heads) if use_shared_rel_pos_bias else None
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=rate, layer_scale_init=layer_scale_init,
                  norm_layer=norm_layer, window_size=window_size if i in windowed else None,
                  window_mask_padding=window_mask_padding, rel_pos_grid=pretrain_grid if use_rel_pos_bias else None)
            for i, rate in enumerate(drop_path_rates(drop_path_rate, depth)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated-normal pos_embed and Linears, zero biases; relative position bias tables stay zero."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> tokens [B, h*w, D] with the absolute position embedding added (if any), and the
        grid (h, w)."""
        tokens, grid = self.patch_embed(images)
        if self.pos_embed is None:
            return tokens, grid
        pos = resize_pos_embed(self.pos_embed, grid, NUM_PREFIX_TOKENS)[:, NUM_PREFIX_TOKENS:]
        return tokens + pos, grid

    def run_blocks(self, tokens: torch.Tensor, grid: tuple[int, int], start: int, stop: int) -> torch.Tensor:
        """Blocks start..stop-1 on tokens [B, h*w, D]."""
        for block in self.blocks[start:stop]:
            tokens = block(tokens, grid, self.rel_pos_bias)
        return tokens

    def forward_features(self, images: torch.Tensor, out_indices: Sequence[int]) -> list[torch.Tensor]:
        """Token maps [B, D, h, w] after each block in out_indices (in the order given)."""
        indexes = check_block_indexes("out_indices", out_indices, self.depth)
        wanted = set(indexes)
        tokens, grid = self.embed(images)
        found = {}
        for i in range(max(indexes) + 1):
            tokens = self.run_blocks(tokens, grid, i, i + 1)
            if i in wanted:
                found[i] = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return [found[i] for i in indexes]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Token map [B, D, h, w] after the last block."""
        return self.forward_features(images, [self.depth - 1])[0]
