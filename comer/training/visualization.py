"""Pictures of predictions: class colours blended into the image, captions over each column and a legend
of the classes present (name and colour swatch), drawn with Pillow's built-in font (nothing downloaded).

- ``comparison_panel``: a validation picture, image | prediction | ground truth;
- ``labelled_overlay``: one image with its predicted classes (``eval.show_dir``, ``predict.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

OVERLAY_OPACITY = 0.5
PIXEL_MAX = 255.0
PANEL_CAPTIONS = ("image", "prediction", "ground truth")

# Text: the font grows with the image column (1 px per FONT_SIZE_DIVISOR px of width), within these bounds.
FONT_SIZE_DIVISOR = 24
MIN_FONT_SIZE = 10
MAX_FONT_SIZE = 32
TEXT_PADDING = 3  # around each line of text, and between a legend entry's swatch and its name
LEGEND_ENTRY_GAP = 10  # between legend entries on a row
BAND_COLOUR = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
SWATCH_OUTLINE = (96, 96, 96)  # so a class coloured like the band still shows its swatch
TEXT_SAMPLE = "Ag"  # ascender and descender: the height of a line of text


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


def present_classes(label_maps: Sequence[np.ndarray], num_classes: int) -> list[int]:
    """The class ids (0..num_classes-1) found in any of ``label_maps``, ascending; anything else (the
    ignore index) is left out."""
    found: set[int] = set()
    for label_map in label_maps:
        found.update(int(v) for v in np.unique(np.asarray(label_map)))
    return sorted(v for v in found if 0 <= v < num_classes)


def label_font(column_width: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in font, sized for an image column ``column_width`` pixels wide."""
    size = min(MAX_FONT_SIZE, max(MIN_FONT_SIZE, column_width // FONT_SIZE_DIVISOR))
    return ImageFont.load_default(size=size)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    return font.getbbox(TEXT_SAMPLE)[3]  # (left, top, right, bottom) from the top of the line


def caption_band(captions: Sequence[str], column_width: int) -> np.ndarray:
    """[h, len(captions) * column_width, 3] uint8: each caption centred over its column."""
    font = label_font(column_width)
    height = _line_height(font) + 2 * TEXT_PADDING
    band = Image.new("RGB", (column_width * len(captions), height), BAND_COLOUR)
    draw = ImageDraw.Draw(band)
    for index, caption in enumerate(captions):
        centre = index * column_width + column_width / 2
        draw.text((centre, TEXT_PADDING), caption, fill=TEXT_COLOUR, font=font, anchor="ma")
    return np.asarray(band)


def legend_band(class_ids: Sequence[int], class_names: Sequence[str], palette: np.ndarray, width: int,
                column_width: int) -> np.ndarray:
    """[h, width, 3] uint8: a colour swatch and the name of each class in ``class_ids``, left to right,
    wrapping onto new rows (an entry wider than ``width`` gets a row of its own and is cut at the edge).
    No classes: an empty (0-row) band."""
    if not class_ids:
        return np.zeros((0, width, 3), dtype=np.uint8)
    font = label_font(column_width)
    line = _line_height(font)
    row_height = line + 2 * TEXT_PADDING
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = []  # (class id, x, row)
    x, row = 0, 0
    for class_id in class_ids:
        entry_width = line + TEXT_PADDING + int(measure.textlength(class_names[class_id], font=font))
        if x > 0 and x + entry_width > width:
            x, row = 0, row + 1
        entries.append((class_id, x, row))
        x += entry_width + LEGEND_ENTRY_GAP
    band = Image.new("RGB", (width, (row + 1) * row_height), BAND_COLOUR)
    draw = ImageDraw.Draw(band)
    for class_id, left, entry_row in entries:
        top = entry_row * row_height + TEXT_PADDING
        draw.rectangle([left + TEXT_PADDING, top, left + TEXT_PADDING + line - 1, top + line - 1],
                       fill=tuple(int(c) for c in palette[class_id]), outline=SWATCH_OUTLINE)
        draw.text((left + 2 * TEXT_PADDING + line, top), class_names[class_id], fill=TEXT_COLOUR, font=font)
    return np.asarray(band)


def titled_panel(columns: Sequence[np.ndarray], captions: Sequence[str] | None, class_ids: Sequence[int],
                 class_names: Sequence[str], palette: np.ndarray) -> np.ndarray:
    """Equal-sized [H, W, 3] uint8 ``columns`` side by side, their captions above (None: no captions) and
    the legend of ``class_ids`` below."""
    body = np.concatenate(list(columns), axis=1)
    column_width = columns[0].shape[1]
    parts = [body, legend_band(class_ids, class_names, palette, body.shape[1], column_width)]
    if captions is not None:
        parts.insert(0, caption_band(captions, column_width))
    return np.concatenate(parts, axis=0)


def labelled_overlay(rgb: np.ndarray, label_map: np.ndarray, class_names: Sequence[str], palette: np.ndarray,
                     ignore_index: int) -> np.ndarray:
    """[H + legend, W, 3] uint8: ``rgb`` blended with the colours of ``label_map``'s classes, their legend
    below."""
    classes = present_classes([label_map], len(class_names))
    return titled_panel([overlay(rgb, label_map, palette, ignore_index)], None, classes, class_names, palette)


def comparison_panel(image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, class_names: Sequence[str],
                     palette: np.ndarray, ignore_index: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[caption + H + legend, 3W, 3] uint8: image | prediction overlay | ground-truth overlay at the label's
    size, captioned, with the legend of the classes in either."""
    size = tuple(label.shape[-2:])
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    rgb = denormalize(image, mean, std)
    pred_np = pred.detach().cpu().numpy()
    label_np = label.detach().cpu().numpy()
    columns = [rgb, overlay(rgb, pred_np, palette, ignore_index), overlay(rgb, label_np, palette, ignore_index)]
    classes = present_classes([pred_np, label_np], len(class_names))
    return titled_panel(columns, PANEL_CAPTIONS, classes, class_names, palette)


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
