"""Instance-level augmentation for detection, with mmdet 2.x semantics, on a compact sample.

A :class:`DetSample` holds the image (uint8 RGB [H,W,3]), boxes (float32 [N,4], x1 y1 x2 y2 in
pixel-corner coordinates: ``[0, 0, W, H]`` covers the whole image), labels (int64 [N]) and one mask
per instance kept compact until the geometry is final: a list of polygons (float64 arrays
``x0, y0, x1, y1, ...``, the COCO polygon format) or, for instances annotated as RLE, a uint8
bitmap [H,W]. Geometric steps move polygon vertices; :func:`finalize` rasterises every mask once
(pycocotools, the evaluator's own rasteriser) at the final size.

Steps are callables ``step(sample, rng) -> sample`` drawing all randomness from the numpy
``Generator`` they are handed, so one generator seeded per sample (``seeding.sample_seed``) makes a
sample's whole augmentation reproducible. The recipe (ViT-CoMer / DETR-style COCO training)::

    RandomFlip(0.5)
    OneOf([Resize(short 480..800, long <= 1333)],
          [Resize(short 400/500/600, long <= 1333), RandomCrop(384..600), Resize(short 480..800, ...)])
    RandomCrop(1024..1024)

Where a crop cuts an instance, its box is recomputed from its cropped mask at the end; an instance
whose cropped mask is empty is dropped (mmdet keeps the clipped box; we keep the tighter box).
Albumentations is not used here: it cannot carry polygons, and the recipe's multi-scale choice and
absolute-range crops are not albumentations transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, Union

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from comer.data.transforms import rescale_size

Polygons = list  # list[np.ndarray]: float64 [2k] arrays, x/y interleaved
InstanceMask = Union[Polygons, np.ndarray]  # polygons, or a uint8 bitmap [H,W]
Step = Callable[["DetSample", np.random.Generator], "DetSample"]

# mmdet's scale lists for the COCO recipe (short sides; the long side is capped at MAX_SIZE).
RECIPE_SHORT_SIDES = tuple(range(480, 801, 32))
RECIPE_CROP_POLICY_SHORT_SIDES = (400, 500, 600)
RECIPE_CROP_POLICY_CROP_SIZE = (384, 600)
RECIPE_CROP_SIZE = (1024, 1024)
RECIPE_MAX_SIZE = 1333
RECIPE_TEST_SCALE = (1333, 800)


@dataclass
class DetSample:
    """One image and its instances. ``scale`` = (height, width) scale of the current image relative to
    the original (the product of all resizes; crops do not change it). ``cut[i]``: instance i was cut by
    a crop (its box is recomputed from its mask in :func:`finalize`)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: list
    scale: tuple[float, float] = (1.0, 1.0)
    cut: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or len(self.labels) != n or len(self.masks) != n:
            raise ValueError(
                f"DetSample needs boxes [N,4], labels [N] and N masks; got boxes {self.boxes.shape}, "
                f"{len(self.labels)} labels, {len(self.masks)} masks"
            )
        if self.cut is None:
            self.cut = np.zeros(n, dtype=bool)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def select(self, keep: np.ndarray) -> "DetSample":
        """The sample with only the instances where ``keep`` (bool [N]) is true."""
        index = np.flatnonzero(keep)
        return replace(
            self, boxes=self.boxes[index], labels=self.labels[index], masks=[self.masks[i] for i in index],
            cut=self.cut[index],
        )


# -- geometry: deterministic functions ---------------------------------------------------------------
def hflip(sample: DetSample) -> DetSample:
    """Horizontal flip: x -> W - x for boxes and polygon vertices (mmdet's convention)."""
    width = sample.size[1]
    boxes = sample.boxes.copy()
    boxes[:, 0], boxes[:, 2] = width - sample.boxes[:, 2], width - sample.boxes[:, 0]
    masks = []
    for mask in sample.masks:
        if isinstance(mask, np.ndarray):
            masks.append(np.ascontiguousarray(mask[:, ::-1]))
        else:
            flipped = []
            for polygon in mask:
                polygon = polygon.copy()
                polygon[0::2] = width - polygon[0::2]
                flipped.append(polygon)
            masks.append(flipped)
    return replace(sample, image=np.ascontiguousarray(sample.image[:, ::-1]), boxes=boxes, masks=masks)


def resize(sample: DetSample, size: tuple[int, int]) -> DetSample:
    """Resize to ``size`` = (h, w): image bilinear, bitmaps nearest (pixel-centre aligned like the bilinear
    image resize; mmcv's ``INTER_NEAREST`` shifts by up to half a source pixel), boxes and vertices scaled by the
    per-axis factors new/old (as mmdet), boxes clipped to the image."""
    (height, width), (new_h, new_w) = sample.size, size
    if (new_h, new_w) == (height, width):
        return sample
    sy, sx = new_h / height, new_w / width
    image = cv2.resize(sample.image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    boxes = sample.boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
    masks = []
    for mask in sample.masks:
        if isinstance(mask, np.ndarray):
            masks.append(cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT))
        else:
            scaled = []
            for polygon in mask:
                polygon = polygon.copy()
                polygon[0::2] *= sx
                polygon[1::2] *= sy
                scaled.append(polygon)
            masks.append(scaled)
    scale = (sample.scale[0] * sy, sample.scale[1] * sx)
    return replace(sample, image=image, boxes=boxes.astype(np.float32), masks=masks, scale=scale)


def crop(sample: DetSample, top: int, left: int, height: int, width: int) -> DetSample:
    """Crop the window [top, top+height) x [left, left+width) (mmdet ``RandomCrop._crop_data``).

    Boxes are shifted and clipped; instances whose clipped box is empty are dropped; instances whose
    box was clipped are marked ``cut``. Polygon vertices are only shifted (the rasteriser clips them).
    """
    image = sample.image[top : top + height, left : left + width]
    crop_h, crop_w = image.shape[:2]
    shifted = sample.boxes - np.array([left, top, left, top], dtype=np.float32)
    boxes = shifted.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, crop_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, crop_h)
    masks = []
    for mask in sample.masks:
        if isinstance(mask, np.ndarray):
            masks.append(mask[top : top + height, left : left + width])
        else:
            moved = []
            for polygon in mask:
                polygon = polygon.copy()
                polygon[0::2] -= left
                polygon[1::2] -= top
                moved.append(polygon)
            masks.append(moved)
    cut = sample.cut | (boxes != shifted).any(axis=1)
    cropped = replace(sample, image=image, boxes=boxes, masks=masks, cut=cut)
    return cropped.select((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))


def rasterize(masks: Sequence[InstanceMask], height: int, width: int) -> np.ndarray:
    """Per-instance uint8 bitmaps [N, height, width]; polygons through pycocotools (union of parts).

    Each polygon instance is rasterised only over its vertices' box (one pixel margin, clipped to the
    image), its vertices shifted by whole pixels: a fraction of the full-frame cost for small instances,
    and the same pixels except where pycocotools rounds a vertex that sits on a 1/5-pixel tie (its
    5x upsampling), which the shift can tip either way (a few boundary pixels of some instances).
    """
    out = np.zeros((len(masks), height, width), dtype=np.uint8)
    for i, mask in enumerate(masks):
        if isinstance(mask, np.ndarray):
            if mask.shape != (height, width):
                raise ValueError(f"bitmap mask {mask.shape} does not match the image ({height}, {width})")
            out[i] = mask
            continue
        polygons = [np.asarray(p, dtype=np.float64) for p in mask]
        if not polygons:
            continue
        xs = np.concatenate([p[0::2] for p in polygons])
        ys = np.concatenate([p[1::2] for p in polygons])
        x0, x1 = max(int(np.floor(xs.min())) - 1, 0), min(int(np.ceil(xs.max())) + 1, width)
        y0, y1 = max(int(np.floor(ys.min())) - 1, 0), min(int(np.ceil(ys.max())) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue  # entirely outside the image
        shifted = []
        for p in polygons:
            p = p.copy()
            p[0::2] -= x0
            p[1::2] -= y0
            shifted.append(p)
        rles = mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0)
        out[i, y0:y1, x0:x1] = mask_utils.decode(mask_utils.merge(rles))
    return out


def mask_boxes(bitmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight pixel-corner boxes [N,4] of bitmaps [N,H,W] (x2 = last column + 1) and which are non-empty."""
    n = len(bitmaps)
    boxes = np.zeros((n, 4), dtype=np.float32)
    rows, cols = bitmaps.any(axis=2), bitmaps.any(axis=1)
    nonempty = rows.any(axis=1)
    for i in np.flatnonzero(nonempty):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes, nonempty


@dataclass
class DetTarget:
    """A finished training sample: uint8 image [h,w,3], boxes float32 [G,4], labels int64 [G], masks uint8 [G,h,w]."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    scale: tuple[float, float]


def finalize(sample: DetSample) -> DetTarget:
    """Rasterise the masks at the final size; boxes of instances cut by a crop become the boxes of their
    cropped masks, and cut instances left with an empty mask are dropped."""
    height, width = sample.size
    bitmaps = rasterize(sample.masks, height, width)
    boxes, labels = sample.boxes.astype(np.float32), sample.labels.astype(np.int64)
    if sample.cut.any():
        boxes = boxes.copy()
        keep = np.ones(len(boxes), dtype=bool)
        for i in np.flatnonzero(sample.cut):
            box, nonempty = mask_boxes(bitmaps[i : i + 1])
            boxes[i], keep[i] = box[0], nonempty[0]
        if not keep.all():
            boxes, labels, bitmaps = boxes[keep], labels[keep], bitmaps[keep]
    return DetTarget(np.ascontiguousarray(sample.image), boxes, labels, bitmaps, sample.scale)


# -- random steps ------------------------------------------------------------------------------------
def _positive_ints(values: Sequence[int], name: str) -> tuple[int, ...]:
    out = tuple(values)
    if not out or any(int(v) != v or v <= 0 for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {values!r}")
    return tuple(int(v) for v in out)


def _int_range(values: Sequence[int], name: str) -> tuple[int, int]:
    pair = _positive_ints(values, name)
    if len(pair) != 2 or pair[0] > pair[1]:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {values!r}")
    return pair[0], pair[1]


class RandomFlip:
    """mmdet ``RandomFlip(flip_ratio=prob)``, horizontal."""

    def __init__(self, prob: float) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {prob!r}")
        self.prob = float(prob)

    def __call__(self, sample: DetSample, rng: np.random.Generator) -> DetSample:
        return hflip(sample) if rng.random() < self.prob else sample

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class Resize:
    """mmdet ``Resize(img_scale=[(max_size, s) for s in short_sides], multiscale_mode='value',
    keep_ratio=True)``: one short side drawn uniformly, the image rescaled (aspect kept) so the short
    side is at most ``s`` and the long side at most ``max_size`` (mmcv ``imrescale`` rounding)."""

    def __init__(self, short_sides: Sequence[int], max_size: int) -> None:
        self.short_sides = _positive_ints(short_sides, "short_sides")
        (self.max_size,) = _positive_ints([max_size], "max_size")

    def __call__(self, sample: DetSample, rng: np.random.Generator) -> DetSample:
        short = self.short_sides[int(rng.integers(len(self.short_sides)))]
        return resize(sample, rescale_size(*sample.size, (self.max_size, short)))

    def __repr__(self) -> str:
        return f"Resize(short_sides={list(self.short_sides)}, max_size={self.max_size})"


class RandomCrop:
    """mmdet ``RandomCrop(crop_type='absolute_range', crop_size=(low, high), allow_negative_crop=True)``:
    crop height in [min(h, low), min(h, high)], width likewise (drawn independently), at a uniform
    offset. A crop holding no instance is kept (an image without targets)."""

    def __init__(self, size_range: Sequence[int]) -> None:
        self.low, self.high = _int_range(size_range, "crop size range")

    def __call__(self, sample: DetSample, rng: np.random.Generator) -> DetSample:
        height, width = sample.size
        crop_h = int(rng.integers(min(height, self.low), min(height, self.high) + 1))
        crop_w = int(rng.integers(min(width, self.low), min(width, self.high) + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        return crop(sample, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"RandomCrop(size_range=({self.low}, {self.high}))"


class OneOf:
    """mmdet ``AutoAugment(policies)``: one policy (a list of steps) drawn uniformly, applied in order."""

    def __init__(self, policies: Sequence[Sequence[Step]]) -> None:
        if not policies or any(len(p) == 0 for p in policies):
            raise ValueError("OneOf needs at least one non-empty policy")
        self.policies = [list(p) for p in policies]

    def __call__(self, sample: DetSample, rng: np.random.Generator) -> DetSample:
        for step in self.policies[int(rng.integers(len(self.policies)))]:
            sample = step(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"OneOf({self.policies})"


class Compose:
    """Steps in order; ``pipeline(sample, rng)`` returns the transformed, still compact, sample."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)

    def __call__(self, sample: DetSample, rng: np.random.Generator) -> DetSample:
        for step in self.steps:
            sample = step(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.steps})"


def build_det_train_pipeline(
    short_sides: Sequence[int] = RECIPE_SHORT_SIDES,
    max_size: int = RECIPE_MAX_SIZE,
    crop_policy_short_sides: Sequence[int] | None = RECIPE_CROP_POLICY_SHORT_SIDES,
    crop_policy_crop_size: Sequence[int] | None = RECIPE_CROP_POLICY_CROP_SIZE,
    crop_size: Sequence[int] | None = RECIPE_CROP_SIZE,
    flip_prob: float = 0.5,
) -> Compose:
    """The ViT-CoMer COCO training augmentation (defaults: the official sizes).

    ``crop_policy_short_sides=None`` (with ``crop_policy_crop_size=None``) keeps only the multi-scale
    resize policy; ``crop_size=None`` skips the final crop. ``crop_size`` and ``crop_policy_crop_size``
    are absolute (low, high) ranges of the crop side.
    """
    multiscale = Resize(short_sides, max_size)
    if (crop_policy_short_sides is None) != (crop_policy_crop_size is None):
        raise ValueError("crop_policy_short_sides and crop_policy_crop_size must both be set or both be None")
    if crop_policy_short_sides is None:
        resize_step: Step = multiscale
    else:
        resize_step = OneOf(
            [
                [multiscale],
                [Resize(crop_policy_short_sides, max_size), RandomCrop(crop_policy_crop_size), multiscale],
            ]
        )
    steps: list[Step] = [RandomFlip(flip_prob), resize_step]
    if crop_size is not None:
        steps.append(RandomCrop(crop_size))
    return Compose(steps)


def build_det_test_pipeline(scale: Sequence[int] = RECIPE_TEST_SCALE) -> Compose:
    """Keep-ratio resize to fit ``scale`` = (long, short) in either order (mmdet test ``(1333, 800)``)."""
    pair = _positive_ints(scale, "test scale")
    if len(pair) != 2:
        raise ValueError(f"test scale must be two ints (long, short), got {scale!r}")
    return Compose([Resize([min(pair)], max(pair))])
