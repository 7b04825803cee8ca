"""The checkpoint `ckpt_path=...` names for eval.py / predict.py, and the config its model and data are rebuilt from.

One of our Lightning checkpoints is rebuilt from its run's stored config (`<run>/config.yaml`, beside the
run's `checkpoints/`), so no training override has to be repeated. On top of the run's config go:

- this command's own keys (`own_keys` in conf/eval.yaml: where results go, loggers, trusted files, ...);
- the keys set on the command line (`data.root=...`, `module.flip=true`, `module.scales=[0.75,1.0]`), and a
  group chosen for the node of its name (`trainer=cpu`), with the values the command composed;
- every value the configs derive from another key (`data.test_ratios: ${module.scales}`), derived again, so
  an override reaches what follows it; only where the derivation gives the run's stored value.

A config group spread over the whole config (`task=`, `experiment=`, `scale=`, `interactions=`) cannot be
applied to a stored config: given on the command line, it must agree with the run (the command's composed
values equal the run's), so repeating the training command works and a different choice is refused.

A released official checkpoint (mmseg/mmdet) carries no config: its model and data come from the command
line (`backbone=... task=...`), as composed.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from comer.checkpoint import read_checkpoint

from .builders import ConfigError
from .resume import flatten
from .run_dir import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, RESUME_LAST, ResumeError, find_last_checkpoint, \
    run_dir_of_checkpoint

log = logging.getLogger(__name__)

LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
HYDRA_KEY = "hydra"
MAX_LISTED_DIFFERENCES = 20
_ABSENT = object()


@dataclass
class CheckpointSource:
    """A checkpoint file, its contents (read once) and the run config it is rebuilt from (None: an
    official checkpoint, whose model the command line describes)."""

    path: Path
    contents: Any
    run_config: Path | None

    @property
    def kind(self) -> str:
        return "official" if self.run_config is None else "lightning"


def is_lightning_checkpoint(contents: Any) -> bool:
    return isinstance(contents, Mapping) and LIGHTNING_VERSION_KEY in contents


def locate_checkpoint(ckpt_path: str, log_dir: str | Path, train_run_name: str) -> Path:
    """``last`` (the newest run named ``train_run_name``: its checkpoints/last.ckpt), a run directory (its
    checkpoints/last.ckpt) or a checkpoint file -> the file, checked to exist."""
    if str(ckpt_path) == RESUME_LAST:
        try:
            return find_last_checkpoint(log_dir, train_run_name)
        except ResumeError:
            raise FileNotFoundError(
                f"ckpt_path=last: no run named {train_run_name} under {log_dir} has {CHECKPOINT_DIR}/{LAST_CHECKPOINT}. "
                f"Name the run (train_run_name=<the run_name it was trained with>), or give its directory or a "
                f"checkpoint file: ckpt_path=outputs/<run_name>/<timestamp>") from None
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        last = path / CHECKPOINT_DIR / LAST_CHECKPOINT
        if not last.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory without {CHECKPOINT_DIR}/{LAST_CHECKPOINT}: "
                                    f"give a run directory (outputs/<run_name>/<timestamp>) or a checkpoint file")
        return last
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file or run directory")
    return path


def open_checkpoint(ckpt_path: str, log_dir: str | Path, train_run_name: str, run_config: str | None) -> CheckpointSource:
    """Read the checkpoint ``ckpt_path`` names. Ours (a Lightning checkpoint) needs its run's config:
    ``run_config`` when given, else the config.yaml of the run directory it sits in."""
    path = locate_checkpoint(ckpt_path, log_dir, train_run_name)
    contents, _ = read_checkpoint(path)
    if not is_lightning_checkpoint(contents):
        if run_config is not None:
            raise ConfigError(f"run_config={run_config} is for this project's checkpoints, but {path} is not one (it has "
                              f"no '{LIGHTNING_VERSION_KEY}'): a released checkpoint's model comes from backbone=... "
                              f"task=... on the command line; drop run_config")
        return CheckpointSource(path, contents, None)
    if run_config is not None:
        config = Path(run_config).expanduser()
        if not config.is_file():
            raise ConfigError(f"run_config={run_config}: no such file")
        return CheckpointSource(path, contents, config)
    run_dir = run_dir_of_checkpoint(path)
    if run_dir is None:
        raise ConfigError(
            f"{path} is a checkpoint of this project, but not inside its run directory, so the config its model "
            f"and data are rebuilt from is missing (expected {path.resolve().parent.parent / CONFIG_FILE}: a run keeps "
            f"<run>/{CONFIG_FILE} beside <run>/{CHECKPOINT_DIR}/). Point ckpt_path into the run directory, or name "
            f"the run's config: run_config=/path/to/{CONFIG_FILE}")
    return CheckpointSource(path, contents, run_dir / CONFIG_FILE)


def read_run_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}, the config of the run whose checkpoint this is: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a run config (a mapping of keys), it holds {type(config).__name__}")
    return config


@dataclass
class CommandLine:
    """The overrides of this command (Hydra's `overrides.task`), sorted by how they apply to a stored config."""

    keys: list[str] = field(default_factory=list)  # config keys set, and groups chosen for the node of their name
    deleted: list[str] = field(default_factory=list)  # ~key
    spread_groups: list[str] = field(default_factory=list)  # task=..., experiment=...: as typed

    @classmethod
    def parse(cls, overrides: Sequence[str], command: DictConfig) -> "CommandLine":
        parsed = cls()
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            key = override.key_or_group
            if key == HYDRA_KEY or key.startswith((f"{HYDRA_KEY}.", f"{HYDRA_KEY}/")):
                continue
            if override.is_delete():
                parsed.deleted.append(key)
            elif override.package is None and OmegaConf.select(command, key, default=_ABSENT) is not _ABSENT:
                parsed.keys.append(key)
            else:
                parsed.spread_groups.append(override.input_line)
        return parsed


def command_line_overrides() -> list[str]:
    """The overrides this process was started with (none outside a Hydra application)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _within(key: str, roots: Sequence[str]) -> bool:
    return any(key == root or key.startswith(f"{root}.") for root in roots)


def check_own_keys(command: DictConfig) -> None:
    """The command's own keys (ckpt_path, input, ...) are set: a missing one is named before any file is read."""
    for key in command.own_keys:
        try:
            OmegaConf.select(command, key, throw_on_missing=True)
        except MissingMandatoryValue:
            raise ConfigError(f"config key {key} has no value (it is '???'): set it on the command line, "
                              f"e.g. {key}=...") from None


def _value(cfg: DictConfig, key: str) -> Any:
    """``key``'s resolved value in ``cfg``, plain Python (nodes as dicts and lists)."""
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _derived_keys(command: DictConfig) -> dict[str, str]:
    """{key: "${...}"} of every value the command's configs derive from other keys."""
    unresolved = flatten(OmegaConf.to_container(command, resolve=False))
    return {key: value for key, value in unresolved.items() if isinstance(value, str) and "${" in value}


def _derives(config: DictConfig, key: str, expression: str, stored: Any) -> bool:
    """Whether ``expression`` at ``key`` of ``config`` gives ``stored``."""
    probe = copy.deepcopy(config)
    OmegaConf.update(probe, key, expression, merge=False, force_add=True)
    try:
        return _value(probe, key) == stored
    except OmegaConfBaseException:
        return False


def _differences(command: DictConfig, run: Mapping[str, Any], skip: Sequence[str]) -> list[str]:
    """`key: run -> command` for the keys both hold (outside ``skip``) whose values differ."""
    ours = flatten(OmegaConf.to_container(command, resolve=True))
    theirs = flatten(run)
    return [f"{key}: {theirs[key]!r} -> {ours[key]!r}" for key in sorted(set(ours) & set(theirs))
            if not _within(key, skip) and ours[key] != theirs[key]]


def check_group_choices(command: DictConfig, run: Mapping[str, Any], command_line: CommandLine,
                        own_keys: Sequence[str], run_config: Path) -> None:
    """Group choices spread over the config (task=...) must give the run's values: every key the command
    sets itself (not its own keys, not derived from another key, not overridden on the command line)."""
    if not command_line.spread_groups:
        return
    differences = _differences(command, run, [*own_keys, *command_line.keys, *_derived_keys(command)])
    if not differences:
        return
    listed = "\n  ".join(differences[:MAX_LISTED_DIFFERENCES])
    if len(differences) > MAX_LISTED_DIFFERENCES:
        listed += f"\n  ... and {len(differences) - MAX_LISTED_DIFFERENCES} more"
    raise ConfigError(
        f"{' '.join(command_line.spread_groups)}: a checkpoint of one of our runs is rebuilt from the run's config "
        f"({run_config}), and this choice gives another config (run -> command line):\n  {listed}\nDrop the "
        f"group choice from the command line; to change a value, override its key (e.g. data.root=..., "
        f"module.flip=true)")


def config_from_run(command: DictConfig, run: Mapping[str, Any], command_line: CommandLine, own_keys: Sequence[str],
                    run_config: Path) -> DictConfig:
    """The run's stored config ``run`` with this command's own keys, derived values and command-line keys
    (see the module's docstring); ``command`` is the command's composed config."""
    check_group_choices(command, run, command_line, own_keys, run_config)
    merged = OmegaConf.create(copy.deepcopy(dict(run)))
    for key in command:
        if key not in run:  # the command's keys the run does not have (eval.*, own_keys)
            OmegaConf.update(merged, str(key), _value(command, str(key)), merge=False, force_add=True)
    for key in own_keys:
        if OmegaConf.select(command, key, default=_ABSENT) is not _ABSENT:
            OmegaConf.update(merged, key, _value(command, key), merge=False, force_add=True)
    stored = flatten(run)
    for key, expression in _derived_keys(command).items():
        if key in stored and not _within(key, own_keys) and _derives(merged, key, expression, stored[key]):
            OmegaConf.update(merged, key, expression, merge=False)
    for key in command_line.keys:
        OmegaConf.update(merged, key, _value(command, key), merge=False, force_add=True)
    for key in command_line.deleted:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(merged, parent) if parent else merged
        if isinstance(node, DictConfig) and leaf in node:
            del node[leaf]
    return merged


def rebuild_config(command: DictConfig, source: CheckpointSource) -> DictConfig:
    """The config a checkpoint is evaluated with: for ours, its run's (``config_from_run`` with this process's
    command line); for an official one, the command's own."""
    if source.run_config is None:
        log.info("%s is not one of this project's checkpoints: loading it as a released checkpoint into the model "
                 "the command line describes (backbone=%s)", source.path, command.get("backbone_name"))
        return command
    log.info("rebuilding the model and data of %s from its run's config %s", source.path, source.run_config)
    command_line = CommandLine.parse(command_line_overrides(), command)
    return config_from_run(command, read_run_config(source.run_config), command_line, list(command.own_keys),
                           source.run_config)
