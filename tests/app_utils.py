"""Compose the real Hydra configs for tests, the way `python train.py ...` would."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
import numpy as np
from omegaconf import DictConfig, open_dict
from PIL import Image

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"

# A synthetic run small enough for a unit test: 64 px images, 2 steps.
TINY_SYNTHETIC = [
    "data.num_train=8", "data.num_val=2", "data.image_size=64", "data.crop_size=[64,64]",
    "data.scale=[128,64]", "data.test_scale=[128,64]", "data.batch_size=2", "data.num_workers=0",
    "module.crop_size=[64,64]", "module.stride=[43,43]", "module.scheduler.warmup_iters=1",
    "model.decode_head.channels=16", "model.auxiliary_head.channels=8",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint_every_n_steps=2", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "logger=csv", "module.num_val_images_to_log=1",
]


# Keys the tests set unless a test sets them itself: the memory preflight's dry step (tests/test_preflight.py
# covers it) would cost each test's train() one more training step, 40 s for the ADE20K recipe's.
TEST_DEFAULTS = {"train": ["preflight.memory_check=false"]}


def _with_test_defaults(config_name: str, overrides: list[str]) -> list[str]:
    own_keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [o for o in TEST_DEFAULTS.get(config_name, []) if o.split("=", 1)[0] not in own_keys] + list(overrides)


def compose_config(config_name: str, overrides: list[str], root: Path) -> DictConfig:
    """The composed config with the hydra node set, paths under `root`, as a run would see it (with
    TEST_DEFAULTS)."""
    GlobalHydra.instance().clear()
    overrides = _with_test_defaults(config_name, overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[f"paths.root_dir={root}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # a @hydra.main task function does not see this node either
        cfg.paths.output_dir = str(root / "outputs" / cfg.run_name / "run")
    return cfg


ADE20K_NUM_CLASSES = 150


def write_tiny_ade20k(root: Path, split_sizes: dict[str, int], size: tuple[int, int] = (64, 80),
                      num_classes: int = ADE20K_NUM_CLASSES, stem: str = "ADE_{split}_{index:08d}") -> Path:
    """A few random images and labels (0..num_classes, 0 = unlabeled) in the ADEChallengeData2016 release layout,
    named ``stem`` (formatted with split and index)."""
    rng = np.random.default_rng(0)
    for split, count in split_sizes.items():
        images = root / "ADEChallengeData2016" / "images" / split
        annotations = root / "ADEChallengeData2016" / "annotations" / split
        images.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for i in range(count):
            name = stem.format(split=split, index=i)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
            Image.fromarray(rng.integers(0, num_classes + 1, size, dtype=np.uint8)).save(annotations / f"{name}.png")
    return root


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(Callback):
    """Kills a run just before the optimiser step `step + 1` (after the checkpoints of step `step`)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"simulated crash at step {self.step}")

# A 4-block ViT-CoMer with narrow widths, for runs whose backbone size does not matter.
SMALL_BACKBONE = ["backbone.embed_dim=48", "backbone.depth=4", "backbone.num_heads=3", "backbone.deform_num_heads=3",
                  "backbone.mrfp_ratio=1.0", "backbone.conv_inplanes=16"]

# A synthetic detection run small enough for a unit test: a 4-block ViT-CoMer, 64-96 px images, slim heads, 2 steps.
TINY_DETECTION = [
    "task=synthetic_det", *SMALL_BACKBONE,
    "data.num_train=6", "data.num_val=2", "data.image_size=[64,96]", "data.train_scales=[64,80]", "data.max_size=128",
    "data.crop_policy_scales=null", "data.crop_policy_crop_size=null", "data.crop_size=null", "data.test_scale=[128,64]",
    "data.batch_size=2", "data.num_workers=0", "model.neck.out_channels=32", "model.roi_head.bbox_head.fc_out_channels=64",
    "model.roi_head.mask_head.conv_out_channels=16", "model.rpn_head.train_nms_pre=200", "model.rpn_head.test_nms_pre=200",
    "model.rpn_head.train_max_per_img=100", "model.rpn_head.test_max_per_img=100", "model.roi_head.sampler.num=64",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint_every_n_steps=2", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "logger=csv", "module.num_val_images_to_log=1", "module.scheduler.warmup_iters=1",
]
