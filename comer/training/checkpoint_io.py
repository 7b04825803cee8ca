"""Crash-safe checkpoint writing: a killed save never leaves a truncated .ckpt behind.

The checkpoint goes to a hidden temporary file in the target's directory, is flushed and fsync'ed,
and only then renamed over the target with ``os.replace`` (atomic on POSIX within one filesystem);
the directory entry is fsync'ed too. A failed save removes its temporary file and leaves any earlier
checkpoint at the same path as it was. Remote URLs (``s3://`` ...) go to Lightning's own writer.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from comer.checkpoint.safe_load import load_checkpoint_file

TEMP_SUFFIX = ".tmp"


def _is_remote(path) -> bool:
    return "://" in str(path)


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, error: OSError) -> OSError:
    """The error of a failed write, naming the file and, when the disk is full, the space left."""
    detail = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        detail += (f" ({free / 2**20:.0f} MiB free on the file system of {path.parent}: free space, or write runs "
                   f"elsewhere with paths.log_dir=...)")
    return OSError(error.errno, f"cannot write {path}: {detail}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` into a hidden temporary file beside ``path``, fsync, then rename over ``path``.
    A failure leaves ``path`` as it was, removes the temporary file and names ``path`` in its error."""
    path = Path(path)
    temp = temp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise _write_error(path, error) from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``Trainer(plugins=[AtomicCheckpointIO()])``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        if _is_remote(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resumes read checkpoints like every other file: as data (comer.checkpoint.safe_load)."""
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path)
