"""The schema of the keys users set (comer/app/config_schema.py): a wrong value is refused by check_config,
with its key, the value and what is expected, before anything is generated, read or built; the options the
constructors take are keys of the configs (no `+` needed)."""
from __future__ import annotations

import copy
import inspect
import typing
from pathlib import Path

import hydra
import pytest
from hydra.utils import get_object
from lightning.fabric.connector import _PRECISION_INPUT
from omegaconf import DictConfig, OmegaConf

from app_utils import TINY_SYNTHETIC, compose_config
from comer.app import train
from comer.app.builders import ConfigError, check_config
from comer.app.config_schema import PRECISIONS, schema_problems

TASKS = ("synthetic_seg", "ade20k", "coco", "synthetic_det")


@pytest.mark.parametrize("value", ["abc", "2.5"])
def test_max_steps_that_is_not_a_positive_int_is_refused_before_anything_is_built(value, tmp_path):
    cfg = compose_config("train", [*TINY_SYNTHETIC, f"trainer.max_steps={value}"], tmp_path)
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=.*expected an int >= 1"):
        train(cfg)
    assert not (Path(cfg.paths.data_dir) / "synthetic_seg").exists(), "no data generated"
    assert not Path(cfg.paths.output_dir).exists(), "no run directory written"


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> DictConfig:
    return compose_config("train", TINY_SYNTHETIC, tmp_path_factory.mktemp("schema"))


def _with(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of ``cfg`` with its dotted keys set to ``values`` (what Hydra parses from the command line)."""
    changed = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(changed, key, value)
    return changed


WRONG_VALUES = [
    ("trainer.max_steps", True, r"trainer\.max_steps=True \(bool\): expected an int >= 1"),
    ("trainer.max_steps", 0, r"trainer\.max_steps=0 \(int\): expected an int >= 1"),
    ("trainer.max_steps", 1e5, r"max_steps=100000\.0 \(float\): expected an int >= 1 \(write trainer\.max_steps=100000"),
    ("trainer.val_check_interval", 0.5, r"trainer\.val_check_interval=0\.5 \(float\): expected an int >= 1"),
    ("trainer.precision", 17, r"trainer\.precision=17 \(int\): expected one of .*'bf16-mixed'"),
    ("trainer.devices", 0, r"trainer\.devices=0 \(int\): expected an int >= 1 or one of -1, 'auto'"),
    ("global_batch_size", 0, r"global_batch_size=0 \(int\): expected an int >= 1, or null"),
    ("data.batch_size", 2.0, r"data\.batch_size=2\.0 \(float\): expected an int >= 1"),
    ("data.num_workers", -1, r"data\.num_workers=-1 \(int\): expected an int >= 0"),
    ("data.val_num_workers", "x", r"data\.val_num_workers='x' \(str\): expected an int >= 0, or null"),
    ("data.crop_size", [64, 0], r"data\.crop_size=\[64, 0\] \(list\): expected an int >= 1 or a list of 2 values"),
    ("data.flip_prob", 1.5, r"data\.flip_prob=1\.5 \(float\): expected a number >= 0 and <= 1"),
    ("module.optimizer.lr", 0, r"module\.optimizer\.lr=0 \(int\): expected a number > 0"),
    ("module.layer_decay", 1.2, r"module\.layer_decay=1\.2 \(float\): expected a number > 0 and <= 1"),
    ("module.crop_size", [64, 64, 64], r"module\.crop_size=\[64, 64, 64\] \(list\)"),
    ("module.stride", -8, r"module\.stride=-8 \(int\)"),
    ("module.inference_mode", "tiles", r"module\.inference_mode='tiles' \(str\): expected one of 'slide', 'whole'"),
    ("seed", 1.5, r"seed=1\.5 \(float\): expected an int"),
    ("checkpoint_every_n_steps", 0, r"checkpoint_every_n_steps=0 \(int\): expected an int >= 1"),
    ("tags", ["ok", ""], r"tags=\['ok', ''\] \(list\): expected a list of values, each a string of 1 to 64"),
    ("extras.print_config", "maybe", r"extras\.print_config='maybe' \(str\): expected true or false"),
]


def test_a_wrong_value_names_its_key_the_value_and_what_is_expected(tiny_cfg):
    for key, value, message in WRONG_VALUES:
        with pytest.raises(ConfigError, match=message):
            check_config(_with(tiny_cfg, {key: value}))


def test_every_problem_is_reported_at_once(tiny_cfg):
    with pytest.raises(ConfigError) as error:
        check_config(_with(tiny_cfg, {"trainer.max_steps": "abc", "data.batch_size": 0}))
    assert "trainer.max_steps='abc'" in str(error.value) and "data.batch_size=0" in str(error.value)


ACCEPTED_VALUES = [("trainer.devices", "auto"), ("trainer.devices", -1), ("trainer.devices", [0, 1]),
                   ("trainer.devices", "0,1"), ("trainer.precision", 16), ("trainer.precision", "bf16-mixed"),
                   ("global_batch_size", 8), ("global_batch_size", None), ("data.val_num_workers", 0),
                   ("data.crop_size", 64), ("module.layer_decay", 1), ("tags", ["baseline", "lr-sweep"]),
                   ("trainer.gradient_clip_val", 1.0)]


def test_values_lightning_and_the_constructors_accept_pass(tiny_cfg):
    for key, value in ACCEPTED_VALUES:
        assert schema_problems(_resolved(_with(tiny_cfg, {key: value}))) == [], (key, value)


def test_detection_rules_apply_to_detection(tmp_path):
    cfg = compose_config("train", ["task=synthetic_det"], tmp_path)
    assert schema_problems(_resolved(_with(cfg, {"data.crop_size": None}))) == []
    with pytest.raises(ConfigError, match=r"module\.iou_types=\['bbox', 'keypoints'\]"):
        check_config(_with(cfg, {"module.iou_types": ["bbox", "keypoints"]}))


def _resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def test_the_precisions_are_lightnings():
    accepted = {value for literal in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(literal)}
    assert set(PRECISIONS) == accepted


# Constructor options that are deliberately not config keys: handed over by the code (the module's class names
# and palette come from the data), not plain values (norm/activation factories), or AdamW's implementation
# switches; and the split folders of the generated datasets, which their generators name.
NOT_CONFIG_KEYS = {"class_names", "palette", "norm", "act", "amsgrad", "maximize", "foreach", "capturable",
                   "differentiable", "fused", "decoupled_weight_decay"}
NOT_CONFIG_KEYS_OF = {"comer.data.SyntheticSegDataModule": {"train_split", "val_split"},
                      "comer.data.SyntheticCocoDataModule": {"train_split", "val_split"}}
# Constructors that hand **kwargs on: where the keyword arguments go.
KWARGS_GO_TO = {"comer.models.build_segmentor": "comer.models.EncoderDecoder",
                "comer.models.build_mask_rcnn": "comer.models.MaskRCNN"}


def _options(target: str) -> dict[str, object]:
    """Keyword options with a default of the constructor of ``target`` and of whatever its **kwargs reach."""
    options, obj = {}, get_object(target)
    functions = [obj] if not inspect.isclass(obj) else [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)]
    if target in KWARGS_GO_TO:
        functions.append(get_object(KWARGS_GO_TO[target]).__init__)
    for function in functions:
        parameters = inspect.signature(function).parameters.values()
        for parameter in parameters:
            if parameter.default is not inspect.Parameter.empty:
                options.setdefault(parameter.name, parameter.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return options


def _hidden_options(node: DictConfig, path: str) -> list[str]:
    hidden = []
    if "_target_" in node and not str(node._target_).startswith("lightning."):
        not_keys = NOT_CONFIG_KEYS | NOT_CONFIG_KEYS_OF.get(node._target_, set())
        hidden += [f"{path}.{name}" for name in _options(node._target_) if name not in node and name not in not_keys]
    for key, child in node.items():
        if isinstance(child, DictConfig):
            hidden += _hidden_options(child, f"{path}.{key}")
    return hidden


@pytest.mark.parametrize("task", TASKS)
def test_constructor_options_are_config_keys(task, tmp_path):
    """Every option of the data, model and module constructors (flip_prob, photometric, val_num_workers,
    align_corners, ...) is written in the configs with its default, so `key=value` sets it without `+`."""
    cfg = compose_config("train", [f"task={task}"], tmp_path)
    assert [h for group in ("data", "model", "module") for h in _hidden_options(cfg[group], group)] == []


def test_documented_options_reach_the_constructors(tmp_path):
    cfg = compose_config("train", [*TINY_SYNTHETIC, "data.flip_prob=0.0", "data.photometric=false",
                                   "data.val_num_workers=1"], tmp_path)
    assert schema_problems(_resolved(cfg)) == []
    datamodule = hydra.utils.instantiate(cfg.data)
    steps = [type(step).__name__ for step in datamodule.train_transform.transforms]
    flip = next(step for step in datamodule.train_transform.transforms if type(step).__name__ == "HorizontalFlip")
    assert flip.p == 0.0 and "PhotoMetricDistortion" not in steps
    assert (datamodule.num_workers, datamodule.val_num_workers) == (0, 1)
