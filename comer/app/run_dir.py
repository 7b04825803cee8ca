"""Where a run writes, and how `ckpt_path=last` finds the checkpoint to resume from."""
from __future__ import annotations

from pathlib import Path

LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_DIR = "checkpoints"


class ResumeError(FileNotFoundError):
    pass


def find_last_checkpoint(log_dir: str | Path, run_name: str) -> Path:
    """The newest `<log_dir>/<run_name>/<timestamp>/checkpoints/last.ckpt`."""
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
    if str(ckpt_path) == "last":
        return find_last_checkpoint(log_dir, run_name)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ResumeError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return path


def run_dir_of_checkpoint(checkpoint: Path) -> Path:
    """A resumed run keeps writing into the directory of the run it resumes."""
    if checkpoint.parent.name == CHECKPOINT_DIR:
        return checkpoint.parent.parent
    return checkpoint.parent
