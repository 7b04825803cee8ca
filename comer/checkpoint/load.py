"""Strict loading of pretrained / released weights into our backbones and segmentors."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .adapt import CheckpointShapeError, adapt_patch_kernel, adapt_pos_embed
from .formats import (
    FORMATS,
    DEFAULT_ALLOW_MISSING,
    PLAIN_VIT_FORMATS,
    CheckpointFormatError,
    convert,
    detect_format,
    split_backbone,
    unwrap,
)
from .safe_load import load_checkpoint_file

log = logging.getLogger(__name__)

VIT_PREFIX = "vit."  # where ViTCoMer (and other composite backbones) keep their plain ViT
POS_EMBED = "pos_embed"
PATCH_KERNEL = "patch_embed.proj.weight"
SEGMENTOR_HEADS = ("decode_head", "auxiliary_head")


class CheckpointKeyError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass
class LoadReport:
    source: str
    format: str
    loaded: list[str] = field(default_factory=list)  # target keys taken from the checkpoint
    missing: list[str] = field(default_factory=list)  # target keys left at init (allowed)
    dropped: list[str] = field(default_factory=list)  # checkpoint keys dropped by name
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # non-backbone keys (heads), unchanged
    notes: list[str] = field(default_factory=list)

    @property
    def head_keys(self) -> list[str]:
        return sorted(self.extra)

    def __str__(self) -> str:
        parts = [f"{self.source} [{self.format}]: {len(self.loaded)} tensors loaded",
                 f"{len(self.missing)} left at init", f"{len(self.dropped)} dropped"]
        if self.resized:
            parts.append("resized " + ", ".join(f"{k} {a}->{b}" for k, (a, b) in self.resized.items()))
        if self.extra:
            parts.append(f"{len(self.extra)} head keys")
        return "; ".join(parts + self.notes)


class NonFiniteCheckpointError(ValueError):
    pass


def read_checkpoint(source: str | Path | Mapping[str, Any]) -> tuple[dict, str]:
    """(checkpoint object, description) from a path or an in-memory state dict. Files are read as data
    (see safe_load.py): no code from the file runs unless the user trusted that file."""
    if isinstance(source, Mapping):
        return dict(source), "<state dict>"
    path = Path(source).expanduser()
    return load_checkpoint_file(path), str(path)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, limit: int = 5) -> None:
    """Refuse weights holding NaN or infinity (a diverged run's checkpoint evaluates to garbage, silently),
    naming the first ``limit`` keys."""
    bad = [key for key, value in tensors.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteCheckpointError(
            f"{source}: {len(bad)} tensors hold NaN or infinite values, e.g. {', '.join(bad[:limit])}. The run that "
            f"wrote it diverged (or the file is damaged): use an earlier checkpoint")


def _vit_prefix(target_keys: Sequence[str]) -> str:
    return VIT_PREFIX if any(k.startswith(VIT_PREFIX) for k in target_keys) else ""


def _format_list(keys: Sequence[str], limit: int = 40, sort: bool = True) -> str:
    """Keys one per line; past ``limit``, the rest is counted per top-level module."""
    keys = sorted(keys) if sort else list(keys)
    shown = "".join(f"\n  {k}" for k in keys[:limit])
    if len(keys) <= limit:
        return shown
    counts: dict[str, int] = {}
    for key in keys[limit:]:
        module = key.split(".", 1)[0]
        counts[module] = counts.get(module, 0) + 1
    return shown + f"\n  ... and {len(keys) - limit} more: " + ", ".join(f"{m}.* ({n})" for m, n in counts.items())


def _prefix_tokens(pos_embed: torch.Tensor) -> int:
    """Slots before the square grid in a [1, P + G*G, D] position embedding (class/distillation
    tokens): P = N - isqrt(N)^2, unambiguous while P <= 2G."""
    tokens = pos_embed.shape[1]
    return tokens - math.isqrt(tokens) ** 2


def _adapt_shapes(tensors: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], vit_prefix: str,
                  report: LoadReport) -> None:
    """Resize the position grid and the patch kernel; any other shape difference is an error
    (all of them are listed, each with the key and both shapes)."""
    pos_key, kernel_key = vit_prefix + POS_EMBED, vit_prefix + PATCH_KERNEL
    mismatches = []
    for key, value in tensors.items():
        want = target[key].shape
        if key == pos_key:  # grid and prefix tokens may differ, the width may not
            fits = value.dim() == 3 and value.shape[-1] == want[-1]
        elif key == kernel_key:  # the kernel size may differ
            fits = value.dim() == 4 and value.shape[:2] == want[:2]
        else:
            fits = value.shape == want
        if not fits:
            mismatches.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
    if mismatches:
        raise CheckpointShapeError(f"{report.source}: shape mismatch for {len(mismatches)} keys (does the checkpoint "
                                   f"belong to this model variant?):" + _format_list(mismatches, sort=False))
    if pos_key in tensors:  # always re-laid out: one class slot, then the model's grid
        source = tensors[pos_key]
        tensors[pos_key] = adapt_pos_embed(source, target[pos_key].shape, _prefix_tokens(source), pos_key)
        _record_resize(report, pos_key, source, tensors[pos_key])
    if kernel_key in tensors and tensors[kernel_key].shape != target[kernel_key].shape:
        source = tensors[kernel_key]
        tensors[kernel_key] = adapt_patch_kernel(source, target[kernel_key].shape, kernel_key)
        _record_resize(report, kernel_key, source, tensors[kernel_key])


def _record_resize(report: LoadReport, key: str, before: torch.Tensor, after: torch.Tensor) -> None:
    if before.shape != after.shape:
        report.resized[key] = (tuple(before.shape), tuple(after.shape))


def convert_backbone_state(
    target_state: Mapping[str, torch.Tensor],
    source: str | Path | Mapping[str, Any],
    format: str | None = None,
    allow_missing: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Convert ``source`` into a complete state dict for a model whose state dict is ``target_state``.

    Raises on unexpected keys, on missing keys not matched by ``allow_missing`` (regular expressions,
    ``re.match`` against our key names; None = the format's default) and on shape mismatches.
    Missing (allowed) keys keep the values of ``target_state``.
    """
    checkpoint, description = read_checkpoint(source)
    state = unwrap(checkpoint)
    check_finite(state, description)
    backbone_state, extra = split_backbone(state)
    fmt = format or detect_format(backbone_state)
    if fmt not in FORMATS:
        raise CheckpointFormatError(f"unknown checkpoint format {fmt!r}; allowed: {FORMATS}")
    report = LoadReport(source=description, format=fmt, extra=extra)
    converted = convert(backbone_state, fmt)
    report.dropped, report.notes = converted.dropped, converted.notes
    vit_prefix = _vit_prefix(list(target_state))
    name_prefix = vit_prefix if fmt in PLAIN_VIT_FORMATS else ""  # official/comer names are complete
    tensors = {name_prefix + k: v for k, v in converted.tensors.items()}

    unexpected = [k for k in tensors if k not in target_state]
    if unexpected:
        raise CheckpointKeyError(f"{description} [{fmt}]: {len(unexpected)} checkpoint keys have no place in the "
                                 f"model (after renaming):" + _format_list(unexpected))
    patterns = tuple(DEFAULT_ALLOW_MISSING[fmt] if allow_missing is None else allow_missing)
    missing = [k for k in target_state if k not in tensors]
    not_allowed = [k for k in missing if not any(re.match(p, k) for p in patterns)]
    if not_allowed:
        raise CheckpointKeyError(f"{description} [{fmt}]: {len(not_allowed)} model keys are missing from the "
                                 f"checkpoint and not in the allow-list {list(patterns)}:" + _format_list(not_allowed))
    _adapt_shapes(tensors, target_state, vit_prefix, report)

    report.loaded = sorted(tensors)
    report.missing = sorted(missing)
    for note in report.notes:
        log.warning("%s", note)
    full = dict(target_state)
    full.update(tensors)
    return full, report


def load_pretrained(
    backbone: nn.Module,
    source: str | Path | Mapping[str, Any],
    format: str | None = None,
    allow_missing: Sequence[str] | None = None,
) -> LoadReport:
    """Load a checkpoint (path or state dict) into ``backbone``, converting its names and shapes.

    format: one of ``formats.FORMATS`` or None to recognise it. A full checkpoint (backbone + heads)
    loads its ``backbone.*`` part; the other keys are returned in ``report.extra``.
    """
    full, report = convert_backbone_state(backbone.state_dict(), source, format, allow_missing)
    backbone.load_state_dict(full, strict=True)
    return report


def load_checkpoint_with_heads(model: nn.Module, source: str | Path | Mapping[str, Any], heads: Sequence[str],
                               owner: str, format: str | None = None) -> LoadReport:
    """Load a full mmseg/mmdet-style checkpoint strictly into ``model``: ``backbone.*`` through the name
    conversion, every other key 1:1 by name into the submodules ``heads`` (attributes of ``model``;
    one that is None is skipped). Every key and shape is checked before anything is loaded: missing and
    unexpected head keys are listed together (``owner`` names the model kind in the message)."""
    backbone_state, report = convert_backbone_state(model.backbone.state_dict(), source, format)
    model_state = model.state_dict()
    expected = [k for k in model_state if k.split(".", 1)[0] in heads]
    unexpected = [k for k in report.extra if k not in model_state or k.split(".", 1)[0] not in heads]
    missing = [k for k in expected if k not in report.extra]
    if unexpected or missing:
        raise CheckpointKeyError(
            f"{report.source}: head keys do not match the {owner}; unexpected:{_format_list(unexpected)}\n"
            f"missing:{_format_list(missing)}")
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in report.extra.items() if v.shape != model_state[k].shape]
    if mismatched:
        raise CheckpointShapeError(f"{report.source}: head shape mismatch (number of classes?):"
                                   + _format_list(mismatched))
    model.backbone.load_state_dict(backbone_state, strict=True)
    for head in heads:
        module = getattr(model, head, None)
        if module is None:
            continue
        prefix = f"{head}."
        head_state = {k[len(prefix):]: v for k, v in report.extra.items() if k.startswith(prefix)}
        module.load_state_dict(head_state, strict=True)
    return report


def load_segmentor_checkpoint(segmentor: nn.Module, source: str | Path | Mapping[str, Any],
                              format: str | None = None) -> LoadReport:
    """Load an mmseg checkpoint (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``) strictly into
    an EncoderDecoder: the backbone through the conversion, the heads 1:1 by name."""
    return load_checkpoint_with_heads(segmentor, source, SEGMENTOR_HEADS, "segmentor", format)
