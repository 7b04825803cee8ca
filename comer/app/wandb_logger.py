"""Lightning's W&B logger as our runs use it (the target of conf/logger/wandb.yaml)."""
from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """``run_tags`` (the config's top-level ``tags``) go to W&B first, then ``tags`` (a sweep's, computed by
    comer.report.sweep), each once.

    Lightning passes ``anonymous=None`` to ``wandb.init`` even when nobody set it, and wandb >= 0.19 answers any
    value with "The anonymous setting has no effect"; unset, it is left out of ``wandb.init``'s arguments."""

    def __init__(self, *args, tags: Sequence[str] = (), run_tags: Sequence[str] = (), anonymous: bool | None = None,
                 **kwargs) -> None:
        merged = list(dict.fromkeys([*map(str, run_tags), *map(str, tags)]))
        super().__init__(*args, tags=merged, anonymous=anonymous, **kwargs)
        if anonymous is None:
            self._wandb_init.pop("anonymous", None)  # the arguments Lightning hands wandb.init
