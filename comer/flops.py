"""Parameters and FLOPs of a model, per component: `python -m comer.flops backbone=comer_s task=ade20k [512]`.

    model_complexity(model, image_size) -> {"params", "flops", "image_size", "components": [...]}

FLOPs are those of one forward pass of one image in inference (eval mode), a multiply-add counted as 2
(torch.utils.flop_counter's convention; fvcore and mmcv's get_flops report multiply-adds, half of ours).
They come from three sources:

* torch's FlopCounterMode: matrix products (Linear, bmm) and convolutions, transposed ones included;
* scaled-dot-product attention on a CPU (`aten._scaled_dot_product_flash_attention_for_cpu`), which
  FlopCounterMode does not know: counted here with torch's own SDPA formula (Q·Kᵀ and A·V), so the count
  is the same on every device;
* multi-scale deformable attention's sampling, analytically: its reference path is grid_sample plus a
  weighted sum and its Triton path a custom op, neither of which FlopCounterMode counts. Per query,
  head, level and sampling point, every value channel costs 4 bilinear taps and 1 attention weight, each
  a multiply-add: DEFORM_SAMPLING_FLOPS = 2 * (4 + 1) per channel. (The four Linears around it are
  matrix products and counted by FlopCounterMode.)

Not counted (by convention, as fvcore and mmcv): normalisations, activations, softmax, element-wise
additions, pooling and resizing.

Components are read from the model's structure: a segmentor's backbone (split into the ViT-CoMer parts
or the plain-ViT pyramid's), decode head and auxiliary head; a detector's backbone, neck, RPN head and RoI
head; any other module's children. The auxiliary head only runs in training: its parameters count, its
FLOPs are shown but left out of the total.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from comer.layers import MSDeformAttn

# Per value channel and sampling point of deformable attention: 4 bilinear taps + the attention weight,
# each one multiply-add (2 FLOPs).
BILINEAR_TAPS = 4
DEFORM_SAMPLING_FLOPS = 2 * (BILINEAR_TAPS + 1)

BACKBONE = "backbone"
# Heads that only run in training: their FLOPs are reported apart from the inference total.
TRAIN_ONLY_CHILDREN = ("auxiliary_head",)

# Components of the backbones, as (label, module or parameter paths; `*` matches one path element).
# FLOPs are charged to the modules named (hooked as called: name the blocks of a ModuleList, not the list);
# parameters go to the first component with a matching path prefix; the rest of the backbone is "other".
BACKBONE_PARTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "ViTCoMer": (
        ("patch embed", ("vit.patch_embed", "vit.pos_embed")),
        ("ViT blocks", ("vit.blocks.*",)),
        ("SPM", ("spm", "level_embed")),
        ("MRFP", ("interactions.*.mrfp",)),
        ("CTI to ViT (injector)", ("interactions.*.cti_to_vit",)),
        ("CTI to CNN (extractor)", ("interactions.*.cti_to_cnn",)),
        ("extra CTIs", ("interactions.*.extra_ctis.*",)),
        ("outputs (deconv, norms)", ("up", "out_norms.*")),
    ),
    "ViTPyramid": (
        ("patch embed", ("vit.patch_embed", "vit.pos_embed")),
        ("ViT blocks", ("vit.blocks.*",)),
        ("pyramid (norms, resampling)", ("norms.*", "ups.*")),
    ),
}
CHILD_LABELS = {
    "decode_head": "decode head",
    "auxiliary_head": "auxiliary head",
    "neck": "neck",
    "rpn_head": "RPN head",
    "roi_head": "RoI head",
}


@dataclass
class Component:
    name: str
    paths: tuple[str, ...]  # full module/parameter paths inside the model, `*` allowed
    group: str | None = None  # "backbone" for the backbone's parts
    train_only: bool = False
    params: int = 0
    flops: int = 0
    analytic_flops: int = 0  # the deformable-attention sampling part of `flops`

    def as_dict(self) -> dict:
        return {"name": self.name, "group": self.group, "params": self.params, "flops": self.flops,
                "analytic_flops": self.analytic_flops, "train_only": self.train_only}


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for the CPU SDPA kernel (the registered CUDA ones use the same count)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOP_FORMULAS: dict = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CUSTOM_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


def deform_sampling_flops(module: MSDeformAttn, query: torch.Tensor) -> int:
    """FLOPs of one MSDeformAttn call's sampling (not its Linears) for `query` [B, Lq, D]."""
    batch, num_queries = query.shape[:2]
    value_dim = module.value_proj.out_features  # heads x head dim
    return batch * num_queries * module.num_levels * module.num_points * value_dim * DEFORM_SAMPLING_FLOPS


def _components(model: nn.Module) -> list[Component]:
    """The model's components, finest first: backbone parts, then the other children."""
    children = dict(model.named_children())
    if not children or (BACKBONE not in children and type(model).__name__ in BACKBONE_PARTS):
        return _backbone_components(model, prefix="", group=None)
    parts = []
    for name, child in children.items():
        if name == BACKBONE:
            parts.extend(_backbone_components(child, prefix=f"{name}.", group=BACKBONE))
        else:
            parts.append(Component(CHILD_LABELS.get(name, name), (name,), train_only=name in TRAIN_ONLY_CHILDREN))
    return parts


def _backbone_components(backbone: nn.Module, prefix: str, group: str | None) -> list[Component]:
    table = BACKBONE_PARTS.get(type(backbone).__name__)
    if table is None:  # an unknown backbone: its direct children
        return [Component(name, (prefix + name,), group=group) for name, _ in backbone.named_children()]
    return [Component(label, tuple(prefix + path for path in paths), group=group) for label, paths in table]


def _matches(name: str, pattern: str) -> bool:
    """`name` is the module/parameter `pattern` or lies inside it (`*` = one path element)."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) >= len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _assign_params(model: nn.Module, components: list[Component]) -> int:
    """Adds each parameter's size to its component; returns the parameters no component claims."""
    unclaimed = 0
    for name, parameter in model.named_parameters():
        owner = next((c for c in components if any(_matches(name, p) for p in c.paths)), None)
        if owner is None:
            unclaimed += parameter.numel()
        else:
            owner.params += parameter.numel()
    return unclaimed


@contextlib.contextmanager
def _hooks(model: nn.Module, components: list[Component], counter: FlopCounterMode) -> Iterator[list[int]]:
    """Forward hooks that charge the counter's FLOPs (and deformable sampling) to the running component."""
    stack: list[list] = []  # [component, counter total on entry, FLOPs of components nested inside]
    handles = []

    def enter(component: Component) -> Callable:
        def hook(module, args):
            stack.append([component, counter.get_total_flops(), 0])
        return hook

    def leave(component: Component) -> Callable:
        def hook(module, args, output):
            entered, start, nested = stack.pop()
            delta = counter.get_total_flops() - start
            entered.flops += delta - nested  # a component called inside another is charged once, to itself
            if stack:
                stack[-1][2] += delta
        return hook

    def sampling(module, args, output):
        flops = deform_sampling_flops(module, args[0])
        if stack:
            stack[-1][0].flops += flops
            stack[-1][0].analytic_flops += flops
        else:
            unattributed.append(flops)

    unattributed: list[int] = []
    modules = dict(model.named_modules())
    # The modules each component names, and their direct children: a module whose work runs through a
    # method other than forward (a detector's RoI head `predict`) still calls its children.
    owners = {name: component for component in components for pattern in component.paths
              for name in modules if name and _matches(name, pattern) and name.count(".") == pattern.count(".")}
    for name, component in list(owners.items()):
        for child, _ in modules[name].named_children():
            owners.setdefault(f"{name}.{child}", component)
    try:
        for name, component in owners.items():
            handles.append(modules[name].register_forward_pre_hook(enter(component)))
            handles.append(modules[name].register_forward_hook(leave(component)))
        for module in modules.values():
            if isinstance(module, MSDeformAttn):
                handles.append(module.register_forward_hook(sampling))
        yield unattributed
    finally:
        for handle in handles:
            handle.remove()


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (int(image_size), int(image_size)) if isinstance(image_size, (int, float)) else tuple(map(int, image_size))
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size


def _run_inference(model: nn.Module, images: torch.Tensor) -> None:
    """One inference forward; a segmentor's training-only heads run on the backbone's features too."""
    height, width = images.shape[-2:]
    if hasattr(model, "decode_head") and hasattr(model, BACKBONE):
        features = {}
        handle = model.backbone.register_forward_hook(lambda m, a, out: features.setdefault("out", out))
        try:
            model(images)
        finally:
            handle.remove()
        for name in TRAIN_ONLY_CHILDREN:
            head = getattr(model, name, None)
            if head is not None:
                head(features["out"])
    elif callable(getattr(model, "predict", None)) and hasattr(model, BACKBONE):
        model.predict(images, [(height, width)] * images.shape[0])
    else:
        model(images)


def model_complexity(model: nn.Module, image_size: int | Sequence[int], batch_size: int = 1) -> dict:
    """Parameters and inference FLOPs of `model` on one `image_size` input (an int or (height, width)),
    in total and per component. JSON-ready:

        {"params": int, "flops": int (per image, training-only heads excluded), "image_size": [h, w],
         "flops_convention": "...", "components": [{"name", "group", "params", "flops", "analytic_flops",
         "train_only"}, ...]}

    Runs one forward pass of zeros on the model's device in eval mode without gradients (BatchNorm
    statistics and the random state are untouched) and restores every module's training mode."""
    height, width = _pair(image_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    components = _components(model)
    other_params = _assign_params(model, components)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    images = torch.zeros(batch_size, 3, height, width, device=device, dtype=dtype)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS)
        with torch.no_grad(), _hooks(model, components, counter) as unattributed, counter:
            _run_inference(model, images)
    finally:
        for module, training in modes.items():  # each module's own mode (frozen parts stay in eval)
            module.training = training
    # the counter's FLOPs plus the analytic ones (charged to components, or to "other" outside any)
    total = counter.get_total_flops() + sum(c.analytic_flops for c in components) + sum(unattributed)
    other_flops = total - sum(c.flops for c in components)
    if other_params or other_flops:
        components.append(Component("other", (), params=other_params, flops=other_flops))
    inference = total - sum(c.flops for c in components if c.train_only)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": inference // batch_size,
        "image_size": [height, width],
        "flops_convention": "one multiply-add = 2 FLOPs, per image, inference forward",
        "components": [{**c.as_dict(), "flops": c.flops // batch_size, "analytic_flops": c.analytic_flops // batch_size}
                       for c in components],
    }


# ---------------------------------------------------------------------------------------------- table
def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}"


def _giga(count: int) -> str:
    return f"{count / 1e9:.2f}"


def format_table(result: dict, title: str = "") -> str:
    """Markdown table of a `model_complexity` result: one row per component, subtotals, total."""
    rows = [("component", "params (M)", "GFLOPs", "of which analytic")]
    components = result["components"]
    backbone = [c for c in components if c["group"] == BACKBONE]
    for c in components:
        name = ("  " if c["group"] == BACKBONE else "") + c["name"] + (" (training only)" if c["train_only"] else "")
        analytic = _giga(c["analytic_flops"]) if c["analytic_flops"] else ""
        rows.append((name, _millions(c["params"]), _giga(c["flops"]), analytic))
        if backbone and c is backbone[-1]:
            rows.append(("backbone total", _millions(sum(b["params"] for b in backbone)),
                         _giga(sum(b["flops"] for b in backbone)),
                         _giga(sum(b["analytic_flops"] for b in backbone))))
    rows.append(("total (inference)", _millions(result["params"]), _giga(result["flops"]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{title}\n" if title else ""]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
        if index == 0:
            lines.append("|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|")
    h, w = result["image_size"]
    lines.append(f"\n{h}x{w} input; FLOPs: {result['flops_convention']} (mmcv/fvcore count multiply-adds: half). "
                 f"'analytic': deformable-attention sampling, counted by formula.")
    return "\n".join(line for line in lines if line != "")


# ---------------------------------------------------------------------------------------------- CLI
def _parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def compose_model_config(overrides: Sequence[str]):
    """The composed training config for `overrides` (Hydra's `${hydra:...}` values available)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import comer.app  # noqa: F401  (registers the run-directory resolvers train.yaml uses)
    from comer.backbones.build import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def build_model_from_config(cfg) -> nn.Module:
    """The task's model with freshly initialised weights (no pretrained weights are read)."""
    import hydra

    backbone = hydra.utils.instantiate(cfg.backbone)
    return hydra.utils.instantiate(cfg.model, backbone=backbone)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comer.flops",
        description="Parameters and FLOPs per component of the model a training config builds.",
        epilog="example: python -m comer.flops backbone=comer_s task=ade20k 512  "
               "(default size: the task's crop, e.g. 512x512 for ADE20K)")
    parser.add_argument("args", nargs="*", help="Hydra overrides (key=value) and optionally a size: 512 or 512x1024")
    parser.add_argument("--backbone-only", action="store_true", help="count the backbone alone")
    options = parser.parse_args(argv)
    overrides = [a for a in options.args if "=" in a]
    sizes = [a for a in options.args if "=" not in a]
    if len(sizes) > 1:
        parser.error(f"give at most one input size, got {sizes}")
    cfg = compose_model_config(overrides)
    size = _parse_size(sizes[0]) if sizes else tuple(cfg.module.crop_size)
    model = build_model_from_config(cfg)
    if options.backbone_only:
        model = model.backbone
    choices = cfg.hydra.runtime.choices
    result = model_complexity(model, size)
    what = "backbone" if options.backbone_only else f"{cfg.model._target_.rsplit('.', 1)[-1]}"
    print(format_table(result, title=f"{choices.backbone} ({what}, task={choices.task}, "
                                     f"{cfg.data.num_classes} classes)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
