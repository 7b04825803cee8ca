"""Reading checkpoint files as data, never as code.

A `.pth`/`.ckpt` file is a pickle: fully unpickling it can run any code its author chose. So a file is
read in two restricted passes and fully unpickled only when the user named it as trusted:

1. ``torch.load(weights_only=True)`` with numpy scalars, arrays and dtypes allowed (torch's own
   restricted unpickler): our Lightning checkpoints, DeiT/MAE/BEiT/DINOv2 releases.
2. If that refuses a global, our `RestrictedUnpickler`: tensors and containers as in pass 1, plus
   the config objects released mmcv/mmengine checkpoints pickle into their ``meta`` (``Config``,
   ``ConfigDict``, ``addict.Dict``, ``argparse.Namespace``), each mapped to an inert stand-in that only
   holds the data. Every other global is refused, naming it.
3. A file the user listed with `trust_checkpoint_files` (the config key ``trusted_checkpoints``) is
   then loaded with full unpickling, and the log says so.

Read errors (a missing, truncated or corrupt file) are raised as `CheckpointReadError` naming the file.
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

log = logging.getLogger(__name__)

TRUST_CONFIG_KEY = "trusted_checkpoints"

_trusted_files: set[Path] = set()


class CheckpointReadError(OSError):
    """A checkpoint file that cannot be read (missing, truncated, not a checkpoint)."""


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint whose pickle asks for a global we do not load from a file nobody trusted."""


# --- inert stand-ins for the config objects of released mmcv / mmengine checkpoints -------------------
class InertConfigDict(dict):
    """Holds the items of a pickled mmcv/mmengine ``ConfigDict`` or ``addict.Dict``; no behaviour."""

    original_class = "ConfigDict"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


class InertConfig:
    """Holds the state of a pickled mmcv/mmengine ``Config`` (its dict, file name and text)."""

    original_class = "Config"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # mmcv >= 1.4 pickles (cfg_dict, filename, text)
            state = dict(zip(("_cfg_dict", "_filename", "_text"), state))
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})

    def __repr__(self) -> str:
        return f"InertConfig({self.__dict__.get('_filename')!r})"


class InertNamespace:
    """Holds the attributes of a pickled ``argparse.Namespace`` (training scripts' ``args``)."""

    original_class = "argparse.Namespace"

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


_CONFIG_MODULES = ("mmcv.utils.config", "mmcv", "mmengine.config.config", "mmengine.config", "mmengine")
STAND_INS: dict[str, type] = {
    **{f"{module}.ConfigDict": InertConfigDict for module in _CONFIG_MODULES},
    **{f"{module}.Config": InertConfig for module in _CONFIG_MODULES},
    "addict.addict.Dict": InertConfigDict,
    "addict.Dict": InertConfigDict,
    "argparse.Namespace": InertNamespace,
}

# numpy moved its core to numpy._core in 2.0; files written by either version name their own.
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core
NUMPY_GLOBALS: dict[str, Any] = {
    "numpy.dtype": np.dtype,
    "numpy.ndarray": np.ndarray,
    **{f"{core}.multiarray.scalar": _NUMPY_CORE.multiarray.scalar for core in ("numpy.core", "numpy._core")},
    **{f"{core}.multiarray._reconstruct": _NUMPY_CORE.multiarray._reconstruct for core in ("numpy.core", "numpy._core")},
    **{f"numpy.dtypes.{name}": getattr(np.dtypes, name) for name in dir(np.dtypes)
       if isinstance(getattr(np.dtypes, name), type) and issubclass(getattr(np.dtypes, name), np.dtype)},
}

_TENSOR_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                      "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy")
DATA_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "_codecs.encode": codecs.encode,  # bytes in protocol-2 pickles
    **{f"builtins.{t.__name__}": t for t in (set, frozenset, complex, slice, bytearray)},
    **{f"torch._utils.{name}": getattr(torch._utils, name) for name in _TENSOR_REBUILDERS
       if hasattr(torch._utils, name)},
    **{f"torch.{name}": getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor data, containers, numpy values and the inert stand-ins (see module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        full_name = f"{module}.{name}"
        for table in (DATA_GLOBALS, NUMPY_GLOBALS, STAND_INS):
            if full_name in table:
                return table[full_name]
        raise UntrustedCheckpointError(f"refusing to load global {full_name!r}: it is not tensor data")


class _RestrictedPickleModule:
    """The ``pickle_module`` torch.load needs: our Unpickler, pickle's everything else."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    load = staticmethod(lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load())


def trust_checkpoint_files(paths: Iterable[str | os.PathLike] | None) -> None:
    """Allow full unpickling (which can run code) for exactly these files; None or [] trusts none.

    The opt-in for checkpoints that hold objects other than tensors, numpy values and mmcv configs.
    """
    _trusted_files.clear()
    for path in paths or ():
        _trusted_files.add(Path(path).expanduser().resolve())


def is_trusted(path: Path) -> bool:
    return path.expanduser().resolve() in _trusted_files


# A damaged pickle can fail in the unpickler with almost any error (a bad opcode pops an empty stack, a length
# field overflows, ...): whatever parsing the file raises means the file is not a readable checkpoint.
READ_ERRORS = (Exception,)


@contextlib.contextmanager
def _naming_the_file(path: Path):
    """Re-raise what torch.load raises on a bad file (bare EOFError, zip RuntimeError, ...) as a
    CheckpointReadError that names the file and says what was expected."""
    try:
        yield
    except UntrustedCheckpointError:
        raise
    except READ_ERRORS as error:
        size = path.stat().st_size if path.exists() else 0
        first_line = (str(error).splitlines() or [""])[0]
        raise CheckpointReadError(
            f"cannot read checkpoint {path} ({size} bytes): {type(error).__name__}: {first_line}. Expected a PyTorch "
            f"checkpoint (a torch.save zip or legacy pickle); the file may be truncated or corrupt: copy or "
            f"download it again") from error


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """The object in checkpoint file ``path``, loaded onto the CPU without running code from it
    unless the file was trusted with `trust_checkpoint_files`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with _naming_the_file(path):
        try:
            with torch.serialization.safe_globals(list(NUMPY_GLOBALS.values())):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            pass  # a global torch's loader refuses: try ours, which knows the mmcv config classes
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
        except UntrustedCheckpointError as error:
            if not is_trusted(path):
                raise UntrustedCheckpointError(
                    f"{path}: {error}. Fully unpickling a checkpoint can run code hidden in it. If you trust this "
                    f"file, name it: {TRUST_CONFIG_KEY}=[{path.resolve()}] on the command line (or "
                    f"comer.checkpoint.trust_checkpoint_files([...]) in Python)") from None
        log.warning("%s: fully unpickling a trusted checkpoint (listed in %s)", path, TRUST_CONFIG_KEY)
        return torch.load(path, map_location="cpu", weights_only=False)
