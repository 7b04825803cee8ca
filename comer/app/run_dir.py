"""Where a run writes, how `ckpt_path=last` finds the checkpoint to resume from, and the lock that keeps
two live runs out of one directory.

Every fresh run gets its own directory `<log_dir>/<run_name>/<timestamp>-<random>` (two runs started in
the same second no longer share one). A resume writes into the directory of the run it continues, and
only when its checkpoint sits in that run's `checkpoints/` folder; a checkpoint from anywhere else starts
a new run directory (nothing is written next to a file the user merely pointed at).
"""
from __future__ import annotations

import datetime
import errno
import logging
import os
import secrets
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".run.lock"
RESUME_LAST = "last"
HYDRA_SUBDIR = ".hydra"
TIMESTAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
RANDOM_SUFFIX_BYTES = 2  # 4 hex digits after the timestamp

_process_run_tag: str | None = None


class ResumeError(FileNotFoundError):
    pass


class RunDirectoryBusy(RuntimeError):
    pass


def run_tag() -> str:
    """`<timestamp>-<random hex>`, the same for the whole process (Hydra may resolve the run directory
    more than once)."""
    global _process_run_tag
    if _process_run_tag is None:
        stamp = datetime.datetime.now().strftime(TIMESTAMP_FORMAT)
        _process_run_tag = f"{stamp}-{secrets.token_hex(RANDOM_SUFFIX_BYTES)}"
    return _process_run_tag


def find_last_checkpoint(log_dir: str | Path, run_name: str) -> Path:
    """The newest `<log_dir>/<run_name>/<run>/checkpoints/last.ckpt`."""
    run_root = Path(log_dir) / run_name
    candidates = sorted(run_root.glob(f"*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ResumeError(
            f"ckpt_path=last: no {CHECKPOINT_DIR}/{LAST_CHECKPOINT} under {run_root}/*/ . "
            f"Start a fresh run (drop ckpt_path), pass the same run_name as the run to resume "
            f"(run_name=...), or give a checkpoint file: ckpt_path=/path/to/file.ckpt")
    return candidates[-1]


def resolve_checkpoint(ckpt_path: str | None, log_dir: str | Path, run_name: str) -> Path | None:
    """None, "last", or a path -> the checkpoint file to resume from (checked to exist)."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == RESUME_LAST:
        return find_last_checkpoint(log_dir, run_name)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ResumeError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return path


def run_dir_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/<file>` next to `<run>/config.yaml`),
    or None for a checkpoint that is not inside one of our run directories."""
    checkpoint = checkpoint.resolve()
    run = checkpoint.parent.parent
    if checkpoint.parent.name == CHECKPOINT_DIR and (run / CONFIG_FILE).is_file():
        return run
    return None


def hydra_run_dir(log_dir: str, run_name: str, ckpt_path: str | None) -> str:
    """`hydra.run.dir`: the resumed run's directory when resuming one of our runs, else a new one."""
    try:
        checkpoint = resolve_checkpoint(ckpt_path, log_dir, run_name)
    except ResumeError:
        checkpoint = None  # train() raises the error with its explanation
    existing = run_dir_of_checkpoint(checkpoint) if checkpoint is not None else None
    return str(existing) if existing is not None else str(Path(log_dir) / run_name / run_tag())


def hydra_output_subdir(ckpt_path: str | None) -> str:
    """`hydra.output_subdir`: a resume records its own composed config and overrides beside, not over,
    the original run's `.hydra/`."""
    return HYDRA_SUBDIR if ckpt_path is None else f"{HYDRA_SUBDIR}/resume-{run_tag()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`<run dir>/.run.lock`, created atomically (O_CREAT | O_EXCL) by the process that runs there and
    removed when it ends. A lock left by a process that no longer exists on this host (kill -9) is taken
    over; one held by a live process, or written on another host, is refused."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner[0] == socket.gethostname() and not _pid_alive(owner[1]):
                    log.warning("%s: taking over the lock of process %d, which no longer runs", self.path, owner[1])
                    self.path.unlink(missing_ok=True)
                    continue
                holder = f"process {owner[1]} on {owner[0]}" if owner else "another process"
                raise RunDirectoryBusy(
                    f"{self.path.parent} is in use by {holder} (lock file {self.path}). Wait for that run to end, "
                    f"or start this one elsewhere; if no run is using it, delete the lock file") from None
            with os.fdopen(fd, "w") as handle:
                handle.write(me)
            self.held = True
            return
        raise RunDirectoryBusy(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temp_files(run_dir: Path, suffix: str) -> list[Path]:
    """Temporary checkpoint files left by a process killed while saving (only called under the run's
    lock, so no live writer owns them)."""
    removed = []
    for temp in sorted((Path(run_dir) / CHECKPOINT_DIR).glob(f".*{suffix}")):
        try:
            temp.unlink()
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise OSError(error.errno, f"cannot remove the stale temporary checkpoint {temp}: {error.strerror}") from error
        removed.append(temp)
    if removed:
        log.warning("removed %d stale temporary checkpoint file(s) of an interrupted save: %s",
                    len(removed), ", ".join(p.name for p in removed))
    return removed
