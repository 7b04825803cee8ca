"""Pretrained and released weights: format recognition, key conversion, strict loading.

`load_pretrained(backbone, source, format=None, allow_missing=None) -> LoadReport` is the entry point;
`apply_pretrain(backbone, cfg.pretrain)` applies the Hydra `pretrain` group.
"""
from .adapt import CheckpointShapeError
from .detector import DETECTOR_HEADS, load_detector_checkpoint
from .formats import DEFAULT_ALLOW_MISSING, FORMATS, CheckpointFormatError, convert, detect_format
from .load import (
    CheckpointKeyError,
    LoadReport,
    NonFiniteCheckpointError,
    check_finite,
    convert_backbone_state,
    load_checkpoint_with_heads,
    load_pretrained,
    load_segmentor_checkpoint,
    read_checkpoint,
)
from .safe_load import (
    TRUST_CONFIG_KEY,
    CheckpointReadError,
    UntrustedCheckpointError,
    load_checkpoint_file,
    trust_checkpoint_files,
)
from .pretrain import PretrainConfigError, apply_pretrain, check_pretrain_config

__all__ = [
    "FORMATS",
    "DEFAULT_ALLOW_MISSING",
    "DETECTOR_HEADS",
    "CheckpointFormatError",
    "CheckpointKeyError",
    "CheckpointReadError",
    "CheckpointShapeError",
    "NonFiniteCheckpointError",
    "TRUST_CONFIG_KEY",
    "UntrustedCheckpointError",
    "check_finite",
    "load_checkpoint_file",
    "trust_checkpoint_files",
    "LoadReport",
    "PretrainConfigError",
    "apply_pretrain",
    "check_pretrain_config",
    "convert",
    "convert_backbone_state",
    "detect_format",
    "load_checkpoint_with_heads",
    "load_detector_checkpoint",
    "load_pretrained",
    "load_segmentor_checkpoint",
    "read_checkpoint",
]
