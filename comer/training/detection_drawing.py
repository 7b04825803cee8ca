"""Validation pictures for detection: predicted boxes, masks and class names beside the ground truth, captioned,
with the legend of the classes drawn."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .visualization import OVERLAY_OPACITY, present_classes, titled_panel

BOX_WIDTH = 2
LABEL_PADDING = 2
TEXT_COLOUR = (255, 255, 255)
PANEL_CAPTIONS = ("prediction", "ground truth")


def draw_instances(rgb: np.ndarray, boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None,
                   class_names: Sequence[str], palette: np.ndarray, scores: torch.Tensor | None = None,
                   opacity: float = OVERLAY_OPACITY) -> np.ndarray:
    """[H, W, 3] uint8 with each instance's mask blended in its class colour, its box outlined and its
    class name (and score) written at the box's top-left corner."""
    height, width = rgb.shape[:2]
    out = rgb.astype(np.float32)
    labels_np = labels.detach().cpu().numpy().astype(np.int64)
    if masks is not None and len(labels_np):
        masks_np = masks.detach().cpu().numpy()[:, :height, :width].astype(bool)
        for mask, label in zip(masks_np, labels_np):
            out[mask] = (1.0 - opacity) * out[mask] + opacity * palette[label].astype(np.float32)
    image = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes_np = boxes.detach().cpu().float().numpy()
    scores_np = None if scores is None else scores.detach().cpu().float().numpy()
    for index, (box, label) in enumerate(zip(boxes_np, labels_np)):
        colour = tuple(int(c) for c in palette[label])
        draw.rectangle([float(v) for v in box], outline=colour, width=BOX_WIDTH)
        text = class_names[label] if scores_np is None else f"{class_names[label]} {scores_np[index]:.2f}"
        left, top, right, bottom = draw.textbbox((float(box[0]), float(box[1])), text)
        draw.rectangle([left, top, right + LABEL_PADDING, bottom + LABEL_PADDING], fill=colour)
        draw.text((float(box[0]) + LABEL_PADDING / 2, float(box[1]) + LABEL_PADDING / 2), text, fill=TEXT_COLOUR)
    return np.asarray(image)


def _drawn_predictions(rgb: np.ndarray, prediction: dict, class_names: Sequence[str], palette: np.ndarray,
                       score_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The predictions scoring at least ``score_threshold`` drawn on ``rgb``, and their labels."""
    keep = prediction["scores"] >= score_threshold
    drawn = draw_instances(rgb, prediction["boxes"][keep], prediction["labels"][keep],
                           prediction["masks"][keep] if "masks" in prediction else None, class_names, palette,
                           scores=prediction["scores"][keep])
    return drawn, prediction["labels"][keep].detach().cpu().numpy()


def _as_rgb(image: torch.Tensor) -> np.ndarray:
    return image.detach().cpu().permute(1, 2, 0).numpy()


def detection_overlay(image: torch.Tensor, prediction: dict, class_names: Sequence[str], palette: np.ndarray,
                      score_threshold: float) -> np.ndarray:
    """[H + legend, W, 3] uint8: the predictions scoring at least ``score_threshold`` on the uint8 [3, H, W]
    input image (unpadded), with the legend of their classes below."""
    drawn, labels = _drawn_predictions(_as_rgb(image), prediction, class_names, palette, score_threshold)
    return titled_panel([drawn], None, present_classes([labels], len(class_names)), class_names, palette)


def detection_panel(image: torch.Tensor, prediction: dict, target: dict, class_names: Sequence[str],
                    palette: np.ndarray, score_threshold: float) -> np.ndarray:
    """[caption + H + legend, 2W, 3] uint8: predictions scoring at least ``score_threshold`` | ground truth,
    on the uint8 [3, H, W] input image (unpadded), captioned, with the legend of the classes drawn in either."""
    rgb = _as_rgb(image)
    predicted, labels = _drawn_predictions(rgb, prediction, class_names, palette, score_threshold)
    truth = draw_instances(rgb, target["boxes"], target["labels"], target.get("masks"), class_names, palette)
    classes = present_classes([labels, target["labels"].detach().cpu().numpy()], len(class_names))
    return titled_panel([predicted, truth], PANEL_CAPTIONS, classes, class_names, palette)
