"""Parameters and FLOPs for runs whose metrics.json does not carry them (runs made before train() recorded
them): rebuilt from each run's resolved config.yaml, one model per distinct architecture."""
from __future__ import annotations

import json
import logging

from .runs import Run

log = logging.getLogger(__name__)


def fill_missing_complexity(runs: list[Run]) -> int:
    """Sets `params` and `flops` of every run that has a config but no counts (from its backbone and model
    config at its task's crop size, weights freshly initialised). Returns how many runs it filled."""
    import hydra

    from comer.flops import model_complexity

    cache: dict[str, dict] = {}
    filled = 0
    for run in runs:
        config = run.config or {}
        if run.params is not None or "backbone" not in config or "model" not in config:
            continue
        size = list((config.get("module") or {}).get("crop_size") or [512, 512])
        key = json.dumps([config["backbone"], config["model"], size], sort_keys=True, default=str)
        if key not in cache:
            log.info("counting parameters and FLOPs of %s at %s", run.location, size)
            backbone = hydra.utils.instantiate(config["backbone"])
            cache[key] = model_complexity(hydra.utils.instantiate(config["model"], backbone=backbone), size)
        run.params, run.flops = cache[key]["params"], cache[key]["flops"]
        filled += 1
    return filled
