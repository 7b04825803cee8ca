"""SegmentationModule: the Lightning side of semantic segmentation (losses, schedule, mIoU, pictures).

The network is a built segmentor (``EncoderDecoder``: ``loss(images, labels)`` and
``inference(views, mode, crop_size, stride, flip, output_size)``); this module owns the
optimizer (layer-wise lr decay), the per-iteration schedule, the metric and what gets logged.

Batches come from the datamodules as uint8 (images RGB [B,3,H,W], labels [B,H,W]); the module
normalises the images on their device (mmseg's data preprocessor) and casts the labels to int64.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger

from comer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from comer.metrics.segmentation import SegmentationIoU, format_table

from .task_module import TaskModule
from .visualization import as_palette, comparison_panel, save_png

INFERENCE_MODES = ("slide", "whole")
METRIC_TABLES_DIR = "metric_tables"
VAL_IMAGES_DIR = "val_images"


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"{name}={value!r} must be a positive int or a pair of them")
    return values


class SegmentationModule(TaskModule):
    """Args:
        model: the segmentor (nn.Module with ``loss`` and ``inference``).
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_`` of torch.optim.AdamW); its lr and
            weight_decay are spread over layer-decayed groups.
        scheduler: factory ``(optimizer, max_iters) -> LRScheduler`` (e.g. a partial of
            ``comer.training.poly_warmup_scheduler``), stepped every optimizer step; max_iters comes
            from the trainer (max_steps).
        layer_decay: layer-wise lr decay rate (1.0 = off).
        num_layers: ViT depth for layer decay; None reads ``len(model.backbone.vit.blocks)``.
        no_weight_decay_names: extra parameter names (or trailing parts) without weight decay.
        num_classes, class_names, ignore_index: the label space.
        inference_mode, crop_size, stride, flip, scales: the test-time recipe. ``scales`` other than
            ``(1.0,)`` need batches with one view per scale (the datamodule's ``test_ratios``, which the
            configs set to these scales).
        num_val_images_to_log: validation pictures written per validation run (rank 0, first batches).
        palette: [num_classes, 3] RGB colours for the pictures (None: a generated palette).
        image_mean, image_std: the normalisation on the 0..255 scale, applied on the device to the
            loader's uint8 images (and undone to draw the validation pictures).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        layer_decay: float,
        num_classes: int,
        class_names: Sequence[str],
        inference_mode: str,
        crop_size: int | Sequence[int],
        stride: int | Sequence[int],
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        ignore_index: int = 255,
        num_layers: int | None = None,
        no_weight_decay_names: Sequence[str] = (),
        num_val_images_to_log: int = 4,
        palette: Sequence[Sequence[int]] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(model, optimizer, scheduler, layer_decay, num_layers, no_weight_decay_names)
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode={inference_mode!r} not in {INFERENCE_MODES}")
        if num_val_images_to_log < 0:
            raise ValueError(f"num_val_images_to_log={num_val_images_to_log} must be >= 0")
        self.num_classes = num_classes
        self.class_names = [str(n) for n in class_names]
        self.ignore_index = ignore_index
        self.inference_kwargs = dict(mode=inference_mode, crop_size=_pair(crop_size, "crop_size"),
                                     stride=_pair(stride, "stride"), flip=bool(flip))
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales={list(scales)} must be one or more positive ratios")
        self.num_val_images_to_log = num_val_images_to_log
        self.palette = as_palette(None if palette is None else [[int(c) for c in rgb] for rgb in palette],
                                  num_classes)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        # Plain Python values only (Hydra hands over ListConfigs) so checkpoints load with weights_only=True;
        # the keys are the constructor's, so load_from_checkpoint(path, model=..., optimizer=..., scheduler=...) works.
        self.save_hyperparameters(dict(
            layer_decay=self.layer_decay, num_layers=num_layers, no_weight_decay_names=list(self.no_weight_decay_names),
            num_classes=num_classes, class_names=self.class_names, ignore_index=ignore_index,
            inference_mode=inference_mode, crop_size=list(self.inference_kwargs["crop_size"]),
            stride=list(self.inference_kwargs["stride"]), flip=bool(flip), scales=list(self.scales),
            num_val_images_to_log=num_val_images_to_log,
            palette=self.palette.tolist(), image_mean=list(self.image_mean), image_std=list(self.image_std)),
            logger=False)
        self.val_metric = SegmentationIoU(num_classes, ignore_index=ignore_index)
        self.test_metric = SegmentationIoU(num_classes, ignore_index=ignore_index)
        self._panels: list[tuple[str, np.ndarray]] = []

    # ------------------------------------------------------------------ inputs
    def normalize(self, images: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """The loader's uint8 RGB images -> the network's float32 input on their device: (x - image_mean)
        / image_std, padding outside ``image_sizes`` ((h, w) per image) set to 0 as mmseg's
        normalise-then-pad gives."""
        return normalize_images(images, image_sizes, self.image_mean, self.image_std)

    def _test_views(self, batch: dict) -> list[torch.Tensor]:
        """The normalised test input of a batch: its image, or one view per test scale."""
        ratios = tuple(float(r) for r in batch.get("ratios", (1.0,)))
        if ratios != self.scales:
            raise ValueError(
                f"module.scales={list(self.scales)} but the batch holds test views for the ratios {list(ratios)}; the "
                f"datamodule's test_ratios must equal module.scales (the data configs set it to ${{module.scales}})")
        return [self.normalize(view) for view in batch.get("views", (batch["image"],))]

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = self.normalize(batch["image"], batch.get("image_sizes"))
        losses = self.model.loss(images, batch["label"].long())
        return self.total_loss(losses, images.shape[0], list(batch.get("path", [])), batch_idx)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.log_throughput(batch["image"].shape[0])

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_labels(self, views: torch.Tensor | Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        """[B, *output_size] int64 class map from the test recipe (slide/whole, flip) over the normalised
        test view(s) (one per scale)."""
        scores = self.model.inference(views, output_size=tuple(output_size), **self.inference_kwargs)
        if tuple(scores.shape[-2:]) != tuple(output_size):
            scores = F.interpolate(scores, size=tuple(output_size), mode="bilinear", align_corners=False)
        return scores.argmax(dim=1)

    def _evaluation_step(self, batch: dict, metric: SegmentationIoU) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Predicted class maps [B, H, W] at the label size (added to ``metric``) and the normalised test
        views. A batch whose samples were all left out as unreadable (``data.skip_unreadable``) has B = 0
        and scores nothing."""
        labels = batch["label"].long()
        if labels.shape[0] == 0:
            return labels.new_empty((0, *labels.shape[-2:])), []
        views = self._test_views(batch)
        preds = self.predict_labels(views, labels.shape[-2:])
        metric.update(preds, labels)
        return preds, views

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        preds, views = self._evaluation_step(batch, self.val_metric)
        if preds.shape[0] and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            images = views[0] if "views" not in batch else self.normalize(batch["image"])
            self._collect_panels(batch, images, preds)

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Returns the predicted class maps so callbacks (e.g. a submission writer) can save them."""
        return self._evaluation_step(batch, self.test_metric)[0]

    def predict_step(self, batch: dict, batch_idx: int) -> list[torch.Tensor]:
        """One [H, W] class map per image: at the label's size when the batch has labels, else at the batch's
        ``output_size`` when it has one (unlabelled images: their original size), else at the input's."""
        size = batch["label"].shape[-2:] if "label" in batch else batch.get("output_size", batch["image"].shape[-2:])
        if batch["image"].shape[0] == 0:
            return []
        return list(self.predict_labels(self._test_views(batch), size).cpu())

    def on_validation_epoch_start(self) -> None:
        self._panels = []

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_metric, "val")
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write_panels()
        self._panels = []

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")

    def _log_metric(self, metric: SegmentationIoU, stage: str) -> dict:
        results = metric.compute()
        metric.reset()
        values = {f"{stage}/{key}": results[key] for key in ("mIoU", "mAcc", "aAcc")}
        for name, iou in zip(self.class_names, results["IoU"]):
            values[f"{stage}/IoU/{name}"] = iou
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()}, sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._report_table(results, stage)
        return results

    def _report_table(self, results: dict, stage: str) -> None:
        """The per-class IoU table: printed, saved under the run directory, and to W&B as a table."""
        table = format_table(results, self.class_names)
        self.print(f"{stage} at step {self.global_step}:\n{table}")
        path = self.run_dir() / METRIC_TABLES_DIR / f"{stage}_step_{self.global_step:06d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")
        rows = [[name, float(iou), float(acc)] for name, iou, acc in zip(self.class_names, results["IoU"], results["Acc"])]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{stage}/per_class", columns=["class", "IoU", "Acc"], data=rows,
                                 step=self.global_step)

    # ------------------------------------------------------------------ pictures
    def _collect_panels(self, batch: dict, images: torch.Tensor, preds: torch.Tensor) -> None:
        """``images``: the normalised test images (the pictures undo the normalisation, as before it
        moved to the device: the same pixels)."""
        paths = list(batch.get("path", []))
        for i in range(preds.shape[0]):
            if len(self._panels) >= self.num_val_images_to_log:
                return
            name = Path(paths[i]).stem if i < len(paths) else f"image{len(self._panels)}"
            panel = comparison_panel(images[i], preds[i], batch["label"][i], self.class_names, self.palette,
                                     self.ignore_index, self.image_mean, self.image_std)
            self._panels.append((name, panel))

    def val_images_dir(self) -> Path:
        return self.run_dir() / VAL_IMAGES_DIR / f"step_{self.global_step:06d}"

    def _write_panels(self) -> None:
        if not self._panels:
            return
        directory = self.val_images_dir()
        for index, (name, panel) in enumerate(self._panels):
            save_png(panel, directory / f"{index:02d}_{name}.png")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/images", images=[p for _, p in self._panels],
                                 caption=[f"{n}: image | prediction | ground truth" for n, _ in self._panels],
                                 step=self.global_step)
