"""build_backbone(name, **overrides): instantiate conf/backbone/<name>.yaml."""
from __future__ import annotations

import importlib.resources
import inspect
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn

BACKBONE_GROUP = "backbone"


def conf_dir() -> Path:
    """The installed `comer.conf` package if present, else the repository's conf/ directory."""
    try:
        installed = Path(str(importlib.resources.files("comer.conf")))
        if (installed / BACKBONE_GROUP).is_dir():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "conf"


def available_backbones() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / BACKBONE_GROUP).glob("*.yaml"))


def backbone_config(name: str, **overrides):
    """The OmegaConf node of backbone `name` with `overrides` merged in (keys must already exist)."""
    path = conf_dir() / BACKBONE_GROUP / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    config = OmegaConf.load(path)
    accepted = set(inspect.signature(get_class(config._target_)).parameters)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown override(s) {unknown}; allowed: {sorted(accepted)}")
    return OmegaConf.merge(config, overrides)


def build_backbone(name: str, **overrides) -> nn.Module:
    """Build backbone `name` (a file conf/backbone/<name>.yaml), e.g. build_backbone("comer_t",
    with_checkpoint=True)."""
    config = backbone_config(name, **overrides)
    try:
        return instantiate(config, _convert_="all")
    except InstantiationException as error:
        # Surface our own configuration errors as they are, not wrapped by Hydra.
        if isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise
