"""ViT-CoMer: a plain ViT with a CNN feature pyramid (SPM) and convolutional-transformer interaction."""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from comer.layers import (MRFP, SPM, CNNInteraction, CTIToCNN, CTIToViT, DeformSettings, ExtraCTI, Injector,
                          LevelLayout, MSDeformAttn)
from comer.layers.pyramid_stages import check_pyramid_input

from .arg_checks import check_counts, check_width_ratios
from .shape_spec import ShapeSpec
from .vit import VisionTransformer

OUTPUT_NAMES = ("res2", "res3", "res4", "res5")
OUTPUT_STRIDES = (4, 8, 16, 32)
PATCH_SIZE = 16  # the ViT grid is the stride-16 level of the CNN pyramid
VIT_FEATURE_MODES = ("per_stage", "final")
# The stage's x <-> c modules: ViT-CoMer's CTI, or ViT-Adapter's injector and extractors (InteractionStage).
INTERACTIONS = ("cti", "adapter")


def stage_block_ranges(depth: int, num_interactions: int | None,
                       interaction_indexes: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
    """Half-open block ranges [start, stop) per stage, from N (even split) or explicit inclusive
    [first, last] pairs that must cover 0..depth-1 in order without gaps or overlaps."""
    if (num_interactions is None) == (interaction_indexes is None):
        raise ValueError("ViTCoMer: give exactly one of num_interactions or interaction_indexes, got "
                         f"num_interactions={num_interactions}, interaction_indexes={interaction_indexes}")
    if num_interactions is not None:
        if num_interactions < 1 or depth % num_interactions:
            raise ValueError(f"ViTCoMer: num_interactions {num_interactions} must be a positive divisor of depth "
                             f"{depth}")
        size = depth // num_interactions
        return [(s * size, (s + 1) * size) for s in range(num_interactions)]
    ranges = []
    expected_start = 0
    for pair in interaction_indexes:
        if len(pair) != 2:
            raise ValueError(f"ViTCoMer: interaction_indexes entries are [first, last] block pairs, got {list(pair)}")
        first, last = int(pair[0]), int(pair[1])
        if first != expected_start or last < first or last >= depth:
            raise ValueError(
                f"ViTCoMer: interaction_indexes {[list(p) for p in interaction_indexes]} must cover blocks "
                f"0..{depth - 1} in order without gaps or overlaps; entry {[first, last]} should start at "
                f"{expected_start} and end in {expected_start}..{depth - 1}")
        ranges.append((first, last + 1))
        expected_start = last + 1
    if expected_start != depth or not ranges:
        raise ValueError(f"ViTCoMer: interaction_indexes {[list(p) for p in interaction_indexes]} end at block "
                         f"{expected_start - 1}, must cover all blocks 0..{depth - 1}")
    return ranges


class InteractionStage(nn.Module):
    """One stage: [MRFP] -> [CTI to ViT] -> the stage's ViT blocks -> [CTI to CNN] -> [extra CTIs].

    interaction "cti" (ViT-CoMer): the ViT tokens are first added into the stride-16 level of c, then
    CTIToViT, CTIToCNN and ExtraCTI. "adapter" (ViT-Adapter): nothing is added into c; the injector
    (Injector, x queries c) takes the CTI-to-ViT place and extractors (CNNInteraction with values from the
    ViT tokens, c queries x) the CTI-to-CNN and extra places.
    """

    def __init__(self, settings: DeformSettings, blocks: tuple[int, int], mrfp: MRFP | None,
                 use_cti_to_vit: bool, cti_init_value: float, use_cti_to_cnn: bool,
                 cnn_feature_interaction: bool, num_extra_ctis: int, with_checkpoint: bool,
                 interaction: str = "cti"):
        super().__init__()
        self.blocks = blocks
        self.with_checkpoint = with_checkpoint
        self.adds_vit_to_cnn_first = interaction == "cti"
        self.mrfp = mrfp
        if interaction == "adapter":
            make_to_vit = partial(Injector, settings, cti_init_value)
            make_to_cnn = make_extra = partial(CNNInteraction, settings, values_from_vit=True)
        else:
            make_to_vit = partial(CTIToViT, settings, cti_init_value)
            make_to_cnn = partial(CTIToCNN, settings, cnn_feature_interaction)
            make_extra = partial(ExtraCTI, settings, cnn_feature_interaction)
        self.cti_to_vit = make_to_vit() if use_cti_to_vit else None
        self.cti_to_cnn = make_to_cnn() if use_cti_to_cnn else None
        self.extra_ctis = nn.ModuleList(make_extra() for _ in range(num_extra_ctis)) if num_extra_ctis else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, vit: VisionTransformer,
                layout: LevelLayout) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mrfp is not None:
            # Outside the checkpoint: its BatchNorm must update running stats once per step.
            c = self.mrfp(c, layout)
        if self.with_checkpoint and torch.is_grad_enabled() and (x.requires_grad or c.requires_grad):
            return checkpoint(self._interact, x, c, vit, layout, use_reentrant=False)
        return self._interact(x, c, vit, layout)

    def _interact(self, x: torch.Tensor, c: torch.Tensor, vit: VisionTransformer,
                  layout: LevelLayout) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cti_to_vit is not None:
            if self.adds_vit_to_cnn_first:
                c = layout.add_to_vit_level(c, x)
            x = self.cti_to_vit(x, c, layout)
        x = vit.run_blocks(x, layout.vit_grid, *self.blocks)
        if self.cti_to_cnn is not None:
            c = self.cti_to_cnn(c, x, layout)
        for cti in self.extra_ctis or ():
            c = cti(c, x, layout)
        return x, c

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks[0]}..{self.blocks[1] - 1}, adds_vit_to_cnn_first={self.adds_vit_to_cnn_first}, "
                f"with_checkpoint={self.with_checkpoint}")


class ViTCoMer(nn.Module):
    """ViT-CoMer backbone. forward(images [B, 3, H, W], H and W multiples of 32) ->
    {"res2".."res5": [B, D, H/s, W/s]} for strides 4, 8, 16, 32.

    Flavours: segmentation (vit_feature_mode "per_stage", MRFP ratio per variant) and detection
    (vit_feature_mode "final", MRFP ratio 0.5, windowed attention). Switches remove exactly their
    modules: use_mrfp, use_cti_to_vit, use_cti_to_cnn, cnn_feature_interaction, num_extra_ctis.
    interaction "adapter" is ViT-Adapter (conf/backbone/vit_adapter_*.yaml): the same skeleton with its
    injector / extractors in the CTI places (see InteractionStage), without MRFP (mrfp_ratio None) and
    without the CNN feature interaction.
    BEiT / BEiTv2 weights: use_abs_pos_embed False with use_rel_pos_bias or use_shared_rel_pos_bias (see
    VisionTransformer).
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        deform_num_heads: int,
        deform_ratio: float,
        mrfp_ratio: float | None,
        drop_path_rate: float,
        num_interactions: int | None = None,
        interaction_indexes: Sequence[Sequence[int]] | None = None,
        vit_feature_mode: str = "per_stage",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pretrain_img_size: int = 224,
        layer_scale_init: float | None = 1.0,
        window_size: int = 14,
        window_block_indexes: Sequence[int] = (),
        window_mask_padding: bool = False,
        conv_inplanes: int = 64,
        num_points: int = 4,
        ffn_ratio: float = 0.25,
        cti_init_value: float = 0.0,
        mrfp_kernel_sizes: Sequence[int] = (3, 5),
        use_mrfp: bool = True,
        use_cti_to_vit: bool = True,
        use_cti_to_cnn: bool = True,
        cnn_feature_interaction: bool = True,
        num_extra_ctis: int = 4,
        with_checkpoint: bool = False,
        norm_eps: float = 1e-6,
        use_abs_pos_embed: bool = True,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = False,
        interaction: str = "cti",
    ):
        super().__init__()
        if vit_feature_mode not in VIT_FEATURE_MODES:
            raise ValueError(f"ViTCoMer: vit_feature_mode {vit_feature_mode!r} is not one of {VIT_FEATURE_MODES}")
        if interaction not in INTERACTIONS:
            raise ValueError(f"ViTCoMer: interaction {interaction!r} is not one of {INTERACTIONS}")
        if interaction == "adapter" and cnn_feature_interaction:
            raise ValueError("ViTCoMer: interaction 'adapter' (ViT-Adapter) has no CNN feature interaction; set "
                             "cnn_feature_interaction false")
        if use_mrfp and mrfp_ratio is None:
            raise ValueError("ViTCoMer: use_mrfp needs an mrfp_ratio (MRFP hidden width / embed_dim), got None")
        if num_extra_ctis < 0:
            raise ValueError(f"ViTCoMer: num_extra_ctis must be >= 0, got {num_extra_ctis}")
        check_counts("ViTCoMer", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                     deform_num_heads=deform_num_heads, num_points=num_points, conv_inplanes=conv_inplanes)
        check_width_ratios("ViTCoMer", embed_dim, deform_ratio=deform_ratio, ffn_ratio=ffn_ratio,
                           **({"mrfp_ratio": mrfp_ratio} if use_mrfp else {}))
        value_dim = int(embed_dim * deform_ratio)
        if value_dim % deform_num_heads:
            raise ValueError(f"ViTCoMer: deform_num_heads {deform_num_heads} must divide the deformable attention's "
                             f"value channels int(embed_dim * deform_ratio) = int({embed_dim} * {deform_ratio}) = "
                             f"{value_dim}")
        ranges = stage_block_ranges(depth, num_interactions, interaction_indexes)
        if vit_feature_mode == "per_stage" and len(ranges) != len(OUTPUT_NAMES):
            raise ValueError(f"ViTCoMer: vit_feature_mode 'per_stage' adds stage i's ViT output to output level i, so "
                             f"it needs exactly {len(OUTPUT_NAMES)} stages, got {len(ranges)}")
        self.embed_dim = embed_dim
        self.vit_feature_mode = vit_feature_mode
        self.vit = VisionTransformer(
            embed_dim, depth, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, patch_size=PATCH_SIZE,
            pretrain_img_size=pretrain_img_size, layer_scale_init=layer_scale_init, drop_path_rate=drop_path_rate,
            window_size=window_size, window_block_indexes=window_block_indexes,
            window_mask_padding=window_mask_padding, norm_eps=norm_eps, use_abs_pos_embed=use_abs_pos_embed,
            use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=use_shared_rel_pos_bias)
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SPM(embed_dim, inplanes=conv_inplanes)
        settings = DeformSettings(embed_dim, deform_num_heads, num_points, deform_ratio, ffn_ratio,
                                  drop_path=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=norm_eps))
        last = len(ranges) - 1
        self.interactions = nn.ModuleList(
            InteractionStage(
                settings, blocks,
                mrfp=MRFP(embed_dim, int(embed_dim * mrfp_ratio), mrfp_kernel_sizes) if use_mrfp else None,
                use_cti_to_vit=use_cti_to_vit, cti_init_value=cti_init_value, use_cti_to_cnn=use_cti_to_cnn,
                cnn_feature_interaction=cnn_feature_interaction,
                num_extra_ctis=num_extra_ctis if s == last else 0, with_checkpoint=with_checkpoint,
                interaction=interaction)
            for s, blocks in enumerate(ranges))
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)
        self.out_norms = nn.ModuleList(nn.BatchNorm2d(embed_dim) for _ in OUTPUT_NAMES)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the official code: truncated-normal Linears, He-normal (fan-out) convs, unit norms,
        Deformable-DETR init for the attention modules, N(0, 1) level embedding."""
        for part in (self.spm, self.interactions, self.up, self.out_norms):
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                    nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for module in self.interactions.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(self.embed_dim, stride) for name, stride in zip(OUTPUT_NAMES, OUTPUT_STRIDES)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pyramid_input(images, OUTPUT_STRIDES[-1], "ViTCoMer")
        layout = LevelLayout.from_image_size(images.shape[-2], images.shape[-1], images.device)
        c1, *pyramid = self.spm(images)
        c = layout.merge([level.flatten(2).transpose(1, 2) + self.level_embed[i] for i, level in enumerate(pyramid)])
        x, _ = self.vit.embed(images)
        stage_outputs = []
        for stage in self.interactions:
            x, c = stage(x, c, self.vit, layout)
            stage_outputs.append(x)
        c2, c3, c4 = layout.to_maps(c)
        maps = [self.up(c2) + c1, c2, c3, c4]
        vit_maps = stage_outputs if self.vit_feature_mode == "per_stage" else [x] * len(maps)
        grid = layout.vit_grid
        out = {}
        for name, level_map, vit_tokens, norm in zip(OUTPUT_NAMES, maps, vit_maps, self.out_norms):
            vit_map = layout.map_of_level(vit_tokens, layout.vit_level)
            if tuple(level_map.shape[-2:]) != grid:
                vit_map = F.interpolate(vit_map, size=level_map.shape[-2:], mode="bilinear", align_corners=False)
            out[name] = norm(level_map + vit_map)
        return out
