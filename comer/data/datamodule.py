"""LightningDataModule for semantic segmentation datasets in the ADE20K layout."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

from comer.data.ade20k import (
    ADE20K_CLASSES,
    TRAIN_SPLIT,
    VAL_SPLIT,
    SegmentationDataset,
    collate_samples,
    default_class_names,
    default_palette,
)
from comer.data.resumable import ResumableDataModule
from comer.data.transforms import IGNORE_INDEX, build_test_transform, build_train_transform, to_pair


class SegmentationDataModule(ResumableDataModule):
    """Train: an infinite seeded shuffled stream, ``batch_size`` per device, augmentation seeded
    per sample from its global stream position, padded to ``crop_size``. Validation: batch size 1,
    in order, split over ranks (each image on one rank: ``EvaluationShardSampler``), image resized to ``test_scale`` (multiple of ``size_divisor``), label at original size;
    ``test_ratios`` other than ``(1.0,)`` add one view per ratio (multi-scale testing; the configs set
    it to the module's ``scales``).

    Batches are uint8 (see :func:`comer.data.ade20k.collate_samples`): images RGB [B,3,H,W], labels
    [B,H,W]; the LightningModule normalises them on the device
    (:func:`comer.data.transforms.normalize_images`).

    ``skip_unreadable``: unreadable samples are left out (see :class:`SegmentationDataset`); each is
    logged once and listed by :meth:`skipped_samples` (recorded as batches arrive in this process).

    Resuming, loaders and the skipped-sample record: :class:`ResumableDataModule`.
    """

    val_batch_size = 1  # validation images keep their own sizes

    def __init__(
        self,
        root: str | Path,
        num_classes: int,
        class_names: Sequence[str],
        crop_size: int | Sequence[int],
        scale: Sequence[int],
        ratio_range: Sequence[float],
        cat_max_ratio: float,
        test_scale: Sequence[int],
        size_divisor: int | None,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        seed: int,
        reduce_zero_label: bool,
        skip_unreadable: bool = False,
        flip_prob: float = 0.5,
        photometric: bool = True,
        test_ratios: Sequence[float] = (1.0,),
        train_split: str = TRAIN_SPLIT,
        val_split: str = VAL_SPLIT,
        val_num_workers: int | None = None,
        palette: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        if palette is not None and len(palette) != num_classes:
            raise ValueError(f"palette has {len(palette)} colours but num_classes={num_classes}")
        self.root = Path(root)
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.palette = [tuple(int(v) for v in colour) for colour in palette] if palette is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_num_workers = num_workers if val_num_workers is None else val_num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.reduce_zero_label = reduce_zero_label
        self.skip_unreadable = skip_unreadable
        self.train_split = train_split
        self.val_split = val_split
        self.ignore_index = IGNORE_INDEX
        self.crop_size = to_pair(crop_size, "crop_size")
        self.train_transform = build_train_transform(
            crop_size, scale, ratio_range, cat_max_ratio, flip_prob, IGNORE_INDEX, photometric
        )
        self.test_transform = build_test_transform(test_scale, size_divisor)
        self.test_ratios = tuple(float(r) for r in test_ratios)
        if not self.test_ratios:
            raise ValueError("test_ratios must name at least one ratio (1.0: the test scale itself)")
        self.test_views = []  # (ratio, transform) per test scale; none when testing at the test scale alone
        if self.test_ratios != (1.0,):
            self.test_views = [(r, build_test_transform(test_scale, size_divisor, r)) for r in self.test_ratios]
        self.train_dataset: SegmentationDataset | None = None
        self.val_dataset: SegmentationDataset | None = None

    # -- datasets -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Discover and pair files (raises on a wrong root or unpaired files)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_split, self.train_transform, transform_label=True)
        if stage in (None, "fit", "validate", "test") and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_split, self.test_transform, transform_label=False)

    def _dataset(self, split: str, transform, transform_label: bool) -> SegmentationDataset:
        return SegmentationDataset(
            self.root,
            split,
            num_classes=self.num_classes,
            reduce_zero_label=self.reduce_zero_label,
            transform=transform,
            transform_label=transform_label,
            seed=self.seed,
            skip_unreadable=self.skip_unreadable,
            test_views=() if transform_label else self.test_views,
        )

    # -- loader hooks (see ResumableDataModule) --------------------------------------------------
    def train_collate(self) -> Callable[[list], dict[str, Any]]:
        return functools.partial(collate_samples, pad_to=self.crop_size, ignore_index=self.ignore_index)

    def val_collate(self) -> Callable[[list], dict[str, Any]]:
        return collate_samples

    def samples_in_batch(self, batch: dict[str, Any]) -> int:
        return len(batch["path"])


class ADE20KDataModule(SegmentationDataModule):
    """A dataset in the ADE20K layout (ADEChallengeData2016), zero label reduced by default. With ADE20K's 150
    classes the class names and palette are ADE20K's; with another ``num_classes`` (a dataset of one's own in
    this layout) they default to ``class_0 .. class_{n-1}`` and a generated palette. ``class_names`` and
    ``palette`` set them."""

    def __init__(self, root: str | Path, num_classes: int = len(ADE20K_CLASSES),
                 class_names: Sequence[str] | None = None, palette: Sequence[Sequence[int]] | None = None,
                 reduce_zero_label: bool = True, **kwargs: Any) -> None:
        super().__init__(root=root, num_classes=num_classes,
                         class_names=default_class_names(num_classes) if class_names is None else class_names,
                         palette=default_palette(num_classes) if palette is None else palette,
                         reduce_zero_label=reduce_zero_label, **kwargs)
