"""Memory on a device: how much is available, and how many bytes a piece of work allocates there.

CUDA: the caching allocator's own counters (``memory_allocated`` / ``max_memory_allocated``) and the free memory
the driver reports. CPU: :class:`TensorAllocations`, a dispatch mode that sees the outputs of every operator
(forward, backward and optimizer step alike) and counts the bytes of each new tensor storage until it is freed.
It is exact for what tensors hold and unaffected by other threads, the allocator's caching or pages the
process already holds, which make a process's RSS a noisy measure; it does not see buffers a kernel allocates
and frees inside one operator. The CPU's available memory is /proc/meminfo's MemAvailable, capped by the
memory cgroup's limit minus its usage when one is set.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MEMINFO = Path("/proc/meminfo")
MEMINFO_AVAILABLE = "MemAvailable:"
MEMINFO_UNIT_BYTES = 1024  # /proc/meminfo counts in kB (KiB)
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# (limit file, usage file, controller folder under CGROUP_ROOT): cgroup v2, then v1.
CGROUP_V2_FILES = ("memory.max", "memory.current", "")
CGROUP_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory")
CGROUP_V2_UNLIMITED = "max"


def _storage_key(tensor: torch.Tensor) -> int | None:
    """The identity of the memory ``tensor`` lives in (views share it); None for tensors without storage."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse, nested or other storage-less tensors
        return None


class TensorAllocations(TorchDispatchMode):
    """Live and peak bytes of the tensor storages operators create while the mode is active.

    An operator's output whose storage is one of its inputs' (a view, an in-place result) is no new memory;
    tensors that existed before (parameters, gradients) are not counted until an operator creates new ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self._bytes: dict[int, int] = {}
        self._live = 0
        self._peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                key = _storage_key(tensor)
                if key is not None and key not in inputs and key not in self._bytes:
                    self._track(tensor.untyped_storage(), key)
        return out

    def _track(self, storage: torch.UntypedStorage, key: int) -> None:
        size = storage.nbytes()
        self._bytes[key] = size
        self._live += size
        self._peak = max(self._peak, self._live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self._live -= self._bytes.pop(key)

    def allocated(self) -> int:
        return self._live

    def peak(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self._live


class CudaAllocations:
    """The CUDA caching allocator's counters for one device, behind the interface of TensorAllocations."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "CudaAllocations":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


def allocation_counter(device: torch.device) -> TensorAllocations | CudaAllocations:
    return CudaAllocations(device) if device.type == "cuda" else TensorAllocations()


def release_freed_host_memory() -> None:
    """Hand the heap memory freed tensors leave behind back to the system (glibc's ``malloc_trim``): without it
    a CPU process keeps the probe's peak as resident memory. A no-op where the C library has no such call."""
    try:
        trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except (OSError, TypeError):  # no loadable C library (e.g. Windows)
        return
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class AvailableMemory:
    bytes: int
    source: str  # where the figure comes from, for messages


def meminfo_available(meminfo: Path = MEMINFO) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith(MEMINFO_AVAILABLE):
            return int(line.split()[1]) * MEMINFO_UNIT_BYTES
    raise RuntimeError(f"{meminfo} has no {MEMINFO_AVAILABLE} line")


def _cgroup_folders(proc_self_cgroup: Path, root: Path, controller: str) -> list[Path]:
    """This process's cgroup folder for ``controller`` ("" = the v2 unified hierarchy) and its ancestors up to
    the hierarchy's root: a limit set on any of them applies."""
    own = []
    if proc_self_cgroup.is_file():
        for line in proc_self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controller == "" and controllers == "") or (controller and controller in controllers.split(",")):
                own.append(root / controller / path.lstrip("/"))
    hierarchy = root / controller
    return [folder for start in own for folder in (start, *start.parents) if folder.is_relative_to(hierarchy)] or [
        hierarchy]


def cgroup_headroom(proc_self_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """The smallest (limit - usage) over the memory cgroups this process is in, or None when none sets a limit
    (or none can be read). Usage counts the page cache too, so this errs on the small side."""
    headrooms = []
    for limit_file, usage_file, controller in (CGROUP_V2_FILES, CGROUP_V1_FILES):
        for folder in _cgroup_folders(proc_self_cgroup, root, controller):
            limit_path, usage_path = folder / limit_file, folder / usage_file
            if limit_path.is_file() and usage_path.is_file():
                limit = limit_path.read_text().strip()
                if limit != CGROUP_V2_UNLIMITED:
                    headrooms.append(max(int(limit) - int(usage_path.read_text().strip()), 0))
    return min(headrooms) if headrooms else None


def available_memory(device: torch.device) -> AvailableMemory:
    """What a run on ``device`` can still allocate: the device's free memory (CUDA), or the system's available
    memory within this process's cgroup limit (CPU)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return AvailableMemory(free, f"free memory of {device} ({total / 2**30:.1f} GiB in all)")
    available = AvailableMemory(meminfo_available(), f"MemAvailable in {MEMINFO}")
    headroom = cgroup_headroom()
    if headroom is not None and headroom < available.bytes:
        return AvailableMemory(headroom, "the memory cgroup's limit minus its usage")
    return available
