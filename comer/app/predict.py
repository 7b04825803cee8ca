"""predict(cfg): run a segmentation checkpoint over a folder of images without labels, with the module's test
recipe (slide/whole, flip, scales), and write per image an overlay with the legend of its classes and its label
map (ADE20K's submission format, as eval.save_predictions writes). The checkpoint and its config are found as
evaluate finds them (one of our runs: its stored config; an official checkpoint: backbone=/task=)."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from comer.data.ade20k import read_image
from comer.training import SegmentationModule
from comer.training.visualization import labelled_overlay, save_png

from .builders import ConfigError, build_model, build_module, build_trainer, instantiate_datamodule
from .console import quiet_library_noise
from .evaluate import config_for_checkpoint, load_weights, refuse_run_directory, submission_labels

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # compared lower-case: .JPG and .Png count
OVERLAYS_DIR = "overlays"
LABELS_DIR = "labels"
OUTPUT_SUFFIX = ".png"
BATCH_SIZE = 1  # each image keeps its own size, as in validation


def list_images(source: Path) -> list[Path]:
    """The images of folder ``source`` (its own files, sorted), or ``source`` itself when it is one image.
    Two images with one name (a.jpg, a.png) would write the same output files: refused."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"input={source}: no such folder or image")
    images = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"input={source}: no images in it ({', '.join(IMAGE_SUFFIXES)}, any case)")
    repeated = sorted(stem for stem, count in Counter(p.stem for p in images).items() if count > 1)
    if repeated:
        raise ValueError(f"input={source}: images sharing a name would write the same outputs: {', '.join(repeated)}; "
                         f"rename or move one of each")
    return images


def _channel_first(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class ImageFolder(Dataset):
    """Unlabelled images through the datamodule's test transform and test views: a sample holds the test
    input (``image``, and ``views``/``ratios`` with multi-scale testing), ``output_size`` (the original
    size, which the prediction is made at), the original ``rgb`` and the ``path``."""

    def __init__(self, paths: Sequence[Path], transform: Callable, test_views: Sequence[tuple[float, Callable]]):
        self.paths = list(paths)
        self.transform = transform
        self.test_views = list(test_views)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        rgb = read_image(path)
        sample = {"image": _channel_first(self.transform(image=rgb)["image"]), "output_size": tuple(rgb.shape[:2]),
                  "rgb": rgb, "path": str(path)}
        if self.test_views:
            sample["views"] = tuple(_channel_first(view(image=rgb)["image"]) for _, view in self.test_views)
            sample["ratios"] = tuple(ratio for ratio, _ in self.test_views)
        return sample


def collate_one(samples: Sequence[dict]) -> dict:
    """A batch of one sample (``BATCH_SIZE``): tensors get the batch dimension, the rest become lists."""
    [sample] = samples
    batch = {"image": sample["image"][None], "output_size": sample["output_size"], "rgb": [sample["rgb"]],
             "path": [sample["path"]]}
    if "views" in sample:
        batch["views"] = tuple(view[None] for view in sample["views"])
        batch["ratios"] = sample["ratios"]
    return batch


class PredictionWriter(BasePredictionWriter):
    """Per image: ``overlays/<name>.png`` (the image with its predicted classes' colours and their legend)
    and ``labels/<name>.png`` (the class map, class k written as k + 1)."""

    def __init__(self, output: Path):
        super().__init__(write_interval="batch")
        self.output = output

    def write_on_batch_end(self, trainer, module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for path, rgb, labels in zip(batch["path"], batch["rgb"], prediction):
            name = f"{Path(path).stem}{OUTPUT_SUFFIX}"
            (self.output / LABELS_DIR).mkdir(parents=True, exist_ok=True)
            Image.fromarray(submission_labels(labels)).save(self.output / LABELS_DIR / name)
            picture = labelled_overlay(rgb, labels.numpy(), module.class_names, module.palette, module.ignore_index)
            save_png(picture, self.output / OVERLAYS_DIR / name)


def predict(cfg: DictConfig) -> dict:
    """Returns {"checkpoint", "checkpoint_kind", "images", "output"}."""
    quiet_library_noise()
    cfg, source = config_for_checkpoint(cfg)
    images = list_images(Path(cfg.input).expanduser())
    output = Path(cfg.output).expanduser().resolve()
    refuse_run_directory(output)

    pl.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg)
    datamodule = instantiate_datamodule(cfg.data)  # the test transforms, class names and palette; no data is read
    module = build_module(cfg, model, datamodule)
    if not isinstance(module, SegmentationModule):
        raise ConfigError(f"predict.py runs segmentation checkpoints; {source.path} is a {type(module).__name__}'s. "
                          f"For detection pictures use eval.py ckpt_path=... eval.show_dir=... (on the validation set)")
    kind = load_weights(module, source.path, source.contents)
    log.info("loaded %s checkpoint %s; predicting %d image(s) into %s", kind, source.path, len(images), output)

    loader = DataLoader(ImageFolder(images, datamodule.test_transform, datamodule.test_views), batch_size=BATCH_SIZE,
                        num_workers=datamodule.val_num_workers, collate_fn=collate_one)
    trainer = build_trainer(cfg, [PredictionWriter(output)], [])
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    return {"checkpoint": str(source.path), "checkpoint_kind": kind, "images": len(images), "output": str(output)}
