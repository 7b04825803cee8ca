"""eval.py rebuilds one of our runs from the run's stored config: ckpt_path alone reproduces the run's last
validation; keys given to eval apply on top; official checkpoints still take backbone=/task=."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app_utils import TINY_SYNTHETIC, compose_config
from comer.app import evaluate, train
from comer.app.builders import ConfigError
from comer.app.evaluate import EVAL_CONFIG_FILE, config_for_checkpoint
from comer.data.ade20k import read_image
from comer.data.synthetic import CLASS_NAMES, SYNTHETIC_CLASSES
from comer.data.transforms import IGNORE_INDEX
from comer.training.visualization import as_palette, labelled_overlay, overlay

# Architecture keys the eval command never repeats: a 4-block ViT-CoMer with 2 interactions (a config group).
SMALL_ARCHITECTURE = ["backbone.embed_dim=48", "backbone.depth=4", "backbone.num_heads=3", "backbone.deform_num_heads=3",
                      "backbone.mrfp_ratio=1.0", "backbone.conv_inplanes=16", "interactions=n2",
                      "model.decode_head.channels=24"]
RUN_OVERRIDES = [*TINY_SYNTHETIC, *SMALL_ARCHITECTURE]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    result = train(compose_config("train", RUN_OVERRIDES, root))
    return root, Path(result["run_dir"]), result


def eval_config(root: Path, *overrides: str):
    return compose_config("eval", list(overrides), root)


def test_the_checkpoint_alone_reproduces_the_last_validation(run, tmp_path):
    _, run_dir, trained = run
    summary_before = (run_dir / "metrics.json").read_bytes()
    cfg = eval_config(tmp_path, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    result = evaluate(cfg)
    assert result["checkpoint_kind"] == "lightning" and result["run_config"] == str(run_dir / "config.yaml")
    validated = {k.removeprefix("val/"): v for k, v in trained["metrics"].items() if k.startswith("val/")}
    tested = {k.removeprefix("test/"): v for k, v in result["metrics"].items()}
    assert "mIoU" in tested and tested == validated  # every number, exactly (a non-finite IoU is None in both)

    used = yaml.safe_load((tmp_path / "outputs" / "eval-synthetic_seg-comer_t" / "run" / EVAL_CONFIG_FILE).read_text())
    assert (used["backbone"]["depth"], used["backbone"]["num_interactions"], used["model"]["decode_head"]["channels"]) \
        == (4, 2, 24)
    assert used["trainer"]["default_root_dir"] == cfg.paths.output_dir != str(run_dir)
    assert (run_dir / "metrics.json").read_bytes() == summary_before, "the training run's files are left alone"


def test_a_run_directory_and_last_name_the_run_s_last_checkpoint(run, tmp_path):
    root, run_dir, _ = run
    expected, _ = config_for_checkpoint(eval_config(tmp_path, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
    for ckpt in (str(run_dir), "last"):
        cfg, source = config_for_checkpoint(eval_config(tmp_path, f"ckpt_path={ckpt}", f"paths.log_dir={root / 'outputs'}"))
        assert source.path == run_dir / "checkpoints" / "last.ckpt"
        assert cfg.backbone == expected.backbone and cfg.model == expected.model and cfg.data == expected.data
    with pytest.raises(FileNotFoundError, match="no run named nameless.*train_run_name="):
        config_for_checkpoint(eval_config(tmp_path, "ckpt_path=last", f"paths.log_dir={root / 'outputs'}",
                                          "train_run_name=nameless"))


def test_keys_given_to_eval_apply_on_top_of_the_run(run, tmp_path):
    _, run_dir, _ = run
    shown = tmp_path / "shown"
    cfg = eval_config(tmp_path, f"ckpt_path={run_dir}", f"data.root={tmp_path / 'other_data'}", "data.num_val=3",
                      "module.scales=[0.75,1.0]", "eval.save_predictions=true", f"eval.show_dir={shown}")
    evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    used = yaml.safe_load((out / EVAL_CONFIG_FILE).read_text())
    assert used["data"]["num_val"] == 3 and used["backbone"]["depth"] == 4
    assert used["module"]["scales"] == used["data"]["test_ratios"] == [0.75, 1.0], "derived values follow the override"
    predictions = sorted((out / "predictions").glob("*.png"))
    overlays = sorted(shown.glob("*.png"))
    assert len(predictions) == len(overlays) == 3 and [p.name for p in predictions] == [p.name for p in overlays]
    # each overlay is the original image with the predicted classes (the submission PNG, 1-based) and their legend
    palette = as_palette([c.rgb for c in SYNTHETIC_CLASSES], len(CLASS_NAMES))
    images = {p.stem: p for p in (tmp_path / "other_data" / "ADEChallengeData2016" / "images" / "validation").iterdir()}
    for prediction, shown_file in zip(predictions, overlays):
        labels = np.asarray(Image.open(prediction)).astype(np.int64) - 1
        rgb = read_image(images[prediction.stem])
        picture = np.asarray(Image.open(shown_file))
        assert picture.shape[0] > rgb.shape[0], "a legend below the image"
        np.testing.assert_array_equal(picture[:rgb.shape[0]], overlay(rgb, labels, palette, IGNORE_INDEX))
        np.testing.assert_array_equal(picture, labelled_overlay(rgb, labels, CLASS_NAMES, palette, IGNORE_INDEX))


def test_a_group_choice_must_agree_with_the_run(run, tmp_path):
    _, run_dir, _ = run
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    config_for_checkpoint(eval_config(tmp_path, ckpt, *RUN_OVERRIDES))  # the training command repeated: accepted
    with pytest.raises(ConfigError, match=r"(?s)interactions=n4.*backbone.num_interactions: 2 -> 4.*Drop the group"):
        config_for_checkpoint(eval_config(tmp_path, ckpt, "interactions=n4"))


def test_our_checkpoint_without_its_run_config_is_refused_clearly(run, tmp_path):
    _, run_dir, _ = run
    moved = tmp_path / "moved.ckpt"
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", moved)
    with pytest.raises(ConfigError, match=r"not inside its run directory.*run_config=/path/to/config\.yaml"):
        config_for_checkpoint(eval_config(tmp_path, f"ckpt_path={moved}"))
    cfg, source = config_for_checkpoint(eval_config(tmp_path, f"ckpt_path={moved}", f"run_config={run_dir / 'config.yaml'}"))
    assert source.kind == "lightning" and cfg.backbone.depth == 4
    with pytest.raises(ConfigError, match="cannot read"):
        (tmp_path / "broken.yaml").write_text("backbone: [unclosed")
        config_for_checkpoint(eval_config(tmp_path, f"ckpt_path={moved}", f"run_config={tmp_path / 'broken.yaml'}"))


def test_an_official_checkpoint_takes_its_model_from_the_command_line(tmp_path):
    official = tmp_path / "upernet_official.pth"
    torch.save({"meta": {"mmseg_version": "0.20.2"}, "state_dict": {"backbone.cls_token": torch.zeros(1, 1, 4)}}, official)
    cfg, source = config_for_checkpoint(eval_config(tmp_path, f"ckpt_path={official}", "backbone=comer_s"))
    assert source.kind == "official" and cfg.backbone_name == "comer_s" and cfg.backbone.embed_dim == 384
    with pytest.raises(ConfigError, match="drop run_config"):
        config_for_checkpoint(eval_config(tmp_path, f"ckpt_path={official}", f"run_config={tmp_path / 'x.yaml'}"))
