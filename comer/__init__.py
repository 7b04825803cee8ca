"""comer: ViT-CoMer for dense prediction."""
from .backbones import ShapeSpec, build_backbone

__all__ = ["ShapeSpec", "build_backbone"]
