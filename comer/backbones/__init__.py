"""Backbones: plain ViT, ViT-CoMer, the plain-ViT 4-scale baseline, and the config-driven builder."""
from .build import available_backbones, backbone_config, build_backbone
from .shape_spec import ShapeSpec
from .vit import VisionTransformer
from .vit_comer import ViTCoMer
from .vit_pyramid import ViTPyramid

__all__ = ["ShapeSpec", "ViTCoMer", "ViTPyramid", "VisionTransformer", "available_backbones", "backbone_config",
           "build_backbone"]
