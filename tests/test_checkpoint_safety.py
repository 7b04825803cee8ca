"""Checkpoint files are data: no code from a file runs unless the user trusted that file; bad files name themselves."""
from __future__ import annotations

import builtins
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from comer.app.evaluate import load_weights
from comer.checkpoint import (
    CheckpointReadError,
    NonFiniteCheckpointError,
    UntrustedCheckpointError,
    load_checkpoint_file,
    load_pretrained,
    read_checkpoint,
    trust_checkpoint_files,
)
from comer.checkpoint.safe_load import InertConfig, InertConfigDict


@pytest.fixture(autouse=True)
def no_trusted_files():
    trust_checkpoint_files(None)
    yield
    trust_checkpoint_files(None)


class _CreatesAFile:
    """A pickle payload: unpickling it calls ``open(target, "w")``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return builtins.open, (self.target, "w")


class _RunsAShellCommand:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("payload", [_CreatesAFile, _RunsAShellCommand])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, payload):
    target = tmp_path / "pwned"
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": payload(target)}, path)
    with pytest.raises(UntrustedCheckpointError) as error:
        load_checkpoint_file(path)
    assert not target.exists()
    message = str(error.value)
    assert str(path) in message and "trusted_checkpoints=" in message
    assert ".open'" in message or "system'" in message  # the refused global is named
    with pytest.raises(UntrustedCheckpointError):  # the same through the pretrained-weight loader
        load_pretrained(nn.Linear(2, 2), path)
    assert not target.exists()


def test_trusting_the_named_file_allows_full_unpickling(tmp_path):
    target = tmp_path / "created"
    path = tmp_path / "trusted.pth"
    torch.save({"meta": _CreatesAFile(target)}, path)
    trust_checkpoint_files([tmp_path / "another.pth"])  # trusting another file changes nothing
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint_file(path)
    trust_checkpoint_files([path])
    load_checkpoint_file(path)
    assert target.exists()


@pytest.fixture
def fake_mmcv(monkeypatch):
    """mmcv's config classes as they pickle (module mmcv.utils.config), installed only while saving."""
    config_module = types.ModuleType("mmcv.utils.config")

    class ConfigDict(dict):
        pass

    class Config:
        def __init__(self, cfg_dict, filename, text):
            self._cfg_dict, self._filename, self._text = cfg_dict, filename, text

    for cls in (ConfigDict, Config):
        cls.__module__ = "mmcv.utils.config"
        cls.__qualname__ = cls.__name__
        setattr(config_module, cls.__name__, cls)
    modules = {"mmcv": types.ModuleType("mmcv"), "mmcv.utils": types.ModuleType("mmcv.utils"),
               "mmcv.utils.config": config_module}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)  # undone (removed) after the test
    return ConfigDict, Config


def test_mmseg_checkpoint_with_numpy_and_mmcv_config_loads_without_mmcv(tmp_path, fake_mmcv):
    ConfigDict, Config = fake_mmcv
    weights = {"backbone.w": torch.arange(6.0).reshape(2, 3), "decode_head.b": torch.ones(3)}
    model_cfg = ConfigDict(type="EncoderDecoder", backbone=ConfigDict(type="ViTCoMer", embed_dim=384))
    meta = {"mmcv_version": "1.4.2", "CLASSES": ("wall", "floor"), "PALETTE": [[120, 120, 120], [6, 230, 230]],
            "config": Config(ConfigDict(model=model_cfg), "upernet.py", "model = dict(...)"),
            "iter": np.int64(160000), "best_score": np.float64(0.465), "hist": np.arange(4, dtype=np.float32),
            "dtype": np.dtype("float16")}
    path = tmp_path / "upernet_mmseg.pth"
    torch.save({"state_dict": weights, "meta": meta}, path)
    for module in ("mmcv.utils.config", "mmcv.utils", "mmcv"):  # the reading side has no mmcv
        sys.modules.pop(module)
    with pytest.raises(ModuleNotFoundError):
        __import__("mmcv")

    checkpoint, description = read_checkpoint(path)
    assert description == str(path)
    assert torch.equal(checkpoint["state_dict"]["backbone.w"], weights["backbone.w"])
    loaded = checkpoint["meta"]
    assert loaded["iter"] == 160000 and loaded["best_score"] == pytest.approx(0.465)
    assert np.array_equal(loaded["hist"], np.arange(4, dtype=np.float32)) and loaded["dtype"] == np.float16
    config = loaded["config"]
    assert isinstance(config, InertConfig) and config._filename == "upernet.py"
    assert isinstance(config._cfg_dict, InertConfigDict)
    assert config._cfg_dict["model"]["backbone"]["embed_dim"] == 384


def test_our_lightning_style_checkpoint_loads_with_numpy_rng_state(tmp_path):
    state = np.random.RandomState(3).get_state()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "rng": {"numpy": state}, "pytorch-lightning_version": "2.6"}, path)
    loaded = load_checkpoint_file(path)
    assert np.array_equal(loaded["rng"]["numpy"][1], state[1])


@pytest.mark.parametrize("damage", ["truncated", "empty", *(f"garbage{seed}" for seed in range(40))])
def test_damaged_checkpoint_error_names_the_file(tmp_path, damage):
    """Random bytes make the unpickler fail in many ways (IndexError, OverflowError, ...): all are named."""
    path = tmp_path / f"{damage}.pth"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b""}
    content = damaged.get(damage) if not damage.startswith("garbage") else \
        np.random.default_rng(int(damage[len("garbage"):])).bytes(4096)
    path.write_bytes(content)
    with pytest.raises(CheckpointReadError) as error:
        load_checkpoint_file(path)
    assert str(path) in str(error.value) and "truncated or corrupt" in str(error.value)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint_file(tmp_path / "nowhere.pth")


def test_non_finite_weights_are_refused_naming_the_keys(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"][0, 0] = float("nan")
    state["0.bias"][1] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"2 tensors.*0\.bias, 1\.weight"):
        load_pretrained(model, {"state_dict": state}, format="comer")
    path = tmp_path / "diverged.ckpt"
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6"}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteCheckpointError, match="diverged.ckpt"):
        load_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
