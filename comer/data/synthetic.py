"""A small synthetic segmentation dataset written in the exact ADE20K layout.

Images show a textured background with shapes of several classes drawn over it (later shapes
occlude earlier ones). Each class has its own hue family, texture and size range, so colour,
texture and shape all carry the label. A one-pixel outline around every shape is left unlabeled
(0), as in ADE20K. Labels on disk: 0 = unlabeled, 1..K = ``SYNTHETIC_CLASSES``.

Generation is atomic: everything is written into a temporary folder, ``synthetic.json`` (the
marker holding the generation parameters) last, then the folder is renamed to
``<root>/ADEChallengeData2016``. An existing generation with the same parameters is kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from comer.data.ade20k import (
    ANNOTATION_DIR,
    ANNOTATION_SUFFIX,
    DATASET_DIR,
    IMAGE_DIR,
    IMAGE_SUFFIX,
    TRAIN_SPLIT,
    VAL_SPLIT,
)
from comer.data.datamodule import SegmentationDataModule

MARKER_FILE = "synthetic.json"
CLASSES_FILE = "classes.json"
FORMAT_VERSION = 1
JPEG_QUALITY = 95
UNLABELED = 0
SHAPES_PER_IMAGE = (6, 10)
COLOUR_JITTER = 18


@dataclass(frozen=True)
class ShapeClass:
    name: str
    rgb: tuple[int, int, int]
    texture: str
    size: tuple[float, float]  # as fractions of the image side


# Label k+1 on disk is SYNTHETIC_CLASSES[k]. "background" fills the canvas first.
SYNTHETIC_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("background", (128, 128, 128), "noise", (1.0, 1.0)),
    ShapeClass("disc", (220, 40, 40), "flat", (0.15, 0.3)),
    ShapeClass("box", (40, 70, 220), "checker", (0.25, 0.45)),
    ShapeClass("triangle", (40, 190, 60), "dots", (0.3, 0.5)),
    ShapeClass("stripes", (230, 200, 30), "stripes", (0.3, 0.6)),
    ShapeClass("ring", (200, 40, 200), "flat", (0.25, 0.45)),
    ShapeClass("blob", (30, 200, 210), "gradient", (0.2, 0.4)),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in SYNTHETIC_CLASSES)


# -- textures: (rng, h, w, rgb) -> float image [h, w, 3] ------------------------------------
def _texture(kind: str, rng: np.random.Generator, h: int, w: int, rgb: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "flat":
        shade = np.ones((h, w), np.float32)
    elif kind == "noise":
        coarse = rng.uniform(0.6, 1.3, size=(max(h // 8, 1), max(w // 8, 1))).astype(np.float32)
        shade = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
        shade += rng.normal(0, 0.08, size=(h, w)).astype(np.float32)
    elif kind == "checker":
        period = int(rng.integers(6, 12))
        shade = np.where(((yy // period) + (xx // period)) % 2 == 0, 1.15, 0.7)
    elif kind == "dots":
        period = int(rng.integers(6, 10))
        near = ((yy % period) - period / 2) ** 2 + ((xx % period) - period / 2) ** 2 < (period / 3.5) ** 2
        shade = np.where(near, 0.55, 1.1)
    elif kind == "stripes":
        period, angle = int(rng.integers(6, 12)), rng.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        shade = 0.85 + 0.3 * np.sign(np.sin(2 * np.pi * phase))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xx * np.cos(angle) + yy * np.sin(angle)
        shade = 0.65 + 0.6 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    else:
        raise ValueError(f"unknown texture '{kind}'")
    return shade[..., None].astype(np.float32) * rgb[None, None, :]


# -- shapes: draw a filled uint8 mask ------------------------------------------------------
def _shape_mask(name: str, rng: np.random.Generator, size: int, extent: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cx, cy = (int(v) for v in rng.integers(0, size, 2))
    r = max(extent // 2, 3)
    if name == "disc":
        cv2.circle(mask, (cx, cy), r, 1, thickness=-1)
    elif name == "box":
        w, h = (int(v) for v in rng.integers(r, 2 * r + 1, 2))
        cv2.rectangle(mask, (cx - w // 2, cy - h // 2), (cx + w // 2, cy + h // 2), 1, thickness=-1)
    elif name == "triangle":
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        angles += rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)
    elif name == "stripes":
        w, h = int(rng.integers(r, 2 * r + 1)), int(rng.integers(max(r // 2, 2), r + 1))
        angle = float(rng.uniform(0, 180))
        box = cv2.boxPoints(((cx, cy), (2 * w, h), angle)).astype(np.int32)
        cv2.fillPoly(mask, [box], 1)
    elif name == "ring":
        cv2.circle(mask, (cx, cy), r, 1, thickness=max(r // 3, 3))
    elif name == "blob":
        axes = (int(rng.integers(r // 2 + 1, r + 1)), int(rng.integers(r // 2 + 1, r + 1)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    else:
        raise ValueError(f"unknown shape '{name}'")
    return mask.astype(bool)


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)


def render_sample(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 [S,S,3]) and its on-disk label (uint8 [S,S], 0 = unlabeled, 1..K)."""
    background = SYNTHETIC_CLASSES[0]
    tint = _jittered(background.rgb, rng) * rng.uniform(0.5, 1.2)
    image = _texture(background.texture, rng, image_size, image_size, tint)
    label = np.full((image_size, image_size), 1, np.uint8)
    for _ in range(int(rng.integers(SHAPES_PER_IMAGE[0], SHAPES_PER_IMAGE[1] + 1))):
        k = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        cls = SYNTHETIC_CLASSES[k]
        extent = int(rng.uniform(*cls.size) * image_size)
        mask = _shape_mask(cls.name, rng, image_size, extent)
        if not mask.any():
            continue
        texture = _texture(cls.texture, rng, image_size, image_size, _jittered(cls.rgb, rng))
        image[mask] = texture[mask]
        label[mask] = k + 1
        outline = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        label[outline & mask] = UNLABELED
    return np.clip(image, 0, 255).astype(np.uint8), label


def _params(num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "classes": list(CLASS_NAMES),
    }


def read_marker(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / DATASET_DIR / MARKER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def generate_synthetic_ade20k(
    root: str | Path, num_train: int, num_val: int, image_size: int, seed: int
) -> Path:
    """Write the dataset under ``<root>/ADEChallengeData2016`` unless an identical one exists.

    Returns the dataset folder. Refuses to replace a folder that is not a synthetic generation.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 32)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    root = Path(root)
    target = root / DATASET_DIR
    params = _params(num_train, num_val, image_size, seed)
    if read_marker(root) == params:
        return target
    if target.exists() and read_marker(root) is None:
        raise FileExistsError(
            f"'{target}' exists but is not a synthetic dataset (no '{MARKER_FILE}'); "
            "refusing to overwrite it. Choose another root."
        )
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{DATASET_DIR}.tmp*"):  # leftovers of interrupted generations
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIR}.tmp", dir=root))
    try:
        for split_id, (split, count) in enumerate(((TRAIN_SPLIT, num_train), (VAL_SPLIT, num_val))):
            (tmp / IMAGE_DIR / split).mkdir(parents=True)
            (tmp / ANNOTATION_DIR / split).mkdir(parents=True)
            for i in range(count):
                image, label = render_sample(np.random.default_rng([seed, split_id, i]), image_size)
                stem = f"synthetic_{split}_{i:06d}"
                Image.fromarray(image).save(tmp / IMAGE_DIR / split / f"{stem}{IMAGE_SUFFIX}", quality=JPEG_QUALITY)
                Image.fromarray(label).save(tmp / ANNOTATION_DIR / split / f"{stem}{ANNOTATION_SUFFIX}")
        (tmp / CLASSES_FILE).write_text(json.dumps(list(CLASS_NAMES), indent=1))
        (tmp / MARKER_FILE).write_text(json.dumps(params, indent=1))  # last: marks completion
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class SyntheticSegDataModule(SegmentationDataModule):
    """``SegmentationDataModule`` over a generated synthetic dataset (created in ``prepare_data``,
    which Lightning runs on local rank 0 only); ``classes.json`` beside it documents the names.
    ``generation_seed`` fixes the images; ``seed`` the sample order and augmentation."""

    def __init__(
        self, root: str | Path, num_train: int, num_val: int, image_size: int, generation_seed: int, **kwargs: Any
    ) -> None:
        num_classes = kwargs.pop("num_classes", len(CLASS_NAMES))
        if num_classes != len(CLASS_NAMES):
            raise ValueError(f"the synthetic dataset has {len(CLASS_NAMES)} classes, got num_classes={num_classes}")
        if not kwargs.pop("reduce_zero_label", True):
            raise ValueError("the synthetic dataset stores 0 = unlabeled: reduce_zero_label must be True")
        kwargs.setdefault("class_names", CLASS_NAMES)
        kwargs.setdefault("palette", [c.rgb for c in SYNTHETIC_CLASSES])
        super().__init__(root=root, num_classes=num_classes, reduce_zero_label=True, **kwargs)
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = image_size
        self.generation_seed = generation_seed

    def prepare_data(self) -> None:
        generate_synthetic_ade20k(self.root, self.num_train, self.num_val, self.image_size, self.generation_seed)

    def is_prepared(self) -> bool:
        """Whether ``prepare_data`` (run by rank zero) has finished writing this generation."""
        return read_marker(self.root) == _params(self.num_train, self.num_val, self.image_size, self.generation_seed)
