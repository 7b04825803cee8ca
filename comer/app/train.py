"""train(cfg): one training run from a composed config. `python train.py` is a thin wrapper."""
from __future__ import annotations

import contextlib
import json
import logging
import secrets
import shlex
import sys
from pathlib import Path

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from comer.training import ContinuingCSVLogger, LastCheckpoint
from comer.training.checkpoint_io import TEMP_SUFFIX, atomic_write_text

from .builders import (
    apply_process_switches, build_callbacks, build_datamodule, build_loggers, build_model, build_module,
    build_trainer, check_config, per_device_batch_size)
from .resume import Resume, plan_resume
from .run_dir import (CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, RunDirectoryBusy, RunLock,
                      remove_stale_temp_files)
from .complexity_record import ModelComplexityRecorder, complexity_image_size
from .config_checks import validate_at_the_end_of_short_runs
from .preflight import check_memory
from .console import announce_run, console_callbacks, quiet_library_noise
from .summary import METRICS_FILE, RunSummary, read_summary

log = logging.getLogger(__name__)

RUN_ID_BYTES = 3
ENTRY_POINT = "python train.py"


def _monitor(cfg: DictConfig) -> tuple[str | None, str]:
    """The metric (and its direction) the best checkpoint follows; metrics.json reports the best by it."""
    best = (cfg.get("callbacks") or {}).get("best_checkpoint") or {}
    return best.get("monitor"), best.get("mode", "max")


def resume_command(checkpoint: Path) -> str:
    """The command that continues this run: the same overrides, ckpt_path set to ``checkpoint``."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    overrides = [o for o in overrides if not o.startswith("ckpt_path=")]
    return " ".join([ENTRY_POINT, *map(shlex.quote, overrides), shlex.quote(f"ckpt_path={checkpoint}")])


def _check_fresh_directory(output_dir: Path) -> None:
    """A fresh run never writes over another run's results."""
    for name in (CONFIG_FILE, METRICS_FILE, f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"):
        if (output_dir / name).exists():
            raise RunDirectoryBusy(
                f"{output_dir} already holds a run ({output_dir / name} exists): resume it with "
                f"ckpt_path={output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT}, or start this run in a new directory")


def _prepare(cfg: DictConfig, resume: Resume | None) -> Path:
    """Settle the run directory and id in ``cfg``; returns the run directory."""
    with open_dict(cfg):
        if resume is not None and resume.run_dir is not None:
            cfg.paths.output_dir = str(resume.run_dir)
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).resolve())
        run_dir = Path(cfg.paths.output_dir)
        cfg.run_id = (resume.run_id if resume is not None else None) or f"{run_dir.name}-{secrets.token_hex(RUN_ID_BYTES)}"
    return run_dir


def train(cfg: DictConfig) -> dict:
    """Train, validate on the task's schedule, keep the best and the last checkpoint.

    Returns the run summary (also <run dir>/metrics.json): the latest and the best validation metrics,
    their history, the status ("finished" or "interrupted") and, when a signal stopped the run, its name.
    """
    quiet_library_noise()
    apply_process_switches(cfg)
    resume = plan_resume(cfg)
    output_dir = _prepare(cfg, resume)
    check_config(cfg)
    validate_at_the_end_of_short_runs(cfg)
    if rank_zero_only.rank == 0:
        announce_run(cfg)
    if resume is not None and resume.step >= cfg.trainer.max_steps:
        log.info("the run in %s already finished at step %d (trainer.max_steps=%d): nothing to do. To train "
                 "further, raise trainer.max_steps", output_dir, resume.step, cfg.trainer.max_steps)
        return {**read_summary(output_dir), "status": "finished", "global_step": resume.step}
    if resume is None:
        _check_fresh_directory(output_dir)

    is_rank_zero = rank_zero_only.rank == 0
    with RunLock(output_dir) if is_rank_zero else contextlib.nullcontext():
        if is_rank_zero:
            remove_stale_temp_files(output_dir, TEMP_SUFFIX)
            atomic_write_text(output_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        try:
            return _fit(cfg, output_dir, resume)
        finally:
            _finish_wandb_run()


def _finish_wandb_run() -> None:
    """End the W&B run this run opened (if any), so the next job of a multirun in this process gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _fit(cfg: DictConfig, output_dir: Path, resume: Resume | None) -> dict:
    last = LastCheckpoint(output_dir / CHECKPOINT_DIR, cfg.checkpoint_every_n_steps, LAST_CHECKPOINT)
    # check_config has built the model on the meta device; the dataset (its layout, pairs and sizes) is checked,
    # or generated, and the memory of a training step is estimated before the model is built or loggers start
    datamodule = build_datamodule(cfg, "fit")
    check_memory(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg)
    module = build_module(cfg, model, datamodule)
    monitor, mode = _monitor(cfg)
    summary = RunSummary(output_dir, monitor, mode, resumed_step=resume.step if resume is not None else None)
    loggers = build_loggers(cfg)
    for logger in loggers:
        if isinstance(logger, ContinuingCSVLogger) and resume is not None:
            logger.resume_at(resume.step)
    complexity = ModelComplexityRecorder(summary, complexity_image_size(cfg))
    trainer = build_trainer(cfg, [*build_callbacks(cfg), last, summary, complexity, *console_callbacks(cfg)], loggers)
    datamodule.batch_size = per_device_batch_size(cfg.get("global_batch_size"), datamodule.batch_size,
                                                  trainer.world_size)
    if resume is not None:
        log.info("resuming %s from %s (step %d)", output_dir, resume.checkpoint, resume.step)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume is not None else None)

    skipped = datamodule.skipped_samples() if hasattr(datamodule, "skipped_samples") else {}
    result = summary.update(trainer, status="interrupted" if last.stopped_by else "finished",
                            interrupted_by=last.stopped_by, skipped_samples=skipped)
    if any(skipped.values()):
        log.warning("unreadable samples left out: %s", json.dumps(skipped))
    if last.stopped_by:
        log.warning("stopped by %s at step %d; %s is saved. Resume with:\n  %s", last.stopped_by,
                    trainer.global_step, last.path, resume_command(last.path))
    else:
        log.info("final validation metrics: %s", json.dumps(result.get("metrics", {})))
    return result
