"""Strict loading of mmdet 2.x two-stage detector checkpoints (released ViT-CoMer Mask R-CNN
weights, or our own ``MaskRCNN.state_dict()``) into a :class:`comer.models.MaskRCNN`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .load import LoadReport, load_checkpoint_with_heads

# mmdet 2.x TwoStageDetector submodules next to the backbone; their keys map 1:1 onto ours.
DETECTOR_HEADS = ("neck", "rpn_head", "roi_head")


def load_detector_checkpoint(detector: nn.Module, source: str | Path | Mapping[str, Any],
                             format: str | None = None) -> LoadReport:
    """Load a detector checkpoint (path or state dict, possibly inside ``state_dict``) strictly:
    ``backbone.*`` through the backbone conversion (official names recognised), ``neck.*``,
    ``rpn_head.*`` and ``roi_head.*`` by name. Missing and unexpected keys are all listed in one
    :class:`CheckpointKeyError`; wrong shapes raise :class:`CheckpointShapeError`; nothing is loaded
    unless everything matches."""
    return load_checkpoint_with_heads(detector, source, DETECTOR_HEADS, "detector", format)
