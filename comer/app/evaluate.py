"""evaluate(cfg): run a checkpoint over the validation set with the task's test recipe (segmentation: slide
inference and mIoU; detection: Mask R-CNN inference and COCOeval).

A checkpoint of one of our runs is rebuilt from the run's stored config, with this command's overrides on
top (comer/app/run_config.py); a released official checkpoint from the command line's backbone=/task=.
Results go to this command's own directory (paths.output_dir), never into the training run's."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from comer.checkpoint import check_finite, load_detector_checkpoint, load_segmentor_checkpoint, read_checkpoint
from comer.data.ade20k import read_image
from comer.models import EncoderDecoder, MaskRCNN
from comer.training import DetectionModule
from comer.training.checkpoint_io import atomic_write_text
from comer.training.detection_drawing import detection_overlay
from comer.training.visualization import labelled_overlay, save_png

from .builders import (
    ConfigError, apply_process_switches, build_datamodule, build_loggers, build_model, build_module, build_trainer,
    check_config)
from .console import quiet_library_noise
from .run_config import CheckpointSource, check_own_keys, is_lightning_checkpoint, open_checkpoint, rebuild_config
from .run_dir import CHECKPOINT_DIR, CONFIG_FILE
from .summary import stage_metrics, write_summary

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
EVAL_CONFIG_FILE = "eval_config.yaml"  # the config this evaluation ran with (for one of our runs: rebuilt)
IMAGE_SUFFIX = ".png"


# How a released official checkpoint (mmseg / mmdet names) loads into each kind of model.
OFFICIAL_LOADERS = ((EncoderDecoder, load_segmentor_checkpoint), (MaskRCNN, load_detector_checkpoint))


def load_weights(module: pl.LightningModule, path: Path, contents: Any = None) -> str:
    """Our Lightning checkpoint (strict, whole module) or a released official mmseg/mmdet checkpoint
    (backbone through the name conversion, heads 1:1). ``contents``: the file's, when already read.
    Returns which kind it was."""
    checkpoint = read_checkpoint(path)[0] if contents is None else contents
    if is_lightning_checkpoint(checkpoint):
        check_finite(checkpoint["state_dict"], str(path))
        module.load_state_dict(checkpoint["state_dict"], strict=True)
        return "lightning"
    for model_class, loader in OFFICIAL_LOADERS:
        if isinstance(module.model, model_class):
            loader(module.model, checkpoint)
            return "official"
    raise TypeError(f"{path}: no official checkpoint format for a {type(module.model).__name__}; "
                    f"load one of this project's Lightning checkpoints instead")


def submission_labels(pred: torch.Tensor) -> np.ndarray:
    """[H, W] class map (0-based) -> uint8 in ADE20K's submission format (class k written as k + 1)."""
    return (pred.cpu().numpy() + 1).astype(np.uint8)


class SubmissionWriter(pl.Callback):
    """One label PNG per image, ADE20K submission format."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.directory.mkdir(parents=True, exist_ok=True)
        for path, pred in zip(batch["path"], outputs):
            Image.fromarray(submission_labels(pred)).save(self.directory / f"{Path(path).stem}{IMAGE_SUFFIX}")


class OverlayWriter(pl.Callback):
    """``eval.show_dir``: one picture per image, the predicted classes' colours blended into the image with
    their legend (segmentation: on the original image file; detection: boxes and masks on the input)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        for name, picture in self._pictures(module, outputs, batch):
            save_png(picture, self.directory / f"{name}{IMAGE_SUFFIX}")

    @staticmethod
    def _pictures(module: pl.LightningModule, outputs, batch: dict):
        if isinstance(module, DetectionModule):
            for i, prediction in enumerate(outputs):
                height, width = batch["image_sizes"][i]
                yield str(batch["image_ids"][i]), detection_overlay(
                    batch["images"][i, :, :height, :width], prediction, module.class_names, module.palette,
                    module.draw_score_threshold)
        else:
            for path, pred in zip(batch["path"], outputs):
                yield Path(path).stem, labelled_overlay(read_image(Path(path)), pred.cpu().numpy(), module.class_names,
                                                        module.palette, module.ignore_index)


def refuse_run_directory(output_dir: Path) -> None:
    """Evaluations and predictions write beside, never into, a training run's files."""
    for name in (CONFIG_FILE, CHECKPOINT_DIR):
        if (output_dir / name).exists():
            raise ConfigError(f"{output_dir} holds a training run ({output_dir / name} exists): results go to a "
                              f"directory of their own; choose another one")


def config_for_checkpoint(cfg: DictConfig) -> tuple[DictConfig, CheckpointSource]:
    """The checkpoint ``cfg.ckpt_path`` names and the config to run it with (checked)."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).resolve())
    check_own_keys(cfg)
    apply_process_switches(cfg)  # the files the user trusts, before the checkpoint is read
    source = open_checkpoint(cfg.ckpt_path, cfg.paths.log_dir, cfg.train_run_name, cfg.get("run_config"))
    cfg = rebuild_config(cfg, source)
    check_config(cfg)
    return cfg, source


def evaluate(cfg: DictConfig) -> dict:
    quiet_library_noise()
    cfg, source = config_for_checkpoint(cfg)
    output_dir = Path(cfg.paths.output_dir)
    refuse_run_directory(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(cfg.seed, workers=True)
    apply_process_switches(cfg)
    model = build_model(cfg)  # configuration errors of the model surface before any data is read
    datamodule = build_datamodule(cfg, "test")
    module = build_module(cfg, model, datamodule)
    kind = load_weights(module, source.path, source.contents)
    log.info("loaded %s checkpoint %s", kind, source.path)

    callbacks = []
    if cfg.eval.save_predictions:  # segmentation: submission PNGs; detection: the COCO results json
        if isinstance(module, DetectionModule):
            module.save_predictions = True
        else:
            callbacks.append(SubmissionWriter(output_dir / PREDICTIONS_DIR))
    if cfg.eval.show_dir is not None:
        callbacks.append(OverlayWriter(Path(cfg.eval.show_dir).expanduser()))
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
    trainer.test(module, datamodule=datamodule, verbose=False)

    metrics = stage_metrics(trainer.callback_metrics, "test")
    run_config = None if source.run_config is None else str(source.run_config)
    summary = {"checkpoint": str(source.path), "checkpoint_kind": kind, "run_config": run_config, "metrics": metrics}
    if trainer.is_global_zero:
        atomic_write_text(output_dir / EVAL_CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        log.info("metrics written to %s", write_summary(output_dir, summary))
    return summary
