"""build_detector(name, num_classes, **overrides): conf/backbone/<name>.yaml + conf/model/mask_rcnn.yaml."""
from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from comer.backbones import build_backbone
from comer.backbones.build import conf_dir

MODEL_GROUP = "model"
DETECTOR_CONFIG = "mask_rcnn"


def detector_config(num_classes: int):
    """The OmegaConf node of ``conf/model/mask_rcnn.yaml`` with ``num_classes`` set."""
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    config = OmegaConf.load(conf_dir() / MODEL_GROUP / f"{DETECTOR_CONFIG}.yaml")
    return OmegaConf.merge(config, {"num_classes": int(num_classes)})


def instantiate_detector(config, backbone: nn.Module) -> nn.Module:
    """The detector of a model config node (``conf/model/mask_rcnn.yaml``, possibly edited) on ``backbone``;
    our own configuration errors surface as they are, not wrapped by Hydra."""
    try:
        return instantiate(config, backbone=backbone, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, TypeError)):
            raise error.__cause__ from None
        raise


def build_detector(name: str, num_classes: int = 80, **overrides) -> nn.Module:
    """Mask R-CNN on backbone ``name`` (a file conf/backbone/<name>.yaml, e.g. ``comer_s_det`` or the
    plain-ViT baseline ``vit_s``); ``overrides`` go to the backbone (e.g. ``pretrain_img_size=224``).
    Weights are freshly initialised; load released ones with ``comer.checkpoint.load_detector_checkpoint``."""
    return instantiate_detector(detector_config(num_classes), build_backbone(name, **overrides))
