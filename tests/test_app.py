"""The application layer end to end: configs compose, train/resume/eval run, bad input fails early."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app_utils import CONFIG_DIR, SMALL_BACKBONE, TINY_SYNTHETIC, SimulatedCrash, compose_config, write_tiny_ade20k
from comer.app import evaluate, train
from comer.app.builders import ConfigError, check_config, fp16_precision_plugin
from comer.app.run_dir import ResumeError
from comer.checkpoint.pretrain import PretrainConfigError

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    weights = tmp_path / "weights.pth"  # check_config checks that the weight file exists
    weights.touch()
    cfg = compose_config("train", [f"experiment={experiment}", f"pretrain.path={weights}"], tmp_path)
    check_config(cfg)
    assert cfg.run_name == experiment.replace("ade20k_", "ade20k-")


SEGMENTATION_BACKBONES = [b for b in BACKBONES if not b.endswith("_det")]


def test_hparams_search_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=ade20k_lr", "task=ade20k"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["module.optimizer.lr"] == "3e-5,6e-5,1.2e-4"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.parametrize("backbone", SEGMENTATION_BACKBONES)
def test_ade20k_recipe_per_backbone(backbone, tmp_path):
    """The spec's recipe is the default of task=ade20k, with the variant's own lr."""
    cfg = compose_config("train", [f"backbone={backbone}", "task=ade20k"], tmp_path)
    check_config(cfg)
    if backbone.startswith(("pvt", "conv2former")):  # no official UperNet recipe: their papers' ADE20K lr, no ViT
        expected_lr, expected_decay = 1e-4, 1.0
    else:
        variant = backbone.removesuffix("_beitv2").rsplit("_", 1)[1]
        expected_lr, expected_decay = {"t": 12e-5, "s": 6e-5, "b": 6e-5, "l": 2e-5}[variant], 0.95
    assert cfg.module.optimizer.lr == pytest.approx(expected_lr)
    assert (cfg.trainer.max_steps, cfg.global_batch_size, cfg.module.layer_decay) == (160000, 16, expected_decay)
    assert cfg.module.scheduler.warmup_iters == 1500 and cfg.module.optimizer.weight_decay == 0.01
    assert list(cfg.data.crop_size) == [512, 512] and list(cfg.data.scale) == [2048, 512]
    assert (list(cfg.module.crop_size), list(cfg.module.stride)) == ([512, 512], [341, 341])
    assert cfg.model.decode_head.channels == 512 and cfg.model.aux_loss_weight == 0.4
    # the official config validates, keeps the best mIoU and checkpoints every 1600 iterations
    assert cfg.trainer.val_check_interval == cfg.checkpoint_every_n_steps == 1600
    assert (cfg.callbacks.best_checkpoint.monitor, cfg.callbacks.best_checkpoint.mode) == ("val/mIoU", "max")


@pytest.mark.parametrize("trainer", ["default", "gpu", "ddp"])
def test_precision_is_decided_by_the_task_and_fp16_starts_at_the_recipe_scale(trainer, tmp_path, monkeypatch):
    ade = compose_config("train", ["task=ade20k", f"trainer={trainer}"], tmp_path)
    synthetic = compose_config("train", [f"trainer={trainer}"], tmp_path)
    assert (ade.trainer.precision, synthetic.trainer.precision) == ("16-mixed", "32-true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the scaler keeps its settings only "on" CUDA
    plugin = fp16_precision_plugin(ade)
    assert plugin.scaler._init_scale == 512.0 and plugin.precision == "16-mixed"
    assert fp16_precision_plugin(synthetic) is None


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
    """The detection flavour has no ADE20K recipe: the user is told which keys to set."""
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_s_det"], tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)module.optimizer.lr.*comer_s_det.*module.optimizer.lr=\.\.\."):
        check_config(cfg)
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_s_det", "module.optimizer.lr=1e-4"], tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)module.layer_decay.*comer_s_det.*module.layer_decay=\.\.\."):
        check_config(cfg)
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_s_det", "module.optimizer.lr=1e-4",
                                   "module.layer_decay=0.95"], tmp_path)
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
    (table,) = run_dir.glob("**/metric_tables/val_step_000002.txt")
    assert "disc" in table.read_text() and "mIoU" in table.read_text()

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


@pytest.mark.slow
def test_ade20k_recipe_starts_on_a_tiny_dataset(tmp_path):
    """`python train.py backbone=comer_t task=ade20k data.root=...` with the real recipe: 512 crops of the
    (2048, 512) rescale, UperNet 512, slide inference, comer_t's own lr. Only the global batch (16 -> 2), the
    length and the precision (fp16 AMP does not exist on a CPU) are shortened for the test. (ViT-T rather than
    the README's comer_s: the recipe is the same, the CPU's cost smaller.)"""
    root = tmp_path / "ade"
    write_tiny_ade20k(root, {"training": 2, "validation": 1})
    cfg = compose_config("train", [
        "backbone=comer_t", "task=ade20k", f"data.root={root}", "global_batch_size=2", "data.num_workers=0",
        "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.precision=32-true", "logger=csv",
        "trainer.enable_progress_bar=false"], tmp_path)
    assert cfg.module.optimizer.lr == pytest.approx(12e-5) and list(cfg.data.crop_size) == [512, 512]
    result = train(cfg)
    assert result["global_step"] == 1
    assert 0.0 <= result["metrics"]["val/mIoU"] <= 1.0
    assert len([k for k in result["metrics"] if k.startswith("val/IoU/")]) == 150


@pytest.mark.slow
def test_default_run_learns_the_synthetic_data(tmp_path):
    """The README's default job, a quarter as long (60 steps, warm-up 15): ViT-CoMer-T from scratch clearly
    learns the shapes. Predicting the background everywhere scores mIoU 0.097 and aAcc 0.68 on this validation
    set; this run scored mIoU 0.44, aAcc 0.85 and IoU 0.74 / 0.66 / 0.62 on box, blob and stripes when written."""
    cfg = compose_config("train", ["trainer.max_steps=60", "trainer.val_check_interval=60", "logger=csv",
                                   "module.scheduler.warmup_iters=15", "trainer.enable_progress_bar=false"], tmp_path)
    result = train(cfg)
    metrics = result["metrics"]
    assert result["global_step"] == 60
    assert metrics["val/mIoU"] > 0.3, metrics
    assert metrics["val/aAcc"] > 0.8, metrics
    shapes = ("disc", "box", "triangle", "stripes", "ring", "blob")
    assert sum(metrics[f"val/IoU/{name}"] > 0.5 for name in shapes) >= 3, metrics


def test_resume_is_exact(tmp_path):
    """4 steps in one go and 2 + resumed 2 end with identical weights and optimiser state: same data
    position, schedule and drop-path/dropout draws (RNG states travel with the checkpoint)."""
    straight = train(compose_config("train", [*TINY_SYNTHETIC, "trainer.max_steps=4", "run_name=straight"], tmp_path))
    crash = ["+callbacks.crash._target_=app_utils.CrashAtStep", "+callbacks.crash.step=2"]
    with pytest.raises(SimulatedCrash):
        train(compose_config("train", [*TINY_SYNTHETIC, "trainer.max_steps=4", "run_name=resumed", *crash], tmp_path))
    resumed = train(compose_config("train", [*TINY_SYNTHETIC, "trainer.max_steps=4", "run_name=resumed",
                                             "ckpt_path=last"], tmp_path))
    a = torch.load(Path(straight["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    moments_a = a["optimizer_states"][0]["state"]
    moments_b = b["optimizer_states"][0]["state"]
    for index, state in moments_a.items():
        assert torch.equal(state["exp_avg"], moments_b[index]["exp_avg"]), index


def test_evaluate_a_released_official_checkpoint(tmp_path):
    """eval.py reads an mmseg-format UperNet checkpoint (official backbone names, mmseg head names)."""
    import hydra

    from official_oracle import random_official_state_dict

    cfg = compose_config("eval", [*(o for o in TINY_SYNTHETIC if not o.startswith("logger=")),
                                  f"ckpt_path={tmp_path / 'official.pth'}"], tmp_path)
    segmentor = hydra.utils.instantiate(cfg.model, backbone=hydra.utils.instantiate(cfg.backbone))
    heads = {k: v for k, v in segmentor.state_dict().items() if not k.startswith("backbone.")}
    state = {**random_official_state_dict("t", dtype=torch.float32), **heads}
    torch.save({"meta": {"mmseg_version": "0.20.2"}, "state_dict": state}, tmp_path / "official.pth")
    result = evaluate(cfg)
    assert result["checkpoint_kind"] == "official"
    assert 0.0 <= result["metrics"]["test/mIoU"] <= 1.0
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["metrics"]["test/mIoU"] == result["metrics"]["test/mIoU"]


def test_evaluate_rejects_a_checkpoint_of_another_model(tmp_path):
    """Heads of another class count (or backbone) are named, not silently skipped."""
    cfg = compose_config("eval", [*(o for o in TINY_SYNTHETIC if not o.startswith("logger=")),
                                  f"ckpt_path={tmp_path / 'other.pth'}"], tmp_path)
    from official_oracle import random_official_state_dict
    torch.save({"state_dict": random_official_state_dict("s", dtype=torch.float32)}, tmp_path / "other.pth")
    with pytest.raises(Exception, match="shape"):
        evaluate(cfg)


@pytest.mark.slow
def test_cli_multirun_sweep(tmp_path):
    """`python train.py -m ...` (the real entry point and Hydra's launcher): one run per combination."""
    import subprocess
    import sys

    repo = CONFIG_DIR.parent
    tiny = [o for o in TINY_SYNTHETIC if not o.startswith("logger=")]
    command = [sys.executable, str(repo / "train.py"), "-m", "mrfp=k3,k3_5", f"paths.root_dir={tmp_path}",
               "logger=csv", "preflight.memory_check=false", *tiny, *SMALL_BACKBONE]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summaries = sorted((tmp_path / "outputs" / "multirun").glob("*/*/metrics.json"))
    assert len(summaries) == 2
    for job, summary in zip(("mrfp=k3", "mrfp=k3_5"), summaries):
        assert job in yaml.safe_load((summary.parent / ".hydra" / "overrides.yaml").read_text())
        assert json.loads(summary.read_text())["global_step"] == 2
        assert "mrfp_kernel_sizes" in (summary.parent / "config.yaml").read_text()


def test_bf16_mixed_precision_trains(tmp_path):
    """trainer.precision=bf16-mixed (Lightning autocast) runs the whole model, attention included."""
    result = train(compose_config("train", [*TINY_SYNTHETIC, "trainer.precision=bf16-mixed"], tmp_path))
    assert result["global_step"] == 2
    last = torch.load(Path(result["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
