"""Albumentations pipelines reproducing the mmseg ADE20K recipe used by ViT-CoMer.

Train: ratio-range rescale of ``scale`` -> random crop with a cat-max-ratio -> horizontal flip ->
photometric distortion -> normalise -> pad to the crop size (label pad 255).
Test: keep-ratio rescale to fit ``scale`` -> resize up to a multiple of ``size_divisor`` ->
normalise (the label is not transformed).

The custom transforms draw all randomness from the albumentations per-transform generators
(``self.py_random`` / ``self.random_generator``), so ``seeding.seed_pipeline`` makes them
reproducible.
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255
CROP_MAX_ATTEMPTS = 10
HUE_PERIOD = 180  # OpenCV's uint8 hue range


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
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
        self.scale = _pair(scale, "scale")
        self.ratio_range = _range(ratio_range, "ratio_range")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        lo, hi = self.ratio_range
        ratio = lo if lo == hi else self.py_random.uniform(lo, hi)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = params["shape"][:2]
        return {"size": rescale_size(height, width, target)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
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
        self.crop_size = _pair(crop_size, "crop_size")
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
        values, counts = np.unique(label, return_counts=True)
        counts = counts[values != self.ignore_index]
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


class PhotoMetricDistortion(ImageOnlyTransform):
    """mmseg ``PhotoMetricDistortion`` on an RGB uint8 image.

    Each step happens with probability 1/2: brightness += U(-delta, delta); then contrast
    *= U(range) either second or last (coin flip); saturation (HSV S channel) *= U(range);
    hue += randint(-hue_delta, hue_delta) (mod 180, OpenCV uint8 HSV).
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
            img = _convert(img, beta=brightness)
        if contrast_first and contrast is not None:
            img = _convert(img, alpha=contrast)
        if saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + hue) % HUE_PERIOD).astype(np.uint8)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and contrast is not None:
            img = _convert(img, alpha=contrast)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def normalize(mean: Sequence[float], std: Sequence[float]) -> A.Normalize:
    """(x - mean) / std with mean/std on the 0-255 scale."""
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0, p=1.0)


def build_train_transform(
    crop_size: int | Sequence[int],
    scale: Sequence[int],
    ratio_range: Sequence[float],
    cat_max_ratio: float,
    flip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
    photometric: bool = True,
) -> A.Compose:
    """The mmseg ADE20K training pipeline; image uint8 RGB [H,W,3], mask uint8 [H,W] in."""
    crop = _pair(crop_size, "crop_size")
    steps: list = [
        RatioRangeResize(scale, ratio_range),
        CatMaxRatioCrop(crop, cat_max_ratio, ignore_index),
        A.HorizontalFlip(p=flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [
        normalize(mean, std),
        A.PadIfNeeded(
            min_height=crop[0],
            min_width=crop[1],
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
    ]
    return A.Compose(steps)


def build_test_transform(
    scale: Sequence[int],
    size_divisor: int | None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Keep-ratio resize to fit ``scale``, then up to a multiple of ``size_divisor`` (None: skip)."""
    steps: list = [RatioRangeResize(scale)]
    if size_divisor is not None:
        steps.append(ResizeToMultiple(size_divisor))
    steps.append(normalize(mean, std))
    return A.Compose(steps)
