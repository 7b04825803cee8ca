"""Each training run's parameters and FLOPs in its metrics.json (``model``), so ``python -m comer.report`` can
show them beside the metrics without rebuilding the model."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning.pytorch as pl
from omegaconf import DictConfig

from comer.flops import model_complexity

from .summary import RunSummary

log = logging.getLogger(__name__)


def complexity_image_size(cfg: DictConfig) -> tuple[int, int]:
    """The input the FLOPs are counted at: the segmentation crop (module.crop_size, the slide window), or
    for detection a landscape image at the test scale (data.test_scale is (long, short)) padded to the
    data's size divisor, as the loader pads it."""
    crop = cfg.module.get("crop_size")
    if crop is not None:
        return _pair(crop)
    long_side, short_side = cfg.data.test_scale
    divisor = int(cfg.data.get("size_divisor") or 1)
    return _round_up(int(short_side), divisor), _round_up(int(long_side), divisor)


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ModelComplexityRecorder(pl.Callback):
    """At the start of fitting, rank zero counts the model's parameters and FLOPs at ``image_size`` (one
    forward pass without gradients, on the model's device) and records them in the run summary."""

    def __init__(self, summary: RunSummary, image_size: tuple[int, int]) -> None:
        self.summary = summary
        self.image_size = image_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        complexity = model_complexity(pl_module.model, self.image_size)
        log.info("model: %.2f M parameters, %.1f GFLOPs at %dx%d", complexity["params"] / 1e6,
                 complexity["flops"] / 1e9, *self.image_size)
        self.summary.record_model(complexity)
