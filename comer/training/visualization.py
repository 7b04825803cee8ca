"""Validation pictures: the image beside the image overlaid with predicted and with true class colours."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OVERLAY_OPACITY = 0.5
PIXEL_MAX = 255.0


def default_palette(num_classes: int) -> np.ndarray:
    """[num_classes, 3] uint8 colours spreading the bits of the class index over R, G, B (PASCAL VOC style)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, colour, shift = index + 1, [0, 0, 0], 7
        while value:
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
        palette[index] = colour
    return palette


def as_palette(palette: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    if palette is None:
        return default_palette(num_classes)
    array = np.asarray(palette, dtype=np.int64)
    if array.shape != (num_classes, 3) or array.min() < 0 or array.max() > 255:
        raise ValueError(f"palette must be {num_classes} RGB triples in 0..255, got shape {array.shape}")
    return array.astype(np.uint8)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3,H,W] normalised float -> [H,W,3] uint8; mean/std on the 0..255 pixel scale (as the data transforms)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = image.detach().float().cpu() * std_t + mean_t
    return pixels.clamp(0, PIXEL_MAX).round().to(torch.uint8).permute(1, 2, 0).numpy()


def overlay(rgb: np.ndarray, label_map: np.ndarray, palette: np.ndarray, ignore_index: int,
            opacity: float = OVERLAY_OPACITY) -> np.ndarray:
    """Blend class colours into ``rgb``; ignored pixels keep the image colour."""
    out = rgb.astype(np.float32)
    valid = (label_map != ignore_index) & (label_map >= 0) & (label_map < len(palette))
    colours = palette[np.where(valid, label_map, 0)].astype(np.float32)
    out[valid] = (1.0 - opacity) * out[valid] + opacity * colours[valid]
    return out.round().astype(np.uint8)


def comparison_panel(image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, palette: np.ndarray,
                     ignore_index: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[H, 3W, 3] uint8: image | prediction overlay | ground-truth overlay, at the label's size."""
    size = tuple(label.shape[-2:])
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    rgb = denormalize(image, mean, std)
    pred_np = pred.detach().cpu().numpy()
    label_np = label.detach().cpu().numpy()
    return np.concatenate([rgb, overlay(rgb, pred_np, palette, ignore_index),
                           overlay(rgb, label_np, palette, ignore_index)], axis=1)


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
