"""The OmegaConf resolvers our configs use, registered before Hydra composes (importing comer.app does it)."""
from __future__ import annotations

import math

from omegaconf import OmegaConf

from .run_dir import hydra_output_subdir, hydra_run_dir


def multiply(*factors: float) -> int | float:
    """``${comer_mul:12,${iterations_per_epoch}}``: epoch recipes in iterations (an int when all factors are)."""
    product = math.prod(factors)
    return int(product) if all(isinstance(f, int) for f in factors) else product


def ceil_divide(numerator: int, denominator: int) -> int:
    """``${comer_ceil_div:117266,${global_batch_size}}``: iterations per epoch of a dataset."""
    return -(-int(numerator) // int(denominator))


RESOLVERS = {
    "comer_run_dir": hydra_run_dir,  # hydra.run.dir: a new directory, or the resumed run's
    "comer_hydra_subdir": hydra_output_subdir,  # hydra.output_subdir: a resume records beside the original
    "comer_mul": multiply,
    "comer_ceil_div": ceil_divide,
}


def register_resolvers() -> None:
    for name, function in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
