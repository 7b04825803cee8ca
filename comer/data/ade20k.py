"""ADE20K (SceneParsing, ADEChallengeData2016) on disk: layout discovery, pairing, loading.

The release layout is::

    <root>/ADEChallengeData2016/images/{training,validation}/<stem>.jpg
    <root>/ADEChallengeData2016/annotations/{training,validation}/<stem>.png

Annotations are single-channel PNGs: 0 = unlabeled, 1..150 = classes. With
``reduce_zero_label`` they become 255 (ignore) and 0..149.

Samples stay uint8 from the file to the batch (images RGB, labels class indices);
:func:`comer.data.transforms.normalize_images` normalises a batch on the device.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
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
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

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


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """ADE20K's names for its 150 classes; ``class_0 .. class_{n-1}`` for a dataset of another class count
    in this layout."""
    if num_classes == len(ADE20K_CLASSES):
        return ADE20K_CLASSES
    return tuple(f"class_{index}" for index in range(num_classes))


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...] | None:
    """ADE20K's palette for its 150 classes; None for another class count (the task module then generates a
    fixed one, :func:`comer.training.visualization.default_palette`)."""
    return ADE20K_PALETTE if num_classes == len(ADE20K_CLASSES) else None


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
    annotations = {p.stem: p for p in annotation_dir.iterdir() if p.suffix.lower() == ANNOTATION_SUFFIX}
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


def header_size(path: Path, what: str, apply_exif_orientation: bool) -> tuple[int, int]:
    """(height, width) of ``path`` from its header alone (nothing is decoded); with
    ``apply_exif_orientation`` the size after the EXIF orientation, as :func:`read_image` decodes it."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if apply_exif_orientation and img.getexif().get(EXIF_ORIENTATION_TAG) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except Exception as exc:  # Pillow raises several kinds for a damaged header
        raise UnreadableSampleError(f"Cannot read {what} '{path}': {exc}") from exc
    return height, width


def _size_mismatch(paths: SamplePaths, image_size: tuple[int, int], label_size: tuple[int, int]) -> str:
    return (f"Image '{paths.image}' is {image_size} but annotation '{paths.annotation}' is {label_size} "
            f"(the image's EXIF orientation, if any, is applied, as mmseg does).")


def check_pair_sizes(samples: Sequence[SamplePaths], skip_unreadable: bool) -> None:
    """Every image and its annotation must open and have the same size, read from the file headers (fast:
    nothing is decoded), so a damaged or mismatched pair fails before any model is built. With
    ``skip_unreadable`` such pairs are only counted here (a warning); they are left out when read."""
    problems = []
    for paths in samples:
        try:
            image_size = header_size(paths.image, "image", apply_exif_orientation=True)
            label_size = header_size(paths.annotation, "annotation", apply_exif_orientation=False)
            if image_size != label_size:
                raise UnreadableSampleError(_size_mismatch(paths, image_size, label_size))
        except UnreadableSampleError as exc:
            if not skip_unreadable:
                raise
            problems.append(str(exc))
    if problems:
        log.warning("%d of %d image/annotation pairs cannot be used and will be left out when read "
                    "(skip_unreadable); the first: %s", len(problems), len(samples), problems[0])


def _read_bytes(path: Path, what: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UnreadableSampleError(f"Cannot read {what} '{path}': {exc}") from exc


def _imdecode(data: np.ndarray, flags: int) -> np.ndarray | None:
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:  # e.g. an empty file
        return None


def read_image(path: Path) -> np.ndarray:
    """Decode ``path`` as RGB uint8 [H, W, 3] as mmseg's ``LoadImageFromFile`` does: OpenCV with
    ``IMREAD_COLOR`` (EXIF orientation applied, greyscale replicated to three channels), then BGR -> RGB.
    For ordinary (YCbCr or greyscale) JPEGs Pillow decodes the same pixels."""
    data = _read_bytes(path, "image")
    image = _imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableSampleError(f"Cannot read image '{path}': not a decodable image ({data.size} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)


def _is_8bit_grey_png(data: np.ndarray) -> bool:
    """The PNG header (IHDR: bit depth at byte 24, colour type at 25) says 8-bit greyscale."""
    return (data.size > 25 and data[:8].tobytes() == PNG_SIGNATURE and data[12:16].tobytes() == b"IHDR"
            and data[24] == 8 and data[25] == 0)


def read_annotation(path: Path) -> np.ndarray:
    """Decode a single-channel label PNG as uint8 [H, W]: the values Pillow gives, as mmseg reads labels
    (Pillow, 'unchanged'): grey values of an 'L' PNG, palette indices of a 'P' PNG. 8-bit greyscale PNGs
    (ADE20K's) go through OpenCV, which decodes the same values faster."""
    data = _read_bytes(path, "annotation")
    if _is_8bit_grey_png(data):
        label = _imdecode(data, cv2.IMREAD_UNCHANGED)
        if label is not None and label.ndim == 2 and label.dtype == np.uint8:
            return label
    try:  # palette PNGs, other modes (rejected) and damaged files (Pillow names the problem)
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("L", "P"):
                raise ValueError(f"mode '{img.mode}', expected a single-channel ('L' or 'P') PNG")
            return np.array(img, dtype=np.uint8)
    except Exception as exc:
        raise UnreadableSampleError(f"Cannot read annotation '{path}': {exc}") from exc


def check_label_range(label: np.ndarray, num_classes: int, reduce_zero_label: bool, path: Path) -> None:
    """Raw labels must be 0..num_classes with reduction (0 = unlabeled), else 0..num_classes-1 or 255.

    One ``max`` decides for valid labels; the values present are listed only when it does not."""
    highest_allowed = num_classes if reduce_zero_label else num_classes - 1
    if label.size == 0 or int(label.max()) <= highest_allowed:
        return
    values = np.flatnonzero(np.bincount(label.reshape(-1), minlength=256))  # the values present, sorted
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
    """0 -> 255 (ignore), k -> k-1: one uint8 subtraction, in which 0 wraps round to 255."""
    return np.asarray(label, dtype=np.uint8) - np.uint8(1)


def _channel_first(image: np.ndarray) -> torch.Tensor:
    """[H,W,3] array -> [3,H,W] tensor view (no copy: the collate copies once, into the batch)."""
    return torch.from_numpy(image).permute(2, 0, 1)


class SegmentationDataset(Dataset):
    """Image/label pairs in the ADE20K layout, transformed by an albumentations pipeline.

    ``dataset[i]`` loads sample ``i``; ``dataset[(i, position)]`` does the same with the
    augmentation random state seeded from ``(seed, position)``, so a sample's augmentation
    depends only on where it sits in the (seeded) sample stream, not on the worker that loads it.
    ``transform_label=False`` transforms the image only (evaluation: the label keeps its original
    size); ``test_views`` (``(ratio, transform)`` pairs) add one more view of the image per pair, each
    made from the original image (multi-scale testing, as mmseg's ``MultiScaleFlipAug``).

    A sample is ``{"image": uint8 [3,H,W] RGB, "label": uint8 [H,W], "path": str, "skipped": [...]}``
    plus ``"views"`` (uint8 [3,h,w] per ratio) and ``"ratios"`` with ``test_views``. Stack samples
    with :func:`collate_samples`.

    ``skip_unreadable``: an unreadable sample (image or annotation) is left out. ``dataset[i]`` then
    returns ``{"path": ..., "skipped": [(path, reason)]}`` without an image, which the collate drops
    (the batch is one smaller; its ``"skipped"`` names the file). In the training stream
    (``dataset[(i, position)]``) the position is filled instead by a sample drawn uniformly at random
    from the whole split (seeded by the position: deterministic and resumable), so every readable
    file keeps the same expected weight and every batch its size; the sample's ``"skipped"`` names the
    unreadable file. Without ``skip_unreadable`` the error stops the run.
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
        test_views: Sequence[tuple[float, Callable]] = (),
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if test_views and transform_label:
            raise ValueError("test_views are for evaluation datasets (transform_label=False)")
        self.samples = discover_pairs(root, split)
        check_pair_sizes(self.samples, skip_unreadable)
        self.split = split
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self.transform_label = transform_label
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self.test_views = tuple((float(ratio), view) for ratio, view in test_views)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw image [H,W,3] uint8 and label [H,W] uint8 (range-checked, reduced if configured)."""
        paths = self.samples[index]
        image = read_image(paths.image)
        label = read_annotation(paths.annotation)
        if image.shape[:2] != label.shape:
            raise UnreadableSampleError(_size_mismatch(paths, image.shape[:2], label.shape))
        check_label_range(label, self.num_classes, self.reduce_zero_label, paths.annotation)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        return image, label

    def _substitute(self, position: int, attempt: int) -> int:
        """The sample standing in for an unreadable one at stream ``position``: uniform over the split."""
        return int(np.random.default_rng((self.seed, position, attempt)).integers(len(self.samples)))

    def _load_readable(
        self, index: int, position: int | None, skipped: list
    ) -> tuple[int, np.ndarray, np.ndarray] | None:
        for attempt in range(len(self.samples)):
            try:
                return index, *self.load(index)
            except UnreadableSampleError as exc:
                if not self.skip_unreadable:
                    raise
                skipped.append((str(self.samples[index].image), str(exc)))
                log.warning("Leaving out an unreadable sample (skip_unreadable=True): %s", exc)
                if position is None:
                    return None
                index = self._substitute(position, attempt)
        raise UnreadableSampleError(
            f"No readable sample in split '{self.split}' after {len(self.samples)} draws ({len(self.samples)} files)."
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, position = (key, None) if isinstance(key, (int, np.integer)) else key
        skipped: list[tuple[str, str]] = []
        loaded = self._load_readable(int(index), position, skipped)
        if loaded is None:
            return {"path": skipped[0][0], "skipped": skipped}
        index, image, label = loaded
        views = [view(image=image)["image"] for _, view in self.test_views]
        if self.transform is not None:
            if position is not None:
                seed_pipeline(self.transform, sample_seed(self.seed, position))
            if self.transform_label:
                out = self.transform(image=image, mask=label)
                image, label = out["image"], out["mask"]
            else:
                image = self.transform(image=image)["image"]
        sample = {
            "image": _channel_first(image),
            "label": torch.from_numpy(label),
            "path": str(self.samples[index].image),
            "skipped": skipped,
        }
        if self.test_views:
            sample["views"] = tuple(_channel_first(view) for view in views)
            sample["ratios"] = tuple(ratio for ratio, _ in self.test_views)
        return sample


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src``. For the dataset's images (channel-first views of channel-last arrays) the
    transposing copy goes through ``cv2.split`` into the planes of ``dst``: a few times faster than
    torch's strided copy."""
    if src.dim() == 3 and src.shape[0] == 3 and src.stride(0) == 1 and src.stride(2) == 3 and dst.stride(-1) == 1:
        planes = [dst[c].numpy() for c in range(3)]
        written = cv2.split(src.permute(1, 2, 0).numpy(), planes)
        if all(w is p for w, p in zip(written, planes)):
            return
    dst.copy_(src)


def _stack(tensors: Sequence[torch.Tensor], size: tuple[int, int] | None, fill: int, what: str) -> torch.Tensor:
    """[B, ..., H, W]: each tensor top-left in a ``size`` canvas filled with ``fill`` (one copy per
    tensor: a channel-first view of a channel-last image is transposed on the way). ``size=None``: the
    tensors' common size."""
    if size is None:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch {what}s of different sizes {sorted(shapes)} without padding")
        size = tuple(tensors[0].shape[-2:])
    lead = tuple(tensors[0].shape[:-2])
    out = torch.empty((len(tensors), *lead, *size), dtype=tensors[0].dtype)
    for i, tensor in enumerate(tensors):
        height, width = tensor.shape[-2:]
        if height > size[0] or width > size[1]:
            raise ValueError(f"{what} {i} is {height}x{width}, larger than the batch size {size}")
        _copy_into(out[i, ..., :height, :width], tensor)
        if height < size[0]:
            out[i, ..., height:, :] = fill
        if width < size[1]:
            out[i, ..., :height, width:] = fill
    return out


def collate_samples(
    samples: Sequence[dict[str, Any]], pad_to: Sequence[int] | None = None, ignore_index: int = IGNORE_INDEX
) -> dict[str, Any]:
    """Samples of :class:`SegmentationDataset` -> one batch. Left-out (unreadable) samples are dropped;
    every sample's ``"skipped"`` entries are kept. The batch:

    - ``image``: uint8 [B,3,H,W]; with ``pad_to`` = (H, W) each image top-left, 0 elsewhere;
    - ``label``: uint8 [B,H,W], padded with ``ignore_index``;
    - ``image_sizes``: the (h, w) of each image before padding (with ``pad_to``);
    - ``path``: list[str]; ``skipped``: list of (path, reason);
    - ``views``: tuple of uint8 [B,3,h,w] and ``ratios`` (tuple of float), with test views.

    A batch whose samples were all left out has B = 0.
    """
    readable = [s for s in samples if "image" in s]
    size = None if pad_to is None else (int(pad_to[0]), int(pad_to[1]))
    if readable:
        images = _stack([s["image"] for s in readable], size, 0, "image")
        labels = _stack([s["label"] for s in readable], size, ignore_index, "label")
    else:
        images = torch.empty((0, 3, *(size or (0, 0))), dtype=torch.uint8)
        labels = torch.empty((0, *(size or (0, 0))), dtype=torch.uint8)
    batch: dict[str, Any] = {
        "image": images,
        "label": labels,
        "path": [s["path"] for s in readable],
        "skipped": [entry for s in samples for entry in s["skipped"]],
    }
    if size is not None:
        batch["image_sizes"] = [tuple(s["image"].shape[-2:]) for s in readable]
    if readable and "views" in readable[0]:
        ratios = {s["ratios"] for s in readable}
        if len(ratios) > 1:
            raise ValueError(f"samples carry views of different test ratios: {sorted(ratios)}")
        batch["ratios"] = readable[0]["ratios"]
        batch["views"] = tuple(
            _stack([s["views"][k] for s in readable], None, 0, "view") for k in range(len(batch["ratios"]))
        )
    return batch
