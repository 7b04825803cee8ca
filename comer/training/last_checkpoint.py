"""`last.ckpt`: what `ckpt_path=last` resumes from, written so that no finished step is lost."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what a cluster sends before preemption


class LastCheckpoint(pl.Callback):
    """Writes ``<dirpath>/<filename>`` at the end of a training step (the point where a resume is exact):
    every ``every_n_steps`` optimiser steps, at the final step (``trainer.max_steps``), and at the first
    step boundary after SIGINT or SIGTERM, after which training stops (``stopped_by`` names the signal).
    A second signal stops at once, the default way. Every rank stops together under DDP."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, filename: str = "last.ckpt") -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be a whole number >= 1, got {every_n_steps!r}: last.ckpt "
                             f"is what a crashed or interrupted run resumes from")
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self.received: int | None = None
        self.stopped_by: str | None = None
        self._saved_step: int | None = None
        self._previous_handlers: dict[int, object] = {}

    # --- signals -------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: stop now, the default way
            self._restore_handlers()
            log.warning("%s again: stopping at once, without saving", signal.Signals(signum).name)
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("%s received: saving %s at the end of this training step, then stopping (send it again to "
                    "stop at once)", signal.Signals(signum).name, self.path)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers()  # after Lightning's own SIGTERM handler, which it installs before this hook

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # --- saving ----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        step = trainer.global_step
        due = step % self.every_n_steps == 0 or 0 < trainer.max_steps <= step
        if (stop or due) and step != self._saved_step:
            trainer.save_checkpoint(self.path)
            self._saved_step = step
        if stop:
            self.stopped_by = signal.Signals(self.received).name if self.received is not None else "a signal to another rank"
            trainer.should_stop = True
