"""COCO instance segmentation (the 2017 release layout): annotation parsing, dataset, collate, datamodule.

The release layout is::

    <root>/annotations/instances_{train2017,val2017}.json
    <root>/{train2017,val2017}/<file_name>.jpg

Annotation files are parsed once (``json`` + a pycocotools ``COCO`` index), checked, and reduced to
one compact record per image (serialised into a single byte buffer, so DataLoader workers share it
instead of copying millions of Python objects). Images are decoded lazily, one per ``__getitem__``.

Conventions (mmdet 2.x ``CocoDataset``): category ids, sorted, map to contiguous labels
``0..C-1`` (``label_to_category_id`` maps back). Training targets leave out crowd instances (the
evaluator handles them from the annotation file), ``ignore`` instances, boxes with w or h < 1 or
area <= 0, and boxes not overlapping the image; training images left without a usable instance,
or smaller than ``min_image_size``, are skipped (mmdet's ``filter_empty_gt``; mmdet also keeps
images whose only annotations are crowd or degenerate, we skip those too). Validation keeps every
image. Boxes are x1 y1 x2 y2 (COCO ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]``).

Batches (see :class:`DetectionCollate`) carry uint8 images; the LightningModule normalises them on the
device (:func:`comer.data.transforms.normalize_images` with ``image_sizes``, which keeps the padding at
0 as mmdet's normalise-then-pad does).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from comer.data.ade20k import UnreadableSampleError
from comer.data.det_transforms import (
    RECIPE_CROP_POLICY_CROP_SIZE,
    RECIPE_CROP_POLICY_SHORT_SIDES,
    RECIPE_CROP_SIZE,
    RECIPE_MAX_SIZE,
    RECIPE_SHORT_SIDES,
    RECIPE_TEST_SCALE,
    Compose,
    DetSample,
    build_det_test_pipeline,
    build_det_train_pipeline,
    finalize,
)
from comer.data.resumable import ResumableDataModule
from comer.data.seeding import sample_seed

log = logging.getLogger(__name__)

ANNOTATION_DIR = "annotations"
TRAIN_SPLIT = "train2017"
VAL_SPLIT = "val2017"
MIN_IMAGE_SIZE = 32  # mmdet CocoDataset._filter_imgs(min_size=32)

EXPECTED_LAYOUT = (
    f"<root>/{ANNOTATION_DIR}/instances_{{{TRAIN_SPLIT},{VAL_SPLIT}}}.json\n"
    f"<root>/{{{TRAIN_SPLIT},{VAL_SPLIT}}}/*.jpg\n"
    "(the COCO 2017 release: train2017.zip, val2017.zip and annotations_trainval2017.zip unpacked into "
    "one folder). To run without COCO on disk, use the synthetic layout (conf/data/synthetic_det.yaml), "
    "which generates itself."
)

# The 80 COCO detection categories in label order, and their category ids in the annotation files.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
    *range(84, 91),
)


class CocoLayoutError(FileNotFoundError):
    """The dataset root lacks the COCO release layout (a folder or annotation file is missing)."""


class CocoAnnotationError(ValueError):
    """An annotation file is malformed; the message names the file, the entry and the problem."""


# -- layout ----------------------------------------------------------------------------------------
def annotation_file(root: str | Path, split: str) -> Path:
    return Path(root).expanduser() / ANNOTATION_DIR / f"instances_{split}.json"


def image_dir(root: str | Path, split: str) -> Path:
    return Path(root).expanduser() / split


def check_layout(root: str | Path, splits: Iterable[str]) -> None:
    """Raise :class:`CocoLayoutError` naming every missing path of ``splits`` under ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        reason = "does not exist" if not root.exists() else "is not a folder"
        raise CocoLayoutError(f"COCO root '{root}' {reason}. Expected:\n{EXPECTED_LAYOUT}")
    missing = []
    for split in splits:
        if not annotation_file(root, split).is_file():
            missing.append(f"annotation file '{annotation_file(root, split)}'")
        if not image_dir(root, split).is_dir():
            missing.append(f"image folder '{image_dir(root, split)}'")
    if missing:
        raise CocoLayoutError(
            f"COCO root '{root}' is missing " + ", ".join(missing) + f". Expected:\n{EXPECTED_LAYOUT}"
        )


def quiet_coco(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` index over an already loaded annotation dict, its prints silenced."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CocoAnnotationError(f"Annotation file '{path}' is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CocoLayoutError(f"Cannot read annotation file '{path}': {exc}") from exc
    if not isinstance(data, dict):
        raise CocoAnnotationError(f"Annotation file '{path}' holds a {type(data).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoAnnotationError(f"Annotation file '{path}' has no '{key}' list (keys: {sorted(data)})")
    return data


# -- categories ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CocoCategories:
    """Category ids (sorted) and names; label ``k`` is ``category_ids[k]``."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @functools.cached_property
    def label_of(self) -> dict[int, int]:
        """category id -> contiguous label."""
        return {cat: label for label, cat in enumerate(self.category_ids)}

    @classmethod
    def from_json(cls, categories: list, path: Path) -> "CocoCategories":
        seen: dict[int, str] = {}
        for entry in categories:
            if not isinstance(entry, dict) or not _is_int(entry.get("id")) or not isinstance(entry.get("name"), str):
                raise CocoAnnotationError(
                    f"Annotation file '{path}': category entry {entry!r} needs an int 'id' and a str 'name'"
                )
            if entry["id"] in seen:
                raise CocoAnnotationError(f"Annotation file '{path}': category id {entry['id']} appears twice")
            seen[int(entry["id"])] = entry["name"]
        if not seen:
            raise CocoAnnotationError(f"Annotation file '{path}' lists no categories")
        ids = tuple(sorted(seen))
        return cls(ids, tuple(seen[i] for i in ids))


# -- annotation parsing ------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SplitStats:
    """What parsing kept and left out (counts over the annotation file)."""

    images: int = 0
    kept_images: int = 0
    images_without_instances: int = 0
    small_images: int = 0
    instances: int = 0
    crowd: int = 0
    ignored: int = 0
    degenerate: int = 0
    outside: int = 0
    dropped_polygon_parts: int = 0


@dataclass
class ParsedSplit:
    categories: CocoCategories
    records: list  # per kept image: see _record()
    stats: SplitStats


def _image_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"image entry {entry!r} is not an object"
    if not _is_int(entry.get("id")):
        return f"image entry {entry!r} has no int 'id'"
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        return f"image id {entry['id']} has no 'file_name'"
    for key in ("height", "width"):
        if not _is_int(entry.get(key)) or entry[key] < 1:
            return f"image id {entry['id']} has no positive int '{key}' (got {entry.get(key)!r})"
    return None


def _segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    if isinstance(seg, list):
        if all(isinstance(p, list) for p in seg):
            return None
        return "'segmentation' is a list but not a list of polygons (coordinate lists)"
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if not isinstance(seg["counts"], (list, str)):
            return f"RLE 'counts' is a {type(seg['counts']).__name__}, expected a list (uncompressed) or a str"
        if list(seg["size"]) != [height, width]:
            return f"RLE 'size' {seg['size']} differs from the image's [height, width] [{height}, {width}]"
        return None
    return (
        f"'segmentation' is neither polygons (a list of coordinate lists) nor RLE (an object with 'counts' "
        f"and 'size'): got {type(seg).__name__} {str(seg)[:80]}"
    )


_REQUIRED_KEYS = ("id", "image_id", "category_id", "bbox", "area", "segmentation")
_NUMBER_TYPES = (int, float)


def _annotation_problem(ann: Any, images: dict[int, dict], label_of: dict[int, int], categories) -> str | None:
    """What is wrong with one annotation entry, or None (the checks of :func:`parse_split`)."""
    if not isinstance(ann, dict):
        return f"entry {str(ann)[:80]} is not an object"
    missing = [key for key in _REQUIRED_KEYS if key not in ann]
    if missing:
        return f"missing key(s) {missing}"
    image = images.get(ann["image_id"]) if isinstance(ann["image_id"], int) else None
    if image is None:
        return f"image_id {ann['image_id']!r} has no entry in 'images'"
    if ann["category_id"] not in label_of:
        return f"category_id {ann['category_id']!r} is not in 'categories' (ids {list(categories.category_ids)})"
    bbox = ann["bbox"]
    if (type(bbox) is not list or len(bbox) != 4
            or not all(type(v) in _NUMBER_TYPES and math.isfinite(v) for v in bbox)):
        return f"bbox {bbox!r} is not [x, y, w, h] with 4 finite numbers"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox {bbox} has a negative width or height"
    if not _is_number(ann["area"]):
        return f"area {ann['area']!r} is not a finite number"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd {ann['iscrowd']!r} is not 0 or 1"
    return _segmentation_problem(ann["segmentation"], image["height"], image["width"])


def parse_split(
    ann_file: str | Path,
    images_folder: str | Path,
    *,
    with_targets: bool,
    filter_empty_gt: bool,
    min_image_size: int = 0,
) -> ParsedSplit:
    """Check ``ann_file`` and build one record per image.

    Raises :class:`CocoAnnotationError` (naming the file, the annotation id and the problem) on bad
    JSON, an image entry without id/file_name/height/width, an image file missing from
    ``images_folder``, an annotation without ``id``/``image_id``/``category_id``/``bbox``/``area``/
    ``segmentation``, an ``image_id`` without an image entry, a ``category_id`` not in ``categories``,
    a bbox that is not 4 finite numbers or has a negative width/height, or a segmentation that is
    neither polygons nor RLE. Degenerate and outside boxes are counted and left out of targets.
    """
    ann_file, images_folder = Path(ann_file), Path(images_folder)
    data = load_json(ann_file)
    categories = CocoCategories.from_json(data["categories"], ann_file)
    label_of = categories.label_of

    images: dict[int, dict] = {}
    for entry in data["images"]:
        problem = _image_problem(entry)
        if problem is None and entry["id"] in images:
            problem = f"image id {entry['id']} appears twice"
        if problem is not None:
            raise CocoAnnotationError(f"Annotation file '{ann_file}': {problem}")
        images[entry["id"]] = entry
    present = set(os.listdir(images_folder))
    for entry in images.values():
        name = entry["file_name"]
        if name not in present and not (images_folder / name).is_file():
            raise CocoAnnotationError(
                f"Annotation file '{ann_file}': image id {entry['id']} names file '{images_folder / name}', "
                "which does not exist"
            )

    stats = SplitStats(images=len(images))
    for ann in data["annotations"]:
        problem = _annotation_problem(ann, images, label_of, categories)
        if problem is not None:
            ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
            raise CocoAnnotationError(f"Annotation file '{ann_file}', annotation id {ann_id}: {problem}")
    coco = quiet_coco(data)

    records = []
    for image_id in sorted(images):
        image = images[image_id]
        height, width = image["height"], image["width"]
        if not with_targets:
            records.append((image_id, image["file_name"], height, width))
            continue
        if min(height, width) < min_image_size:
            stats.small_images += 1
            continue
        ann_ids, boxes, labels, segs = [], [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            if ann.get("ignore", False):
                stats.ignored += 1
                continue
            if ann.get("iscrowd", 0):
                stats.crowd += 1
                continue
            if max(0.0, min(x + w, width) - max(x, 0.0)) * max(0.0, min(y + h, height) - max(y, 0.0)) == 0:
                stats.outside += 1
                continue
            if ann["area"] <= 0 or w < 1 or h < 1:
                stats.degenerate += 1
                continue
            seg = ann["segmentation"]
            if isinstance(seg, list):
                polygons = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
                stats.dropped_polygon_parts += len(seg) - len(polygons)
                seg = polygons
            ann_ids.append(ann["id"])
            boxes.append((x, y, x + w, y + h))
            labels.append(label_of[ann["category_id"]])
            segs.append(seg)
        if not ann_ids and filter_empty_gt:
            stats.images_without_instances += 1
            continue
        stats.instances += len(ann_ids)
        records.append(
            (
                image_id, image["file_name"], height, width, np.asarray(ann_ids, dtype=np.int64),
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64), segs,
            )
        )
    stats.kept_images = len(records)
    return ParsedSplit(categories, records, stats)


def log_split_stats(ann_file: Path, stats: SplitStats, with_targets: bool) -> None:
    if not with_targets:
        log.info("COCO '%s': %d images", ann_file, stats.images)
        return
    log.info(
        "COCO '%s': %d of %d images kept, %d training instances (%d crowd instances left to the evaluator)",
        ann_file, stats.kept_images, stats.images, stats.instances, stats.crowd,
    )
    if stats.images_without_instances:
        log.warning("COCO '%s': skipped %d images without a usable instance", ann_file, stats.images_without_instances)
    if stats.small_images:
        log.warning("COCO '%s': skipped %d images smaller than the minimum size", ann_file, stats.small_images)
    for count, what in (
        (stats.degenerate, "degenerate boxes (w or h < 1, or area <= 0)"),
        (stats.outside, "boxes outside their image"),
        (stats.ignored, "instances marked 'ignore'"),
        (stats.dropped_polygon_parts, "polygon parts with fewer than 3 points"),
    ):
        if count:
            log.warning("COCO '%s': dropped %d %s", ann_file, count, what)


class SerializedRecords:
    """A list of picklable records stored as one byte buffer plus offsets: DataLoader workers read it
    without touching per-record Python objects (whose reference counts would unshare forked memory)."""

    def __init__(self, records: Sequence[Any]) -> None:
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].tobytes())


# -- dataset -----------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """Decode ``path`` as RGB uint8 [H, W, 3] (OpenCV, EXIF orientation applied, as mmcv)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableSampleError(f"Cannot read image '{path}'")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class CocoDetection(Dataset):
    """One split in the COCO layout; ``dataset[i]`` or ``dataset[(i, position)]`` -> a sample dict.

    ``train=True``: images without usable instances (or smaller than ``min_image_size``) are skipped;
    samples carry targets; the ``pipeline`` (augmentation) draws from a generator seeded by
    ``(seed, position)``, so a sample's augmentation depends only on its place in the stream.
    ``train=False``: every image, no targets.

    A sample: ``image`` uint8 [3,h,w], ``image_id``, ``image_size`` (h, w) after the pipeline,
    ``original_size`` (H, W), ``scale_factor`` (h/H, w/W) of the resizes, ``skipped`` (see below); with
    targets ``gt_boxes`` float32 [G,4] x1y1x2y2, ``gt_labels`` int64 [G] (0..C-1), ``gt_masks`` uint8 [G,h,w].

    ``skip_unreadable`` (as :class:`comer.data.ade20k.SegmentationDataset`): an unreadable image is left
    out. ``dataset[i]`` then returns ``{"image_id", "skipped": [(path, reason)]}`` without an image,
    which :class:`DetectionCollate` drops (the batch is one smaller, so no other image is evaluated in
    its place). In the training stream (``dataset[(i, position)]``) the position is filled instead by an
    image drawn uniformly from the split (seeded by the position: deterministic and resumable), so
    every batch keeps its size; the sample's ``skipped`` names the unreadable file. Without
    ``skip_unreadable`` the error stops the run.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        pipeline: Compose,
        *,
        train: bool,
        seed: int = 0,
        skip_unreadable: bool = False,
        min_image_size: int = MIN_IMAGE_SIZE,
    ) -> None:
        check_layout(root, [split])
        self.annotation_file = annotation_file(root, split)
        self.image_dir = image_dir(root, split)
        parsed = parse_split(
            self.annotation_file, self.image_dir, with_targets=train, filter_empty_gt=train,
            min_image_size=min_image_size if train else 0,
        )
        log_split_stats(self.annotation_file, parsed.stats, with_targets=train)
        if not parsed.records:
            raise CocoAnnotationError(
                f"Annotation file '{self.annotation_file}' leaves no image to "
                + ("train on (every image lacks a usable instance)" if train else "evaluate")
            )
        self.categories = parsed.categories
        self.stats = parsed.stats
        self.split = split
        self.pipeline = pipeline
        self.train = train
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self._records = SerializedRecords(parsed.records)

    def __len__(self) -> int:
        return len(self._records)

    def image_id(self, index: int) -> int:
        return int(self._records[index][0])

    def load(self, index: int) -> tuple[tuple, np.ndarray]:
        """The record of image ``index`` and its decoded image (size checked against the annotation)."""
        record = self._records[index]
        path = self.image_dir / record[1]
        image = read_image(path)
        if image.shape[:2] != (record[2], record[3]):
            raise UnreadableSampleError(
                f"Image '{path}' decodes to {image.shape[0]}x{image.shape[1]} but '{self.annotation_file}' "
                f"gives image id {record[0]} height {record[2]} and width {record[3]}"
            )
        return record, image

    def _substitute(self, position: int, attempt: int) -> int:
        """The image standing in for an unreadable one at stream ``position``: uniform over the split."""
        return int(np.random.default_rng((self.seed, position, attempt)).integers(len(self)))

    def _load_readable(self, index: int, position: int | None, skipped: list) -> tuple[tuple, np.ndarray] | None:
        for attempt in range(len(self)):
            try:
                return self.load(index)
            except UnreadableSampleError as exc:
                if not self.skip_unreadable:
                    raise
                skipped.append((str(self.image_dir / self._records[index][1]), str(exc)))
                log.warning("Leaving out an unreadable image (skip_unreadable=True): %s", exc)
                if position is None:
                    return None
                index = self._substitute(position, attempt)
        raise UnreadableSampleError(f"No readable image in '{self.image_dir}' after {len(self)} draws ({len(self)} listed)")

    def instances(self, record: tuple) -> tuple[list, np.ndarray, np.ndarray]:
        """The record's instances: compact masks (polygon lists, or bitmaps for RLE), boxes, labels."""
        image_id, _, height, width, ann_ids, boxes, labels, segs = record
        masks = []
        for ann_id, seg in zip(ann_ids, segs):
            try:
                if isinstance(seg, dict):
                    rle = seg if isinstance(seg["counts"], str) else mask_utils.frPyObjects(seg, height, width)
                    if isinstance(rle["counts"], str):
                        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
                    masks.append(np.ascontiguousarray(mask_utils.decode(rle)))
                else:
                    polygons = [np.asarray(p, dtype=np.float64) for p in seg]
                    if not all(np.isfinite(p).all() for p in polygons):
                        raise ValueError("a polygon coordinate is not finite")
                    masks.append(polygons)
            except (ValueError, TypeError, KeyError) as exc:
                raise CocoAnnotationError(
                    f"Annotation file '{self.annotation_file}', annotation id {int(ann_id)} "
                    f"(image id {image_id}): cannot decode its segmentation: {exc}"
                ) from exc
        return masks, boxes, labels

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, position = (key, None) if isinstance(key, (int, np.integer)) else key
        index = int(index)
        skipped: list[tuple[str, str]] = []
        loaded = self._load_readable(index, None if position is None else int(position), skipped)
        if loaded is None:
            return {"image_id": self.image_id(index), "skipped": skipped}
        record, image = loaded
        if self.train:
            masks, boxes, labels = self.instances(record)
        else:
            masks, boxes, labels = [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        rng = np.random.default_rng(sample_seed(self.seed, index if position is None else int(position)))
        sample = self.pipeline(DetSample(image, boxes.copy(), labels.copy(), masks), rng)
        target = finalize(sample)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(target.image.transpose(2, 0, 1))),
            "image_id": int(record[0]),
            "image_size": (int(target.image.shape[0]), int(target.image.shape[1])),
            "original_size": (int(record[2]), int(record[3])),
            "scale_factor": (float(target.scale[0]), float(target.scale[1])),
            "skipped": skipped,
        }
        if self.train:
            item["gt_boxes"] = torch.from_numpy(target.boxes)
            item["gt_labels"] = torch.from_numpy(target.labels)
            item["gt_masks"] = torch.from_numpy(target.masks)
        return item


class DetectionCollate:
    """Samples of :class:`CocoDetection` -> a batch dict. Left-out (unreadable) samples are dropped; every
    sample's ``skipped`` entries are kept. The batch:

    - ``images``: uint8 [B,3,Hp,Wp], each image top-left, zero padding bottom/right, Hp and Wp the batch's
      largest sizes rounded up to a multiple of ``size_divisor``;
    - ``image_sizes``, ``original_sizes``: lists of (h, w); ``scale_factors``: list of (h/H, w/W) (maps
      network-input pixels to the original image: divide x by the second, y by the first);
    - ``image_ids``: list of int;
    - with targets: ``gt_boxes`` list of float32 [G,4] x1y1x2y2 in input pixels, ``gt_labels`` list of
      int64 [G], ``gt_masks`` list of uint8 [G,h,w] (at the image size, unpadded);
    - ``skipped``: list of (path, reason) of unreadable images left out or replaced.

    A batch whose samples were all left out has B = 0 (images [0,3,0,0]).
    """

    def __init__(self, size_divisor: int) -> None:
        if int(size_divisor) != size_divisor or size_divisor < 1:
            raise ValueError(f"size_divisor must be a positive int, got {size_divisor!r}")
        self.size_divisor = int(size_divisor)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped = [entry for s in samples for entry in s["skipped"]]
        samples = [s for s in samples if "image" in s]
        d = self.size_divisor
        sizes = [s["image_size"] for s in samples]
        height = -(-max((h for h, _ in sizes), default=0) // d) * d
        width = -(-max((w for _, w in sizes), default=0) // d) * d
        images = torch.zeros((len(samples), 3, height, width), dtype=torch.uint8)
        for i, s in enumerate(samples):
            h, w = s["image_size"]
            images[i, :, :h, :w] = s["image"]
        batch: dict[str, Any] = {
            "images": images,
            "image_sizes": sizes,
            "original_sizes": [s["original_size"] for s in samples],
            "scale_factors": [s["scale_factor"] for s in samples],
            "image_ids": [s["image_id"] for s in samples],
            "skipped": skipped,
        }
        if samples and "gt_boxes" in samples[0]:
            for key in ("gt_boxes", "gt_labels", "gt_masks"):
                batch[key] = [s[key] for s in samples]
        return batch


# -- datamodule --------------------------------------------------------------------------------------
def _optional_ints(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


class CocoDataModule(ResumableDataModule):
    """COCO instance segmentation in the release layout, with the ViT-CoMer Mask R-CNN recipe.

    Train: an infinite seeded shuffled stream (``InfiniteShuffleSampler``), ``batch_size`` per device
    (``train(cfg)`` derives it from ``global_batch_size``), augmentation seeded per sample from its
    global stream position. Resuming: ``state_dict()`` stores the samples consumed by all ranks
    (counted in ``on_after_batch_transfer``; see :class:`ResumableDataModule`).
    Validation: every image of ``val_split`` in id order, resized to fit ``test_scale``,
    ``val_batch_size`` per device, split over ranks (``EvaluationShardSampler``: each image on one rank,
    no padding).

    The layout is checked in the constructor (before any model is built); annotation files are parsed in
    ``setup``, which checks they list ``num_classes`` categories when it is given. After ``setup``:
    ``class_names``, ``label_to_category_id`` and ``val_annotation_file`` (for ``comer.metrics.CocoMetric``).

    Sizes: ``train_scales`` short sides with the long side <= ``max_size``; the crop policy resizes to
    ``crop_policy_scales`` then crops a side in ``crop_policy_crop_size`` (low, high) before the
    multi-scale resize; then a final crop of a side in ``crop_size`` (low, high); ``None`` disables a
    policy/crop. ``test_scale`` = (long, short). ``train_split=None``: evaluation only.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        seed: int,
        train_scales: Sequence[int] = RECIPE_SHORT_SIDES,
        max_size: int = RECIPE_MAX_SIZE,
        crop_policy_scales: Sequence[int] | None = RECIPE_CROP_POLICY_SHORT_SIDES,
        crop_policy_crop_size: Sequence[int] | None = RECIPE_CROP_POLICY_CROP_SIZE,
        crop_size: Sequence[int] | None = RECIPE_CROP_SIZE,
        test_scale: Sequence[int] = RECIPE_TEST_SCALE,
        size_divisor: int = 32,
        flip_prob: float = 0.5,
        val_batch_size: int = 1,
        val_num_workers: int | None = None,
        skip_unreadable: bool = False,
        min_image_size: int = MIN_IMAGE_SIZE,
        train_split: str | None = TRAIN_SPLIT,
        val_split: str = VAL_SPLIT,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self._num_classes = None if num_classes is None else int(num_classes)
        for name, value, low in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.root = Path(root).expanduser()
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.num_workers = int(num_workers)
        self.val_num_workers = self.num_workers if val_num_workers is None else int(val_num_workers)
        self.pin_memory = pin_memory
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self.min_image_size = min_image_size
        self.train_split = train_split
        self.val_split = val_split
        self.train_pipeline = build_det_train_pipeline(
            train_scales, max_size, _optional_ints(crop_policy_scales), _optional_ints(crop_policy_crop_size),
            _optional_ints(crop_size), flip_prob,
        )
        self.test_pipeline = build_det_test_pipeline(test_scale)
        self.collate = DetectionCollate(size_divisor)
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None
        self.check()

    # -- layout and datasets ------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return [s for s in (self.train_split, self.val_split) if s is not None]

    def check(self) -> None:
        """Raise :class:`CocoLayoutError` unless ``root`` has the release layout for the splits used."""
        check_layout(self.root, self.splits)

    def setup(self, stage: str | None = None) -> None:
        """Parse the annotation files (raises on a malformed file)."""
        if stage in (None, "fit") and self.train_dataset is None:
            if self.train_split is None:
                raise RuntimeError("train_split is None (evaluation only): this datamodule cannot train")
            self.train_dataset = CocoDetection(
                self.root, self.train_split, self.train_pipeline, train=True, seed=self.seed,
                skip_unreadable=self.skip_unreadable, min_image_size=self.min_image_size,
            )
        if stage in (None, "fit", "validate", "test") and self.val_dataset is None:
            self.val_dataset = CocoDetection(
                self.root, self.val_split, self.test_pipeline, train=False, seed=self.seed,
                skip_unreadable=self.skip_unreadable,
            )
        for dataset in (self.train_dataset, self.val_dataset):
            if dataset is not None and self._num_classes not in (None, dataset.categories.num_classes):
                raise CocoAnnotationError(
                    f"'{dataset.annotation_file}' lists {dataset.categories.num_classes} categories but "
                    f"num_classes={self._num_classes} (the model's classes; data.num_classes in the config)"
                )
        if self.train_dataset is not None and self.val_dataset is not None:
            if self.train_dataset.categories != self.val_dataset.categories:
                raise CocoAnnotationError(
                    f"'{self.train_dataset.annotation_file}' and '{self.val_dataset.annotation_file}' list "
                    f"different categories: {self.train_dataset.categories} vs {self.val_dataset.categories}"
                )

    @property
    def categories(self) -> CocoCategories:
        dataset = self.val_dataset or self.train_dataset
        if dataset is None:
            raise RuntimeError("Call setup() first: the categories come from the annotation files")
        return dataset.categories

    @property
    def num_classes(self) -> int:
        """The configured ``num_classes`` (checked against the annotation files in ``setup``), or, without
        one, the number of categories in the files (after ``setup``)."""
        if self._num_classes is not None:
            return self._num_classes
        return self.categories.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.categories.names)

    @property
    def label_to_category_id(self) -> list[int]:
        return list(self.categories.category_ids)

    @property
    def val_annotation_file(self) -> Path:
        return annotation_file(self.root, self.val_split)

    # -- loader hooks (see ResumableDataModule) -----------------------------------------------------
    def train_collate(self) -> DetectionCollate:
        return self.collate

    def val_collate(self) -> DetectionCollate:
        return self.collate

    def samples_in_batch(self, batch: dict[str, Any]) -> int:
        return len(batch["image_ids"])
