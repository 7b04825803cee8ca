"""Evaluate a checkpoint: `python eval.py ckpt_path=<our run's checkpoint or directory, or last>`, or a released
one with `task=... backbone=...` (see conf/eval.yaml)."""
import hydra
from omegaconf import DictConfig

from comer.app import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
