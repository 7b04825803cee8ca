"""conf/experiment/*: every paper result we reproduce, its command in its header, its sweep, its toy scale;
the launchers (SLURM, Optuna) compose."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from app_utils import CONFIG_DIR, compose_config
from comer.app import train
from comer.app.builders import check_config
from comer.report.sweep import parse_overrides, sweep_definition

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# `scale=toy` swaps the task for the synthetic segmentation set: it covers the ADE20K experiments; the COCO
# ones have `scale=toy_det`, on the synthetic COCO-layout set.
SEGMENTATION_EXPERIMENTS = [e for e in EXPERIMENTS
                            if "override /task: ade20k" in (CONFIG_DIR / "experiment" / f"{e}.yaml").read_text()]
DETECTION_EXPERIMENTS = [e for e in EXPERIMENTS
                         if "override /task: coco" in (CONFIG_DIR / "experiment" / f"{e}.yaml").read_text()]
# The results of the paper each experiment file reproduces (at least these must exist).
PAPER_RESULTS = {
    "component ablation": ["ablation_vit_s", "ablation_mrfp_only", "ablation_cti_to_vit_only", "ablation_cti_both",
                           "ablation_full"],
    "N interactions": ["ablation_interactions"],
    "MRFP kernel sizes": ["ablation_mrfp_kernels"],
    "pretraining comparison": ["pretrain_comparison"],
    "ADE20K headline": ["ade20k_comer_t", "ade20k_comer_s", "ade20k_comer_b", "ade20k_vit_s"],
}


def has_hydra_plugin(name: str) -> bool:
    """Whether `hydra_plugins.<name>` is installed (`find_spec` raises when no plugin at all is, as in CI)."""
    try:
        return importlib.util.find_spec(f"hydra_plugins.{name}") is not None
    except ModuleNotFoundError:
        return False


HAS_OPTUNA = has_hydra_plugin("hydra_optuna_sweeper")
HAS_SUBMITIT = has_hydra_plugin("hydra_submitit_launcher")


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_every_paper_result_has_an_experiment():
    for result, names in PAPER_RESULTS.items():
        assert set(names) <= set(EXPERIMENTS), (result, sorted(set(names) - set(EXPERIMENTS)))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_header_has_the_command_and_the_toy_switch(experiment):
    lines = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert lines[0] == "# @package _global_"
    assert any("python train.py" in line and f"experiment={experiment}" in line for line in header), experiment
    toy_switch = "add `scale=toy`" if experiment in SEGMENTATION_EXPERIMENTS else "add `scale=toy_det`"
    assert any(toy_switch in line for line in header), experiment


def test_every_experiment_has_a_toy_scale():
    every_result = {name for names in PAPER_RESULTS.values() for name in names}
    assert every_result <= set(SEGMENTATION_EXPERIMENTS)
    assert set(SEGMENTATION_EXPERIMENTS) | set(DETECTION_EXPERIMENTS) == set(EXPERIMENTS)
    assert DETECTION_EXPERIMENTS, "the COCO rows"


@pytest.mark.parametrize("experiment", DETECTION_EXPERIMENTS)
def test_detection_toy_scale_keeps_the_architecture_and_shrinks_the_rest(experiment, tmp_path):
    """`scale=toy_det` (one override): the synthetic COCO-layout set at 64-96 px, 4 iterations, from scratch,
    slim heads, outputs under outputs/toy/; the backbone, layer decay and run name are the experiment's."""
    full = compose_config("train", [f"experiment={experiment}", "pretrain.path=/weights/x.pth"], tmp_path)
    toy = compose_config("train", [f"experiment={experiment}", "scale=toy_det"], tmp_path)
    check_config(toy)
    assert toy.backbone == full.backbone and toy.run_name == full.run_name
    assert toy.module.layer_decay == full.module.layer_decay
    assert full.data._target_ == "comer.data.CocoDataModule"
    assert toy.data._target_ == "comer.data.SyntheticCocoDataModule" and list(toy.data.image_size) == [64, 96]
    assert (toy.trainer.max_steps, toy.trainer.val_check_interval, toy.trainer.precision) == (4, 4, "32-true")
    assert toy.pretrain.format == "none" and toy.pretrain.path is None
    assert toy.model.neck.out_channels == 32 and toy.global_batch_size is None
    assert toy.paths.log_dir == f"{tmp_path}/outputs/toy"


@pytest.mark.parametrize("experiment", SEGMENTATION_EXPERIMENTS)
def test_toy_scale_keeps_the_architecture_and_shrinks_the_rest(experiment, tmp_path):
    """`scale=toy` (one override): synthetic data at 64 px, 4 iterations, from scratch, a 16-channel UperNet,
    outputs under outputs/toy/; the backbone and the run name are the experiment's."""
    full = compose_config("train", [f"experiment={experiment}", "pretrain.path=/weights/x.pth"], tmp_path)
    toy = compose_config("train", [f"experiment={experiment}", "scale=toy"], tmp_path)
    check_config(toy)
    assert toy.backbone == full.backbone and toy.run_name == full.run_name
    assert full.data._target_ == "comer.data.ADE20KDataModule"
    assert toy.data._target_ == "comer.data.SyntheticSegDataModule" and toy.data.image_size == 64
    assert (toy.trainer.max_steps, toy.trainer.val_check_interval, toy.trainer.precision) == (4, 4, "32-true")
    assert toy.pretrain.format == "none" and toy.pretrain.path is None
    assert toy.model.decode_head.channels == 16 and toy.global_batch_size is None
    assert toy.paths.log_dir == f"{tmp_path}/outputs/toy"


EXPECTED_SWITCHES = {  # (use_mrfp, use_cti_to_vit, use_cti_to_cnn, num_extra_ctis) of the component ablation
    "ablation_mrfp_only": (True, False, False, 0),
    "ablation_cti_to_vit_only": (False, True, False, 0),
    "ablation_cti_both": (False, True, True, 4),
    "ablation_full": (True, True, True, 4),
}


def test_component_ablation_rows(tmp_path):
    for experiment, switches in EXPECTED_SWITCHES.items():
        backbone = compose_config("train", [f"experiment={experiment}"], tmp_path).backbone
        flags = (backbone.use_mrfp, backbone.use_cti_to_vit, backbone.use_cti_to_cnn, backbone.num_extra_ctis)
        assert flags == switches, experiment
        assert backbone.embed_dim == 384 and backbone.num_interactions == 4
    plain = compose_config("train", ["experiment=ablation_vit_s"], tmp_path)
    assert plain.backbone._target_ == "comer.backbones.ViTPyramid" and plain.backbone.embed_dim == 384
    assert plain.pretrain.format == "deit" and plain.data._target_ == "comer.data.ADE20KDataModule"


@pytest.mark.parametrize("experiment,key,expected", [
    ("ablation_interactions", "interactions", ["n1", "n2", "n3", "n4", "n6"]),
    ("ablation_mrfp_kernels", "mrfp", ["k3", "k5", "k3_5", "k3_5_7", "k3_5_7_9"]),
    ("pretrain_comparison", "pretrain", ["none", "deit", "augreg", "mae", "beit", "dinov2"]),
])
def test_sweep_experiments_declare_the_papers_values(experiment, key, expected, tmp_path):
    """`python train.py -m experiment=X` sweeps the paper's values; `key=a,b` on the command line narrows it.
    Checked with Hydra's own basic sweeper on the composed config (the jobs it would launch, in order)."""
    cfg = compose_with_hydra([f"experiment={experiment}"])
    master = {"hydra": {"sweeper": {"_target_": cfg.hydra.sweeper._target_, "params": dict(cfg.hydra.sweeper.params)},
                        "overrides": {"task": [f"experiment={experiment}"]}}}
    definition = sweep_definition(master)
    assert definition.swept == [key] and definition.values[key] == expected
    jobs = [parse_overrides(job) for job in definition.job_overrides]
    assert [job[key] for job in jobs] == expected and all(job["experiment"] == experiment for job in jobs)
    narrowed = {**master, "hydra": {**master["hydra"], "overrides": {"task": [f"experiment={experiment}",
                                                                             f"{key}={expected[0]},{expected[2]}"]}}}
    assert [parse_overrides(j)[key] for j in sweep_definition(narrowed).job_overrides] == [expected[0], expected[2]]


def test_each_sweep_row_builds_the_papers_model(tmp_path):
    """Every row of the N and kernel-size sweeps reaches the backbone; every pretraining row names its file."""
    for choice, n in (("n1", 1), ("n2", 2), ("n3", 3), ("n4", 4), ("n6", 6)):
        backbone = compose_config("train", ["experiment=ablation_interactions", f"interactions={choice}"],
                                  tmp_path).backbone
        assert (backbone.num_interactions, backbone.vit_feature_mode) == (n, "final")
    for choice, kernels in (("k3", [3]), ("k5", [5]), ("k3_5", [3, 5]), ("k3_5_7", [3, 5, 7]),
                            ("k3_5_7_9", [3, 5, 7, 9])):
        backbone = compose_config("train", ["experiment=ablation_mrfp_kernels", f"mrfp={choice}"], tmp_path).backbone
        assert list(backbone.mrfp_kernel_sizes) == kernels and backbone.use_mrfp
    for choice in ("none", "deit", "augreg", "mae", "beit", "dinov2"):
        cfg = compose_config("train", ["experiment=pretrain_comparison", f"pretrain={choice}", "weights_dir=/w"],
                             tmp_path)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # (check_config also wants the files)
        assert cfg.pretrain.format == choice and cfg.backbone.embed_dim == 768
        assert cfg.pretrain.path == (None if choice == "none" else cfg.pretrain_files[choice])
        assert choice == "none" or cfg.pretrain.path.startswith("/w/")


@pytest.mark.skipif(not HAS_SUBMITIT, reason="the cluster extra is not installed: pip install -e '.[cluster]'")
def test_slurm_launcher_asks_one_task_per_gpu():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
                              "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    assert (launcher.partition, launcher.max_num_timeout, launcher.timeout_min) == ("gpu", 0, 4320)


@pytest.mark.skipif(not HAS_OPTUNA, reason="the cluster extra is not installed: pip install -e '.[cluster]'")
def test_optuna_search_composes():
    cfg = compose_with_hydra(["hparams_search=ade20k_optuna", "experiment=ade20k_comer_s"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert (sweeper.direction, cfg.optimized_metric, str(cfg.hydra.mode)) == ("maximize", "val/mIoU",
                                                                             "RunMode.MULTIRUN")
    assert sweeper.params["module.optimizer.lr"] == "tag(log, interval(2.0e-5, 2.0e-4))"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
@pytest.mark.parametrize("experiment", SEGMENTATION_EXPERIMENTS)
def test_every_experiment_trains_at_toy_scale(experiment, tmp_path):
    """Each experiment with `scale=toy` trains its 4 iterations, validates and writes its summary (CSV logger)."""
    result = train(compose_config("train", [f"experiment={experiment}", "scale=toy", "logger=csv",
                                            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
                                  tmp_path))
    assert result["status"] == "finished" and result["global_step"] == 4
    assert 0.0 <= result["metrics"]["val/mIoU"] <= 1.0 and 0.0 <= result["metrics"]["val/aAcc"] <= 1.0
    assert json.loads((Path(result["run_dir"]) / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_coco_experiment_trains_at_toy_scale(tmp_path):
    """`scale=toy_det` on a COCO row: ViT-CoMer-S + Mask R-CNN trains 4 iterations and COCOeval runs (the
    other rows differ in backbone size and schedule only, which the composition test covers)."""
    result = train(compose_config("train", ["experiment=coco_comer_s_dinov2_1x", "scale=toy_det", "logger=csv",
                                            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
                                  tmp_path))
    assert result["status"] == "finished" and result["global_step"] == 4
    assert 0.0 <= result["metrics"]["val/bbox_mAP"] <= 1.0 and 0.0 <= result["metrics"]["val/segm_mAP"] <= 1.0


OPTUNA_APP = '''
import hydra
from comer.app import train
from comer.report import optimized_value


@hydra.main(version_base="1.3", config_path={conf!r}, config_name="train")
def main(cfg):
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPTUNA, reason="the cluster extra is not installed: pip install -e '.[cluster]'")
def test_optuna_search_runs_trials_at_toy_scale(tmp_path):
    """hparams_search=ade20k_optuna at toy scale: two trials, each a run directory, each returning its
    best val/mIoU to Optuna (the task function returns comer.report.optimized_value of the run)."""
    app = tmp_path / "optuna_app.py"
    app.write_text(OPTUNA_APP.format(conf=str(CONFIG_DIR)))
    command = [sys.executable, str(app), "hparams_search=ade20k_optuna", "scale=toy", "hydra.sweeper.n_trials=2",
               f"paths.root_dir={tmp_path}", "logger=csv", "trainer.enable_progress_bar=false",
               "preflight.memory_check=false"]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "toy" / "multirun").iterdir()
    trials = sorted(d for d in sweep_dir.iterdir() if d.is_dir() and (d / "metrics.json").is_file())
    assert len(trials) == 2
    lrs = {parse_overrides(yaml.safe_load((t / ".hydra" / "overrides.yaml").read_text()))["module.optimizer.lr"]
           for t in trials}
    assert len(lrs) == 2 and all(2e-5 <= float(lr) <= 2e-4 for lr in lrs)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = max(json.loads((t / "metrics.json").read_text())["best"]["metrics"]["val/mIoU"] for t in trials)
    assert results["best_value"] == pytest.approx(best)
