"""Nothing is lost: resumes never destroy results, runs never share a directory, signals save last.ckpt."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from app_utils import TINY_SYNTHETIC, compose_config
from comer.app import train
from comer.app.builders import ConfigError
from comer.app.resume import config_changes
from comer.app.run_dir import RunDirectoryBusy, RunLock, hydra_run_dir
from comer.training import checkpoint_io

TINY_RUN = [o for o in TINY_SYNTHETIC if not o.startswith("checkpoint_every_n_steps=")]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resuming_never_destroys_results(tmp_path):
    first = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=2"], tmp_path))
    run_dir = Path(first["run_dir"])
    assert first["status"] == "finished" and [e["step"] for e in first["history"]] == [2]
    before = _files(run_dir)
    first_run_id = _stored_run_id(run_dir)

    # a finished run: says so, changes nothing (not config.yaml, metrics.json, the CSV or the checkpoints)
    again = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=2", "ckpt_path=last",
                                           "module.num_val_images_to_log=0"], tmp_path))
    assert again["status"] == "finished" and again["global_step"] == 2
    assert _files(run_dir) == before

    # a change a resume must not make is refused, naming the key, before anything is built
    with pytest.raises(ConfigError, match=r"module\.optimizer\.lr: 0\.001 -> 0\.5"):
        train(compose_config("train", [*TINY_RUN, "ckpt_path=last", "trainer.max_steps=4",
                                       "module.optimizer.lr=0.5"], tmp_path))

    # more steps continue the same run: history kept, same CSV file, same run id, stale temp files removed
    stale = run_dir / "checkpoints" / ".last.ckpt.4242.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    more = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=2", "ckpt_path=last",
                                          "trainer.max_steps=4"], tmp_path))
    assert more["run_dir"] == first["run_dir"] and more["global_step"] == 4
    assert [e["step"] for e in more["history"]] == [2, 4]
    assert more["history"][0] == first["history"][0]
    assert more["best"]["step"] in (2, 4) and more["monitor"] == "val/mIoU"
    assert json.loads((run_dir / "metrics.json").read_text())["history"] == more["history"]
    assert not stale.exists()
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0"]
    csv_text = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert csv_text.startswith(before["csv/version_0/metrics.csv"].decode().splitlines()[0])
    logged_steps = [int(float(row)) for row in _csv_column(csv_text, "step")]
    assert min(logged_steps) < 2 <= max(logged_steps) and 3 in logged_steps, "both runs' rows in one file"
    config = (run_dir / "config.yaml").read_text()
    assert "max_steps: 4" in config and _stored_run_id(run_dir) == first_run_id
    assert not (run_dir / ".run.lock").exists()

    # a fresh run never writes into a directory that holds a run
    with pytest.raises(RunDirectoryBusy, match="already holds a run"):
        train(compose_config("train", TINY_RUN, tmp_path))


def _csv_column(text: str, column: str) -> list[str]:
    return [row[column] for row in csv.DictReader(io.StringIO(text)) if row[column]]


def _stored_run_id(run_dir: Path) -> str:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["run_id"]


def test_resume_from_a_checkpoint_outside_a_run_writes_nothing_beside_it(tmp_path):
    first = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=1", "trainer.max_steps=1",
                                           "trainer.val_check_interval=1", "run_name=source"], tmp_path))
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    (elsewhere / "model.ckpt").write_bytes((Path(first["run_dir"]) / "checkpoints" / "last.ckpt").read_bytes())
    result = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=1", "trainer.max_steps=2",
                                            f"ckpt_path={elsewhere / 'model.ckpt'}", "run_name=continued"], tmp_path))
    assert result["global_step"] == 2 and Path(result["run_dir"]).name == "run"
    assert "continued" in result["run_dir"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model.ckpt"]


class SendSignalAtStep(Callback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_saves_last_checkpoint_and_prints_the_resume_command(tmp_path, caplog):
    """checkpoint_every_n_steps far beyond the run: only the signal makes last.ckpt, at the step boundary."""
    signal_cb = ["+callbacks.signal._target_=test_run_safety.SendSignalAtStep", "+callbacks.signal.step=1",
                 f"+callbacks.signal.signum={int(signal.SIGTERM)}"]
    result = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=100", "trainer.max_steps=4",
                                            *signal_cb], tmp_path))
    assert result["status"] == "interrupted" and result["interrupted_by"] == "SIGTERM"
    last = Path(result["run_dir"]) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == result["global_step"] == 2
    assert f"ckpt_path={last}" in caplog.text and "Resume with" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone after the run


def test_a_run_shorter_than_the_checkpoint_interval_still_saves_last(tmp_path):
    result = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=1000"], tmp_path))
    last = Path(result["run_dir"]) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize("value", ["0", "-3"])
def test_checkpoint_interval_must_be_positive(tmp_path, value):
    with pytest.raises(ValueError, match="checkpoint_every_n_steps"):
        train(compose_config("train", [*TINY_RUN, f"checkpoint_every_n_steps={value}"], tmp_path))
    assert not (tmp_path / "outputs" / "synthetic_seg-comer_t" / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=100", "trainer.max_steps=4",
                                              "run_name=straight"], tmp_path))
    ctrl_c = ["+callbacks.signal._target_=test_run_safety.SendSignalAtStep", "+callbacks.signal.step=1",
              f"+callbacks.signal.signum={int(signal.SIGINT)}"]
    stopped = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=100", "trainer.max_steps=4",
                                             "run_name=stopped", *ctrl_c], tmp_path))
    assert stopped["interrupted_by"] == "SIGINT" and stopped["global_step"] == 2
    resumed = train(compose_config("train", [*TINY_RUN, "checkpoint_every_n_steps=100", "trainer.max_steps=4",
                                             "run_name=stopped", "ckpt_path=last"], tmp_path))
    assert resumed["status"] == "finished" and resumed["global_step"] == 4
    a = torch.load(Path(straight["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryBusy, match=f"process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".run.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".run.lock").write_text(f"{os.uname().nodename} {dead.pid}")
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / ".run.lock").read_text().endswith(str(os.getpid()))


def test_two_processes_started_together_get_two_run_directories(tmp_path):
    code = "from comer.app.run_dir import hydra_run_dir; print(hydra_run_dir('logs', 'name', None))"
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    dirs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert dirs[0] != dirs[1] and all(d.startswith("logs/name/") for d in dirs)


def test_config_changes_lists_only_unsafe_keys():
    original = {"trainer": {"max_steps": 2, "precision": "32-true"}, "paths": {"output_dir": "/a"}, "seed": 0}
    current = {"trainer": {"max_steps": 9, "precision": "bf16-mixed"}, "paths": {"output_dir": "/b"}, "seed": 0,
               "extra": 1}
    assert config_changes(original, current, ["trainer.max_steps", "paths"]) == [
        "extra: (absent) -> 1", "trainer.precision: '32-true' -> 'bf16-mixed'"]


def test_a_full_disk_names_the_file_and_the_space_left(tmp_path, monkeypatch):
    def no_space(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", no_space)
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device \(\d+ MiB free"):
        checkpoint_io.atomic_torch_save({"w": torch.zeros(1)}, target)
    assert os.listdir(target.parent) == []
