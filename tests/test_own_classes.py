"""A dataset of one's own in the ADE20K layout: a class count alone gives names and a palette, the data's
num_classes is the one class count, and the run's files land where the README says (metrics.json holds the
best validation and its step)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app_utils import SMALL_BACKBONE, compose_config, write_tiny_ade20k
from comer.app import train
from comer.app.builders import ConfigError, check_config
from comer.data import ADE20KDataModule
from comer.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from comer.training.visualization import as_palette, default_palette

NUM_CLASSES = 4
IMAGE_SIZE = (48, 64)

# ADE20K's recipe on a dataset of 4 classes, with slim heads on 64 px crops: two steps in seconds.
TINY_OWN_DATASET = [
    "task=ade20k", f"data.num_classes={NUM_CLASSES}", *SMALL_BACKBONE, "data.crop_size=[64,64]", "data.scale=[128,64]",
    "data.test_scale=[128,64]", "global_batch_size=null",
    "data.batch_size=2", "data.num_workers=0", "module.crop_size=[64,64]", "module.stride=[43,43]",
    "module.scheduler.warmup_iters=1", "model.decode_head.channels=16", "model.auxiliary_head.channels=8",
    "trainer.precision=32-true", "trainer.max_steps=2", "trainer.val_check_interval=1", "checkpoint_every_n_steps=2",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
    "module.num_val_images_to_log=1", "extras.print_config=false",
]


def write_own_dataset(root: Path, split_sizes: dict[str, int], num_classes: int = NUM_CLASSES) -> Path:
    """Random images and labels 0..num_classes (0 = unlabeled) in the ADEChallengeData2016 layout."""
    return write_tiny_ade20k(root, split_sizes, IMAGE_SIZE, num_classes, stem="own_{index:04d}")


def test_own_class_count_trains_and_reports_its_classes(tmp_path):
    root = write_own_dataset(tmp_path / "own", {"training": 4, "validation": 2})
    result = train(compose_config("train", [*TINY_OWN_DATASET, f"data.root={root}"], tmp_path))
    run_dir = Path(result["run_dir"])
    names = [f"class_{k}" for k in range(NUM_CLASSES)]
    assert result["global_step"] == 2
    assert sorted(k.removeprefix("val/IoU/") for k in result["metrics"] if k.startswith("val/IoU/")) == names

    table = (run_dir / "metric_tables" / "val_step_000002.txt").read_text().splitlines()
    class_rows = [line.split()[0] for line in table if line.split() and line.split()[0].startswith("class_")]
    assert class_rows == names, table
    assert not any(name in "\n".join(table) for name in ADE20K_CLASSES[:3]), "no ADE20K names"

    # metrics.json: the best validation (by the monitored val/mIoU) with its step, the one the best checkpoint holds
    written = json.loads((run_dir / "metrics.json").read_text())
    assert [entry["step"] for entry in written["history"]] == [1, 2]
    best = max(written["history"], key=lambda entry: entry["metrics"]["val/mIoU"])
    assert written["best"] == best and written["monitor"] == "val/mIoU"
    assert Path(written["best_checkpoint"]).name.startswith(f"best-step{best['step']:07d}-")
    assert Path(written["best_checkpoint"]).is_file()

    # the README's layout: pictures in the run directory, not in the CSV logger's version folder
    assert list((run_dir / "val_images" / "step_000002").glob("*.png"))
    assert not list((run_dir / "csv").glob("**/val_images"))
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()


@pytest.mark.parametrize("key", ["model.num_classes", "module.num_classes"])
def test_a_class_count_other_than_the_data_one_is_refused_before_anything_is_built(key, tmp_path):
    missing_root = tmp_path / "not_there"  # the data is never looked at
    cfg = compose_config("train", [*TINY_OWN_DATASET, f"data.root={missing_root}", f"{key}=5"], tmp_path)
    with pytest.raises(ConfigError, match=rf"{key}=5 but data.num_classes={NUM_CLASSES}"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_class_names_of_another_length_are_refused(tmp_path):
    cfg = compose_config("train", ["task=ade20k", "data.num_classes=3", "data.class_names=[road,sky]"], tmp_path)
    with pytest.raises(ConfigError, match="data.class_names has 2 names but data.num_classes=3"):
        check_config(cfg)
    cfg = compose_config("train", ["task=ade20k", "data.palette=[[0,0,0]]"], tmp_path)
    with pytest.raises(ConfigError, match="data.palette has 1 colours but data.num_classes=150"):
        check_config(cfg)


def test_names_and_palette_default_from_the_class_count(tmp_path):
    root = write_own_dataset(tmp_path / "own", {"training": 1, "validation": 1})
    common = dict(root=root, crop_size=64, scale=[128, 64], ratio_range=[0.5, 2.0], cat_max_ratio=0.75,
                  test_scale=[128, 64], size_divisor=32, batch_size=1, num_workers=0, pin_memory=False, seed=0)
    own = ADE20KDataModule(num_classes=NUM_CLASSES, **common)
    assert own.class_names == [f"class_{k}" for k in range(NUM_CLASSES)] and own.palette is None
    # the task module then draws with the fixed generated palette: the same colours in every run
    np.testing.assert_array_equal(as_palette(own.palette, NUM_CLASSES), default_palette(NUM_CLASSES))
    assert len({tuple(c) for c in default_palette(NUM_CLASSES)}) == NUM_CLASSES

    ade = ADE20KDataModule(**common)
    assert ade.class_names == list(ADE20K_CLASSES) and ade.palette == list(ADE20K_PALETTE)

    named = ADE20KDataModule(num_classes=2, class_names=["road", "sky"], palette=[[1, 2, 3], [4, 5, 6]], **common)
    assert named.class_names == ["road", "sky"] and named.palette == [(1, 2, 3), (4, 5, 6)]
