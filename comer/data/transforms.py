"""Albumentations pipelines reproducing the mmseg ADE20K recipe used by ViT-CoMer.

Train: ratio-range rescale of ``scale`` -> random crop with a cat-max-ratio -> horizontal flip ->
photometric distortion.
Test: keep-ratio rescale to fit ``scale`` (times a test-time ratio) -> resize up to a multiple of
``size_divisor`` (the label is not transformed).

Images stay uint8 RGB [H, W, 3] on the CPU. The last two steps of mmseg's training pipeline,
normalise and pad to the crop size (image 0 after normalisation, label 255), happen later: the collate
pads (image 0, label 255) and records each image's size, and :func:`normalize_images` normalises the
batch on the device and sets the padding back to 0, which gives mmseg's numbers exactly.

The custom transforms draw all randomness from the albumentations per-transform generators
(``self.py_random`` / ``self.random_generator``), so ``seeding.seed_pipeline`` makes them
reproducible.
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255
CROP_MAX_ATTEMPTS = 10
HUE_PERIOD = 180  # OpenCV's uint8 hue range
LABEL_VALUES = 256  # labels are uint8
_UINT8_VALUES = np.arange(256, dtype=np.uint8)


def to_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v <= 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or two positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _range(value: Sequence[float], name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {value!r}")
    return lo, hi


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale`` size: the largest (h, w) with the same aspect that fits
    max(scale) on the long side and min(scale) on the short side (rounded half up)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class RatioRangeResize(DualTransform):
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``.

    A ratio r ~ U(ratio_range) scales ``scale`` to (int(s0*r), int(s1*r)); the image is then
    rescaled, keeping its aspect, to fit it (see ``rescale_size``). Image bilinear, label nearest.
    ``ratio_range=(1, 1)`` is the deterministic test-time resize.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0), p: float = 1.0):
        super().__init__(p=p)
        self.scale = to_pair(scale, "scale")
        self.ratio_range = _range(ratio_range, "ratio_range")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        lo, hi = self.ratio_range
        ratio = lo if lo == hi else self.py_random.uniform(lo, hi)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = params["shape"][:2]
        return {"size": rescale_size(height, width, target)}

    # cv2.resize to the input's own size is a copy, so the unchanged input is the same result.
    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(size):
            return img
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        if mask.shape[:2] == tuple(size):
            return mask
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range")


class ResizeToMultiple(DualTransform):
    """mmseg ``ResizeToMultiple``: resize each side up to the next multiple of ``size_divisor``."""

    def __init__(self, size_divisor: int, p: float = 1.0):
        super().__init__(p=p)
        if int(size_divisor) != size_divisor or size_divisor < 1:
            raise ValueError(f"size_divisor must be a positive int, got {size_divisor!r}")
        self.size_divisor = int(size_divisor)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        d = self.size_divisor
        height, width = params["shape"][:2]
        return {"size": (-(-height // d) * d, -(-width // d) * d)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(size):
            return img
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        if mask.shape[:2] == tuple(size):
            return mask
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size_divisor",)


class CatMaxRatioCrop(DualTransform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``.

    Crops min(crop, side) at a uniform offset. With ``cat_max_ratio < 1`` the crop is redrawn
    (up to ``max_attempts`` draws after the first) until it holds more than one class and no class
    covers ``cat_max_ratio`` or more of its labelled (non-ignore) pixels; the last draw is kept.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        cat_max_ratio: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        max_attempts: int = CROP_MAX_ATTEMPTS,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.crop_size = to_pair(crop_size, "crop_size")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio!r}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index
        self.max_attempts = max_attempts

    @property
    def targets_as_params(self) -> list[str]:
        return ["mask"]

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        top = self.py_random.randint(0, max(height - self.crop_size[0], 0))
        left = self.py_random.randint(0, max(width - self.crop_size[1], 0))
        return top, top + min(self.crop_size[0], height), left, left + min(self.crop_size[1], width)

    def _acceptable(self, label: np.ndarray) -> bool:
        """mmseg's test on ``np.unique`` counts, from a 256-bin histogram of the uint8 crop."""
        counts = np.bincount(label.reshape(-1), minlength=LABEL_VALUES)
        if 0 <= self.ignore_index < LABEL_VALUES:
            counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        box = self._draw(height, width)
        if self.cat_max_ratio < 1.0:
            label = data["mask"]
            for _ in range(self.max_attempts):
                if self._acceptable(label[box[0] : box[1], box[2] : box[3]]):
                    break
                box = self._draw(height, width)
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return img[box[0] : box[1], box[2] : box[3]]

    def apply_to_mask(self, mask: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return mask[box[0] : box[1], box[2] : box[3]]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "cat_max_ratio", "ignore_index", "max_attempts")


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """values * alpha + beta in float32, clipped to 0..255 and truncated to uint8 (as mmseg)."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _convert_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``_convert`` of every uint8 value: looking a pixel up in it is ``_convert`` of that pixel, bit
    for bit (the same float32 operations on the same value), at a fraction of the cost."""
    return _convert(_UINT8_VALUES, alpha, beta)


def _channel_table(channel: int, table: np.ndarray) -> np.ndarray:
    """A [1, 256, 3] cv2.LUT table mapping ``channel`` through ``table`` and the others to themselves."""
    tables = [table if c == channel else _UINT8_VALUES for c in range(3)]
    return np.stack(tables, axis=-1)[None]


class PhotoMetricDistortion(ImageOnlyTransform):
    """mmseg ``PhotoMetricDistortion`` on an RGB uint8 image.

    Each step happens with probability 1/2: brightness += U(-delta, delta); then contrast
    *= U(range) either second or last (coin flip); saturation (HSV S channel) *= U(range);
    hue += randint(-hue_delta, hue_delta) (mod 180, OpenCV uint8 HSV). Every step is a per-value
    uint8 -> uint8 map, applied as a 256-entry table (``cv2.LUT``); HSV as mmseg (OpenCV, from RGB
    here, from BGR there: the same hue, saturation and value).
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = _range(contrast_range, "contrast_range")
        self.saturation_range = _range(saturation_range, "saturation_range")
        self.hue_delta = int(hue_delta)

    def _maybe(self, draw):
        return draw() if self.py_random.random() < 0.5 else None

    def get_params(self) -> dict[str, Any]:
        rnd = self.py_random
        return {
            "brightness": self._maybe(lambda: rnd.uniform(-self.brightness_delta, self.brightness_delta)),
            "contrast_first": rnd.random() < 0.5,
            "contrast": self._maybe(lambda: rnd.uniform(*self.contrast_range)),
            "saturation": self._maybe(lambda: rnd.uniform(*self.saturation_range)),
            "hue": self._maybe(lambda: rnd.randint(-self.hue_delta, self.hue_delta - 1)),
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None,
        contrast_first: bool,
        contrast: float | None,
        saturation: float | None,
        hue: int | None,
        **params: Any,
    ) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError(f"PhotoMetricDistortion expects a uint8 image, got {img.dtype}")
        if brightness is not None:
            img = cv2.LUT(img, _convert_table(beta=brightness))
        if contrast_first and contrast is not None:
            img = cv2.LUT(img, _convert_table(alpha=contrast))
        if saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            img = cv2.cvtColor(cv2.LUT(hsv, _channel_table(1, _convert_table(alpha=saturation))), cv2.COLOR_HSV2RGB)
        if hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            shifted = ((_UINT8_VALUES.astype(np.int64) + hue) % HUE_PERIOD).astype(np.uint8)
            img = cv2.cvtColor(cv2.LUT(hsv, _channel_table(0, shifted)), cv2.COLOR_HSV2RGB)
        if not contrast_first and contrast is not None:
            img = cv2.LUT(img, _convert_table(alpha=contrast))
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def build_train_transform(
    crop_size: int | Sequence[int],
    scale: Sequence[int],
    ratio_range: Sequence[float],
    cat_max_ratio: float,
    flip_prob: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    photometric: bool = True,
) -> A.Compose:
    """The mmseg ADE20K training pipeline up to (not including) normalise and pad; image uint8 RGB
    [H,W,3] and mask uint8 [H,W] in, both at most ``crop_size`` out."""
    crop = to_pair(crop_size, "crop_size")
    steps: list = [
        RatioRangeResize(scale, ratio_range),
        CatMaxRatioCrop(crop, cat_max_ratio, ignore_index),
        A.HorizontalFlip(p=flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    return A.Compose(steps)


def build_test_transform(scale: Sequence[int], size_divisor: int | None, ratio: float = 1.0) -> A.Compose:
    """Keep-ratio resize to fit ``scale`` x ``ratio`` (each side truncated to an int, as mmseg's
    ``MultiScaleFlipAug`` makes its scales), then up to a multiple of ``size_divisor`` (None: skip);
    image uint8 RGB in and out."""
    if not ratio > 0:
        raise ValueError(f"test ratio must be > 0, got {ratio!r}")
    steps: list = [RatioRangeResize(scale, (ratio, ratio))]
    if size_divisor is not None:
        steps.append(ResizeToMultiple(size_divisor))
    return A.Compose(steps)


def normalize_images(
    images: torch.Tensor,
    image_sizes: Sequence[Sequence[int]] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 [B,3,H,W] RGB -> float32 (x - mean) * (1 / std), mean and std on the 0..255 scale, on
    the images' device. With ``image_sizes`` ((h, w) per image, the rest being padding), the padding
    is 0 afterwards, as mmseg's normalise-then-pad gives.

    The arithmetic is float32 subtract, then multiply by the float32 reciprocal of std: bit for bit
    what ``albumentations.Normalize(max_pixel_value=1)`` computes on the CPU (and mmcv's
    ``imnormalize`` up to the rounding of 1 / std).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(images.device)
    inv_std = torch.from_numpy(np.reciprocal(np.asarray(std, dtype=np.float32))).view(1, 3, 1, 1).to(images.device)
    out = images.to(torch.float32)
    out.sub_(mean_t).mul_(inv_std)
    if image_sizes is not None:
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image_sizes for a batch of {images.shape[0]}")
        for i, (height, width) in enumerate(image_sizes):
            out[i, :, int(height):] = 0
            out[i, :, :, int(width):] = 0
    return out
