"""A synthetic instance segmentation dataset written in the exact COCO 2017 layout.

Each image shows a smooth textured background with shapes of several categories drawn over it; later
shapes occlude earlier ones. Every category has its own colour family and shape, so both carry the
label. Annotations follow COCO: non-contiguous category ids (like COCO's 1..90 with gaps), large
arbitrary image and annotation ids, ``[x, y, w, h]`` boxes, polygon masks of the *visible* part of
each object (several polygons when an occluder splits it; holes cut in by an occluder are encoded
exactly by bridging each hole into its outer polygon, which pycocotools' even-odd fill leaves empty),
boxes and areas of the rasterised polygons, objects partly outside the frame, a few crowd regions
(clusters of small objects annotated once as an uncompressed RLE with ``iscrowd=1``, as COCO does) and
a few images without any object (every ``EMPTY_EVERY``-th image, from the 4th on).

Generation is deterministic from the seed and atomic: everything is written into a temporary folder
beside ``root``, ``synthetic.json`` (the generation parameters) last, then the folder is renamed to
``root``. An existing generation with the same parameters is kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from comer.data.coco import ANNOTATION_DIR, TRAIN_SPLIT, VAL_SPLIT, CocoDataModule

MARKER_FILE = "synthetic.json"
FORMAT_VERSION = 1
JPEG_QUALITY = 95
EMPTY_EVERY = 10  # images 3, 13, 23, ... of each split hold no object
MIN_VISIBLE_AREA = 12  # pixels; objects occluded below this are not drawn
COLOUR_JITTER = 20
SPLIT_IMAGE_ID_BASE = {TRAIN_SPLIT: 1_000, VAL_SPLIT: 500_000}
SPLIT_ANN_ID_BASE = {TRAIN_SPLIT: 1, VAL_SPLIT: 900_000}


@dataclass(frozen=True)
class ShapeCategory:
    id: int
    name: str
    rgb: tuple[int, int, int]


# Non-contiguous ids on purpose: label k <-> SYNTHETIC_CATEGORIES[k].id.
SYNTHETIC_CATEGORIES: tuple[ShapeCategory, ...] = (
    ShapeCategory(1, "disc", (220, 40, 40)),
    ShapeCategory(3, "box", (40, 70, 220)),
    ShapeCategory(7, "triangle", (40, 190, 60)),
    ShapeCategory(12, "bar", (230, 200, 30)),
    ShapeCategory(18, "arc", (200, 40, 200)),
    ShapeCategory(25, "blob", (30, 200, 210)),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in SYNTHETIC_CATEGORIES)
CATEGORY_IDS: tuple[int, ...] = tuple(c.id for c in SYNTHETIC_CATEGORIES)


# -- drawing -------------------------------------------------------------------------------------
def _shape_mask(name: str, rng: np.random.Generator, height: int, width: int, extent: float) -> np.ndarray:
    """A filled shape of about ``extent`` pixels across, centred anywhere in the frame (may stick out)."""
    mask = np.zeros((height, width), np.uint8)
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    r = max(int(extent / 2), 2)
    if name == "disc":
        cv2.circle(mask, (cx, cy), r, 1, thickness=-1)
    elif name == "box":
        w, h = (int(v) for v in rng.integers(r, 2 * r + 1, 2))
        cv2.rectangle(mask, (cx - w // 2, cy - h // 2), (cx + w // 2, cy + h // 2), 1, thickness=-1)
    elif name == "triangle":
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        points = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).round().astype(np.int32)
        cv2.fillPoly(mask, [points], 1)
    elif name == "bar":
        thickness = max(int(r * rng.uniform(0.4, 0.7)), 3)
        box = cv2.boxPoints(((cx, cy), (2 * r, thickness), float(rng.uniform(0, 180))))
        cv2.fillPoly(mask, [box.round().astype(np.int32)], 1)
    elif name == "arc":
        start = float(rng.uniform(0, 360))
        cv2.ellipse(mask, (cx, cy), (r, max(int(r * rng.uniform(0.6, 1.0)), 2)), float(rng.uniform(0, 180)),
                    start, start + 250, 1, thickness=max(r // 3, 3))
    elif name == "blob":
        axes = (int(rng.integers(r // 2 + 1, r + 1)), int(rng.integers(r // 2 + 1, r + 1)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    else:
        raise ValueError(f"unknown shape '{name}'")
    return mask.astype(bool)


def _crowd_mask(rng: np.random.Generator, height: int, width: int, short: int) -> np.ndarray:
    """A cluster of 6-12 small discs (a 'crowd' of one category)."""
    mask = np.zeros((height, width), np.uint8)
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    spread = max(int(short * rng.uniform(0.1, 0.2)), 4)
    for _ in range(int(rng.integers(6, 13))):
        x, y = cx + int(rng.integers(-spread, spread + 1)), cy + int(rng.integers(-spread, spread + 1))
        cv2.circle(mask, (x, y), max(int(short * rng.uniform(0.02, 0.045)), 2), 1, thickness=-1)
    return mask.astype(bool)


def _paint(image: np.ndarray, mask: np.ndarray, rgb: Sequence[int], rng: np.random.Generator) -> None:
    """Fill ``mask`` with a jittered colour and a coarse shading, over the mask's box only."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    colour = np.clip(np.asarray(rgb, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
    coarse = rng.uniform(0.75, 1.15, size=(max(h // 6, 1), max(w // 6, 1))).astype(np.float32)
    shade = cv2.resize(coarse, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)[..., None]
    region = mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][region] = np.clip(shade * colour, 0, 255)[region]


def render_image(
    rng: np.random.Generator, height: int, width: int, num_objects: int, with_crowd: bool
) -> tuple[np.ndarray, list[tuple[int, bool, np.ndarray]]]:
    """One image (uint8 RGB [H,W,3]) and its objects ``(category index, is crowd, visible mask)``.

    Objects are stacked bottom (crowd first) to top; an object whose visible part is under
    ``MIN_VISIBLE_AREA`` pixels is left out entirely (not drawn, not annotated).
    """
    short = min(height, width)
    tint = rng.uniform(70, 170, 3).astype(np.float32)
    coarse = rng.uniform(0.7, 1.3, size=(max(height // 16, 2), max(width // 16, 2))).astype(np.float32)
    image = np.clip(cv2.resize(coarse, (width, height))[..., None] * tint, 0, 255)
    layers: list[tuple[int, bool, np.ndarray]] = []
    if with_crowd:
        layers.append((int(rng.integers(len(SYNTHETIC_CATEGORIES))), True, _crowd_mask(rng, height, width, short)))
    for _ in range(num_objects):
        k = int(rng.integers(len(SYNTHETIC_CATEGORIES)))
        extent = short * float(np.exp(rng.uniform(np.log(0.08), np.log(1.2))))
        layers.append((k, False, _shape_mask(SYNTHETIC_CATEGORIES[k].name, rng, height, width, extent)))
    occupied = np.zeros((height, width), bool)
    kept = []
    for k, crowd, full in reversed(layers):  # top down: what is still visible
        visible = full & ~occupied
        if visible.sum() < MIN_VISIBLE_AREA:
            continue
        kept.append((k, crowd, full, visible))
        occupied |= full
    for k, _, full, _ in reversed(kept):  # bottom up: draw
        _paint(image, full, SYNTHETIC_CATEGORIES[k].rgb, rng)
    return image.astype(np.uint8), [(k, crowd, visible) for k, crowd, _, visible in reversed(kept)]


# -- annotation encodings ------------------------------------------------------------------------
def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons whose pycocotools rasterisation reproduces ``mask`` (to within a pixel or two).

    Contours are traced on the 2x-upsampled mask (vertices 1/4 pixel inside the boundary, so every mask
    pixel centre is inside and every other centre outside); each hole is bridged into its outer contour
    (the bridge is traversed both ways, so even-odd filling leaves the hole empty).
    """
    up = cv2.resize(mask.astype(np.uint8), (mask.shape[1] * 2, mask.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    hierarchy = hierarchy[0]
    points = [(c.reshape(-1, 2).astype(np.float64) + 0.5) / 2 for c in contours]
    polygons = []
    for i, (_, _, child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        polygon = points[i]
        while child != -1:
            hole = points[child]
            gaps = ((polygon[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
            a, b = np.unravel_index(int(gaps.argmin()), gaps.shape)
            polygon = np.concatenate([polygon[: a + 1], hole[b:], hole[: b + 1], polygon[a:]])
            child = hierarchy[child][0]
        if len(polygon) >= 3:
            polygons.append([round(float(v), 2) for v in polygon.ravel()])
    return polygons


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (``counts`` a list of run lengths, column-major, starting with zeros)."""
    flat = np.asfortranarray(mask.astype(np.uint8)).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _annotation(ann_id: int, image_id: int, k: int, crowd: bool, visible: np.ndarray) -> dict[str, Any] | None:
    height, width = visible.shape
    if crowd:
        segmentation: Any = mask_to_uncompressed_rle(visible)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        segmentation = mask_to_polygons(visible)
        if not segmentation:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    area = float(mask_utils.area(rle))
    if area <= 0:
        return None
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": SYNTHETIC_CATEGORIES[k].id,
        "segmentation": segmentation,
        "area": area,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(crowd),
    }


# -- generation ----------------------------------------------------------------------------------
def _range(values: Sequence[int], name: str, low: int) -> tuple[int, int]:
    pair = tuple(int(v) for v in values)
    if len(pair) != 2 or pair[0] > pair[1] or pair[0] < low or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be (min, max) ints with {low} <= min <= max, got {values!r}")
    return pair[0], pair[1]


def _params(num_train, num_val, image_size, instances, crowd_prob, seed) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": list(image_size),
        "instances_per_image": list(instances),
        "crowd_prob": crowd_prob,
        "seed": seed,
        "categories": [[c.id, c.name] for c in SYNTHETIC_CATEGORIES],
    }


def read_marker(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MARKER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_split(folder: Path, split: str, split_id: int, count: int, params: dict[str, Any]) -> None:
    (folder / split).mkdir(parents=True)
    (low_side, high_side), (low_n, high_n) = params["image_size"], params["instances_per_image"]
    images, annotations = [], []
    ann_id = SPLIT_ANN_ID_BASE[split]
    for i in range(count):
        rng = np.random.default_rng([params["seed"], split_id, i])
        height, width = (int(v) for v in rng.integers(low_side, high_side + 1, 2))
        empty = i % EMPTY_EVERY == 3
        num_objects = 0 if empty else int(rng.integers(low_n, high_n + 1))
        with_crowd = not empty and rng.random() < params["crowd_prob"]
        image, objects = render_image(rng, height, width, num_objects, with_crowd)
        image_id = SPLIT_IMAGE_ID_BASE[split] + 3 * i
        file_name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(folder / split / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for k, crowd, visible in objects:
            annotation = _annotation(ann_id, image_id, k, crowd, visible)
            if annotation is not None:
                annotations.append(annotation)
                ann_id += 1
    document = {
        "info": {"description": "comer synthetic COCO-layout instance segmentation", "version": FORMAT_VERSION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in SYNTHETIC_CATEGORIES],
    }
    (folder / ANNOTATION_DIR / f"instances_{split}.json").write_text(json.dumps(document))


def generate_synthetic_coco(
    root: str | Path,
    num_train: int,
    num_val: int,
    image_size: Sequence[int],
    instances_per_image: Sequence[int],
    crowd_prob: float,
    seed: int,
) -> Path:
    """Write the dataset as ``root`` (``annotations/``, ``train2017/``, ``val2017/``) unless an identical
    generation exists there; returns ``root``. ``image_size``: (min, max) of each side, drawn per image;
    ``instances_per_image``: (min, max) objects drawn (some end fully occluded). Refuses to replace a
    folder that is not a synthetic generation."""
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not 0.0 <= crowd_prob <= 1.0:
        raise ValueError(f"crowd_prob must be in [0, 1], got {crowd_prob!r}")
    params = _params(int(num_train), int(num_val), _range(image_size, "image_size", 32),
                     _range(instances_per_image, "instances_per_image", 0), float(crowd_prob), int(seed))
    root = Path(root).expanduser()
    if read_marker(root) == params:
        return root
    if root.exists() and read_marker(root) is None:
        raise FileExistsError(
            f"'{root}' exists but is not a synthetic dataset (no '{MARKER_FILE}'); refusing to overwrite it. "
            "Choose another root."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(f".{root.name}.tmp*"):  # leftovers of interrupted generations
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))
    try:
        (tmp / ANNOTATION_DIR).mkdir()
        for split_id, (split, count) in enumerate(((TRAIN_SPLIT, num_train), (VAL_SPLIT, num_val))):
            _write_split(tmp, split, split_id, int(count), params)
        (tmp / MARKER_FILE).write_text(json.dumps(params, indent=1))  # last: marks completion
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


class SyntheticCocoDataModule(CocoDataModule):
    """``CocoDataModule`` over a generated synthetic dataset (created in ``prepare_data``, which Lightning
    runs on local rank 0 only). ``generation_seed`` fixes the images; ``seed`` the sample order and
    augmentation. The layout is checked in ``setup`` (it does not exist before ``prepare_data``)."""

    def __init__(
        self,
        root: str | Path,
        num_train: int,
        num_val: int,
        image_size: Sequence[int],
        instances_per_image: Sequence[int],
        crowd_prob: float,
        generation_seed: int,
        **kwargs: Any,
    ) -> None:
        self.num_train = int(num_train)
        self.num_val = int(num_val)
        self.image_size = _range(image_size, "image_size", 32)
        self.instances_per_image = _range(instances_per_image, "instances_per_image", 0)
        self.crowd_prob = float(crowd_prob)
        self.generation_seed = int(generation_seed)
        num_classes = kwargs.pop("num_classes", len(SYNTHETIC_CATEGORIES))
        if num_classes != len(SYNTHETIC_CATEGORIES):
            raise ValueError(f"the synthetic dataset has {len(SYNTHETIC_CATEGORIES)} categories, got num_classes={num_classes}")
        super().__init__(root=root, num_classes=num_classes, **kwargs)

    def check(self) -> None:
        """Generated in ``prepare_data``; before that there is nothing to check."""
        if read_marker(self.root) is not None:
            super().check()

    def prepare_data(self) -> None:
        generate_synthetic_coco(self.root, self.num_train, self.num_val, self.image_size,
                                self.instances_per_image, self.crowd_prob, self.generation_seed)

    def is_prepared(self) -> bool:
        """Whether ``prepare_data`` (run by rank zero) has finished writing this generation."""
        return read_marker(self.root) == _params(self.num_train, self.num_val, self.image_size,
                                                 self.instances_per_image, self.crowd_prob, self.generation_seed)
