"""The application layer end to end: configs compose, train/resume/eval run, bad input fails early."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app_utils import CONFIG_DIR, TINY_SYNTHETIC, compose_config
from comer.app import evaluate, train
from comer.app.builders import ConfigError, check_config
from comer.app.run_dir import ResumeError
from comer.checkpoint.pretrain import PretrainConfigError

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", "pretrain.path=/weights/x.pth"], tmp_path)
    check_config(cfg)
    assert cfg.run_name == experiment.replace("ade20k_", "ade20k-")


SEGMENTATION_BACKBONES = [b for b in BACKBONES if not b.endswith("_det")]


@pytest.mark.parametrize("backbone", SEGMENTATION_BACKBONES)
def test_ade20k_recipe_per_backbone(backbone, tmp_path):
    """The spec's recipe is the default of task=ade20k, with the variant's own lr."""
    cfg = compose_config("train", [f"backbone={backbone}", "task=ade20k"], tmp_path)
    check_config(cfg)
    expected_lr = {"t": 12e-5, "s": 6e-5, "b": 6e-5, "l": 2e-5}[backbone.split("_")[1]]
    assert cfg.module.optimizer.lr == pytest.approx(expected_lr)
    assert (cfg.trainer.max_steps, cfg.global_batch_size, cfg.module.layer_decay) == (160000, 16, 0.95)
    assert cfg.module.scheduler.warmup_iters == 1500 and cfg.module.optimizer.weight_decay == 0.01
    assert list(cfg.data.crop_size) == [512, 512] and list(cfg.data.scale) == [2048, 512]
    assert (list(cfg.module.crop_size), list(cfg.module.stride)) == ([512, 512], [341, 341])
    assert cfg.model.decode_head.channels == 512 and cfg.model.aux_loss_weight == 0.4


@pytest.mark.parametrize("group,choice,key,value", [
    ("interactions", "n2", "num_interactions", 2),
    ("interactions", "n6", "num_interactions", 6),
    ("mrfp", "k3_5_7", "mrfp_kernel_sizes", [3, 5, 7]),
    ("mrfp", "off", "use_mrfp", False),
])
def test_ablation_groups_reach_the_backbone(group, choice, key, value, tmp_path):
    import hydra
    cfg = compose_config("train", [f"{group}={choice}"], tmp_path)
    assert cfg.backbone[key] == value
    backbone = hydra.utils.instantiate(cfg.backbone)
    assert backbone(torch.zeros(1, 3, 64, 64))["res5"].shape[-1] == 2


def test_backbone_without_recipe_lr_is_a_config_error(tmp_path):
    """The detection flavour has no ADE20K recipe: the user is told which key to set."""
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_s_det"], tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)module.optimizer.lr.*comer_s_det.*module.optimizer.lr=\.\.\."):
        check_config(cfg)
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_s_det", "module.optimizer.lr=1e-4"], tmp_path)
    check_config(cfg)


def test_pretrain_without_path_fails_before_training(tmp_path):
    cfg = compose_config("train", ["pretrain=deit", *TINY_SYNTHETIC], tmp_path)
    with pytest.raises(PretrainConfigError, match="pretrain.path"):
        train(cfg)
    assert not (tmp_path / "data").exists(), "no data should be generated before the config is known to be good"


def test_interactions_not_dividing_depth_fails_before_data(tmp_path):
    cfg = compose_config("train", ["backbone.num_interactions=5", *TINY_SYNTHETIC], tmp_path)
    with pytest.raises(Exception, match="num_interactions 5 must be a positive divisor of depth 12"):
        train(cfg)
    assert not (tmp_path / "data").exists()


def test_missing_dataset_root_names_the_path(tmp_path):
    missing = tmp_path / "no_such_ade"
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_t", f"data.root={missing}", "global_batch_size=2",
                                   "trainer.max_steps=1", "logger=csv"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_ade") as error:
        train(cfg)
    assert "task=synthetic_seg" in str(error.value)


def test_resume_last_without_a_previous_run(tmp_path):
    cfg = compose_config("train", ["ckpt_path=last", *TINY_SYNTHETIC], tmp_path)
    with pytest.raises(ResumeError, match="no checkpoints/last.ckpt"):
        train(cfg)


def test_train_resume_and_evaluate(tmp_path):
    """Two steps, resume to four, then eval.py on the last checkpoint reproduces the last validation."""
    first = train(compose_config("train", TINY_SYNTHETIC, tmp_path))
    run_dir = Path(first["run_dir"])
    assert first["global_step"] == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["val/mIoU"] is not None
    assert list(run_dir.glob("**/val_images/step_000002/*.png")), "validation overlays are written as PNGs"

    resumed = train(compose_config("train", [*TINY_SYNTHETIC, "ckpt_path=last", "trainer.max_steps=4"], tmp_path))
    assert resumed["global_step"] == 4 and resumed["run_dir"] == first["run_dir"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4

    eval_overrides = [o for o in TINY_SYNTHETIC if not o.startswith("logger=")]
    cfg = compose_config("eval", [*eval_overrides, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                                  "eval.save_predictions=true"], tmp_path)
    result = evaluate(cfg)
    assert result["checkpoint_kind"] == "lightning"
    assert result["metrics"]["test/mIoU"] == pytest.approx(resumed["metrics"]["val/mIoU"], abs=1e-6)
    predictions = sorted((Path(cfg.paths.output_dir) / "predictions").glob("*.png"))
    assert len(predictions) == 2
    values = np.unique(np.array(Image.open(predictions[0])))
    assert values.min() >= 1 and values.max() <= 7, "submission format: classes written as 1..K"
