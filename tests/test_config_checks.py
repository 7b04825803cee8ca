"""Errors that used to surface after compute now fail before anything is generated, read or built: input sizes
the backbone cannot take, slide windows with gaps, nonsensical backbone sizes, a wrong dataset; a run shorter
than its validation interval validates at its end; debug=fast keeps an explicitly chosen logger."""
from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from app_utils import TINY_SYNTHETIC, compose_config
from comer.app import train
from comer.app.builders import ConfigError, check_config
from comer.app.config_checks import validate_at_the_end_of_short_runs
from comer.data.ade20k import DatasetLayoutError, UnreadableSampleError
from comer.data.coco import CocoLayoutError

TRAIN_MODULE = importlib.import_module("comer.app.train")  # comer.app.train is also the function

def tiny(*overrides: str) -> list[str]:
    """TINY_SYNTHETIC with some of its keys set otherwise."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [*(o for o in TINY_SYNTHETIC if o.split("=", 1)[0] not in keys), *overrides]


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if train() builds a model or a logger (W&B starts with its logger)."""
    def refuse(what):
        def build(*args, **kwargs):
            pytest.fail(f"{what} was built before the error")
        return build

    monkeypatch.setattr(TRAIN_MODULE, "build_model", refuse("the model"))
    monkeypatch.setattr(TRAIN_MODULE, "build_loggers", refuse("a logger"))


def refused_before_data(overrides: list[str], tmp_path, match: str) -> None:
    cfg = compose_config("train", overrides, tmp_path)
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "data").exists(), "no data may be generated for a config known to be wrong"


@pytest.mark.parametrize("overrides, match", [
    (["data.crop_size=[72,72]"], r"data.crop_size=\[72, 72\] is not a multiple of 32 .* e.g. data.crop_size=\[64,64\]"),
    (["module.crop_size=[48,64]"], r"module.crop_size=\[48, 64\] is not a multiple of 32 .* module.crop_size=\[32,64\]"),
    (["data.size_divisor=16"], r"data.size_divisor=16 must be a multiple of 32"),
    (["module.stride=[80,43]"], r"module.stride=\[80, 43\] is larger than the slide window module.crop_size=\[64, 64\]"
                                r".* e.g. module.stride=\[64,43\]"),
    (["backbone.depth=0"], r"ViTCoMer: depth must be >= 1, got 0"),
    (["backbone.num_points=0"], r"ViTCoMer: num_points must be >= 1, got 0"),
    (["backbone.deform_num_heads=5"], r"ViTCoMer: deform_num_heads 5 must divide"),
])
def test_bad_sizes_fail_before_data_and_model(overrides, match, tmp_path, nothing_built):
    refused_before_data(tiny(*overrides), tmp_path, match)


@pytest.mark.parametrize("trainer", ["trainer=gpu", "trainer=ddp"])
def test_a_gpu_trainer_without_cuda_is_refused_before_data(trainer, tmp_path, nothing_built, monkeypatch):
    """Not an AssertionError from deep inside torch once the memory preflight asks the GPU for its memory."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused_before_data(tiny(trainer), tmp_path, r"trainer.accelerator=gpu but torch sees no CUDA GPU here .* "
                                                 r"Drop trainer=gpu/ddp .* or pass trainer=cpu")


def test_the_backbone_decides_the_divisor(tmp_path):
    """PVT v2 also needs multiples of its coarsest stride (32); whole-image inference has no window to check."""
    cfg = compose_config("train", tiny("backbone=pvt_v2_b0", "data.crop_size=[80,80]"), tmp_path)
    with pytest.raises(ConfigError, match=r"data.crop_size=\[80, 80\] is not a multiple of 32"):
        check_config(cfg)
    check_config(compose_config("train", tiny("module.inference_mode=whole", "module.stride=[96,96]"), tmp_path))


@pytest.mark.slow
def test_short_run_validates_at_its_end(tmp_path, caplog):
    """trainer.max_steps below trainer.val_check_interval: one validation, at the last step, instead of none."""
    cfg = compose_config("train", tiny("trainer.max_steps=2", "trainer.val_check_interval=5"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="comer.app.config_checks"):
        result = train(cfg)
    assert "trainer.max_steps=2 is below trainer.val_check_interval=5: validating once, at the end" in caplog.text
    assert result["global_step"] == 2 and result["metrics"]["val/mIoU"] is not None
    assert [entry["step"] for entry in result["history"]] == [2]


def test_validation_interval_is_kept_when_the_run_reaches_it(tmp_path):
    cfg = compose_config("train", tiny("trainer.max_steps=10", "trainer.val_check_interval=4"), tmp_path)
    validate_at_the_end_of_short_runs(cfg)
    assert cfg.trainer.val_check_interval == 4
    cfg = compose_config("train", tiny("trainer.max_steps=3", "trainer.val_check_interval=4"), tmp_path)
    validate_at_the_end_of_short_runs(cfg)
    assert cfg.trainer.val_check_interval == 3


def ade20k_run(root, tmp_path) -> list[str]:
    return ["task=ade20k", "backbone=comer_t", f"data.root={root}", "global_batch_size=2", "data.num_workers=0",
            "trainer.max_steps=1", "trainer=cpu", "logger=csv"]


def test_wrong_data_root_fails_before_the_model_and_the_loggers(tmp_path, nothing_built):
    cfg = compose_config("train", ade20k_run(tmp_path / "no_such_ade", tmp_path), tmp_path)
    with pytest.raises(DatasetLayoutError, match="no_such_ade"):
        train(cfg)


def test_wrong_coco_root_is_its_own_error_before_the_model(tmp_path, nothing_built):
    """COCO checks its layout in the datamodule's constructor: the error reaches the user as itself (the path and
    the expected layout on their own lines), not inside Hydra's one-line "Error in call to target" wrapper."""
    cfg = compose_config("train", ["task=coco", "backbone=comer_t", f"data.root={tmp_path / 'no_such_coco'}",
                                   "trainer=cpu", "logger=csv"], tmp_path)
    with pytest.raises(CocoLayoutError, match="no_such_coco' does not exist. Expected:\n") as error:
        train(cfg)
    assert "instances_{train2017,val2017}.json" in str(error.value)


def test_dataset_with_mismatched_sizes_fails_before_the_model(tmp_path, nothing_built):
    """Every pair's sizes are read from the file headers when the dataset is set up, before any model."""
    root = tmp_path / "ade"
    for split, kind, name, array in (("training", "images", "a.jpg", np.zeros((32, 48, 3), np.uint8)),
                                     ("training", "annotations", "a.png", np.ones((32, 48), np.uint8)),
                                     ("validation", "images", "b.jpg", np.zeros((32, 48, 3), np.uint8)),
                                     ("validation", "annotations", "b.png", np.ones((48, 32), np.uint8))):
        folder = root / "ADEChallengeData2016" / kind / split
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / name)
    cfg = compose_config("train", ade20k_run(root, tmp_path), tmp_path)
    with pytest.raises(UnreadableSampleError, match=r"b\.jpg' is \(32, 48\) but annotation '.*b\.png' is \(48, 32\)"):
        train(cfg)


@pytest.mark.parametrize("overrides, loggers", [
    (["debug=fast"], set()),
    (["debug=fast", "logger=csv"], {"csv"}),
    (["logger=csv", "debug=fast"], {"csv"}),
    (["debug=fast", "logger=wandb"], {"wandb"}),
])
def test_debug_fast_keeps_an_explicit_logger(overrides, loggers, tmp_path):
    cfg = compose_config("train", overrides, tmp_path)
    assert set(cfg.get("logger") or {}) == loggers and cfg.trainer.max_steps == 4
