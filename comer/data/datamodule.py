"""LightningDataModule for semantic segmentation datasets in the ADE20K layout."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from comer.data.ade20k import (
    ADE20K_CLASSES,
    TRAIN_SPLIT,
    VAL_SPLIT,
    SegmentationDataset,
    collate_samples,
    default_class_names,
    default_palette,
)
from comer.data.sampler import EvaluationShardSampler, InfiniteShuffleSampler
from comer.data.seeding import seed_worker
from comer.data.transforms import IGNORE_INDEX, build_test_transform, build_train_transform, to_pair

log = logging.getLogger(__name__)

STATE_KEY = "samples_consumed"


class SegmentationDataModule(L.LightningDataModule):
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

    Resuming: ``state_dict()`` stores the number of samples consumed by all ranks (counted in
    ``on_after_batch_transfer`` during training; Lightning saves it in checkpoints), and
    ``train_dataloader()`` restarts the stream there, so a resumed run sees exactly the batches of
    an uninterrupted one. ``samples_consumed`` may also be set directly. (Lightning calls a
    datamodule's ``on_after_batch_transfer`` instead of the LightningModule's.)
    """

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
        self.samples_consumed = 0
        self.train_dataset: SegmentationDataset | None = None
        self.val_dataset: SegmentationDataset | None = None
        self._skipped: dict[str, dict[str, str]] = {}

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

    def skipped_samples(self) -> dict[str, list[str]]:
        """Split -> the image paths of the samples left out as unreadable so far, in the order met (each
        once). Recorded from the batches this process received, so under DDP each rank lists its own."""
        return {split: list(paths) for split, paths in self._skipped.items()}

    def _record_skipped(self, split: str, entries: Sequence[tuple[str, str]]) -> None:
        seen = self._skipped.setdefault(split, {})
        for path, reason in entries:
            if path not in seen:
                seen[path] = reason
                log.warning("skip_unreadable: left out '%s' from split '%s' (%d file(s) of that split so far): %s",
                            path, split, len(seen), reason)

    # -- distributed context ----------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # -- loaders ----------------------------------------------------------------------------
    def train_sampler(self) -> InfiniteShuffleSampler:
        self._require(self.train_dataset, "fit")
        rank, world = self._rank_and_world()
        return InfiniteShuffleSampler(len(self.train_dataset), self.seed, rank, world, start=self.samples_consumed)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_samples, pad_to=self.crop_size, ignore_index=self.ignore_index),
            pin_memory=self.pin_memory,
            drop_last=True,
            persistent_workers=False,
            worker_init_fn=functools.partial(seed_worker, seed=self.seed, rank=sampler.rank, start=sampler.start),
            generator=self._private_generator(),
        )

    def val_dataloader(self) -> DataLoader:
        self._require(self.val_dataset, "validate")
        return DataLoader(
            self.val_dataset,
            batch_size=1,
            sampler=EvaluationShardSampler(len(self.val_dataset), *self._rank_and_world()),
            num_workers=self.val_num_workers,
            collate_fn=collate_samples,
            pin_memory=self.pin_memory,
            generator=self._private_generator(),
        )

    def _private_generator(self) -> torch.Generator:
        """Each DataLoader iterator draws a base seed; from its own generator it leaves the global torch RNG
        (drop path, dropout) untouched, so a resumed run draws what an uninterrupted one would."""
        return torch.Generator().manual_seed(self.seed)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @staticmethod
    def _require(dataset, stage: str) -> None:
        if dataset is None:
            raise RuntimeError(f"Call setup('{stage}') before building its dataloader.")

    # -- resumable position ------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None:
            if trainer.training:
                self.samples_consumed += len(batch["path"]) * trainer.world_size
            self._record_skipped(self.train_split if trainer.training else self.val_split, batch.get("skipped", ()))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: self.samples_consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if STATE_KEY not in state_dict:
            raise KeyError(f"datamodule state has no '{STATE_KEY}' (keys: {sorted(state_dict)})")
        self.samples_consumed = int(state_dict[STATE_KEY])


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
