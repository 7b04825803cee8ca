"""What a sweep varied, and the name, W&B group, tags and config each of its runs gets from that.

A multirun writes `<sweep dir>/multirun.yaml` (Hydra's basic sweeper) before its first job: its
`hydra.sweeper.params` (an experiment's or hparams_search's declared sweep) and `hydra.overrides.task` (the
command line, where `interactions=n1,n2,n4` narrows or adds a sweep) say which keys are swept. Each job's
`.hydra/overrides.yaml` holds its own values. The same rules name the rows of `comer.report` and the runs
in W&B (conf/logger/wandb.yaml calls the `wandb_*` functions below through Hydra's instantiate).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

MULTIRUN_FILE = "multirun.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Every experiment names its runs (run_name), so the `experiment` choice is already in the name.
NAMED_BY_RUN_NAME = ("experiment",)
WANDB_TAG_MAX = 64  # W&B refuses longer tags
WANDB_GROUP_MAX = 128
# Keys that say where or how a run ran, not what it measured: never taken as swept just because they differ
# between runs (a sweep that declares them still shows them), never part of a sweep's W&B group.
BOOKKEEPING_PREFIXES = ("paths.", "hydra.", "logger", "callbacks", "extras.", "preflight.")
BOOKKEEPING_KEYS = {"ckpt_path", "trusted_checkpoints", "data.root", "data.num_workers", "data.val_num_workers",
                    "data.pin_memory", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                    "trainer.log_every_n_steps", "attention_impl", "weights_dir", "run_id", "tags"}


def is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING_KEYS or key.startswith(BOOKKEEPING_PREFIXES)


def _parser() -> OverridesParser:
    return OverridesParser.create()


def _key(override: Override) -> str:
    """The key an override sets, without its `+`/`++`/`~` prefix (with `@package` if it has one)."""
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def parse_overrides(lines: Sequence[str] | None) -> dict[str, str]:
    """Override strings of one job (`.hydra/overrides.yaml`) -> {key: value as written}; sweeps
    (`a,b`, `interval(...)`) keep their text; deletions (`~key`) map to "~"."""
    result = {}
    for override in _parser().parse_overrides(list(_plain(lines) or [])):
        key = _key(override)
        if override.is_delete():
            result[key] = "~"
        elif override.is_sweep_override():
            result[key] = override.input_line.split("=", 1)[1]
        else:
            result[key] = override.get_value_element_as_str()
    return result


@dataclass
class SweepDefinition:
    """The keys a multirun sweeps (in the sweeper's order) and the overrides all its jobs share."""

    swept: list[str] = field(default_factory=list)
    values: dict[str, list[str]] = field(default_factory=dict)  # discrete sweeps: their values in order
    fixed: dict[str, str] = field(default_factory=dict)
    sweeper: str | None = None
    job_overrides: list[list[str]] | None = None  # every job's overrides, in job-number order (basic sweeper)


def sweep_definition(multirun: Mapping | None, sweeper_params: Mapping | None = None) -> SweepDefinition:
    """From a multirun's master config (the content of multirun.yaml), or, when there is none (Optuna
    writes none), from the sweeper's params alone."""
    multirun = _plain(multirun) or {}
    hydra = multirun.get("hydra") or {}
    sweeper = hydra.get("sweeper") or {}
    params = _plain(sweeper.get("params")) or _plain(sweeper_params) or {}
    command_line = (hydra.get("overrides") or {}).get("task") or []
    # The basic sweeper's rule: the declared params first, the command line after; a command-line key
    # replaces a declared one in place.
    parsed = _parser().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(command_line))
    effective: dict[str, Override] = {}
    for override in parsed:
        effective[_key(override)] = override
    definition = SweepDefinition(sweeper=sweeper.get("_target_"))
    for key, override in effective.items():
        if override.is_sweep_override():
            definition.swept.append(key)
            if override.is_discrete_sweep():
                definition.values[key] = [str(v) for v in override.sweep_string_iterator()]
        elif not override.is_delete():
            definition.fixed[key] = override.get_value_element_as_str()
    if definition.sweeper == BASIC_SWEEPER and multirun:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        definition.job_overrides = BasicSweeper.split_arguments(parsed, None)[0]
    return definition


def read_multirun(sweep_dir: str | Path) -> dict | None:
    """The master config a multirun saved in its directory, as plain data (not resolved), or None."""
    path = Path(sweep_dir) / MULTIRUN_FILE
    if not path.is_file():
        return None
    with path.open() as handle:
        return yaml.safe_load(handle)


def run_label(run_name: str | None, swept: Mapping[str, str]) -> str:
    """A run's readable name: its run_name and its swept values, e.g. `ablation_interactions interactions=n2`."""
    values = [f"{k}={v}" for k, v in swept.items() if k not in NAMED_BY_RUN_NAME or not run_name]
    return " ".join([run_name, *values] if run_name else values) or "run"


# ------------------------------------------------------------------------------- W&B (conf/logger/wandb.yaml)
def _job_sweep(run_dir: str, sweep_dir: str | None, overrides, sweeper_params) -> tuple[Path | None, dict, dict]:
    """(the sweep directory when this run is a multirun job, its swept values, the sweep's shared overrides).
    Naming never stops a run: a sweep definition that cannot be read is logged and the run named as a
    single one."""
    run, sweep = Path(run_dir).resolve(), Path(sweep_dir).resolve() if sweep_dir else None
    if sweep is None or sweep not in run.parents:
        return None, {}, {}
    try:
        definition = sweep_definition(read_multirun(sweep), sweeper_params)
        values = parse_overrides(overrides)
    except (OSError, yaml.YAMLError, HydraException, ValueError) as error:
        log.warning("cannot tell what the sweep %s varies (%s); naming %s as a single run", sweep, error, run)
        return None, {}, {}
    swept = {k: values[k] for k in definition.swept if k in values}
    return sweep, swept, definition.fixed


def is_choice(key: str, value: str) -> bool:
    """A config-group choice that says what ran (experiment=..., scale=toy), not where or how."""
    return "." not in key and "/" not in value and not is_bookkeeping(key)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def wandb_name(run_name: str, run_dir: str, sweep_dir: str | None = None, overrides=None, sweeper_params=None) -> str:
    """The run's name: run_name, plus its swept values when it is a multirun job."""
    _, swept, _ = _job_sweep(run_dir, sweep_dir, overrides, sweeper_params)
    return run_label(run_name, swept)


def wandb_group(run_name: str, run_dir: str, sweep_dir: str | None = None, overrides=None,
                sweeper_params=None) -> str:
    """The sweep: `<sweep dir name> <its shared config choices>` for a multirun job (every job of one `-m`
    launch shares it); run_name for a single run."""
    sweep, _, fixed = _job_sweep(run_dir, sweep_dir, overrides, sweeper_params)
    if sweep is None:
        return _short(run_name, WANDB_GROUP_MAX)
    choices = [f"{k}={v}" for k, v in fixed.items() if is_choice(k, v)]
    return _short(" ".join([sweep.name, *choices]), WANDB_GROUP_MAX)


def wandb_tags(run_name: str, run_dir: str, sweep_dir: str | None = None, overrides=None,
               sweeper_params=None) -> list[str]:
    """One `key=value` tag per swept key (none for a single run); W&B's 64-character limit applies."""
    _, swept, _ = _job_sweep(run_dir, sweep_dir, overrides, sweeper_params)
    return [_short(f"{k}={v}", WANDB_TAG_MAX) for k, v in swept.items()]


def wandb_config(run_name: str, run_dir: str, sweep_dir: str | None = None, overrides=None,
                 sweeper_params=None) -> dict:
    """W&B config entries to group and filter by: `sweep` (the swept values), `overrides` (all of this
    run's command-line overrides), `run_name`, `run_dir` and `sweep_dir` (`comer.report --wandb` reads them)."""
    sweep, swept, _ = _job_sweep(run_dir, sweep_dir, overrides, sweeper_params)
    return {"sweep": swept, "overrides": parse_overrides(overrides), "run_name": run_name,
            "run_dir": str(Path(run_dir).resolve()), "sweep_dir": str(sweep) if sweep is not None else None}


# ------------------------------------------------------------------------------- Optuna objective
def optimized_value(summary: Mapping, metric: str | None) -> float | None:
    """The number an optimising sweeper (Optuna) receives from a run: `metric` at the run's best validation
    (by the monitored metric), else at its latest; NaN when the run has no such value (the trial then counts
    as failed). None when `metric` is None (no optimising sweep)."""
    if metric is None:
        return None
    best = (summary.get("best") or {}).get("metrics") or {}
    value = best.get(metric, (summary.get("metrics") or {}).get(metric))
    return float(value) if value is not None and math.isfinite(float(value)) else math.nan
