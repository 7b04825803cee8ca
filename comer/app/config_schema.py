"""What the keys users set may hold, checked in one pass before anything is built.

A wrong value (``trainer.max_steps=abc``, ``trainer.max_steps=2.5``, ``module.layer_decay=1.5``) is refused
with its key, the value and what is expected, instead of surfacing as a bare TypeError inside Lightning or
running with a rounded value. Keys absent from a config (``checkpoint_every_n_steps`` in eval.yaml) are not
checked. The rules are a table: ``COMMON_RULES`` for every run, ``TASK_RULES`` by the task's module.

The class count has one source, ``data.num_classes``: the model and module follow it (``${data.num_classes}``)
and a config where they disagree with it, or where ``data.class_names`` / ``data.palette`` have another
length, is refused by :func:`class_count_problems`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from comer.report.sweep import WANDB_TAG_MAX

# Lightning 2.x's accepted `precision` values (lightning.fabric.connector._PRECISION_INPUT).
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
ALL_DEVICES = -1
DEVICE_LIST_TEXT = re.compile(r"-1|\d+(,\d+)*,?")  # Lightning's "0,1" / "1," / "-1" device strings
INFERENCE_MODES = ("slide", "whole")
IOU_TYPES = ("bbox", "segm")
RGB_MAX = 255
RGB_CHANNELS = 3


@dataclass(frozen=True)
class Expect:
    """What a key may hold: ``accepts(value)`` for the resolved value, ``description`` for the message."""

    description: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def integer(minimum: int | None = None, maximum: int | None = None) -> Expect:
    bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
    text = " and ".join(b for b in bounds if b)
    return Expect(f"an int {text}".strip(),
                  lambda v: _is_int(v) and (minimum is None or v >= minimum) and (maximum is None or v <= maximum))


def number(above: float | None = None, at_least: float | None = None, at_most: float | None = None) -> Expect:
    """A finite int or float with the bounds given (``above``: exclusive lower bound)."""
    bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
              f"<= {at_most:g}" if at_most is not None else ""]
    text = " and ".join(b for b in bounds if b)
    return Expect(f"a number {text}".strip(), lambda v: _is_number(v) and (above is None or v > above)
                  and (at_least is None or v >= at_least) and (at_most is None or v <= at_most))


def boolean() -> Expect:
    return Expect("true or false", lambda v: isinstance(v, bool))


def one_of(*choices: Any) -> Expect:
    return Expect(f"one of {', '.join(map(repr, choices))}",
                  lambda v: not isinstance(v, bool) and any(v == c and type(v) is type(c) for c in choices))


def list_of(item: Expect, length: int | None = None, non_empty: bool = False) -> Expect:
    count = f"{length} " if length is not None else ("one or more " if non_empty else "")
    return Expect(f"a list of {count}values, each {item.description}",
                  lambda v: isinstance(v, list) and (length is None or len(v) == length)
                  and (not non_empty or len(v) > 0) and all(item.accepts(x) for x in v))


def either(*options: Expect) -> Expect:
    return Expect(" or ".join(o.description for o in options), lambda v: any(o.accepts(v) for o in options))


def nullable(expect: Expect) -> Expect:
    return Expect(f"{expect.description}, or null", lambda v: v is None or expect.accepts(v))


POSITIVE_PAIR = list_of(integer(1), length=2)
POSITIVE_INT_OR_PAIR = either(integer(1), POSITIVE_PAIR)
PROBABILITY = number(at_least=0.0, at_most=1.0)
DEVICES = either(integer(1), one_of(ALL_DEVICES, "auto"), list_of(integer(0), non_empty=True),
                 Expect("a string of device indices such as '0,1'",
                        lambda v: isinstance(v, str) and DEVICE_LIST_TEXT.fullmatch(v) is not None))
TEXT = Expect("a string", lambda v: isinstance(v, str))
PALETTE = list_of(list_of(integer(0, RGB_MAX), length=RGB_CHANNELS))
TAGS = list_of(Expect(f"a string of 1 to {WANDB_TAG_MAX} characters (W&B's limit)",
                      lambda v: isinstance(v, str) and 0 < len(v) <= WANDB_TAG_MAX))

# Every run (a key missing from a config is skipped).
COMMON_RULES: dict[str, Expect] = {
    "seed": integer(),
    "tags": TAGS,
    "extras.print_config": boolean(),
    "global_batch_size": nullable(integer(1)),
    "checkpoint_every_n_steps": integer(1),
    "fp16_init_scale": number(above=0.0),
    "trainer.max_steps": integer(1),
    "trainer.val_check_interval": integer(1),
    "trainer.log_every_n_steps": integer(1),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.devices": DEVICES,
    "trainer.num_nodes": integer(1),
    "trainer.accelerator": one_of(*ACCELERATORS),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.gradient_clip_val": nullable(number(at_least=0.0)),
    "trainer.enable_progress_bar": boolean(),
    "trainer.enable_model_summary": boolean(),
    "data.num_classes": integer(1),
    "data.batch_size": integer(1),
    "data.num_workers": integer(0),
    "data.val_num_workers": nullable(integer(0)),
    "data.pin_memory": boolean(),
    "data.skip_unreadable": boolean(),
    "data.flip_prob": PROBABILITY,
    "module.optimizer.lr": number(above=0.0),
    "module.optimizer.weight_decay": number(at_least=0.0),
    "module.optimizer.eps": number(above=0.0),
    "module.layer_decay": number(above=0.0, at_most=1.0),
    "module.num_layers": nullable(integer(1)),
    "module.num_val_images_to_log": integer(0),
    "module.scheduler.warmup_iters": integer(0),
    "module.scheduler.warmup_ratio": number(above=0.0, at_most=1.0),
    "module.scheduler.min_lr": number(at_least=0.0),
    "module.image_mean": list_of(number(), length=RGB_CHANNELS),
    "module.image_std": list_of(number(above=0.0), length=RGB_CHANNELS),
}

# By the task's LightningModule (module._target_).
TASK_RULES: dict[str, dict[str, Expect]] = {
    "comer.training.SegmentationModule": {
        "data.crop_size": POSITIVE_INT_OR_PAIR,
        "data.class_names": nullable(list_of(TEXT)),
        "data.palette": nullable(PALETTE),
        "data.photometric": boolean(),
        "data.reduce_zero_label": boolean(),
        "data.ratio_range": list_of(number(above=0.0), length=2),
        "data.cat_max_ratio": number(above=0.0, at_most=1.0),
        "data.scale": POSITIVE_PAIR,
        "data.test_scale": POSITIVE_PAIR,
        "data.size_divisor": nullable(integer(1)),  # null: test images are not resized to a multiple
        "module.crop_size": POSITIVE_INT_OR_PAIR,
        "module.stride": POSITIVE_INT_OR_PAIR,
        "module.inference_mode": one_of(*INFERENCE_MODES),
        "module.flip": boolean(),
        "module.scales": list_of(number(above=0.0), non_empty=True),
        "model.align_corners": boolean(),
        "model.avg_non_ignore": boolean(),
        "model.max_windows_per_forward": integer(1),
    },
    "comer.training.DetectionModule": {
        "data.crop_size": nullable(POSITIVE_PAIR),  # null: no final random crop
        "data.val_batch_size": integer(1),
        "data.size_divisor": integer(1),
        "data.test_scale": POSITIVE_PAIR,
        "data.min_image_size": integer(0),
        "module.iou_types": list_of(one_of(*IOU_TYPES), non_empty=True),
        "module.draw_score_threshold": PROBABILITY,
        "module.save_predictions": boolean(),
    },
}

ABSENT = object()


def lookup(container: Mapping, key: str) -> Any:
    """The value at the dotted ``key`` of a resolved config (plain dicts and lists), or ``ABSENT``."""
    node: Any = container
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ABSENT
        node = node[part]
    return node


def rules_for(container: Mapping) -> dict[str, Expect]:
    return {**COMMON_RULES, **TASK_RULES.get(lookup(container, "module._target_"), {})}


def schema_problems(container: Mapping) -> list[str]:
    """One line per key whose value breaks its rule: the key, the value and what is expected."""
    problems = []
    for key, expect in rules_for(container).items():
        value = lookup(container, key)
        if value is not ABSENT and not expect.accepts(value):
            hint = ""
            if isinstance(value, float) and value.is_integer() and expect.accepts(int(value)):
                hint = f" (write {key}={int(value)}: 1e5-style and {int(value)}.0 values are floats)"
            problems.append(f"{key}={value!r} ({type(value).__name__}): expected {expect.description}{hint}")
    return problems


def class_count_problems(container: Mapping) -> list[str]:
    """The data's ``num_classes`` is the class count of the run: the model's and the module's must equal it,
    and class names and palette, when given, have one entry per class."""
    num_classes = lookup(container, "data.num_classes")
    if num_classes is ABSENT or num_classes is None:
        return []
    problems = []
    for key in ("model.num_classes", "module.num_classes"):
        value = lookup(container, key)
        if value is not ABSENT and value != num_classes:
            problems.append(f"{key}={value!r} but data.num_classes={num_classes!r}: the data's num_classes is the "
                            f"run's class count ({key} follows it by default); set data.num_classes={value} instead "
                            f"and leave {key} unset")
    for key, what in (("data.class_names", "names"), ("data.palette", "colours")):
        value = lookup(container, key)
        if isinstance(value, list) and len(value) != num_classes:
            problems.append(f"{key} has {len(value)} {what} but data.num_classes={num_classes}: give one per class, "
                            f"or null for the defaults")
    return problems
