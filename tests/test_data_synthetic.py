import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from comer.data.ade20k import discover_pairs
from comer.data.synthetic import (
    CLASS_NAMES,
    SyntheticSegDataModule,
    generate_synthetic_ade20k,
    read_marker,
)

ADE = "ADEChallengeData2016"
SIZE = 64


def dm_kwargs(root, **over):
    kw = dict(
        root=root, num_train=8, num_val=3, image_size=SIZE, generation_seed=0, crop_size=32, scale=(128, 32),
        ratio_range=(0.5, 2.0), cat_max_ratio=0.75, test_scale=(128, 64), size_divisor=32, batch_size=2,
        num_workers=0, pin_memory=False, seed=0,
    )
    kw.update(over)
    return kw


def test_layout_classes_and_marker(tmp_path):
    target = generate_synthetic_ade20k(tmp_path, num_train=6, num_val=2, image_size=SIZE, seed=0)
    assert target == tmp_path / ADE
    train, val = discover_pairs(tmp_path, "training"), discover_pairs(tmp_path, "validation")
    assert len(train) == 6 and len(val) == 2
    assert json.loads((target / "classes.json").read_text()) == list(CLASS_NAMES)
    assert 6 <= len(CLASS_NAMES) <= 8 and CLASS_NAMES[0] == "background"
    assert read_marker(tmp_path)["num_train"] == 6
    assert not list(tmp_path.glob(".*tmp*"))  # temporary folder renamed away
    values = set()
    for pair in train:
        image, label = Image.open(pair.image), np.asarray(Image.open(pair.annotation))
        assert image.mode == "RGB" and image.size == (SIZE, SIZE) and label.shape == (SIZE, SIZE)
        assert label.max() <= len(CLASS_NAMES)
        values |= set(np.unique(label).tolist())
    assert 0 in values and 1 in values  # unlabeled outlines and the background class
    assert len(values - {0, 1}) >= 3  # several shape classes appear


def test_generation_is_deterministic_for_a_seed(tmp_path):
    a = generate_synthetic_ade20k(tmp_path / "a", 3, 1, SIZE, seed=5)
    b = generate_synthetic_ade20k(tmp_path / "b", 3, 1, SIZE, seed=5)
    c = generate_synthetic_ade20k(tmp_path / "c", 3, 1, SIZE, seed=6)
    rel = "annotations/training/synthetic_training_000001.png"
    img = "images/training/synthetic_training_000001.jpg"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / img).read_bytes() == (b / img).read_bytes()
    assert not np.array_equal(np.asarray(Image.open(a / rel)), np.asarray(Image.open(c / rel)))


def test_marker_skips_identical_regeneration_and_redoes_changed(tmp_path):
    target = generate_synthetic_ade20k(tmp_path, 2, 1, SIZE, seed=0)
    probe = target / "images" / "training" / "synthetic_training_000000.jpg"
    probe.write_bytes(b"sentinel")  # would be overwritten by a regeneration
    generate_synthetic_ade20k(tmp_path, 2, 1, SIZE, seed=0)
    assert probe.read_bytes() == b"sentinel"
    generate_synthetic_ade20k(tmp_path, 3, 1, SIZE, seed=0)
    assert probe.read_bytes() != b"sentinel" and len(discover_pairs(tmp_path, "training")) == 3


def test_interrupted_generation_is_redone(tmp_path):
    stale = tmp_path / f".{ADE}.tmpdead"
    (stale / "images").mkdir(parents=True)  # what an interrupted run leaves: no marker, not renamed
    generate_synthetic_ade20k(tmp_path, 2, 1, SIZE, seed=0)
    assert not stale.exists() and read_marker(tmp_path) is not None


def test_refuses_to_overwrite_a_real_dataset(tmp_path):
    (tmp_path / ADE / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        generate_synthetic_ade20k(tmp_path, 2, 1, SIZE, seed=0)


def test_bad_generation_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_synthetic_ade20k(tmp_path, 0, 1, SIZE, seed=0)
    with pytest.raises(ValueError, match="reduce_zero_label must be True"):
        SyntheticSegDataModule(**dm_kwargs(tmp_path, reduce_zero_label=False))


def test_datamodule_generates_and_reads_class_names(tmp_path):
    dm = SyntheticSegDataModule(**dm_kwargs(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == list(CLASS_NAMES) and dm.num_classes == len(CLASS_NAMES)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert set(batch["label"].unique().tolist()) <= set(range(len(CLASS_NAMES))) | {255}
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 3, 64, 64) and val["label"].shape == (1, SIZE, SIZE)


def _batches(root, seed, n, num_workers, start=0):
    dm = SyntheticSegDataModule(**dm_kwargs(root, seed=seed, num_workers=num_workers))
    dm.prepare_data()
    dm.setup("fit")
    dm.samples_consumed = start
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_two_worker_loader_is_reproducible_and_resumable(tmp_path):
    run1 = _batches(tmp_path, seed=0, n=5, num_workers=2)
    run2 = _batches(tmp_path, seed=0, n=5, num_workers=2)
    for a, b in zip(run1, run2):
        assert a["path"] == b["path"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    other = _batches(tmp_path, seed=1, n=1, num_workers=2)
    assert not torch.equal(run1[0]["image"], other[0]["image"])
    # augmentation depends on the stream position only: worker count and resume do not change it
    resumed = _batches(tmp_path, seed=0, n=2, num_workers=0, start=6)
    for a, b in zip(run1[3:], resumed):
        assert a["path"] == b["path"] and torch.equal(a["image"], b["image"])
    # over 5 batches the random augmentation differs between samples (flip/crop/colour really random)
    assert not all(torch.equal(run1[0]["image"][0], b["image"][0]) for b in run1[1:])


class _PathRecorder(L.LightningModule):
    """A one-parameter model that records the sample paths of every training batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((tuple(batch["path"]), float(batch["image"].sum())))
        return (self.weight - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, max_steps, ckpt_path=None, save_to=None):
    dm = SyntheticSegDataModule(**dm_kwargs(root))
    model = _PathRecorder()
    trainer = L.Trainer(
        max_steps=max_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model.seen, dm


def test_lightning_resume_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    full, dm = _fit(tmp_path, 5)
    assert dm.samples_consumed == 5 * 2
    first, _ = _fit(tmp_path, 2, save_to=tmp_path / "step2.ckpt")
    assert torch.load(tmp_path / "step2.ckpt", weights_only=False)["SyntheticSegDataModule"] == {"samples_consumed": 4}
    rest, _ = _fit(tmp_path, 5, ckpt_path=tmp_path / "step2.ckpt")
    assert first + rest == full
