"""The application layer: Hydra configs in, Lightning runs out. Entry points import from here."""
from .evaluate import evaluate
from .train import train

__all__ = ["train", "evaluate"]
