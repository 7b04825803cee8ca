"""ADE20K (SceneParsing, ADEChallengeData2016) on disk: layout discovery, pairing, loading.

The release layout is::

    <root>/ADEChallengeData2016/images/{training,validation}/<stem>.jpg
    <root>/ADEChallengeData2016/annotations/{training,validation}/<stem>.png

Annotations are single-channel PNGs: 0 = unlabeled, 1..150 = classes. With
``reduce_zero_label`` they become 255 (ignore) and 0..149.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from comer.data.seeding import sample_seed, seed_pipeline

log = logging.getLogger(__name__)

DATASET_DIR = "ADEChallengeData2016"
IMAGE_DIR = "images"
ANNOTATION_DIR = "annotations"
IMAGE_SUFFIX = ".jpg"
ANNOTATION_SUFFIX = ".png"
TRAIN_SPLIT = "training"
VAL_SPLIT = "validation"
IGNORE_INDEX = 255

# The 150 SceneParsing classes in label order (label k+1 on disk, k after reduction).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# The conventional RGB visualisation palette, one colour per class above.
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

EXPECTED_LAYOUT = (
    f"<root>/{DATASET_DIR}/{IMAGE_DIR}/{{{TRAIN_SPLIT},{VAL_SPLIT}}}/*{IMAGE_SUFFIX}\n"
    f"<root>/{DATASET_DIR}/{ANNOTATION_DIR}/{{{TRAIN_SPLIT},{VAL_SPLIT}}}/*{ANNOTATION_SUFFIX}\n"
    f"(root may also point directly at the {DATASET_DIR} folder). "
    "To train without any dataset on disk, use `task=synthetic_seg`, which generates its own data."
)


class DatasetLayoutError(FileNotFoundError):
    """The dataset root does not have the ADE20K release layout, or files are unpaired."""


class UnreadableSampleError(OSError):
    """An image or annotation could not be decoded."""


class LabelRangeError(ValueError):
    """An annotation holds a value outside the allowed class range."""


@dataclass(frozen=True)
class SamplePaths:
    image: Path
    annotation: Path


def resolve_dataset_dir(root: str | Path) -> Path:
    """Return the ``ADEChallengeData2016`` folder for ``root`` (its parent or itself)."""
    root = Path(root).expanduser()
    for candidate in (root / DATASET_DIR, root):
        if (candidate / IMAGE_DIR).is_dir() and (candidate / ANNOTATION_DIR).is_dir():
            return candidate
    reason = "does not exist" if not root.exists() else "does not have the ADE20K layout"
    raise DatasetLayoutError(f"Dataset root '{root}' {reason}. Expected:\n{EXPECTED_LAYOUT}")


def discover_pairs(root: str | Path, split: str) -> list[SamplePaths]:
    """List (image, annotation) pairs of ``split``, matched by file stem, sorted by stem.

    Raises if the split folders are missing or empty, or if any image lacks its annotation
    (or the reverse); the error names the first offending file.
    """
    dataset_dir = resolve_dataset_dir(root)
    image_dir = dataset_dir / IMAGE_DIR / split
    annotation_dir = dataset_dir / ANNOTATION_DIR / split
    for folder in (image_dir, annotation_dir):
        if not folder.is_dir():
            raise DatasetLayoutError(
                f"Split folder '{folder}' does not exist (split='{split}'). Expected:\n{EXPECTED_LAYOUT}"
            )
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() == IMAGE_SUFFIX}
    annotations = {p.stem: p for p in annotation_dir.iterdir() if p.suffix == ANNOTATION_SUFFIX}
    missing_annotation = sorted(images.keys() - annotations.keys())
    if missing_annotation:
        stem = missing_annotation[0]
        raise DatasetLayoutError(
            f"Image '{images[stem]}' has no annotation '{annotation_dir / (stem + ANNOTATION_SUFFIX)}' "
            f"({len(missing_annotation)} image(s) unpaired in split '{split}')."
        )
    missing_image = sorted(annotations.keys() - images.keys())
    if missing_image:
        stem = missing_image[0]
        raise DatasetLayoutError(
            f"Annotation '{annotations[stem]}' has no image '{image_dir / (stem + IMAGE_SUFFIX)}' "
            f"({len(missing_image)} annotation(s) unpaired in split '{split}')."
        )
    if not images:
        raise DatasetLayoutError(
            f"Split '{split}' under '{dataset_dir}' holds no '*{IMAGE_SUFFIX}' images. Expected:\n{EXPECTED_LAYOUT}"
        )
    return [SamplePaths(images[s], annotations[s]) for s in sorted(images)]


def read_image(path: Path) -> np.ndarray:
    """Decode ``path`` as RGB uint8 [H, W, 3]."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise UnreadableSampleError(f"Cannot read image '{path}': {exc}") from exc


def read_annotation(path: Path) -> np.ndarray:
    """Decode a single-channel label PNG as uint8 [H, W]."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise ValueError(f"mode '{img.mode}', expected a single-channel ('L' or 'P') PNG")
            return np.asarray(img, dtype=np.uint8).copy()
    except Exception as exc:
        raise UnreadableSampleError(f"Cannot read annotation '{path}': {exc}") from exc


def check_label_range(label: np.ndarray, num_classes: int, reduce_zero_label: bool, path: Path) -> None:
    """Raw labels must be 0..num_classes with reduction (0 = unlabeled), else 0..num_classes-1 or 255."""
    values = np.unique(label)
    if reduce_zero_label:
        bad = values[values > num_classes]
        allowed = f"0..{num_classes} (0 = unlabeled)"
    else:
        bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
        allowed = f"0..{num_classes - 1} or {IGNORE_INDEX} (ignore)"
    if bad.size:
        raise LabelRangeError(
            f"Annotation '{path}' holds label value {int(bad[0])}; allowed values are {allowed} "
            f"for num_classes={num_classes}, reduce_zero_label={reduce_zero_label}."
        )


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignore), k -> k-1."""
    reduced = label.astype(np.int64) - 1
    reduced[label == 0] = IGNORE_INDEX
    return reduced.astype(np.uint8)


class SegmentationDataset(Dataset):
    """Image/label pairs in the ADE20K layout, transformed by an albumentations pipeline.

    ``dataset[i]`` loads sample ``i``; ``dataset[(i, position)]`` does the same with the
    augmentation random state seeded from ``(seed, position)``, so a sample's augmentation
    depends only on where it sits in the (seeded) sample stream, not on the worker that loads it.
    ``transform_label=False`` transforms the image only (evaluation: the label keeps its original
    size). With ``skip_unreadable``, a corrupt sample is replaced by the next readable one and counted
    (``num_skipped``, shared across DataLoader worker processes).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int,
        reduce_zero_label: bool,
        transform: Callable | None = None,
        transform_label: bool = True,
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.samples = discover_pairs(root, split)
        self.split = split
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self.transform_label = transform_label
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self._skipped = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """How many unreadable samples were skipped so far (all worker processes together)."""
        return int(self._skipped.value)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw image [H,W,3] uint8 and label [H,W] uint8 (range-checked, reduced if configured)."""
        paths = self.samples[index]
        image = read_image(paths.image)
        label = read_annotation(paths.annotation)
        if image.shape[:2] != label.shape:
            raise UnreadableSampleError(
                f"Image '{paths.image}' is {image.shape[:2]} but annotation '{paths.annotation}' is {label.shape}."
            )
        check_label_range(label, self.num_classes, self.reduce_zero_label, paths.annotation)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        return image, label

    def _load_or_skip(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        for attempt in range(len(self.samples)):
            candidate = (index + attempt) % len(self.samples)
            try:
                return candidate, *self.load(candidate)
            except UnreadableSampleError as exc:
                if not self.skip_unreadable:
                    raise
                with self._skipped.get_lock():
                    self._skipped.value += 1
                log.warning("Skipping unreadable sample (skip_unreadable=True): %s", exc)
        raise UnreadableSampleError(f"No readable sample in split '{self.split}' ({len(self.samples)} files).")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, position = (key, None) if isinstance(key, (int, np.integer)) else key
        index, image, label = self._load_or_skip(int(index))
        if self.transform is not None:
            if position is not None:
                seed_pipeline(self.transform, sample_seed(self.seed, position))
            if self.transform_label:
                out = self.transform(image=image, mask=label)
                image, label = out["image"], out["mask"]
            else:
                image = self.transform(image=image)["image"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "path": str(self.samples[index].image),
        }
