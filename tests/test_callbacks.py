"""Atomic checkpoint IO: complete files or the previous file, never a truncated one."""
import os

import pytest
import torch

from comer.training import checkpoint_io
from comer.training.checkpoint_io import AtomicCheckpointIO


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value)}


def test_save_writes_a_loadable_checkpoint_and_no_temp_files(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_checkpoint(3.0), path)
    io.save_checkpoint(_checkpoint(4.0), path)  # overwrite in place
    assert os.listdir(path.parent) == ["last.ckpt"]
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 4
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.full((64, 64), 4.0))


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    good_bytes = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.seek(handle.tell() // 2)
        handle.truncate()  # half a file is on disk ...
        raise OSError("disk full (simulated)")  # ... when the process dies

    monkeypatch.setattr(checkpoint_io.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint(_checkpoint(2.0), path)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["last.ckpt"]  # the partial temp file is gone
    assert path.read_bytes() == good_bytes
    assert io.load_checkpoint(path)["global_step"] == 1


def test_storage_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), tmp_path / "a.ckpt", storage_options={"x": 1})
