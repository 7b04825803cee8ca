"""Turn a composed Hydra config into the objects of a run: model, data, trainer."""
from __future__ import annotations

import logging
import os
import time

import hydra
import lightning.pytorch as pl
import torch
import torch.nn as nn
from hydra.errors import InstantiationException
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from comer import kernels
from comer.checkpoint import TRUST_CONFIG_KEY, apply_pretrain, check_pretrain_config, trust_checkpoint_files
from comer.data.ade20k import DatasetLayoutError
from comer.data.coco import CocoAnnotationError, CocoLayoutError

from .config_checks import ConfigError, check_network_and_inputs
from .config_schema import class_count_problems, schema_problems

log = logging.getLogger(__name__)


# How long the other ranks wait for rank zero to generate a synthetic dataset, and how often they look.
PREPARE_TIMEOUT_S = 1800.0
PREPARE_POLL_S = 1.0
# A dataset's own errors (the path and the expected layout, or the file and the annotation): shown as they are,
# not inside Hydra's "Error in call to target ..." wrapper, which prints them as one escaped line.
DATASET_ERRORS = (DatasetLayoutError, CocoLayoutError, CocoAnnotationError)


def check_config(cfg: DictConfig) -> None:
    """Resolve every interpolation, check the values users set against the schema (comer/app/config_schema.py),
    the class count and the pretrained-weight settings now, so a bad key fails in seconds, before any data is
    generated or read."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise ConfigError(f"config key {error.full_key} has no value (it is '???'): set it on the command line, "
                          f"e.g. {error.full_key}=...") from error
    except InterpolationResolutionError as error:
        raise ConfigError(f"config key {error.full_key} cannot be resolved: {error.msg}. Set it on the command "
                          f"line ({error.full_key}=...) or fix the referenced key") from error
    problems = [*schema_problems(resolved), *class_count_problems(resolved)]
    if problems:
        raise ConfigError("invalid config value(s):\n  " + "\n  ".join(problems))
    if cfg.get("pretrain") is not None:
        check_pretrain_config(cfg.pretrain)
    if cfg.get("trainer") is not None:
        check_accelerator(cfg.trainer)
    check_network_and_inputs(cfg)


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """A GPU asked for (``trainer=gpu``/``ddp``, ``trainer.accelerator=gpu``) where torch sees none."""
    accelerator = trainer_cfg.get("accelerator", "auto")
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"trainer.accelerator={accelerator} but torch sees no CUDA GPU here (torch {torch.__version__}, {build}). "
            f"Drop trainer=gpu/ddp (the default trainer uses what the machine has) or pass trainer=cpu; on a GPU "
            f"machine, install the torch build that matches its CUDA driver")


def build_model(cfg: DictConfig) -> nn.Module:
    """Backbone (with its pretrained weights) wrapped by the task's model (e.g. a segmentor)."""
    backbone = hydra.utils.instantiate(cfg.backbone)
    report = apply_pretrain(backbone, cfg.pretrain)
    if report is not None:
        log.info("pretrained weights: %s", report)
    return hydra.utils.instantiate(cfg.model, backbone=backbone)


def instantiate_datamodule(data_cfg: DictConfig) -> pl.LightningDataModule:
    """``data_cfg``'s datamodule; a dataset error its constructor raises (COCO checks its layout there) is
    raised as itself."""
    try:
        return hydra.utils.instantiate(data_cfg)
    except InstantiationException as error:
        if isinstance(error.__cause__, DATASET_ERRORS):
            raise error.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig, stage: str) -> pl.LightningDataModule:
    """The task's datamodule, prepared (synthetic data generated: on rank zero, the only one that writes)
    and set up for ``stage``: the dataset's files and annotations are checked here, before any model is
    built, and its class names are known."""
    datamodule = instantiate_datamodule(cfg.data)
    cap_loader_workers(datamodule)
    if rank_zero_only.rank == 0:
        datamodule.prepare_data()
    else:
        wait_until_prepared(datamodule)
    datamodule.setup(stage)
    return datamodule


def usable_cpu_count() -> int:
    """The CPUs this process may run on (what torch's DataLoader compares its workers with)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cap_loader_workers(datamodule: pl.LightningDataModule) -> None:
    """More loader workers than CPUs only slow a run down (and torch warns at every loader): cap
    ``num_workers`` and ``val_num_workers`` to the CPU count, saying so once."""
    cpus = usable_cpu_count()
    capped = []
    for name in ("num_workers", "val_num_workers"):
        requested = getattr(datamodule, name, None)
        if requested is not None and requested > cpus:
            setattr(datamodule, name, cpus)
            capped.append(f"data.{name}={requested}")
    if capped:
        log.info("%s capped to %d: the CPUs this process may use", " and ".join(capped), cpus)


def wait_until_prepared(datamodule: pl.LightningDataModule, timeout_s: float = PREPARE_TIMEOUT_S,
                        poll_s: float = PREPARE_POLL_S) -> None:
    """On ranks other than zero: wait for the data rank zero writes in ``prepare_data`` (a datamodule whose
    data is generated says so with ``is_prepared()``; real datasets are on disk already)."""
    is_prepared = getattr(datamodule, "is_prepared", None)
    if is_prepared is None:
        return
    deadline = time.monotonic() + timeout_s
    while not is_prepared():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_zero_only.rank}: rank zero did not finish preparing the data under "
                               f"data.root={getattr(datamodule, 'root', '?')} within {timeout_s:.0f} s; see rank "
                               f"zero's log")
        time.sleep(poll_s)


def build_module(cfg: DictConfig, model: nn.Module, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The task's LightningModule around ``model``, with the dataset's class names and palette."""
    return hydra.utils.instantiate(cfg.module, model=model, class_names=datamodule.class_names,
                                   palette=getattr(datamodule, "palette", None))


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks_cfg = cfg.get("callbacks") or {}
    return [hydra.utils.instantiate(c) for c in callbacks_cfg.values() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list:
    logger_cfg = cfg.get("logger") or {}
    return [hydra.utils.instantiate(c) for c in logger_cfg.values() if c is not None and "_target_" in c]


FP16_PRECISIONS = ("16-mixed", "16")
GPU_ACCELERATORS = ("gpu", "cuda")


def _runs_on_cuda(trainer_cfg: DictConfig) -> bool:
    accelerator = trainer_cfg.get("accelerator", "auto")
    return accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())


def fp16_precision_plugin(cfg: DictConfig) -> MixedPrecision | None:
    """fp16 AMP with the recipe's initial loss scale (`fp16_init_scale`; mmcv's 512 where torch starts at
    65536), or None when the run is not fp16 on CUDA (Lightning falls back to bf16 on a CPU, with a warning)."""
    if str(cfg.trainer.get("precision")) not in FP16_PRECISIONS or not _runs_on_cuda(cfg.trainer):
        return None
    scaler = torch.amp.GradScaler("cuda", init_scale=float(cfg.fp16_init_scale))
    return MixedPrecision("16-mixed", "cuda", scaler=scaler)


def build_trainer(cfg: DictConfig, callbacks, loggers) -> pl.Trainer:
    """The Lightning Trainer; its default_root_dir is the run directory (paths.output_dir). Precision is
    `trainer.precision` alone (the task sets the recipe's); fp16 gets the recipe's initial loss scale."""
    fp16 = fp16_precision_plugin(cfg)
    if fp16 is None:
        return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    plugins = [hydra.utils.instantiate(p) for p in cfg.trainer.get("plugins") or []]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=None,
                                   plugins=[*plugins, fp16])


def per_device_batch_size(global_batch_size: int | None, batch_size: int, world_size: int) -> int:
    """The recipe's batch is global (16 for ADE20K); each of world_size processes takes its share."""
    if global_batch_size is None:
        return batch_size
    if global_batch_size % world_size:
        raise ConfigError(
            f"global_batch_size={global_batch_size} cannot be split evenly over {world_size} processes "
            f"(trainer.devices x trainer.num_nodes); choose a divisor or set global_batch_size=null and data.batch_size")
    return global_batch_size // world_size


def apply_process_switches(cfg: DictConfig) -> None:
    """Process-wide choices of the config: the attention implementation and the checkpoint files the
    user trusts with full unpickling."""
    kernels.set_ms_deform_attn_impl(cfg.get("attention_impl", "auto"))
    trust_checkpoint_files(cfg.get(TRUST_CONFIG_KEY) or [])
