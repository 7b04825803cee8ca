"""The application layer: Hydra configs in, Lightning runs out. Entry points import from here."""
from .evaluate import evaluate
from .resolvers import register_resolvers
from .train import train

register_resolvers()  # before Hydra composes: conf/train.yaml's run directory uses them

__all__ = ["train", "evaluate"]
