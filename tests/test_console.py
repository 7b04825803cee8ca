"""What a run prints (comer/app/console.py): the config tree (switchable) and the tags at the start; not
Lightning's litlogger tip, torch's LeafSpec FutureWarning, the zero FLOPs of Lightning's model summary, W&B's
"anonymous" warning or the DataLoader's too-many-workers warning. Tags reach W&B beside a sweep's."""
from __future__ import annotations

import importlib
import logging
import sys
import warnings

import hydra
import lightning.pytorch as pl
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities._pytree import _tree_flatten
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from app_utils import SMALL_BACKBONE, TINY_SYNTHETIC, compose_config

from comer.app import builders, train
from comer.app.console import (CONFIG_TREE_TITLE, LIBRARY_NOTES, DropMessages, announce_run, config_tree_text,
                               quiet_library_noise)

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
LITMODELS_TIP = "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]"
LEAFSPEC = "isinstance(treespec, LeafSpec)"


class Collect(logging.Handler):
    """The messages a logger lets through (its filters run before its handlers)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def loud_lightning():
    """Lightning's loggers without our filters (an earlier run in this process installed them), each watched."""
    watched = {}
    for name, _ in LIBRARY_NOTES:
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, DropMessages)]:
            logger.removeFilter(existing)
        if name not in watched:
            watched[name] = Collect()
            logger.addHandler(watched[name])
    yield watched
    for name, handler in watched.items():
        logging.getLogger(name).removeHandler(handler)


def _trainer(tmp_path) -> pl.Trainer:
    return pl.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", limit_val_batches=1.0, max_steps=1,
                      enable_progress_bar=False, enable_model_summary=False)


def test_lightning_notes_and_library_warnings_are_left_out(loud_lightning, tmp_path):
    handler = loud_lightning["lightning.pytorch.utilities.rank_zero"]
    _trainer(tmp_path)
    assert any(m.startswith(LITLOGGER_TIP) for m in handler.messages), "the tip Lightning prints by default"
    with pytest.warns(FutureWarning, match="LeafSpec"):
        _tree_flatten(1)

    handler.messages.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        quiet_library_noise()  # a second run in the same process: no second set of filters
        _trainer(tmp_path)
        _tree_flatten(1)
    rank_zero_info(LITMODELS_TIP)  # what Lightning says when a test or predict loop starts
    assert not any(m.startswith(LITLOGGER_TIP) or "limit_val_batches=1.0" in m for m in handler.messages)
    assert not any(m.startswith(LITMODELS_TIP) for m in handler.messages)
    assert not [w for w in caught if LEAFSPEC in str(w.message)]
    rank_zero_filters = logging.getLogger("lightning.pytorch.utilities.rank_zero").filters
    assert sum(isinstance(f, DropMessages) for f in rank_zero_filters) == 1


@pytest.mark.parametrize("module, entry", [("comer.app.evaluate", "evaluate"), ("comer.app.predict", "predict"),
                                           ("comer.export", "export")])
def test_eval_predict_and_export_leave_the_noise_out_too(loud_lightning, monkeypatch, module, entry):
    """eval.py, predict.py and comer.export install the same filters before anything else (as train() does)."""
    class Stopped(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stopped

    for name in ("comer.app.evaluate", "comer.app.predict"):
        monkeypatch.setattr(importlib.import_module(name), "config_for_checkpoint", stop)
    monkeypatch.setattr(importlib.import_module("comer.export"), "open_dict", stop)
    with pytest.raises(Stopped):
        getattr(importlib.import_module(module), entry)(None)
    rank_zero_info(LITMODELS_TIP)
    rank_zero_info("an unrelated note")
    assert loud_lightning["lightning.pytorch.utilities.rank_zero"].messages == ["an unrelated note"]
    onnx_registration = "torch.onnx._internal.exporter._registration"
    logging.getLogger(onnx_registration).warning("torchvision is not installed. Skipping %s", "torchvision::nms")
    assert loud_lightning[onnx_registration].messages == []


def test_config_tree_is_printed_and_switchable(tmp_path, capsys, caplog):
    cfg = compose_config("train", [*TINY_SYNTHETIC, "tags=[mine,baseline]"], tmp_path)
    with caplog.at_level(logging.INFO, logger="comer.app.console"):
        announce_run(cfg)
    out = capsys.readouterr().out
    assert out.startswith(CONFIG_TREE_TITLE)
    assert out.index("── data") < out.index("── trainer") < out.index("max_steps: 2") < out.index("── seed: 0")
    assert "tags: [mine, baseline]" in out and "tags: mine, baseline" in caplog.text

    quiet = compose_config("train", [*TINY_SYNTHETIC, "extras.print_config=false"], tmp_path)
    announce_run(quiet)
    assert capsys.readouterr().out == ""


def test_config_tree_without_rich_is_plain_yaml(tmp_path, capsys, monkeypatch):
    cfg = compose_config("train", TINY_SYNTHETIC, tmp_path)
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` fails
    announce_run(cfg)
    out = capsys.readouterr().out
    assert out.rstrip("\n") == config_tree_text(cfg)
    lines = out.splitlines()
    assert lines[lines.index("trainer:") + 1].startswith("    _target_: lightning.pytorch.Trainer")
    assert "    crop_size: [64, 64]" in lines and "seed: 0" in lines


def test_tags_reach_wandb_beside_the_sweep_and_anonymous_is_not_passed(tmp_path, monkeypatch):
    cfg = compose_config("train", [*TINY_SYNTHETIC, "logger=wandb", "tags=[mine,baseline]"], tmp_path)
    assert list(cfg.logger.wandb.run_tags) == ["mine", "baseline"]
    received = {}
    monkeypatch.setenv("WANDB_MODE", "offline")  # the logger sets it; restored afterwards
    monkeypatch.setattr(wandb, "init", lambda **kwargs: received.update(kwargs) or object())
    monkeypatch.setattr(wandb, "run", None)
    logger = hydra.utils.instantiate(cfg.logger.wandb)
    logger.experiment  # noqa: B018  (opens the run: wandb.init)
    assert received["tags"] == ["mine", "baseline"]  # a single run has no swept values to add
    assert "anonymous" not in received, "wandb warns about any anonymous value"


@pytest.mark.slow  # a second training run (~25 s of CPU); the filters themselves are tested above in a second
def test_a_short_run_prints_the_tree_and_no_library_noise(tmp_path, capfd, caplog, recwarn, monkeypatch):
    monkeypatch.setattr(builders, "usable_cpu_count", lambda: 1)
    cfg = compose_config("train", [*TINY_SYNTHETIC, *SMALL_BACKBONE, "trainer.enable_model_summary=true",
                                   "data.num_workers=2", "tags=[mine]"], tmp_path)
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    assert result["global_step"] == 2
    captured = capfd.readouterr()
    out = captured.out + captured.err + caplog.text
    assert out.count(CONFIG_TREE_TITLE) >= 1 and "Total params" in out and "Trainable params" in out
    assert "data.num_workers=2 and data.val_num_workers=2 capped to 1" in caplog.text
    for noise in (LITLOGGER_TIP, "litlogger", LEAFSPEC, "Total FLOPs", "Total Flops", "worker processes in total",
                  "The anonymous setting"):
        assert noise not in out, noise
    assert not [w for w in recwarn if LEAFSPEC in str(w.message)]
