"""The Hydra `pretrain` group (`conf/pretrain/*.yaml`: format, path, allow_missing) applied to a backbone."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .formats import FORMATS
from .load import LoadReport, load_pretrained

NO_PRETRAIN = "none"


class PretrainConfigError(ValueError):
    pass


def check_pretrain_config(pretrain_cfg: Mapping[str, Any]) -> Path | None:
    """Validate `pretrain.format` / `pretrain.path` before anything is built or trained.
    Returns the checkpoint path, or None for `format: none`."""
    fmt = pretrain_cfg.get("format", NO_PRETRAIN)
    path = pretrain_cfg.get("path")
    allowed = (NO_PRETRAIN, "auto") + FORMATS
    if fmt not in allowed:
        raise PretrainConfigError(f"pretrain.format={fmt!r} is not one of {allowed}")
    if fmt == NO_PRETRAIN:
        if path is not None:
            raise PretrainConfigError(f"pretrain.path={path} is set but pretrain.format=none; choose a format, "
                                      f"e.g. pretrain=deit pretrain.path={path}")
        return None
    if path is None:
        raise PretrainConfigError(f"pretrain={fmt} needs a checkpoint file: add pretrain.path=/path/to/weights.pth")
    resolved = Path(str(path)).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"pretrain.path={path}: no such checkpoint file")
    return resolved


def apply_pretrain(backbone: nn.Module, pretrain_cfg: Mapping[str, Any]) -> LoadReport | None:
    """Load `pretrain_cfg.path` into `backbone` (None for `format: none`)."""
    path = check_pretrain_config(pretrain_cfg)
    if path is None:
        return None
    fmt = pretrain_cfg.get("format")
    allow_missing = pretrain_cfg.get("allow_missing")
    return load_pretrained(backbone, path, format=None if fmt == "auto" else fmt,
                           allow_missing=None if allow_missing is None else list(allow_missing))
