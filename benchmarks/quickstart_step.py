"""The quickstart's training step with the loader's batches as they are now against as they were before the
data-path rework (issue 17), alternated step by step in one process.

Now, the loader hands over uint8 images and uint8 labels, and the step normalises the images (and casts the
labels to int64) on the device before the network; before, the loader handed over float32 normalised images
and int64 labels, and the step began with the network. Everything else in the step is the same network on
the same shapes, so the two are timed on the same batches of the composed config (by default the
quickstart's, `python train.py`), alternately (now, before, before, now, ...), so that the machine's drift
over the run hits both alike: what each step costs end to end (wall clock): normalisation where there is
one, ``model.loss``, the loss sum, backward, the optimizer step (Lightning's logging is left out of both).
The "before" batches are the "now" batches normalised once by the same function, equal to the old CPU
normalisation within float32 rounding (tests/test_transforms.py).

Prints the median s/step of each, the median and the quartiles of the per-pair ratio now / before, and the
cost of the normalisation alone. The batches are read with no worker processes (the data workers of a real
run are not part of the step).

    python benchmarks/quickstart_step.py                       # the quickstart (ViT-CoMer-T, batch 4, 96x96)
    python benchmarks/quickstart_step.py --pairs 60 data.batch_size=8
    python benchmarks/quickstart_step.py --smoke               # 2 pairs of a tiny network: checks the script only
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import comer.app  # noqa: E402,F401  (registers the config resolvers)
from comer.app.builders import build_datamodule, build_model, build_module  # noqa: E402
from comer.training.layer_decay import build_optimizer, decay_depth  # noqa: E402
from comer.training.task_module import LOSS_PREFIX  # noqa: E402

NUM_BATCHES = 4  # distinct batches, cycled
WARMUP_STEPS = 4  # of each kind, untimed
SMOKE_OVERRIDES = ["data.num_train=8", "data.num_val=2", "data.image_size=64", "data.crop_size=[64,64]",
                   "data.scale=[128,64]", "data.test_scale=[128,64]", "data.batch_size=2",
                   "model.decode_head.channels=16", "model.auxiliary_head.channels=8",
                   "module.crop_size=[64,64]", "module.stride=[43,43]",
                   "backbone.embed_dim=48", "backbone.depth=4", "backbone.num_heads=3", "backbone.deform_num_heads=3",
                   "backbone.mrfp_ratio=1.0", "backbone.conv_inplanes=16"]


def compose(overrides: list[str], root: Path):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"paths.root_dir={root}", "data.num_workers=0", *overrides],
                            return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="timed steps of each kind")
    parser.add_argument("--root", type=Path, default=REPO, help="paths.root_dir (the synthetic data lives under it)")
    parser.add_argument("--smoke", action="store_true", help="2 pairs of a tiny config: checks the script, NOT a benchmark")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    overrides = [*SMOKE_OVERRIDES, *args.overrides] if args.smoke else args.overrides
    pairs, warmup = (2, 1) if args.smoke else (args.pairs, WARMUP_STEPS)

    cfg = compose(overrides, args.root)
    datamodule = build_datamodule(cfg, "fit")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    module = build_module(cfg, model, datamodule)
    model.train()
    optimizer = build_optimizer(model, module.optimizer_factory, module.layer_decay,
                                decay_depth(model, module.layer_decay, module.num_layers), module.no_weight_decay_names)
    loader = iter(datamodule.train_dataloader())
    now_batches = [next(loader) for _ in range(NUM_BATCHES)]
    before_batches = [{"image": module.normalize(b["image"], b.get("image_sizes")).contiguous(),
                       "label": b["label"].long()} for b in now_batches]

    def network_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        losses = model.loss(images, labels)
        loss = torch.stack([v for k, v in losses.items() if k.startswith(LOSS_PREFIX)]).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_now(batch: dict) -> None:
        network_step(module.normalize(batch["image"], batch.get("image_sizes")), batch["label"].long())

    def step_before(batch: dict) -> None:
        network_step(batch["image"], batch["label"])

    for i in range(warmup):
        step_now(now_batches[i % NUM_BATCHES])
        step_before(before_batches[i % NUM_BATCHES])
    now_times, before_times = [], []
    for i in range(pairs):
        j = i % NUM_BATCHES
        if i % 2 == 0:  # alternate which kind goes first, so neither always follows the other
            now_times.append(timed(lambda: step_now(now_batches[j])))
            before_times.append(timed(lambda: step_before(before_batches[j])))
        else:
            before_times.append(timed(lambda: step_before(before_batches[j])))
            now_times.append(timed(lambda: step_now(now_batches[j])))
    normalise_times = [timed(lambda: module.normalize(b["image"], b.get("image_sizes"))) for b in now_batches * 5]

    ratios = sorted(n / b for n, b in zip(now_times, before_times))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    image = now_batches[0]["image"]
    if args.smoke:
        print("SMOKE RUN: tiny network, two pairs -- NOT a benchmark")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{cfg.run_name}, batch {tuple(image.shape)} {image.dtype}; {pairs} pairs after {warmup} warm-up steps of each\n")
    print("| step | median s/step |")
    print("|---|---:|")
    print(f"| now: uint8 batch, normalised in the step | {statistics.median(now_times):.4f} |")
    print(f"| before: float32 batch from the loader | {statistics.median(before_times):.4f} |")
    print(f"\nper-pair ratio now / before: median {quartiles[1]:.4f}, quartiles {quartiles[0]:.4f}-{quartiles[2]:.4f}")
    print(f"the normalisation alone: {statistics.median(normalise_times) * 1e3:.3f} ms per batch")


if __name__ == "__main__":
    main()
