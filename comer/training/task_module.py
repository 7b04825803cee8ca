"""What every task's LightningModule shares: layer-decayed optimizer and per-iteration schedule, the
non-finite-loss guard, RNG states in checkpoints, throughput logging and the run directory."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn

from .layer_decay import build_optimizer, decay_depth
from .rng_state import RNG_STATE_KEY, capture_rng_states, restore_rng_states

LOSS_PREFIX = "loss"


class NonFiniteLossError(RuntimeError):
    """The training loss is NaN/inf; raised before the optimizer step so the weights stay finite."""


class TaskModule(pl.LightningModule):
    """Base of the task modules.

    Args:
        model: the network; its ``backbone.vit.blocks`` give the depth for layer decay unless ``num_layers``.
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_`` of torch.optim.AdamW); its lr and
            weight_decay are spread over layer-decayed groups.
        scheduler: factory ``(optimizer, max_iters) -> LRScheduler``, stepped every optimizer step;
            max_iters comes from the trainer (max_steps).
        layer_decay: layer-wise lr decay rate (1.0 = off).
        num_layers: ViT depth for layer decay; None reads ``len(model.backbone.vit.blocks)``.
        no_weight_decay_names: extra parameter names (or trailing parts) without weight decay.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        layer_decay: float,
        num_layers: int | None = None,
        no_weight_decay_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.layer_decay = float(layer_decay)
        self.num_layers = num_layers
        self.no_weight_decay_names = tuple(no_weight_decay_names)
        self._last_batch_end: float | None = None

    # ------------------------------------------------------------------ optimisation
    def _vit_depth(self) -> int:
        return decay_depth(self.model, self.layer_decay, self.num_layers)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optimizer_factory, self.layer_decay, self._vit_depth(),
                                    self.no_weight_decay_names)
        max_iters = self.trainer.estimated_stepping_batches
        if not math.isfinite(max_iters):
            raise ValueError("the lr schedule needs a finite run length: set trainer.max_steps")
        scheduler = self.scheduler_factory(optimizer, int(max_iters))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ training
    def total_loss(self, losses: Mapping[str, torch.Tensor], batch_size: int, names: Sequence[str],
                   batch_idx: int) -> torch.Tensor:
        """The sum of the ``loss*`` entries, checked finite on every process, logged with its terms."""
        terms = [value for key, value in losses.items() if key.startswith(LOSS_PREFIX)]
        if not terms:
            raise ValueError(f"the model returned no '{LOSS_PREFIX}*' entries (keys: {sorted(losses)})")
        loss = torch.stack(terms).sum()
        self._check_finite(loss, losses, names, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for key, value in losses.items():
            self.log(f"train/{key}", value, batch_size=batch_size)
        self.log("train/lr", max(g["lr"] for g in self.optimizers().param_groups), batch_size=batch_size)
        return loss

    def _check_finite(self, loss: torch.Tensor, losses: Mapping[str, torch.Tensor], names: Sequence[str],
                      batch_idx: int) -> None:
        """Raise on every process when any process has a NaN/inf loss (so none waits in an all-reduce)."""
        finite_here = bool(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(finite_here, all=True):
            return
        where = f"at global step {self.global_step} (batch {batch_idx}, process {self.global_rank})"
        if finite_here:
            raise NonFiniteLossError(f"another process had a non-finite training loss {where}; this process's "
                                     f"images {list(names)} were fine. The optimizer step was not taken: resume "
                                     f"from the last checkpoint")
        values = {k: float(v.detach()) for k, v in losses.items()}
        raise NonFiniteLossError(
            f"non-finite training loss {float(loss.detach())} ({values}) {where}; images: {list(names)}. The "
            f"optimizer step was not taken: resume from the last checkpoint (lower the lr or check these images)")

    def log_throughput(self, batch_size: int) -> None:
        """train/images_per_sec over all processes, from one training step's end to the next."""
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self.log("train/images_per_sec", batch_size * self.trainer.world_size / max(now - self._last_batch_end, 1e-9),
                     batch_size=batch_size)
        self._last_batch_end = now

    def on_train_epoch_start(self) -> None:
        self._last_batch_end = None

    def on_validation_start(self) -> None:
        self._last_batch_end = None  # do not count validation time as a slow training step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[RNG_STATE_KEY] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if RNG_STATE_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_STATE_KEY])

    # ------------------------------------------------------------------ files
    def run_dir(self) -> Path:
        """The run directory (paths.output_dir), not a logger's version folder."""
        return Path(self.trainer.default_root_dir)
