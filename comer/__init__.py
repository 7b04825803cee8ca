"""comer: ViT-CoMer for dense prediction."""
from .backbones import ShapeSpec, build_backbone
from .models import build_detector

__all__ = ["ShapeSpec", "build_backbone", "build_detector"]
