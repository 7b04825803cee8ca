"""Checks of a composed config that need neither data nor weights, run by ``check_config`` before anything is
generated, read or built: the network's constructor arguments (built on the meta device: no memory, no
initialisation), the input sizes the backbone needs, the slide-inference windows; and the validation schedule
of a run shorter than its validation interval."""
from __future__ import annotations

import logging

import hydra
import torch
import torch.nn as nn
from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from comer.data.datamodule import SegmentationDataModule
from comer.data.transforms import to_pair

log = logging.getLogger(__name__)

SLIDE_MODE = "slide"
# Constructor errors that mean "this config is wrong" (the rest would be a bug of a meta-device build).
CONFIG_ERROR_CAUSES = (ValueError, TypeError, KeyError)


class ConfigError(ValueError):
    pass


def instantiate_network(cfg: DictConfig) -> nn.Module:
    """The task's network, its backbone inside the model, freshly initialised (no pretrained weights)."""
    backbone = hydra.utils.instantiate(cfg.backbone)
    return hydra.utils.instantiate(cfg.model, backbone=backbone)


def network_on_meta(cfg: DictConfig) -> nn.Module | None:
    """The network built on the meta device, so its constructor checks (depth, heads, interactions, ...) run
    in a fraction of a second without memory. A bad argument is a ConfigError naming it; None when a module
    cannot be built on the meta device at all (its errors then surface when the real network is built)."""
    try:
        with torch.device("meta"):
            return instantiate_network(cfg)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, CONFIG_ERROR_CAUSES):
            raise ConfigError(f"the model of this config cannot be built: {cause}") from error
        log.warning("could not check the model on the meta device (%s); its errors surface when it is built",
                    cause or error)
        return None


def required_input_divisor(network: nn.Module) -> int | None:
    """What the backbone's input sides must be multiples of: its coarsest output stride (res5: 32), where every
    level is an exact downsampling of the one before. None for a network without a shape contract."""
    backbone = getattr(network, "backbone", None)
    output_shape = getattr(backbone, "output_shape", None)
    if output_shape is None:
        return None
    return max(spec.stride for spec in output_shape().values())


def override_list(values) -> str:
    """A list as a command-line override writes it: [512,512]."""
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def _round_down(size: tuple[int, int], divisor: int) -> str:
    return override_list(max(divisor, side // divisor * divisor) for side in size)


def check_input_sizes(cfg: DictConfig, divisor: int) -> None:
    """The training crop (the network's input in training), the slide window (its input in validation) and
    the validation resize divisor must be multiples of ``divisor``."""
    data, module = cfg.get("data") or {}, cfg.get("module") or {}
    sizes = {}
    if data.get("_target_") and issubclass(get_class(data._target_), SegmentationDataModule):
        sizes["data.crop_size"] = to_pair(data.crop_size, "data.crop_size")
    if module.get("inference_mode") == SLIDE_MODE:
        sizes["module.crop_size"] = to_pair(module.crop_size, "module.crop_size")
    for key, size in sizes.items():
        if size[0] % divisor or size[1] % divisor:
            raise ConfigError(
                f"{key}={list(size)} is not a multiple of {divisor} on both sides, which the backbone needs (its "
                f"coarsest stride): e.g. {key}={_round_down(size, divisor)}")
    size_divisor = data.get("size_divisor")
    if size_divisor is not None and size_divisor % divisor:
        raise ConfigError(f"data.size_divisor={size_divisor} must be a multiple of {divisor} (the backbone's coarsest "
                          f"stride): validation images are resized to multiples of it, e.g. data.size_divisor={divisor}")


def check_slide_windows(cfg: DictConfig) -> None:
    """Slide inference moves its window by module.stride: a stride larger than the window leaves pixels that no
    window covers."""
    module = cfg.get("module") or {}
    if module.get("inference_mode") != SLIDE_MODE:
        return
    window, stride = to_pair(module.crop_size, "module.crop_size"), to_pair(module.stride, "module.stride")
    if stride[0] > window[0] or stride[1] > window[1]:
        raise ConfigError(f"module.stride={list(stride)} is larger than the slide window module.crop_size="
                          f"{list(window)}: windows would leave gaps. Use a stride of at most the window, e.g. "
                          f"module.stride={override_list(min(s, w) for s, w in zip(stride, window))}")


def check_network_and_inputs(cfg: DictConfig) -> None:
    """The network's constructor arguments and the input sizes it needs; the slide windows."""
    check_slide_windows(cfg)
    if cfg.get("backbone") is None or cfg.get("model") is None:
        return
    network = network_on_meta(cfg)
    divisor = required_input_divisor(network) if network is not None else None
    if divisor is not None:
        check_input_sizes(cfg, divisor)


def validate_at_the_end_of_short_runs(cfg: DictConfig) -> None:
    """A run shorter than trainer.val_check_interval would never validate: it validates once, at its last step
    (the interval becomes trainer.max_steps), and says so."""
    trainer = cfg.get("trainer") or {}
    max_steps, interval = trainer.get("max_steps"), trainer.get("val_check_interval")
    if not (isinstance(max_steps, int) and isinstance(interval, int)) or not 0 < max_steps < interval:
        return
    log.warning("trainer.max_steps=%d is below trainer.val_check_interval=%d: validating once, at the end of the "
                "run (step %d)", max_steps, interval, max_steps)
    with open_dict(cfg):
        cfg.trainer.val_check_interval = max_steps
