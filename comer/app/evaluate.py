"""evaluate(cfg): run a checkpoint over the validation set with the task's test recipe (segmentation: slide
inference and mIoU; detection: Mask R-CNN inference and COCOeval)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from omegaconf import DictConfig, open_dict
from PIL import Image

from comer.checkpoint import check_finite, load_detector_checkpoint, load_segmentor_checkpoint, read_checkpoint
from comer.models import EncoderDecoder, MaskRCNN
from comer.training import DetectionModule

from .builders import (
    apply_process_switches, build_datamodule, build_loggers, build_model, build_module, build_trainer,
    check_config)
from .summary import stage_metrics, write_summary

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


# How a released official checkpoint (mmseg / mmdet names) loads into each kind of model.
OFFICIAL_LOADERS = ((EncoderDecoder, load_segmentor_checkpoint), (MaskRCNN, load_detector_checkpoint))


def load_weights(module: pl.LightningModule, path: Path) -> str:
    """Our Lightning checkpoint (strict, whole module) or a released official mmseg/mmdet checkpoint
    (backbone through the name conversion, heads 1:1). Returns which kind it was."""
    checkpoint, _ = read_checkpoint(path)
    if isinstance(checkpoint, dict) and LIGHTNING_VERSION_KEY in checkpoint:
        check_finite(checkpoint["state_dict"], str(path))
        module.load_state_dict(checkpoint["state_dict"], strict=True)
        return "lightning"
    for model_class, loader in OFFICIAL_LOADERS:
        if isinstance(module.model, model_class):
            loader(module.model, checkpoint)
            return "official"
    raise TypeError(f"{path}: no official checkpoint format for a {type(module.model).__name__}; "
                    f"load one of this project's Lightning checkpoints instead")


class SubmissionWriter(pl.Callback):
    """One label PNG per image, ADE20K submission format: class k (0-based) written as k + 1."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.directory.mkdir(parents=True, exist_ok=True)
        for path, pred in zip(batch["path"], outputs):
            label = (pred.cpu().numpy() + 1).astype(np.uint8)
            Image.fromarray(label).save(self.directory / f"{Path(path).stem}.png")


def evaluate(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).resolve())
    check_config(cfg)
    checkpoint = Path(cfg.ckpt_path).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(cfg.seed, workers=True)
    apply_process_switches(cfg)
    model = build_model(cfg)  # configuration errors of the model surface before any data is read
    datamodule = build_datamodule(cfg, "test")
    module = build_module(cfg, model, datamodule)
    kind = load_weights(module, checkpoint)
    log.info("loaded %s checkpoint %s", kind, checkpoint)

    callbacks = []
    if cfg.eval.save_predictions:  # segmentation: submission PNGs; detection: the COCO results json
        if isinstance(module, DetectionModule):
            module.save_predictions = True
        else:
            callbacks.append(SubmissionWriter(output_dir / PREDICTIONS_DIR))
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
    trainer.test(module, datamodule=datamodule, verbose=False)

    metrics = stage_metrics(trainer.callback_metrics, "test")
    summary = {"checkpoint": str(checkpoint), "checkpoint_kind": kind, "metrics": metrics}
    if trainer.is_global_zero:
        log.info("metrics written to %s", write_summary(output_dir, summary))
    return summary
