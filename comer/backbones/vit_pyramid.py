"""Plain-ViT 4-scale baseline: features after 4 evenly spaced blocks turned into strides 4/8/16/32."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from comer.layers.pyramid_stages import check_pyramid_input

from .arg_checks import check_counts
from .shape_spec import ShapeSpec
from .vit import VisionTransformer, check_block_indexes
from .vit_comer import OUTPUT_NAMES, OUTPUT_STRIDES


def evenly_spaced_blocks(depth: int, count: int = len(OUTPUT_NAMES)) -> list[int]:
    """The last block of each of `count` equal chunks of the depth, e.g. 12 -> [2, 5, 8, 11]."""
    if depth % count:
        raise ValueError(f"ViTPyramid: depth {depth} must be divisible by {count} to pick evenly spaced blocks")
    return [(i + 1) * depth // count - 1 for i in range(count)]


class ViTPyramid(nn.Module):
    """Blocks' outputs -> LayerNorm -> (deconv x2, GroupNorm, GELU, deconv x2) | deconv x2 | identity |
    max-pool /2, as the official ViT baseline of ViT-CoMer / ViT-Adapter."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        drop_path_rate: float,
        out_indices: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_size: int = 16,
        pretrain_img_size: int = 224,
        layer_scale_init: float | None = 1.0,
        window_size: int = 14,
        window_block_indexes: Sequence[int] = (),
        window_mask_padding: bool = False,
        upsample_norm_groups: int = 32,
        norm_eps: float = 1e-6,
        use_abs_pos_embed: bool = True,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = False,
    ):
        super().__init__()
        check_counts("ViTPyramid", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                     upsample_norm_groups=upsample_norm_groups)
        if patch_size != OUTPUT_STRIDES[2]:
            raise ValueError(f"ViTPyramid: patch_size must be {OUTPUT_STRIDES[2]} (the res4 stride), got {patch_size}")
        if embed_dim % upsample_norm_groups:
            raise ValueError(f"ViTPyramid: embed_dim {embed_dim} must be divisible by upsample_norm_groups "
                             f"{upsample_norm_groups}")
        self.out_indices = list(out_indices) if out_indices is not None else evenly_spaced_blocks(depth)
        if len(self.out_indices) != len(OUTPUT_NAMES):
            raise ValueError(f"ViTPyramid: out_indices must name {len(OUTPUT_NAMES)} blocks, got {self.out_indices}")
        check_block_indexes("ViTPyramid: out_indices", self.out_indices, depth)
        self.embed_dim = embed_dim
        self.vit = VisionTransformer(
            embed_dim, depth, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, patch_size=patch_size,
            pretrain_img_size=pretrain_img_size, layer_scale_init=layer_scale_init, drop_path_rate=drop_path_rate,
            window_size=window_size, window_block_indexes=window_block_indexes,
            window_mask_padding=window_mask_padding, norm_eps=norm_eps, use_abs_pos_embed=use_abs_pos_embed,
            use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=use_shared_rel_pos_bias)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim, eps=norm_eps) for _ in OUTPUT_NAMES)
        self.ups = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2),
                          nn.GroupNorm(upsample_norm_groups, embed_dim), nn.GELU(),
                          nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2)),
            nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.ups.modules():
            if isinstance(module, nn.ConvTranspose2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(self.embed_dim, stride) for name, stride in zip(OUTPUT_NAMES, OUTPUT_STRIDES)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pyramid_input(images, OUTPUT_STRIDES[-1], "ViTPyramid")
        features = self.vit.forward_features(images, self.out_indices)
        out = {}
        for name, feature, norm, up in zip(OUTPUT_NAMES, features, self.norms, self.ups):
            normed = norm(feature.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            out[name] = up(normed)
        return out
