"""Optimizer parameter groups with layer-wise learning-rate decay (BEiT / ViT-Adapter / ViT-CoMer rule).

Every parameter gets a depth id:
  * the ViT's patch embedding, position embedding and class token   -> 0
  * ViT block ``i``                                                 -> i + 1
  * everything else (the CNN branch, interactions, necks, heads)    -> num_layers + 1
and its learning rate is ``lr * layer_decay ** (num_layers + 1 - id)``. A backbone without a ViT (PVT,
Conv2Former) has num_layers 0: allowed only with layer_decay 1.0, every parameter then has id 1 and scale 1.
Biases, 1-D parameters (norms, layer scales, level embeddings) and any explicitly listed name get no
weight decay. Parameters sharing (lr_scale, weight_decay) share one optimizer group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

VIT_EMBED_NAMES = ("patch_embed", "pos_embed", "cls_token")
NO_LAYER_DECAY = 1.0


def _as_int(token: str) -> int | None:
    return int(token) if token.isdigit() else None


def layer_id(name: str, num_layers: int, vit_name: str = "vit") -> int:
    """Depth id of parameter ``name``; the ViT is the sub-module whose last name component is ``vit_name``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part != vit_name:
            continue
        child = parts[i + 1]
        if child in VIT_EMBED_NAMES:
            return 0
        if child == "blocks" and i + 2 < len(parts) and _as_int(parts[i + 2]) is not None:
            block = _as_int(parts[i + 2])
            if block >= num_layers:
                raise ValueError(f"parameter {name!r} is in ViT block {block} but num_layers={num_layers}; "
                                 f"num_layers must be the ViT depth (blocks 0..{num_layers - 1})")
            return block + 1
    return num_layers + 1


def lr_scale_of(layer: int, num_layers: int, layer_decay: float) -> float:
    return layer_decay ** (num_layers + 1 - layer)


def _no_weight_decay(name: str, param: torch.Tensor, names: Sequence[str]) -> bool:
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return any(name == n or name.endswith("." + n) for n in names)


def _group_name(layers: Iterable[int], decay: bool) -> str:
    layers = sorted(set(layers))
    ids = f"layer_{layers[0]}" if len(layers) == 1 else "layers_" + ",".join(map(str, layers))
    return f"{ids}_{'decay' if decay else 'no_decay'}"


def param_groups_layer_decay(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                             num_layers: int, no_weight_decay_names: Sequence[str] = (),
                             vit_name: str = "vit") -> list[dict]:
    """Optimizer param groups. Each group has params, lr, weight_decay, lr_scale, name, param_names, layer_ids.

    ``no_weight_decay_names``: parameter names (full, or a trailing part such as ``pos_embed`` or
    ``level_embed``) that get weight_decay 0 in addition to biases and 1-D parameters.
    Frozen parameters (requires_grad False) are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
    if num_layers < 0 or (num_layers == 0 and layer_decay != NO_LAYER_DECAY):
        raise ValueError(f"num_layers={num_layers} must be >= 1 (the ViT depth), or 0 (no ViT) with layer_decay "
                         f"{NO_LAYER_DECAY}, got layer_decay={layer_decay}")
    if lr <= 0.0 or weight_decay < 0.0:
        raise ValueError(f"lr={lr} must be > 0 and weight_decay={weight_decay} >= 0")
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, num_layers, vit_name)
        scale = lr_scale_of(layer, num_layers, layer_decay)
        decay = not _no_weight_decay(name, param, no_weight_decay_names)
        wd = weight_decay if decay else 0.0
        group = groups.setdefault((scale, wd), {"params": [], "lr": lr * scale, "weight_decay": wd,
                                                "lr_scale": scale, "param_names": [], "layer_ids": set()})
        group["params"].append(param)
        group["param_names"].append(name)
        group["layer_ids"].add(layer)
    out = []
    for group in sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"])):
        group["name"] = _group_name(group["layer_ids"], group["weight_decay"] > 0.0)
        group["layer_ids"] = sorted(group["layer_ids"])
        out.append(group)
    return out


def decay_depth(model: nn.Module, layer_decay: float, num_layers: int | None) -> int:
    """The depth layer decay counts: ``num_layers`` when given, else ``len(model.backbone.vit.blocks)``, else 0
    for a backbone without a ViT, which only layer_decay 1.0 accepts (there are no ViT layers to decay over)."""
    if num_layers is not None:
        return int(num_layers)
    backbone = getattr(model, "backbone", None)
    blocks = getattr(getattr(backbone, "vit", None), "blocks", None)
    if blocks is not None:
        return len(blocks)
    if layer_decay != NO_LAYER_DECAY:
        raise ValueError(f"module.layer_decay={layer_decay} needs ViT blocks to decay over, but the backbone "
                         f"{type(backbone).__name__} has no backbone.vit.blocks; set module.layer_decay="
                         f"{NO_LAYER_DECAY} (or module.num_layers to a depth)")
    return 0


def optimizer_defaults(optimizer_factory: Callable[[list], torch.optim.Optimizer]) -> dict:
    """The defaults (lr, weight_decay, ...) a factory such as ``partial(AdamW, lr=...)`` would use."""
    probe = optimizer_factory([nn.Parameter(torch.zeros(1))])
    return dict(probe.defaults)


def build_optimizer(model: nn.Module, optimizer_factory: Callable[[list], torch.optim.Optimizer],
                    layer_decay: float, num_layers: int, no_weight_decay_names: Sequence[str] = (),
                    vit_name: str = "vit") -> torch.optim.Optimizer:
    """The factory's lr and weight_decay, spread over layer-decayed groups."""
    defaults = optimizer_defaults(optimizer_factory)
    for key in ("lr", "weight_decay"):
        if key not in defaults:
            raise ValueError(f"optimizer factory {optimizer_factory!r} has no default {key!r}; "
                             f"layer-wise decay needs an optimizer taking lr and weight_decay (e.g. AdamW)")
    groups = param_groups_layer_decay(model, float(defaults["lr"]), float(defaults["weight_decay"]), layer_decay,
                                      num_layers, no_weight_decay_names, vit_name)
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return optimizer_factory(groups)
