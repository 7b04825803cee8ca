"""DetectionModule: the Lightning side of instance segmentation (Mask R-CNN losses, COCOeval, pictures).

The network is a built detector (``comer.models.MaskRCNN``: ``forward(images, image_sizes, gt_boxes,
gt_labels, gt_masks) -> losses`` and ``predict(images, image_sizes) -> detections``); this module owns
the optimizer (layer-wise lr decay), the per-iteration schedule, the COCO metric and what gets logged.

Batches come from the COCO datamodule (``comer.data.DetectionCollate``): uint8 images padded to a
multiple of 32, each image's size, original size and scale factor, and the targets; the module
normalises the images on their device.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.loggers import WandbLogger

from comer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from comer.metrics.coco import IOU_TYPES, CocoMetric

from .detection_drawing import detection_panel
from .task_module import TaskModule
from .visualization import as_palette, save_png

VAL_IMAGES_DIR = "val_images"
PREDICTIONS_FILE_PREFIX = "predictions/coco_results"


class DetectionModule(TaskModule):
    """Args (beyond ``TaskModule``'s):
        num_classes, class_names: the label space (contiguous labels 0..num_classes-1).
        iou_types: what COCOeval scores ("bbox", "segm").
        num_val_images_to_log: validation pictures written per validation run (rank 0, first batches).
        draw_score_threshold: detections drawn in those pictures score at least this.
        palette: [num_classes, 3] RGB colours (None: a generated palette).
        image_mean, image_std: normalisation on the 0..255 scale, applied on the device.
        save_predictions: also write the COCO results json (bbox and segm) of each evaluation under the
            run directory (``predictions/coco_results.<type>.json``), readable by ``COCO.loadRes``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        layer_decay: float,
        num_classes: int,
        class_names: Sequence[str],
        num_layers: int | None = None,
        no_weight_decay_names: Sequence[str] = (),
        iou_types: Sequence[str] = IOU_TYPES,
        num_val_images_to_log: int = 4,
        draw_score_threshold: float = 0.3,
        palette: Sequence[Sequence[int]] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        save_predictions: bool = False,
    ) -> None:
        super().__init__(model, optimizer, scheduler, layer_decay, num_layers, no_weight_decay_names)
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        if num_val_images_to_log < 0:
            raise ValueError(f"num_val_images_to_log={num_val_images_to_log} must be >= 0")
        self.num_classes = num_classes
        self.class_names = [str(n) for n in class_names]
        self.iou_types = tuple(iou_types)
        self.num_val_images_to_log = num_val_images_to_log
        self.draw_score_threshold = float(draw_score_threshold)
        self.palette = as_palette(None if palette is None else [[int(c) for c in rgb] for rgb in palette], num_classes)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.save_predictions = bool(save_predictions)
        self.save_hyperparameters(dict(
            layer_decay=self.layer_decay, num_layers=num_layers, no_weight_decay_names=list(self.no_weight_decay_names),
            num_classes=num_classes, class_names=self.class_names, iou_types=list(self.iou_types),
            num_val_images_to_log=num_val_images_to_log, draw_score_threshold=self.draw_score_threshold,
            palette=self.palette.tolist(), image_mean=list(self.image_mean), image_std=list(self.image_std)),
            logger=False)
        self.metric: CocoMetric | None = None
        self._panels: list[tuple[str, np.ndarray]] = []

    def setup(self, stage: str) -> None:
        """The metric needs the validation annotations and the label -> category id map of the data."""
        datamodule = self.trainer.datamodule
        if stage in ("fit", "validate", "test") and datamodule is not None:
            if datamodule.val_dataset is None:
                datamodule.setup(stage)
            self.metric = CocoMetric(annotation_file=datamodule.val_annotation_file,
                                     label_to_category_id=datamodule.label_to_category_id, iou_types=self.iou_types)

    # ------------------------------------------------------------------ training
    def normalize(self, batch: dict) -> torch.Tensor:
        return normalize_images(batch["images"], batch["image_sizes"], self.image_mean, self.image_std)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = self.normalize(batch)
        losses = self.model(images, batch["image_sizes"], batch["gt_boxes"], batch["gt_labels"], batch["gt_masks"])
        return self.total_loss(losses, images.shape[0], [str(i) for i in batch["image_ids"]], batch_idx)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.log_throughput(batch["images"].shape[0])

    # ------------------------------------------------------------------ evaluation
    def _evaluation_step(self, batch: dict) -> list[dict]:
        if batch["images"].shape[0] == 0:  # every image of the batch was unreadable and left out
            return []
        predictions = self.model.predict(self.normalize(batch), batch["image_sizes"])
        self.metric.update(predictions, batch["image_ids"], batch["image_sizes"], batch["original_sizes"],
                           batch["scale_factors"])
        return predictions

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        predictions = self._evaluation_step(batch)
        if predictions and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._collect_panels(batch, predictions)

    def test_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return self._evaluation_step(batch)

    def on_validation_epoch_start(self) -> None:
        self.metric.reset()
        self._panels = []

    def on_test_epoch_start(self) -> None:
        self.metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metric("val")
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write_panels()
        self._panels = []

    def on_test_epoch_end(self) -> None:
        self._log_metric("test")

    def _log_metric(self, stage: str) -> dict[str, float]:
        """COCOeval over every image of every rank (the metric gathers; the numbers are the same on all)."""
        results = self.metric.compute()
        if self.save_predictions and self.trainer.is_global_zero:
            self.metric.save_results(self.run_dir() / PREDICTIONS_FILE_PREFIX)
        self.log_dict({f"{stage}/{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in results.items()},
                      sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            summary = "  ".join(f"{k} {v:.3f}" for k, v in results.items() if k.endswith("mAP"))
            self.print(f"{stage} at step {self.global_step}: {summary}")
        return results

    # ------------------------------------------------------------------ pictures
    def _ground_truth(self, batch: dict, index: int) -> dict:
        """Image ``index``'s annotated boxes and labels in network-input pixels: the batch's targets, or
        (validation batches carry none) the annotation file's non-crowd instances, scaled."""
        if "gt_boxes" in batch:
            return {"boxes": batch["gt_boxes"][index], "labels": batch["gt_labels"][index],
                    "masks": batch["gt_masks"][index]}
        coco = self.metric.coco_gt
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[int(batch["image_ids"][index])], iscrowd=False))
        label_of = {int(c): label for label, c in enumerate(self.metric.label_to_category_id)}
        scale_y, scale_x = batch["scale_factors"][index]
        boxes = torch.tensor([[x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y]
                              for x, y, w, h in (a["bbox"] for a in annotations)], dtype=torch.float32).view(-1, 4)
        labels = torch.tensor([label_of[a["category_id"]] for a in annotations], dtype=torch.long)
        return {"boxes": boxes, "labels": labels}

    def _collect_panels(self, batch: dict, predictions: list[dict]) -> None:
        for i, prediction in enumerate(predictions):
            if len(self._panels) >= self.num_val_images_to_log:
                return
            h, w = batch["image_sizes"][i]
            panel = detection_panel(batch["images"][i, :, :h, :w], prediction, self._ground_truth(batch, i),
                                    self.class_names, self.palette, self.draw_score_threshold)
            self._panels.append((str(batch["image_ids"][i]), panel))

    def _write_panels(self) -> None:
        if not self._panels:
            return
        directory = self.run_dir() / VAL_IMAGES_DIR / f"step_{self.global_step:06d}"
        for index, (name, panel) in enumerate(self._panels):
            save_png(panel, directory / f"{index:02d}_{name}.png")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/images", images=[p for _, p in self._panels],
                                 caption=[f"image {n}: prediction | ground truth" for n, _ in self._panels],
                                 step=self.global_step)
