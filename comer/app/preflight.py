"""Before training: does a training step of this config fit the memory of its device?

A throwaway copy of the network (fresh weights, on the training device, in the run's precision; the global RNG
states are forked, so the run's own random draws are untouched) takes a dry training step on ONE sample of
``data.crop_size``: forward and backward (the peak above what was allocated before is the sample's activations),
then an optimizer step (its state and its temporaries). With the weights and the gradients this gives the memory
of a step at any batch (:class:`StepMemory`: the activations times the batch); at the per-device batch it is
compared with what the device has (:func:`comer.app.memory_probe.available_memory`). A run that cannot fit is
refused with overrides that fit; one close to the limit gets a warning. ``preflight.memory_check=false`` skips
the check.

The estimate is the memory tensors hold at the step's peak. Scaling the one sample's activations by the batch
also scales what does not grow with the batch (under mixed precision mostly autocast's half-precision copies of
the weights): the estimate errs on the large side by (batch - 1) times that. It leaves out the framework's own
memory (the CUDA context, Python, the libraries: already in use when the available memory is read), the
allocator's fragmentation and the data-loading workers, which ``preflight.warn_fraction`` leaves room for.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import hydra
import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig

from comer.data.transforms import to_pair
from comer.models import EncoderDecoder
from comer.training.task_module import LOSS_PREFIX

from .builders import _runs_on_cuda, per_device_batch_size
from .config_checks import ConfigError, instantiate_network, network_on_meta, override_list, required_input_divisor
from .memory_probe import AvailableMemory, allocation_counter, available_memory, release_freed_host_memory

log = logging.getLogger(__name__)

IMAGE_CHANNELS = 3
GIB = 2**30
ALL_DEVICES = (-1, "-1", "auto")
# Lightning's precision flags -> the autocast dtype of a mixed-precision step, or the weights' dtype of a "true"
# one. On a CPU Lightning runs fp16 AMP as bf16.
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "16": torch.float16, 16: torch.float16,
                   "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}
WEIGHT_DTYPES = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64, "64": torch.float64,
                 64: torch.float64}
CPU_AUTOCAST_DTYPE = torch.bfloat16
BATCH_NORMS = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d and SyncBatchNorm


class MemoryPreflightError(RuntimeError):
    """A training step of this config needs more memory than its device has."""


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


@dataclass(frozen=True)
class StepMemory:
    """Bytes a training step holds at its peak on one device, by part. Activations grow with the batch and
    (at most linearly, when the crop shrinks) with the pixels per sample; the optimizer step's temporaries come
    after the activations are freed, so the step needs the larger of the two on top of what stays."""

    weights: int  # parameters and buffers
    gradients: int  # one per trainable parameter
    optimizer_state: int  # e.g. AdamW's two moments
    optimizer_temporaries: int  # above the state, during optimizer.step()
    activations_per_sample: int  # the forward/backward peak of one sample

    @property
    def resident(self) -> int:
        return self.weights + self.gradients + self.optimizer_state

    def total(self, batch: int, pixel_ratio: float = 1.0) -> int:
        """Bytes at ``batch`` samples per device; ``pixel_ratio`` < 1: a crop with that share of the pixels."""
        activations = batch * self.activations_per_sample * pixel_ratio
        return int(self.resident + max(activations, self.optimizer_temporaries))

    def largest_batch(self, budget: int) -> int:
        """The largest per-device batch within ``budget`` bytes (0: not even one sample)."""
        if self.total(1) > budget:
            return 0
        if self.activations_per_sample == 0:
            raise ValueError("no memory per sample was measured: every batch costs the same")
        return (budget - self.resident) // self.activations_per_sample

    def describe(self, batch: int) -> str:
        return (f"weights {gib(self.weights)} + gradients {gib(self.gradients)} + optimizer state "
                f"{gib(self.optimizer_state)} + activations {batch} x {gib(self.activations_per_sample)} per "
                f"sample (optimizer step temporaries "
                f"{gib(self.optimizer_temporaries)})")


@dataclass(frozen=True)
class StepPlan:
    """What one training process runs, from the config: where, how many samples of which size, how precise."""

    device: torch.device
    batch: int  # per device
    crop: tuple[int, int]
    precision: str | int
    world_size: int
    processes_per_machine: int  # CPU: these processes share the machine's memory

    def describe(self) -> str:
        return (f"per-device batch {self.batch} of {self.crop[0]}x{self.crop[1]}, precision {self.precision}, on "
                f"{self.device}" + (f" x {self.processes_per_machine} processes" if self.shares_memory else ""))

    @property
    def shares_memory(self) -> bool:
        return self.processes_sharing_memory > 1

    @property
    def processes_sharing_memory(self) -> int:
        """How many processes of this run draw on the memory this process has (a GPU is its process's own)."""
        return self.processes_per_machine if self.device.type == "cpu" else 1


def training_device(trainer_cfg: DictConfig) -> torch.device:
    """The device this process trains on: its LOCAL_RANK's GPU under CUDA, else the CPU."""
    if _runs_on_cuda(trainer_cfg):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def devices_per_machine(trainer_cfg: DictConfig, device: torch.device) -> int:
    """trainer.devices as a count: a list of indices, "0,1", -1 / "auto" (every GPU; one CPU process), or N."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, ListConfig)):
        return len(devices)
    if devices in ALL_DEVICES:
        return torch.cuda.device_count() if device.type == "cuda" else 1
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d])
    return int(devices)


def step_plan(cfg: DictConfig) -> StepPlan:
    device = training_device(cfg.trainer)
    per_machine = devices_per_machine(cfg.trainer, device)
    world_size = per_machine * int(cfg.trainer.get("num_nodes", 1))
    batch = per_device_batch_size(cfg.get("global_batch_size"), int(cfg.data.batch_size), world_size)
    crop = to_pair(cfg.data.crop_size, "data.crop_size")
    return StepPlan(device, batch, crop, cfg.trainer.get("precision", "32-true"), world_size, per_machine)


def autocast_dtype(precision: str | int, device: torch.device) -> torch.dtype | None:
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is torch.float16 and device.type == "cpu":
        return CPU_AUTOCAST_DTYPE
    return dtype


def measure_step_memory(network: nn.Module, optimizer: torch.optim.Optimizer, step_loss: Callable[[int], torch.Tensor],
                        counter) -> StepMemory:
    """A dry step of ``network`` on one sample (see the module's docstring). ``step_loss(batch)`` runs the
    forward pass on ``batch`` samples and returns the loss; ``counter`` counts the bytes allocated on the device.
    The gradients exist before the pass (backward accumulates into them), so its peak is the activations."""
    weights = sum(t.nbytes for t in (*network.parameters(), *network.buffers()))
    trainable = [p for p in network.parameters() if p.requires_grad]
    with counter:
        for parameter in trainable:
            parameter.grad = torch.zeros_like(parameter)
        before = counter.allocated()
        counter.reset_peak()
        step_loss(1).backward()
        activations = counter.peak() - before
        before = counter.allocated()
        counter.reset_peak()
        optimizer.step()
        optimizer_state = counter.allocated() - before
        optimizer_temporaries = counter.peak() - counter.allocated()
    return StepMemory(weights=weights, gradients=sum(p.nbytes for p in trainable), optimizer_state=optimizer_state,
                      optimizer_temporaries=optimizer_temporaries, activations_per_sample=activations)


def segmentation_step_loss(network: EncoderDecoder, plan: StepPlan) -> Callable[[int], torch.Tensor]:
    """The training loss of ``batch`` normalised images of the crop size (their values do not change the
    memory), under the run's autocast."""
    dtype = autocast_dtype(plan.precision, plan.device)

    def step_loss(batch: int) -> torch.Tensor:
        images = torch.zeros(batch, IMAGE_CHANNELS, *plan.crop, device=plan.device)
        labels = torch.zeros(batch, *plan.crop, dtype=torch.long, device=plan.device)
        with torch.autocast(plan.device.type, dtype=dtype, enabled=dtype is not None):
            losses = network.loss(images, labels)
        return torch.stack([value for key, value in losses.items() if key.startswith(LOSS_PREFIX)]).sum()

    return step_loss


def probe_step_memory(cfg: DictConfig, plan: StepPlan) -> StepMemory:
    """Build the throwaway network and optimizer on the device and measure their dry steps."""
    cuda_devices = [plan.device] if plan.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        with torch.device(plan.device):
            network = instantiate_network(cfg)
        network.to(plan.device, WEIGHT_DTYPES.get(plan.precision, torch.float32)).train()
        for module in network.modules():
            if isinstance(module, BATCH_NORMS):  # one sample has no batch statistics at 1x1 (a pooling branch);
                module.eval()  # the same operator in eval mode saves the same tensors for backward
        optimizer = hydra.utils.instantiate(cfg.module.optimizer)(network.parameters())
        step = measure_step_memory(network, optimizer, segmentation_step_loss(network, plan),
                                   allocation_counter(plan.device))
    del network, optimizer
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        release_freed_host_memory()
    return step


def largest_fitting_crop(step: StepMemory, crop: tuple[int, int], batch: int, divisor: int,
                         budget: int) -> tuple[int, int] | None:
    """The largest crop of about the same aspect, sides multiples of ``divisor``, whose step fits ``budget``,
    scaling the per-sample activations with the pixel count (an upper bound when the crop shrinks: terms that
    grow faster than the pixels, like global attention, shrink faster too)."""
    height, width = crop
    for rows in range(height // divisor - 1, 0, -1):
        new_height = rows * divisor
        new_width = max(divisor, round(width * new_height / height / divisor) * divisor)
        if step.total(batch, pixel_ratio=new_height * new_width / (height * width)) <= budget:
            return new_height, new_width
    return None


def fitting_overrides(cfg: DictConfig, plan: StepPlan, step: StepMemory, budget: int, divisor: int | None) -> list[str]:
    """Command-line overrides whose step fits ``budget`` bytes per process, each with its estimate."""
    overrides = []
    largest = step.largest_batch(budget) if step.activations_per_sample else 0
    global_batch = cfg.get("global_batch_size")
    if largest >= 1:
        setting = (f"global_batch_size={largest * plan.world_size}" if global_batch is not None
                   else f"data.batch_size={largest}")
        overrides.append(f"{setting}  (per-device batch {largest}: about {gib(step.total(largest))})")
    if divisor is not None:
        crop = largest_fitting_crop(step, plan.crop, plan.batch, divisor, budget)
        if crop is not None:
            ratio = crop[0] * crop[1] / (plan.crop[0] * plan.crop[1])
            overrides.append(f"data.crop_size={override_list(crop)}  (at most about "
                             f"{gib(step.total(plan.batch, ratio))} at per-device batch {plan.batch})")
    if plan.device.type == "cuda" and global_batch is not None and largest >= 1:
        nodes = plan.world_size // plan.processes_per_machine
        devices = next((n for n in range(plan.processes_per_machine + 1, global_batch + 1)
                        if global_batch % (n * nodes) == 0 and global_batch // (n * nodes) <= largest), None)
        if devices is not None:
            overrides.append(f"trainer=ddp trainer.devices={devices}  (the global batch {global_batch} over "
                             f"{devices * nodes} GPUs: {global_batch // (devices * nodes)} per GPU)")
    return overrides


def refusal(plan: StepPlan, step: StepMemory, need: int, available: AvailableMemory, warn_fraction: float,
            overrides: list[str]) -> str:
    lines = [f"a training step of this config needs about {gib(need)} ({plan.describe()}), more than the "
             f"{gib(available.bytes)} available ({available.source}).",
             f"  estimate per process: {step.describe(plan.batch)}"]
    if overrides:
        lines += [f"Overrides that fit (within preflight.warn_fraction={warn_fraction:g} of it):",
                  *(f"  {o}" for o in overrides)]
    else:
        lines.append("No smaller batch or crop fits: choose a smaller backbone or a device with more memory.")
    lines.append("Or skip this check (the run may then be killed for memory): preflight.memory_check=false")
    return "\n".join(lines)


def check_memory(cfg: DictConfig) -> StepMemory | None:
    """Refuse a run whose training step cannot fit its device's memory, warn when it is close (above
    preflight.warn_fraction of the available memory); the step's estimate, or None when not checked."""
    settings = cfg.get("preflight") or {}
    if not settings.get("memory_check", False):
        log.info("memory preflight skipped (preflight.memory_check=false)")
        return None
    warn_fraction = float(settings.warn_fraction)
    if not 0 < warn_fraction <= 1:
        raise ConfigError(f"preflight.warn_fraction={warn_fraction} must be in (0, 1]")
    meta_network = network_on_meta(cfg)
    if not isinstance(meta_network, EncoderDecoder):
        log.info("memory preflight: no dry training step for a %s yet; skipped", type(meta_network).__name__)
        return None
    plan = step_plan(cfg)
    available = available_memory(plan.device)
    budget = available.bytes // plan.processes_sharing_memory
    weights_and_gradients = sum(2 * p.numel() * p.element_size() for p in meta_network.parameters())
    if weights_and_gradients > budget:
        raise MemoryPreflightError(
            f"the weights and gradients of this model alone need {gib(weights_and_gradients)} per process, more "
            f"than the {gib(available.bytes)} available ({available.source}) for {plan.describe()}: choose a "
            f"smaller backbone or a device with more memory, or skip this check: preflight.memory_check=false")
    log.info("memory preflight: a dry training step on one sample (%s); preflight.memory_check=false skips it",
             plan.describe())
    step = probe_step_memory(cfg, plan)
    need = step.total(plan.batch) * plan.processes_sharing_memory
    if need > available.bytes:  # suggest what fits without the warning: it leaves room for what is not estimated
        suggestion_budget = int(warn_fraction * available.bytes) // plan.processes_sharing_memory
        overrides = fitting_overrides(cfg, plan, step, suggestion_budget, required_input_divisor(meta_network))
        raise MemoryPreflightError(refusal(plan, step, need, available, warn_fraction, overrides))
    report = (f"memory preflight: a training step needs about {gib(need)} ({plan.describe()}; "
              f"{step.describe(plan.batch)}); {gib(available.bytes)} available ({available.source})")
    if need > warn_fraction * available.bytes:
        log.warning("%s: above %.0f%% of it, the run may still be killed for memory (allocator caches, data "
                    "workers and the framework's own memory are not in the estimate)", report, 100 * warn_fraction)
    else:
        log.info(report)
    return step
