"""train(cfg): one training run from a composed config. `python train.py` is a thin wrapper."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from .builders import (build_callbacks, build_loggers, build_module, build_trainer, check_config,
                       per_device_batch_size, apply_process_switches)
from .run_dir import resolve_checkpoint, run_dir_of_checkpoint
from .summary import stage_metrics, write_summary

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def train(cfg: DictConfig) -> dict:
    """Train, validate on the task's schedule, keep the best and the last checkpoint.

    Returns the final validation metrics (also written to <run dir>/metrics.json).
    """
    checkpoint = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.run_name)
    with open_dict(cfg):
        if checkpoint is not None:
            cfg.paths.output_dir = str(run_dir_of_checkpoint(checkpoint))
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).resolve())
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    pl.seed_everything(cfg.seed, workers=True)
    apply_process_switches(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    datamodule.batch_size = per_device_batch_size(cfg.get("global_batch_size"), datamodule.batch_size,
                                                  trainer.world_size)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)

    metrics = stage_metrics(trainer.callback_metrics, "val")
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    summary = {"run_dir": str(output_dir), "global_step": trainer.global_step, "best_checkpoint": best,
               "metrics": metrics}
    if trainer.is_global_zero:
        write_summary(output_dir, summary)
        log.info("final validation metrics: %s", json.dumps(metrics))
    return summary
