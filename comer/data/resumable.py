"""The part the segmentation and COCO datamodules share: a resumable training stream, sharded
evaluation loaders and the record of samples skipped as unreadable."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from comer.data.sampler import EvaluationShardSampler, InfiniteShuffleSampler
from comer.data.seeding import seed_worker

log = logging.getLogger(__name__)

STATE_KEY = "samples_consumed"


class ResumableDataModule(L.LightningDataModule):
    """Loaders for a dataset pair whose training stream resumes where it stopped.

    Train: an infinite seeded shuffled stream (:class:`InfiniteShuffleSampler`), ``batch_size`` per
    device, workers seeded from the stream position (:func:`seed_worker`). Validation and test: in
    order, ``val_batch_size`` per device, split over ranks (:class:`EvaluationShardSampler`: each
    sample on one rank). Every loader draws its base seed from a private generator seeded with
    ``seed``, never from the global torch RNG.

    Resuming: ``state_dict()`` stores the number of samples consumed by all ranks (counted in
    ``on_after_batch_transfer`` during training; Lightning saves it in checkpoints), and
    ``train_dataloader()`` restarts the stream there, so a resumed run sees exactly the batches of an
    uninterrupted one. ``samples_consumed`` may also be set directly. (Lightning calls a datamodule's
    ``on_after_batch_transfer`` instead of the LightningModule's.)

    Skipped samples: a batch may list the samples its dataset left out as unreadable under
    ``"skipped"`` (``(path, reason)`` pairs); each is logged once and listed by :meth:`skipped_samples`.

    A subclass calls ``super().__init__()`` and provides the attributes annotated below (the datasets
    stay ``None`` until its ``setup`` builds them), ``val_batch_size``, and the hooks
    :meth:`train_collate`, :meth:`val_collate` and :meth:`samples_in_batch`.
    """

    train_dataset: Dataset | None
    val_dataset: Dataset | None
    train_split: str | None
    val_split: str
    batch_size: int
    val_batch_size: int
    num_workers: int
    val_num_workers: int
    pin_memory: bool
    seed: int

    def __init__(self) -> None:
        super().__init__()
        self.samples_consumed = 0
        self._skipped: dict[str, dict[str, str]] = {}

    # -- hooks --------------------------------------------------------------------------------------
    def train_collate(self) -> Callable[[list], Any]:
        """The ``collate_fn`` of the training loader."""
        raise NotImplementedError

    def val_collate(self) -> Callable[[list], Any]:
        """The ``collate_fn`` of the validation and test loaders."""
        raise NotImplementedError

    def samples_in_batch(self, batch: Any) -> int:
        """The number of samples in a collated batch (what this device consumed of the stream)."""
        raise NotImplementedError

    # -- skipped samples ----------------------------------------------------------------------------
    def skipped_samples(self) -> dict[str, list[str]]:
        """Split -> the paths of the samples left out as unreadable so far (``skip_unreadable``), in the
        order met, each once. Recorded from the batches this process received, so under DDP each rank
        lists its own."""
        return {split: list(paths) for split, paths in self._skipped.items()}

    def _record_skipped(self, split: str, entries: Sequence[tuple[str, str]]) -> None:
        seen = self._skipped.setdefault(split, {})
        for path, reason in entries:
            if path not in seen:
                seen[path] = reason
                log.warning("skip_unreadable: left out '%s' from split '%s' (%d file(s) of that split so far): %s",
                            path, split, len(seen), reason)

    # -- loaders ------------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

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
            collate_fn=self.train_collate(),
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
            batch_size=self.val_batch_size,
            sampler=EvaluationShardSampler(len(self.val_dataset), *self._rank_and_world()),
            num_workers=self.val_num_workers,
            collate_fn=self.val_collate(),
            pin_memory=self.pin_memory,
            generator=self._private_generator(),
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _private_generator(self) -> torch.Generator:
        """Each DataLoader iterator draws a base seed; from its own generator it leaves the global torch RNG
        (drop path, dropout) untouched, so a resumed run draws what an uninterrupted one would."""
        return torch.Generator().manual_seed(self.seed)

    @staticmethod
    def _require(dataset, stage: str) -> None:
        if dataset is None:
            raise RuntimeError(f"Call setup('{stage}') before building its dataloader.")

    # -- resumable position -------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None:
            if trainer.training:
                self.samples_consumed += self.samples_in_batch(batch) * trainer.world_size
            split = self.train_split if trainer.training else self.val_split
            self._record_skipped(str(split), batch.get("skipped", ()))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: self.samples_consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if STATE_KEY not in state_dict:
            raise KeyError(f"datamodule state has no '{STATE_KEY}' (keys: {sorted(state_dict)})")
        self.samples_consumed = int(state_dict[STATE_KEY])
