"""Train ViT-CoMer: `python train.py backbone=comer_s task=ade20k data.root=/data/ade` (see conf/train.yaml)."""
import signal

import hydra
from omegaconf import DictConfig

from comer.app import train
from comer.report.sweep import optimized_value

SIGNAL_EXIT_BASE = 128  # the shell's convention: killed by signal N exits with 128 + N


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    stopped_by = summary.get("interrupted_by")
    if stopped_by:  # last.ckpt is saved and the resume command printed; tell the scheduler we were stopped
        raise SystemExit(SIGNAL_EXIT_BASE + signal.Signals[stopped_by].value if stopped_by in signal.Signals.__members__
                         else 1)
    return optimized_value(summary, cfg.get("optimized_metric"))  # what an Optuna sweep maximises (None otherwise)


if __name__ == "__main__":
    main()
