"""The same runs read from a W&B project instead of run directories (`python -m comer.report --wandb ...`).

Our runs carry what the report needs in their W&B config (conf/logger/wandb.yaml): `sweep` (the swept
values), `overrides`, `run_name`, `run_dir`, `sweep_dir`; the group is the sweep. The metrics are the
summary's latest values; the best by the monitored metric comes from the run's history.
"""
from __future__ import annotations

from typing import Any

from .runs import FAILED, FINISHED, INTERRUPTED, KILLED, RUNNING, Run
from .sweep import SweepDefinition
from .table import METRIC_NAMES, STAGES

# W&B run states in the report's words: "crashed" is a process that died (no final heartbeat), "killed"
# one stopped from W&B or by a signal.
STATES = {"finished": FINISHED, "running": RUNNING, "crashed": KILLED, "failed": FAILED, "killed": INTERRUPTED,
          "preempted": INTERRUPTED, "preempting": INTERRUPTED}
STEP_KEYS = ("trainer/global_step", "_step")
DEFAULT_MONITOR = "val/mIoU"


def _get(mapping: Any, key: str, default=None):
    try:
        value = mapping.get(key, default)
    except AttributeError:
        return default
    return default if value is None else value


def _best(run: Any, monitor: str) -> dict | None:
    """{"step", "metrics": {monitor: value}} at the run's highest `monitor`, from its history."""
    history = getattr(run, "history", None)
    if history is None:
        return None
    rows = [row for row in history(keys=[monitor], pandas=False) if row.get(monitor) is not None]
    if not rows:
        return None
    top = max(rows, key=lambda row: row[monitor])
    step = next((top[k] for k in STEP_KEYS if top.get(k) is not None), None)
    return {"step": int(step) if step is not None else None, "metrics": {monitor: float(top[monitor])}}


def _metrics(summary: Any) -> dict[str, float]:
    names = [f"{stage}/{name}" for name in METRIC_NAMES for stage in STAGES]
    return {name: float(_get(summary, name)) for name in names if _get(summary, name) is not None}


def runs_from_wandb(project: str, group: str | None = None, api: Any = None,
                    monitor: str = DEFAULT_MONITOR) -> tuple[list[Run], list[SweepDefinition]]:
    """Runs of W&B `project` ("entity/project"), optionally only one `group` (a sweep). `api` defaults to
    `wandb.Api()` (it needs `wandb login`, or WANDB_API_KEY, and the network)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs: list[Run] = []
    swept_keys: list[str] = []
    for remote in api.runs(project, filters={"group": group} if group else None):
        config = dict(remote.config or {})
        swept = dict(config.get("sweep") or {})
        swept_keys.extend(k for k in swept if k not in swept_keys)
        overrides = {**dict(config.get("overrides") or {}), **swept}
        summary = remote.summary
        model = config.get("model") or {}
        step = next((_get(summary, k) for k in STEP_KEYS if _get(summary, k) is not None), None)
        state = STATES.get(remote.state, remote.state)
        runs.append(Run(
            location=f"wandb:{project}/{remote.id}", state=state,
            detail="" if state == FINISHED else f"W&B state {remote.state}",
            run_name=config.get("run_name") or remote.name, overrides={k: str(v) for k, v in overrides.items()},
            step=int(step) if step is not None else None, metrics=_metrics(summary), best=_best(remote, monitor),
            monitor=monitor, params=model.get("params") or _get(summary, "model/params"),
            flops=model.get("flops") or _get(summary, "model/flops"), config=config,
            sweep=getattr(remote, "group", None) or group))
    return runs, [SweepDefinition(swept=swept_keys)]

