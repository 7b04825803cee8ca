"""Train ViT-CoMer: `python train.py backbone=comer_s task=ade20k data.root=/data/ade` (see conf/train.yaml)."""
import hydra
from omegaconf import DictConfig

from comer.app import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
