"""COCO detection and instance segmentation metrics (pycocotools ``COCOeval``, bbox and segm).

``CocoMetric`` accumulates per-image predictions (mapped back to the original image and encoded to
RLE at once, so memory stays small), and ``compute()`` returns the 12 standard COCOeval numbers per
IoU type, named ``{bbox,segm}_{mAP, mAP_50, mAP_75, mAP_s, mAP_m, mAP_l, AR_1, AR_10, AR_100, AR_s,
AR_m, AR_l}`` (fractions in [0, 1]).

Meaning of the numbers (pycocotools'): an average over categories that have ground truth in the
evaluated images; ``-1`` where no category does (e.g. ``mAP_l`` on images without any large object,
or every number on images without ground truth). A model that predicts nothing scores 0 wherever
ground truth exists (pycocotools' ``loadRes`` cannot load an empty result list; we evaluate against an
empty result set instead). Evaluated images are those passed to ``update`` (all of val2017 in a full
validation; a subset with ``limit_val_batches``), not every image of the annotation file.

Segm results carry no ``bbox`` (as mmdet), so pycocotools takes a detection's area for the
small/medium/large split from its mask, not from its box.

Distributed: each rank ``update``s its own images; ``compute()`` gathers every rank's images to rank 0
(``torch.distributed.gather_object``), counts each ``image_id`` once (``DistributedSampler`` pads with
repeats), evaluates there and broadcasts the numbers, so every rank returns the same dict. Afterwards
rank 0 holds every rank's images (``save_results`` there writes the whole set); the other ranks keep
their own. Without an initialised process group it evaluates locally.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")
MASK_RESIZE_CHUNK = 16  # masks resized to the original image at once


def metric_names(iou_types: Sequence[str] = IOU_TYPES) -> list[str]:
    return [f"{t}_{name}" for t in iou_types for name in STAT_NAMES]


def _quiet(fn, *args, **kwargs):
    """Call a pycocotools function with its prints captured; returns (result, printed text)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn(*args, **kwargs)
    return result, buffer.getvalue()


def load_coco_gt(annotation_file: str | Path) -> COCO:
    """A pycocotools ``COCO`` of ``annotation_file`` (its prints silenced)."""
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file '{path}' does not exist")
    return _quiet(COCO, str(path))[0]


def _empty_results(coco_gt: COCO) -> COCO:
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    _quiet(empty.createIndex)
    return empty


def evaluate_results(
    coco_gt: COCO, results: list[dict], iou_type: str, image_ids: Sequence[int] | None = None
) -> dict[str, float]:
    """COCOeval of a results list (COCO results format) -> ``{f"{iou_type}_{name}": value}``.

    ``image_ids``: the images evaluated (default: every image of ``coco_gt``). An empty ``results``
    evaluates as a model that detects nothing.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    # loadRes adds keys to the result dicts: hand it copies.
    coco_dt = _quiet(coco_gt.loadRes, [dict(r) for r in results])[0] if results else _empty_results(coco_gt)
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _, table = _quiet(evaluator.summarize)
    log.info("COCO %s evaluation over %d images:\n%s", iou_type, len(evaluator.params.imgIds), table.rstrip())
    return {f"{iou_type}_{name}": float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def evaluate_results_file(
    annotation_file: str | Path | COCO, results_file: str | Path, iou_type: str,
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Evaluate a saved results json (as written by ``CocoMetric.save_results``) against the annotations."""
    coco_gt = annotation_file if isinstance(annotation_file, COCO) else load_coco_gt(annotation_file)
    results = json.loads(Path(results_file).read_text())
    return evaluate_results(coco_gt, results, iou_type, image_ids)


class CocoMetric:
    """Accumulates predictions per image; ``compute()`` -> the COCOeval numbers of ``iou_types``.

    Args:
        annotation_file: the ground truth (e.g. ``datamodule.val_annotation_file``); read at the first
            ``compute()``, on rank 0 only. Or pass ``coco_gt``, an already loaded pycocotools ``COCO``.
        label_to_category_id: category id of each contiguous label (``datamodule.label_to_category_id``).
        iou_types: ``("bbox", "segm")`` or one of them; ``"segm"`` needs ``masks`` in the predictions.
        mask_threshold: masks given as probabilities are binarised at this value after resizing.

    ``update(predictions, image_ids, image_sizes, original_sizes, scale_factors)`` per batch, with the
    batch's own keys (``comer.data.DetectionCollate``) and per image a prediction dict: ``boxes`` [N,4]
    x1y1x2y2 in network-input pixels, ``scores`` [N], ``labels`` [N] (0..C-1), ``masks`` [N,h',w'] bool
    or probabilities in network-input pixels (h' >= h, w' >= w: the padded or unpadded input). Boxes are
    divided by the scale factors and clipped to the original image; masks are cropped to the image
    size, resized (bilinear) to the original size and thresholded, then RLE-encoded. An image seen
    again is ignored. ``compute()`` does not reset: call ``reset()`` at the start of each validation.
    """

    def __init__(
        self,
        annotation_file: str | Path | None = None,
        label_to_category_id: Sequence[int] | None = None,
        iou_types: Sequence[str] = IOU_TYPES,
        mask_threshold: float = 0.5,
        coco_gt: COCO | None = None,
    ) -> None:
        if (annotation_file is None) == (coco_gt is None):
            raise ValueError("give exactly one of annotation_file and coco_gt")
        if label_to_category_id is None or len(label_to_category_id) == 0:
            raise ValueError("label_to_category_id must list the category id of each label")
        self.iou_types = tuple(iou_types)
        if not self.iou_types or any(t not in IOU_TYPES for t in self.iou_types):
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types!r}")
        self.annotation_file = None if annotation_file is None else Path(annotation_file)
        self._coco_gt = coco_gt
        self.label_to_category_id = np.asarray([int(c) for c in label_to_category_id], dtype=np.int64)
        self.mask_threshold = float(mask_threshold)
        self._images: dict[int, dict[str, Any]] = {}
        self.num_repeats = 0

    # -- accumulation --------------------------------------------------------------------------------
    def reset(self) -> None:
        self._images = {}
        self.num_repeats = 0

    @property
    def image_ids(self) -> list[int]:
        return sorted(self._images)

    def update(
        self,
        predictions: Sequence[dict[str, torch.Tensor]],
        image_ids: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
        scale_factors: Sequence[tuple[float, float]],
    ) -> None:
        n = len(predictions)
        if not len(image_ids) == len(image_sizes) == len(original_sizes) == len(scale_factors) == n:
            raise ValueError(
                f"update got {n} predictions, {len(image_ids)} image_ids, {len(image_sizes)} image_sizes, "
                f"{len(original_sizes)} original_sizes and {len(scale_factors)} scale_factors"
            )
        for pred, image_id, image_size, original_size, scale in zip(
            predictions, image_ids, image_sizes, original_sizes, scale_factors
        ):
            image_id = int(image_id)
            if image_id in self._images:
                self.num_repeats += 1
                continue
            self._images[image_id] = self._encode(pred, image_id, image_size, original_size, scale)

    def _encode(self, pred, image_id, image_size, original_size, scale) -> dict[str, Any]:
        boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(pred["scores"]).detach().to("cpu", torch.float64).reshape(-1)
        labels = torch.as_tensor(pred["labels"]).detach().to("cpu", torch.int64).reshape(-1)
        count = len(boxes)
        if len(scores) != count or len(labels) != count:
            raise ValueError(f"image {image_id}: {count} boxes, {len(scores)} scores and {len(labels)} labels")
        num_classes = len(self.label_to_category_id)
        if count and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"image {image_id}: labels outside 0..{num_classes - 1}: {labels.unique().tolist()}")
        (h, w), (height, width), (sy, sx) = image_size, original_size, scale
        boxes = boxes / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        entry: dict[str, Any] = {
            "boxes": xywh.numpy(),
            "scores": scores.numpy(),
            "category_ids": self.label_to_category_id[labels.numpy()],
        }
        if "segm" in self.iou_types:
            if "masks" not in pred:
                raise ValueError(f"image {image_id}: iou_types includes 'segm' but the prediction has no 'masks'")
            entry["rles"] = self._encode_masks(torch.as_tensor(pred["masks"]), image_id, (h, w), (height, width))
            if len(entry["rles"]) != count:
                raise ValueError(f"image {image_id}: {len(entry['rles'])} masks for {count} boxes")
        return entry

    def _encode_masks(self, masks: torch.Tensor, image_id: int, image_size, original_size) -> list[dict]:
        (h, w), (height, width) = image_size, original_size
        if masks.dim() != 3 or masks.shape[1] < h or masks.shape[2] < w:
            raise ValueError(
                f"image {image_id}: masks must be [N, h', w'] covering the input image {h}x{w}, got {tuple(masks.shape)}"
            )
        rles: list[dict] = []
        for start in range(0, len(masks), MASK_RESIZE_CHUNK):
            chunk = masks[start : start + MASK_RESIZE_CHUNK, :h, :w].detach()
            if (h, w) != (height, width):
                chunk = F.interpolate(chunk[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            binary = chunk >= self.mask_threshold if chunk.is_floating_point() else chunk.bool()
            array = np.asfortranarray(binary.to("cpu", torch.uint8).numpy().transpose(1, 2, 0))
            rles.extend(mask_utils.encode(array))
        return rles

    # -- results -------------------------------------------------------------------------------------
    def results(self, iou_type: str) -> list[dict]:
        """The accumulated predictions in the COCO results format (``bbox`` [x, y, w, h]; ``segmentation``
        RLE with ``counts`` as str; segm entries without ``bbox``)."""
        if iou_type not in self.iou_types:
            raise ValueError(f"iou_type {iou_type!r} is not among this metric's {self.iou_types}")
        out = []
        for image_id in sorted(self._images):
            entry = self._images[image_id]
            for i in range(len(entry["scores"])):
                result = {"image_id": image_id, "category_id": int(entry["category_ids"][i]),
                          "score": float(entry["scores"][i])}
                if iou_type == "bbox":
                    result["bbox"] = [float(v) for v in entry["boxes"][i]]
                else:
                    rle = entry["rles"][i]
                    result["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
                out.append(result)
        return out

    def save_results(self, prefix: str | Path) -> dict[str, Path]:
        """Write ``<prefix>.<iou_type>.json`` per IoU type (mmdet's naming); ``COCO.loadRes`` reads them."""
        written = {}
        for iou_type in self.iou_types:
            path = Path(f"{prefix}.{iou_type}.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.results(iou_type)))
            written[iou_type] = path
        return written

    # -- distributed ---------------------------------------------------------------------------------
    def state(self) -> dict[int, dict[str, Any]]:
        """This process's accumulated images (picklable), for ``merge`` on another process."""
        return self._images

    def merge(self, states: Sequence[dict[int, dict[str, Any]]]) -> None:
        """Add other processes' states; an image already present is kept once."""
        for state in states:
            for image_id, entry in state.items():
                if image_id in self._images:
                    self.num_repeats += 1
                else:
                    self._images[image_id] = entry

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    # -- evaluation ----------------------------------------------------------------------------------
    @property
    def coco_gt(self) -> COCO:
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self.annotation_file)
        return self._coco_gt

    def _evaluate_local(self) -> dict[str, float]:
        coco_gt = self.coco_gt
        if not self._images:
            raise RuntimeError("CocoMetric.compute() before any update(): no image to evaluate")
        unknown = sorted(set(self._images) - set(coco_gt.getImgIds()))
        if unknown:
            raise ValueError(
                f"{len(unknown)} image id(s) not in the ground truth {self.annotation_file or ''}: {unknown[:10]}"
            )
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            metrics.update(evaluate_results(coco_gt, self.results(iou_type), iou_type, self.image_ids))
        return metrics

    def compute(self) -> dict[str, float]:
        """Gather (when distributed), evaluate once, return the same numbers on every rank."""
        if not self._distributed():
            return self._evaluate_local()
        rank = dist.get_rank()
        gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(self._images, gathered, dst=0)
        payload: list[Any] = [None]
        if rank == 0:
            self.merge(gathered[1:])  # rank 0 keeps the union: save_results() there writes the whole set
            log.info("COCO evaluation: %d images from %d ranks (%d repeats counted once)",
                     len(self._images), len(gathered), self.num_repeats)
            try:
                payload[0] = self._evaluate_local()
            except Exception as exc:  # every rank must leave the broadcast; re-raised below
                payload[0] = exc
        dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], Exception):
            raise RuntimeError(f"COCO evaluation failed on rank 0: {payload[0]}") from (payload[0] if rank == 0 else None)
        return payload[0]
