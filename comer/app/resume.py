"""What `ckpt_path=...` means for a run: which directory it continues, from which step, and whether the
composed config may continue it (only resume-safe keys may differ from the run's stored config)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf

from comer.checkpoint import check_finite, load_checkpoint_file

from .builders import ConfigError
from .run_dir import CONFIG_FILE, resolve_checkpoint, run_dir_of_checkpoint

log = logging.getLogger(__name__)

SAFE_KEYS_CONFIG_KEY = "resume_safe_keys"
MAX_LISTED_CHANGES = 20


@dataclass
class Resume:
    checkpoint: Path
    step: int
    run_dir: Path | None  # None: a checkpoint from outside our run directories starts a new directory
    original: dict[str, Any] | None  # the resumed run's stored config

    @property
    def run_id(self) -> str | None:
        return (self.original or {}).get("run_id")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (lists are leaves)."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}": value})
    return flat


def _is_safe(key: str, safe_keys: Iterable[str]) -> bool:
    return any(key == safe or key.startswith(f"{safe}.") for safe in safe_keys)


def config_changes(original: Mapping[str, Any], current: Mapping[str, Any], safe_keys: Iterable[str]) -> list[str]:
    """`key: old -> new` for every key (outside ``safe_keys``) whose value differs, appears or disappears."""
    before, after = flatten(original), flatten(current)
    absent = object()

    def show(value: Any) -> str:
        return "(absent)" if value is absent else repr(value)

    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, absent), after.get(key, absent)
        if old != new and not _is_safe(key, safe_keys):
            changes.append(f"{key}: {show(old)} -> {show(new)}")
    return changes


def plan_resume(cfg: DictConfig) -> Resume | None:
    """None for a fresh run; else the checkpoint's step and run. Refuses a checkpoint with non-finite
    weights and a config that changes anything but the resume-safe keys."""
    checkpoint = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.run_name)
    if checkpoint is None:
        return None
    state = load_checkpoint_file(checkpoint)
    if not isinstance(state, dict) or "global_step" not in state or "state_dict" not in state:
        raise ConfigError(f"ckpt_path={checkpoint} is not a training checkpoint of this project (it has no "
                          f"global_step/state_dict); to start from its weights use pretrain=comer pretrain.path=...")
    check_finite(state["state_dict"], str(checkpoint))
    run_dir = run_dir_of_checkpoint(checkpoint)
    original = None
    if run_dir is not None:
        config_path = run_dir / CONFIG_FILE
        try:
            original = yaml.safe_load(config_path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read {config_path}, the config of the run to resume: {error}") from error
        current = OmegaConf.to_container(cfg, resolve=True)
        safe_keys = list(cfg.get(SAFE_KEYS_CONFIG_KEY) or [])
        changes = config_changes(original, current, safe_keys)
        if changes:
            listed = "\n  ".join(changes[:MAX_LISTED_CHANGES])
            more = f"\n  ... and {len(changes) - MAX_LISTED_CHANGES} more" if len(changes) > MAX_LISTED_CHANGES else ""
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: this config differs from the one the run in {run_dir} was trained with "
                f"({config_path}) in keys a resume must not change:\n  {listed}{more}\nRepeat the run's overrides "
                f"(only {', '.join(safe_keys)} may change), or start a new run from its weights with "
                f"pretrain=comer pretrain.path={checkpoint}")
    return Resume(checkpoint=checkpoint, step=int(state["global_step"]), run_dir=run_dir, original=original)
