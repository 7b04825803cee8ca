"""Validate one saved model on the synthetic data with Lightning, on `devices` CPU processes, and write the
validation metrics (rank zero) as JSON. tests/test_distributed_eval.py runs it in-process for one device and
under `torchrun --nproc_per_node=2` (gloo) for two.

    python tests/distributed_eval_worker.py {seg|det} ROOT STATE_FILE OUT_JSON DEVICES
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_utils import TINY_DETECTION, TINY_SYNTHETIC, compose_config  # noqa: E402

from comer.app.builders import build_datamodule, build_model, build_module  # noqa: E402

# Validation sets whose size two processes do not divide: one process evaluates one image more.
NUM_VAL = 5
OVERRIDES = {
    "seg": ["task=synthetic_seg", *TINY_SYNTHETIC, f"data.num_val={NUM_VAL}"],
    "det": [*TINY_DETECTION, f"data.num_val={NUM_VAL}", "data.val_batch_size=2"],
}


def composed(task: str, root: Path):
    return compose_config("train", [*OVERRIDES[task], f"data.root={root / 'data'}"], root)


def output_dir(root: Path, devices: int) -> Path:
    return root / "outputs" / f"devices{devices}"


def validate(task: str, root: Path, state_file: Path | None, devices: int) -> dict[str, float]:
    """The validation metrics of the model in `state_file` (a fresh seeded model when None)."""
    cfg = composed(task, root)
    datamodule = build_datamodule(cfg, "validate")
    torch.manual_seed(0)
    model = build_model(cfg)
    if state_file is not None:
        model.load_state_dict(torch.load(state_file, weights_only=True))
    module = build_module(cfg, model, datamodule)
    if task == "det":
        module.save_predictions = True  # the COCO results json: every detection of every image, on rank zero
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=str(output_dir(root, devices)))
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {key: float(value) for key, value in metrics.items()}


def main(task: str, root: str, state_file: str, out_json: str, devices: str) -> None:
    metrics = validate(task, Path(root), Path(state_file), int(devices))
    if pl.utilities.rank_zero_only.rank == 0:
        Path(out_json).write_text(json.dumps(metrics, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
