"""Every checkpoint key conversion, in one place.

A checkpoint is first *unwrapped* (``state_dict`` / ``model`` / ``module`` containers), its
*format* recognised, then its keys are renamed into our names:

- ``official``: released ViT-CoMer backbones (mmseg/mmdet ``backbone.*`` keys) -> ViTCoMer names.
- ``vit_adapter``: released ViT-Adapter backbones (czczup/ViT-Adapter mmseg/mmdet ``backbone.*`` keys) ->
  ViTCoMer names with interaction "adapter": ``injector`` -> ``cti_to_vit``, ``extractor`` -> ``cti_to_cnn``,
  ``extra_extractors`` -> ``extra_ctis``; the ViT, output norms and ConvFFN as in ``official``.
- ``deit`` / ``augreg`` / ``mae`` / ``timm``: timm ViT names -> ``<vit prefix>`` + the same names.
- ``beit``: ``gamma_1/2`` -> ``ls1/ls2.gamma``; ``q_bias``/``v_bias`` -> ``qkv.bias`` (zero k bias);
  relative position bias tables (per block or shared) keep their names and load into a ViT built with
  BEiT's options; the derived ``relative_position_index`` buffers are checked against the layout we read
  the tables with, then dropped.
- ``dinov2``: ``blocks.<chunk>.<i>`` -> ``blocks.<i>``; ``mask_token``/``register_tokens`` dropped.
- ``pvt`` / ``pvt_v2``: released PVT v1 / v2 ImageNet weights (whai362/PVT) -> the per-stage modules of
  ``PyramidVisionTransformer(V2)``: ``patch_embed{i}`` / ``pos_embed{i}`` / ``block{i}`` / ``norm{i}`` ->
  ``stages.{i-1}.patch_embed`` / ``.pos_embed`` / ``.blocks`` / ``.norm``, ``mlp.dwconv.dwconv`` -> ``mlp.dwconv``;
  PVT v1's stage-4 position embedding loses its class-token slot (the backbone has no class token).
- ``conv2former``: released Conv2Former ImageNet weights (HVision-NKU/Conv2Former): our names are theirs.
- ``comer``: our own names (a backbone state dict saved from this code base), unchanged.

Keys a format carries that we never use are dropped by name (the lists below); anything else that
has no place in the target is an error, raised by the loader.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from comer.layers.rel_pos_bias import relative_position_index_with_class_token, square_grid_of_table

CONTAINER_KEYS = ("state_dict", "model", "module")  # mmseg/mmdet/Lightning, DeiT/MAE/BEiT, DDP dumps
BACKBONE_PREFIX = "backbone."
LIGHTNING_MODEL_PREFIX = "model."  # our SegmentationModule keeps the segmentor as `model`
PLAIN_VIT_FORMATS = ("deit", "augreg", "mae", "timm", "beit", "dinov2")
HIERARCHICAL_FORMATS = ("pvt", "pvt_v2", "conv2former")  # ImageNet classifiers of the comparison backbones
FORMATS = ("official", "vit_adapter", "comer") + PLAIN_VIT_FORMATS + HIERARCHICAL_FORMATS

# Source keys of plain-ViT checkpoints that a dense-prediction backbone never uses (class token,
# classifier, final norm). Patterns are matched with re.match against the canonical (timm) name.
TIMM_UNUSED = (r"cls_token$", r"dist_token$", r"norm\.", r"fc_norm\.", r"head\.", r"head_dist\.", r"pre_logits\.")
UNUSED_KEYS: dict[str, tuple[str, ...]] = {
    "deit": TIMM_UNUSED,
    "augreg": TIMM_UNUSED,
    "timm": TIMM_UNUSED,
    "mae": TIMM_UNUSED + (r"mask_token$", r"decoder_"),
    "dinov2": TIMM_UNUSED + (r"mask_token$", r"register_tokens$"),
    # BEiTv2 pretraining: the patch-aggregation head (cls_pt_*) and the tokenizer head (lm_head).
    "beit": TIMM_UNUSED + (r"mask_token$", r"lm_head\.", r"cls_pt_layers\.", r"cls_pt_norm\.", r"cls_pt_lm_head\.",
                           r"(.+\.)?relative_position_index$"),
    "official": (),
    "vit_adapter": (),
    "comer": (),
    # The classifiers' parts a dense-prediction backbone has no use for. PVT v1: the class token (only its
    # classifier's stage 4 attends to it), the final norm over it and the head.
    "pvt": (r"cls_token$", r"norm\.", r"head\."),
    "pvt_v2": (r"head\.",),  # the stage norms norm1..4 are the backbone's output norms and load
    "conv2former": (r"head\.", r"pred\."),  # head: 1x1 conv + GELU + LayerNorm to 1280 before pooling; pred: Linear
}
# Target keys a plain-ViT checkpoint cannot provide (regular expressions, re.match against OUR key
# names): the modules around the ViT -- ViTCoMer's CNN branch (spm, level_embed, interactions, up,
# out_norms; ViT-Adapter, a ViTCoMer with interaction "adapter", has the same names) and ViTPyramid's
# resampling (ups, norms) -- and the layer scales.
AROUND_VIT = (r"spm\.", r"level_embed$", r"interactions\.", r"up\.", r"out_norms\.", r"ups\.", r"norms\.")
LAYER_SCALES = (r"(.+\.)?blocks\.\d+\.ls[12]\.gamma$",)
PLAIN_VIT_ALLOW_MISSING = AROUND_VIT + LAYER_SCALES
# Per format (used when the caller gives no allow-list; conf/pretrain/<format>.yaml spells the same lists).
DEFAULT_ALLOW_MISSING: dict[str, tuple[str, ...]] = {
    "deit": PLAIN_VIT_ALLOW_MISSING,
    "augreg": PLAIN_VIT_ALLOW_MISSING,
    "timm": PLAIN_VIT_ALLOW_MISSING,
    "mae": PLAIN_VIT_ALLOW_MISSING,
    "beit": AROUND_VIT,  # layer scales and relative position bias tables must load
    "dinov2": AROUND_VIT,  # DINOv2 has layer scales: they must load
    "official": (),
    "vit_adapter": (),
    "comer": (),
    "pvt": (),
    "pvt_v2": (),
    "conv2former": (r"out_norms\.",),  # the dense-prediction output norms (ConvNeXt-style): ImageNet has none
}

# Official ViT-CoMer name -> ours, applied in order (re.sub on the key, backbone. prefix stripped).
MRFP_KERNEL_GROUPS = 2  # official MultiDWConv: per level a 3x3 and a 5x5 depth-wise conv


def _official_dwconv(match: re.Match) -> str:
    index = int(match[1]) - 1  # dwconv1..6: level index // groups, group index % groups
    return f".mrfp.dwconvs.{index // MRFP_KERNEL_GROUPS}.{index % MRFP_KERNEL_GROUPS}."


# Names both released families share (ViT-CoMer's code grew out of ViT-Adapter's): the ViT with gamma1/2
# layer scales, the output norms norm1..4 and ConvFFN's DWConv wrapper.
RELEASED_FAMILY_RENAMES: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (r"^blocks\.(\d+)\.gamma([12])$", r"blocks.\1.ls\2.gamma"),
    (r"^(patch_embed\.|pos_embed$|blocks\.)", r"vit.\1"),
    (r"^norm([1-4])\.", lambda m: f"out_norms.{int(m[1]) - 1}."),
    (r"\.ffn\.dwconv\.dwconv\.", ".ffn.dwconv."),
)
OFFICIAL_RENAMES: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = RELEASED_FAMILY_RENAMES + (
    (r"\.cti_tov\.", ".cti_to_vit."),
    (r"\.cti_toc\.", ".cti_to_cnn."),
    (r"\.cfinter\.", ".cnn_interaction."),
    (r"\.extra_CTIs\.", ".extra_ctis."),
    (r"\.mrfp\.dwconv\.dwconv(\d+)\.", _official_dwconv),
    (r"\.mrfp\.dwconv\.bn(\d+)\.", lambda m: f".mrfp.norms.{int(m[1]) - 1}."),
)
# ViT-Adapter name -> ours: the injector sits in the CTI-to-ViT place, the extractors in the CTI-to-CNN and
# extra places (comer.backbones.vit_comer.InteractionStage).
VIT_ADAPTER_RENAMES: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = RELEASED_FAMILY_RENAMES + (
    (r"\.injector\.", ".cti_to_vit."),
    (r"\.extractor\.", ".cti_to_cnn."),
    (r"\.extra_extractors\.", ".extra_ctis."),
)
# Plain-ViT (timm-like) renames into the canonical timm names, per format.
BEIT_RENAMES = ((r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma"),)
BEIT_TABLE, BEIT_INDEX = "relative_position_bias_table", "relative_position_index"
DINOV2_RENAMES = ((r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),)  # block chunks: indices are global


def _pvt_stage(child: str) -> Callable[[re.Match], str]:
    return lambda match: f"stages.{int(match[1]) - 1}.{child}"


# PVT v1 / v2 official names -> ours: the per-stage modules gather under stages.{i - 1}; DWConv's wrapper goes.
PVT_RENAMES: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (r"^patch_embed([1-4])\.", _pvt_stage("patch_embed.")),
    (r"^pos_embed([1-4])$", _pvt_stage("pos_embed")),
    (r"^block([1-4])\.", _pvt_stage("blocks.")),
    (r"^norm([1-4])\.", _pvt_stage("norm.")),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
)
PVT_CLASS_TOKEN_POS_EMBED = "pos_embed4"  # PVT v1 [1, 1 + g*g, D]: a class-token slot, then the stage-4 grid


class CheckpointFormatError(ValueError):
    pass


@dataclass
class Converted:
    """Result of renaming a source state dict."""

    tensors: dict[str, torch.Tensor]  # our names (without any vit prefix for plain-ViT formats)
    dropped: list[str] = field(default_factory=list)  # source keys dropped by name
    notes: list[str] = field(default_factory=list)


def unwrap(checkpoint) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (``state_dict``/``model``/``module`` containers)."""
    if not isinstance(checkpoint, dict):
        raise CheckpointFormatError(f"checkpoint is a {type(checkpoint).__name__}, expected a dict of tensors")
    for key in CONTAINER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return unwrap(checkpoint[key])
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError(
            f"checkpoint holds no tensors (top-level keys: {sorted(checkpoint)[:10]}); expected a state dict or "
            f"one inside {CONTAINER_KEYS}")
    return tensors


def split_backbone(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """mmseg/mmdet checkpoints: (``backbone.*`` with the prefix stripped, every other key unchanged).
    Our Lightning checkpoints (``model.backbone.*``, ``model.decode_head.*``) lose the ``model.`` first.
    A state dict without ``backbone.`` keys is returned whole as the backbone part."""
    if state and all(k.startswith(LIGHTNING_MODEL_PREFIX) for k in state):
        state = {k[len(LIGHTNING_MODEL_PREFIX):]: v for k, v in state.items()}
    if not any(k.startswith(BACKBONE_PREFIX) for k in state):
        return dict(state), {}
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    return backbone, rest


def detect_format(backbone_state: dict[str, torch.Tensor]) -> str:
    """Recognise the format of a (prefix-stripped) backbone state dict."""
    keys = list(backbone_state)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"\.injector\.|\.extractor\.|\.extra_extractors\."):  # before "official": both have gamma1/2
        return "vit_adapter"
    if has(r"\.cti_tov\.|\.cti_toc\.") or has(r"^blocks\.\d+\.gamma[12]$"):
        return "official"
    if has(r"^vit\.") or has(r"\.cti_to_vit\."):
        return "comer"
    if has(r"^block[1-4]\.\d+\.mlp\.dwconv\.dwconv\."):
        return "pvt_v2"
    if has(r"^pos_embed[1-4]$") and has(r"^block[1-4]\.\d+\.attn\.kv\."):
        return "pvt"
    if has(r"^stages\.\d+\.\d+\.attn\.att\.") and not has(r"^out_norms\."):
        return "conv2former"
    if has(r"^stages\.\d+\.(patch_embed|blocks)\.") or has(r"^stages\.\d+\.\d+\.attn\.att\."):
        return "comer"  # our PVT v1/v2 (stages.*) and Conv2Former (with out_norms) backbones
    if has(r"gamma_[12]$|attn\.q_bias$|relative_position_bias_table$"):
        return "beit"
    if has(r"^register_tokens$") or has(r"^blocks\.\d+\.\d+\.") or has(r"\.ls[12]\.gamma$"):
        return "dinov2"
    if has(r"^decoder_"):
        return "mae"
    if has(r"^blocks\.\d+\.attn\.qkv\.weight$") and has(r"^patch_embed\.proj\.weight$"):
        return "timm"
    raise CheckpointFormatError(
        f"cannot recognise the checkpoint format from its keys (first: {keys[:8]}); pass format= one of {FORMATS}")


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _matches_any(key: str, patterns) -> bool:
    return any(re.match(p, key) for p in patterns)


def _merge_beit_qkv_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BEiT keeps q and v biases only: qkv.bias = [q_bias, 0, v_bias]."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".attn.q_bias")]:
        prefix = key[: -len("q_bias")]
        q_bias, v_bias = state.pop(key), state.pop(f"{prefix}v_bias")
        state[f"{prefix}qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return state


def _check_beit_position_index(state: dict[str, torch.Tensor]) -> None:
    """Every ``relative_position_index`` buffer must be BEiT's index for the grid of the table beside it (the
    layout our attention reads the tables with); it carries nothing else, so it is dropped after this."""
    for key in [k for k in state if k.endswith(BEIT_INDEX)]:
        table_key = key[: -len(BEIT_INDEX)] + BEIT_TABLE
        if table_key not in state:
            raise CheckpointFormatError(f"{key} has no {table_key} beside it")
        grid = square_grid_of_table(state[table_key].shape[0], table_key)
        expected = relative_position_index_with_class_token(grid)
        index = state[key]
        if index.shape != expected.shape or not torch.equal(index.to(expected.dtype), expected):
            raise CheckpointFormatError(
                f"{key} {tuple(index.shape)} is not BEiT's relative position index of the {grid[0]}x{grid[1]} grid of "
                f"{table_key}: the table cannot be read as a (dy, dx) offset table")


def _drop_pvt_class_slot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PVT v1's stage-4 position embedding without its class-token slot: [1, 1 + g*g, D] -> [1, g*g, D]
    (one without the slot, g*g tokens, is kept as it is)."""
    if PVT_CLASS_TOKEN_POS_EMBED not in state:
        return state
    value = state[PVT_CLASS_TOKEN_POS_EMBED]
    tokens = value.shape[1] if value.dim() == 3 else 0
    grid_tokens = math.isqrt(max(tokens - 1, 0)) ** 2
    if grid_tokens and tokens == grid_tokens + 1:
        return {**state, PVT_CLASS_TOKEN_POS_EMBED: value[:, 1:]}
    if value.dim() == 3 and math.isqrt(tokens) ** 2 == tokens:
        return state
    raise CheckpointFormatError(f"{PVT_CLASS_TOKEN_POS_EMBED} {tuple(value.shape)} is neither a class-token slot plus "
                                f"a square grid nor a square grid [1, g*g, D]")


def convert(backbone_state: dict[str, torch.Tensor], fmt: str) -> Converted:
    """Rename a prefix-stripped backbone state dict of format ``fmt`` into our names.

    Plain-ViT formats come out with the plain ViT names (``patch_embed.*``, ``pos_embed``,
    ``blocks.*``); the loader prefixes them with the target's ViT prefix.
    """
    if fmt not in FORMATS:
        raise CheckpointFormatError(f"unknown checkpoint format {fmt!r}; allowed: {FORMATS}")
    converted = Converted(tensors={})
    converted.dropped = [k for k in backbone_state if _matches_any(k, UNUSED_KEYS[fmt])]  # source names
    state = {k: v for k, v in backbone_state.items() if k not in set(converted.dropped)}
    rules: tuple = ()
    if fmt == "official":
        rules = OFFICIAL_RENAMES
    elif fmt == "vit_adapter":
        rules = VIT_ADAPTER_RENAMES
    elif fmt == "pvt":
        state = _drop_pvt_class_slot(state)
        rules = PVT_RENAMES
    elif fmt == "pvt_v2":
        rules = PVT_RENAMES
    elif fmt == "beit":
        _check_beit_position_index(backbone_state)
        state = _merge_beit_qkv_bias(state)
        rules = BEIT_RENAMES
    elif fmt == "dinov2":
        rules = DINOV2_RENAMES
    converted.tensors = {_rename(key, rules): value for key, value in state.items()}
    return converted
