"""Backbones: plain ViT, ViT-CoMer, the plain-ViT 4-scale baseline, and the config-driven builder."""
from .build import available_backbones, backbone_config, build_backbone
from .conv2former import Conv2Former
from .pvt import PyramidVisionTransformer
from .pvt_v2 import PyramidVisionTransformerV2
from .shape_spec import ShapeSpec
from .vit import VisionTransformer
from .vit_comer import ViTCoMer
from .vit_pyramid import ViTPyramid

__all__ = ["Conv2Former", "PyramidVisionTransformer", "PyramidVisionTransformerV2", "ShapeSpec", "ViTCoMer",
           "ViTPyramid", "VisionTransformer", "available_backbones", "backbone_config",
           "build_backbone"]
