"""Dataset-level semantic segmentation metrics (mmseg's ``mIoU`` evaluation).

Intersection, union, prediction and label areas are summed per class over the whole set (sum
reduction, so DDP-correct); IoU and accuracy are computed once from the totals, not averaged
over images.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

STATES = ("area_intersect", "area_union", "area_pred", "area_label")


class SegmentationIoU(Metric):
    """``update(preds, target)`` with ``preds`` class ids [B,H,W] (int) or scores [B,C,H,W]
    (argmax over C; logits or probabilities) and ``target`` [B,H,W] with ``ignore_index`` pixels
    left out. ``compute()`` -> ``{"mIoU", "mAcc", "aAcc", "IoU", "Acc"}``; ``IoU``/``Acc`` are
    per-class tensors, NaN for a class with zero union / zero label area, and the means skip NaN
    (mmseg's ``nanmean``)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        for name in STATES:
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def _class_ids(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if preds.dim() == 4:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"score preds have {preds.shape[1]} channels, num_classes={self.num_classes}")
            preds = preds.argmax(dim=1)
        elif preds.dim() != 3 or preds.is_floating_point():
            raise ValueError(
                f"preds must be int class ids [B,H,W] or scores [B,C,H,W], got {preds.dtype} {tuple(preds.shape)}"
            )
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        return preds

    def _per_class(self, class_ids: torch.Tensor) -> torch.Tensor:
        return torch.bincount(class_ids, minlength=self.num_classes).to(torch.float64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds = self._class_ids(preds, target)
        valid = target != self.ignore_index
        labels = target[valid].long()
        predicted = preds[valid].long()
        for name, values in (("target", labels), ("preds", predicted)):
            if values.numel() and (values.min() < 0 or values.max() >= self.num_classes):
                bad = torch.unique(values[(values < 0) | (values >= self.num_classes)])[:10].tolist()
                raise ValueError(
                    f"{name} hold class ids {bad} outside [0, {self.num_classes}) "
                    f"(ignore_index={self.ignore_index})"
                )
        intersect = self._per_class(labels[predicted == labels])
        area_pred = self._per_class(predicted)
        area_label = self._per_class(labels)
        self.area_intersect += intersect
        self.area_pred += area_pred
        self.area_label += area_label
        self.area_union += area_pred + area_label - intersect

    def compute(self) -> dict[str, torch.Tensor]:
        iou = self.area_intersect / self.area_union  # 0/0 -> NaN: class absent from preds and labels
        acc = self.area_intersect / self.area_label
        return {
            "mIoU": iou.nanmean(),
            "mAcc": acc.nanmean(),
            "aAcc": self.area_intersect.sum() / self.area_label.sum(),
            "IoU": iou,
            "Acc": acc,
        }


def format_table(result: dict[str, torch.Tensor], class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU / Acc (in %) and the summary line, as printable text."""
    iou, acc = result["IoU"], result["Acc"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for {len(iou)} classes")
    width = max(len("Class"), *(len(name) for name in names))

    def pct(value: torch.Tensor) -> str:
        return "nan" if torch.isnan(value) else f"{100 * float(value):.2f}"

    lines = [f"{'Class':<{width}}  {'IoU':>7}  {'Acc':>7}"]
    lines += [f"{name:<{width}}  {pct(i):>7}  {pct(a):>7}" for name, i, a in zip(names, iou, acc)]
    lines.append(f"mIoU {pct(result['mIoU'])}  mAcc {pct(result['mAcc'])}  aAcc {pct(result['aAcc'])}")
    return "\n".join(lines)
