"""Building blocks of the ViT and ViT-CoMer backbones, one per file."""
from .attention import Attention
from .conv_ffn import ConvFFN
from .cti import CNNInteraction, CTIToCNN, CTIToViT, DeformSettings, ExtraCTI, Injector
from .drop_path import DropPath, drop_path_rates
from .layer_scale import LayerScale
from .level_layout import LevelLayout
from .mlp import Mlp
from .mrfp import MRFP
from .ms_deform_attn import MSDeformAttn
from .patch_embed import PatchEmbed
from .pos_embed import resize_pos_embed
from .rel_pos_bias import RelativePositionBias, relative_position_bias, resize_rel_pos_table
from .spm import SPM
from .vit_block import Block

__all__ = ["Attention", "Block", "CNNInteraction", "ConvFFN", "CTIToCNN", "CTIToViT", "DeformSettings", "DropPath",
           "ExtraCTI", "Injector", "LayerScale", "LevelLayout", "MRFP", "MSDeformAttn", "Mlp", "PatchEmbed",
           "RelativePositionBias", "SPM", "drop_path_rates", "relative_position_bias", "resize_pos_embed",
           "resize_rel_pos_table"]
