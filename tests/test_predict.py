"""predict.py on a folder of unlabelled images: per image an overlay with its legend and the label map, equal to
the module's test recipe (predict_labels) on that image; the checkpoint's model comes from its run's config."""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from app_utils import TINY_SYNTHETIC, compose_config
from comer.app.builders import build_model, build_module, check_config
from comer.app.predict import LABELS_DIR, OVERLAYS_DIR, list_images, predict
from comer.data.ade20k import read_image
from comer.data.transforms import build_test_transform
from comer.training.visualization import labelled_overlay

# A run's architecture eval/predict never repeat: a 4-block ViT-CoMer with 2 interactions.
RUN_OVERRIDES = [*TINY_SYNTHETIC, "backbone.embed_dim=48", "backbone.depth=4", "backbone.num_heads=3",
                 "backbone.deform_num_heads=3", "backbone.mrfp_ratio=1.0", "backbone.conv_inplanes=16", "interactions=n2"]
SCALES = [0.75, 1.0]
# name -> (height, width): three sizes, one upper-case suffix
IMAGES = {"street.jpg": (40, 60), "PARK.JPG": (50, 30), "room.png": (64, 64)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as train() leaves it (config.yaml, checkpoints/last.ckpt), with the network's freshly
    initialised weights: what predict reads of a run, without the minutes of a training."""
    root = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", RUN_OVERRIDES, root)
    check_config(cfg)
    torch.manual_seed(0)
    module = build_module(cfg, build_model(cfg), hydra.utils.instantiate(cfg.data))
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.save({"pytorch-lightning_version": lightning.__version__, "global_step": 0,
                "state_dict": module.state_dict()}, run_dir / "checkpoints" / "last.ckpt")
    return cfg, run_dir


def write_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name, (height, width) in IMAGES.items():
        blocks = rng.integers(0, 256, (height // 10 + 1, width // 10 + 1, 3))
        image = np.kron(blocks, np.ones((10, 10, 1)))[:height, :width].astype(np.uint8)
        Image.fromarray(image).save(folder / name, quality=95)
    (folder / "notes.txt").write_text("not an image")


def reference_module(cfg, run_dir: Path):
    """The run's module with flip and the two scales, its weights loaded from the checkpoint."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.module.flip, cfg.module.scales = True, SCALES
    module = build_module(cfg, build_model(cfg), hydra.utils.instantiate(cfg.data)).eval()
    module.load_state_dict(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    return module


def reference_labels(module, cfg, path: Path) -> np.ndarray:
    """``module.predict_labels`` on views of the image file made here with the run's test transform."""
    rgb = read_image(path)
    views = [torch.from_numpy(build_test_transform(cfg.data.test_scale, cfg.data.size_divisor, ratio)(image=rgb)["image"])
             .permute(2, 0, 1)[None] for ratio in SCALES]
    return module.predict_labels([module.normalize(view) for view in views], rgb.shape[:2])[0].numpy()


def test_predict_writes_an_overlay_and_a_label_map_per_image(run, tmp_path):
    train_cfg, run_dir = run
    folder, output = tmp_path / "photos", tmp_path / "predicted"
    write_images(folder)
    cfg = compose_config("predict", [f"ckpt_path={run_dir}", f"input={folder}", f"output={output}", "module.flip=true",
                                     f"module.scales=[{','.join(map(str, SCALES))}]", "trainer.enable_progress_bar=false"],
                         tmp_path)
    result = predict(cfg)
    assert result["images"] == 3 and result["checkpoint_kind"] == "lightning"
    names = sorted(f"{Path(name).stem}.png" for name in IMAGES)
    assert sorted(p.name for p in (output / LABELS_DIR).iterdir()) == names
    assert sorted(p.name for p in (output / OVERLAYS_DIR).iterdir()) == names

    module = reference_module(train_cfg, run_dir)
    seen = set()
    for name in IMAGES:
        expected = reference_labels(module, train_cfg, folder / name)
        written = np.asarray(Image.open(output / LABELS_DIR / f"{Path(name).stem}.png"))
        assert written.shape == IMAGES[name]
        np.testing.assert_array_equal(written.astype(np.int64) - 1, expected)  # submission format: k + 1
        overlay = np.asarray(Image.open(output / OVERLAYS_DIR / f"{Path(name).stem}.png"))
        np.testing.assert_array_equal(overlay, labelled_overlay(read_image(folder / name), expected, module.class_names,
                                                                module.palette, module.ignore_index))
        seen.update(np.unique(expected).tolist())
    assert len(seen) > 1, "the check means something only if the maps hold more than one class"


def test_the_folder_listing(tmp_path):
    write_images(tmp_path / "photos")
    assert [p.name for p in list_images(tmp_path / "photos")] == ["PARK.JPG", "room.png", "street.jpg"]
    assert list_images(tmp_path / "photos" / "room.png") == [tmp_path / "photos" / "room.png"]
    (tmp_path / "photos" / "room.jpeg").write_bytes((tmp_path / "photos" / "room.png").read_bytes())
    with pytest.raises(ValueError, match="sharing a name.*room"):
        list_images(tmp_path / "photos")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(tmp_path / "missing")
