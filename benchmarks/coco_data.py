"""COCO data loading throughput: images/s of one loader worker on the training and test paths.

Generates (once, under --root) a synthetic layout with COCO-like sizes (640x480-ish images, 10-30
instances, polygon masks, crowd RLEs), then times ``CocoDetection.__getitem__`` (JPEG decode, target
decoding, the recipe's augmentation, mask rasterisation) plus ``DetectionCollate`` in this process, i.e.
one DataLoader worker's rate; a loader with N workers delivers at most about N times that, on N free cores.
Then, per path, the median time of each stage called on its own on the same samples and seeds: image
decode, target decoding (polygons kept compact, crowd RLEs decoded), each step of the recipe's pipeline,
``finalize`` (masks rasterised at the final size, boxes from them), the conversion to tensors (whatever
``CocoDetection.__getitem__`` does beyond the stages) and the collation, per image.

    python benchmarks/coco_data.py                       # the official recipe's sizes
    python benchmarks/coco_data.py --num-images 64 --root /tmp/coco_bench
    python benchmarks/coco_data.py --smoke               # tiny sizes, seconds: checks the script only
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from comer.data.coco import CocoDetection, DetectionCollate  # noqa: E402
from comer.data.det_transforms import DetSample, build_det_test_pipeline, build_det_train_pipeline, finalize  # noqa: E402
from comer.data.seeding import sample_seed  # noqa: E402
from comer.data.synthetic_coco import generate_synthetic_coco  # noqa: E402

RECIPE = dict(train=dict(), test=dict(scale=(1333, 800)))
SMOKE = dict(
    train=dict(short_sides=[48, 64], max_size=120, crop_policy_short_sides=[40, 50],
               crop_policy_crop_size=[32, 48], crop_size=[96, 96]),
    test=dict(scale=(120, 64)),
)


def time_path(dataset: CocoDetection, collate: DetectionCollate, batch_size: int, repeats: int) -> tuple[float, float]:
    """Seconds per image and mean instances per image over ``repeats`` passes (stream positions advance)."""
    dataset[(0, 0)]  # warm-up (imports, first decode)
    position, instances, images = 1, 0, 0
    start = time.perf_counter()
    for _ in range(repeats):
        for first in range(0, len(dataset), batch_size):
            samples = [dataset[(i, position + i)] for i in range(first, min(first + batch_size, len(dataset)))]
            batch = collate(samples)
            images += len(samples)
            instances += sum(len(b) for b in batch.get("gt_boxes", []))
        position += len(dataset)
    elapsed = time.perf_counter() - start
    return elapsed / images, instances / images


class Stages:
    """Seconds per call of each named stage, in the order first met."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def time(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def last_sum(self, exclude: tuple[str, ...]) -> float:
        return sum(times[-1] for name, times in self.times.items() if name not in exclude)


def time_stages(dataset: CocoDetection, collate: DetectionCollate, batch_size: int) -> Stages:
    """Each stage of every sample of ``dataset`` called on its own, as ``__getitem__`` calls them (stream
    positions 1.., the seeds ``time_path`` used first)."""
    stages = Stages()
    samples = []
    for index in range(len(dataset)):
        position = 1 + index
        record, image = stages.time("decode image", dataset.load, index)
        if dataset.train:
            masks, boxes, labels = stages.time("targets", dataset.instances, record)
        else:
            masks, boxes, labels = [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        rng = np.random.default_rng(sample_seed(dataset.seed, position))
        sample = DetSample(image, boxes.copy(), labels.copy(), masks)
        for step in dataset.pipeline.steps:
            sample = stages.time(type(step).__name__, step, sample, rng)
        stages.time("finalize (masks rasterised)", finalize, sample)
        start = time.perf_counter()
        samples.append(dataset[(index, position)])
        whole = time.perf_counter() - start
        stages.times.setdefault("to tensor", []).append(max(whole - stages.last_sum(("to tensor", "collate")), 0.0))
    for first in range(0, len(samples) - batch_size + 1, batch_size):
        stages.time("collate", collate, samples[first:first + batch_size])
        stages.times["collate"][-1] /= batch_size
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny images and sizes; NOT a benchmark")
    parser.add_argument("--root", type=Path, default=None, help="where the synthetic layout lives (kept)")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # as inside a DataLoader worker
    if args.smoke:
        sizes, num_images, image_size, instances, repeats = SMOKE, 4, (96, 128), (3, 6), 1
    else:
        sizes, num_images, image_size, instances, repeats = RECIPE, args.num_images, (480, 640), (10, 30), args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "coco_bench"
        start = time.perf_counter()
        generate_synthetic_coco(root, num_images, num_images, image_size, instances, crowd_prob=0.2, seed=0)
        generation_s = time.perf_counter() - start
        collate = DetectionCollate(32)
        rows, stage_tables = [], {}
        for name, pipeline, train in (
            ("train", build_det_train_pipeline(**sizes["train"]), True),
            ("test", build_det_test_pipeline(**sizes["test"]), False),
        ):
            dataset = CocoDetection(root, "train2017" if train else "val2017", pipeline, train=train, seed=0)
            per_image_s, mean_instances = time_path(dataset, collate, args.batch_size, repeats)
            rows.append((name, len(dataset) * repeats, 1.0 / per_image_s, 1e3 * per_image_s, mean_instances))
            stage_tables[name] = (time_stages(dataset, collate, args.batch_size), per_image_s)
    print(f"# COCO data loading, one worker ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"visible, torch {torch.__version__}, OpenCV {cv2.__version__})")
    if args.smoke:
        print("# --smoke: tiny images and sizes, NOT a benchmark")
    print(f"# layout: {num_images} images per split, sides {image_size[0]}-{image_size[1]}, {instances[0]}-{instances[1]} "
          f"objects drawn per image; generated in {generation_s:.1f} s")
    print("| path | images | images/s per worker | ms/image | instances/image |")
    print("|---|---|---|---|---|")
    for name, count, rate, ms, mean_instances in rows:
        print(f"| {name} | {count} | {rate:.1f} | {ms:.1f} | {mean_instances:.1f} |")
    for name, (stages, per_image_s) in stage_tables.items():
        print(f"\n### {name} path, by stage (median per image)\n")
        print("| stage | ms per image | share |")
        print("|---|---|---|")
        for stage, times in stages.times.items():
            ms = statistics.median(times) * 1e3
            print(f"| {stage} | {ms:.3f} | {ms / (per_image_s * 1e3):.0%} |")
        print(f"| end to end (dataset + collate) | {per_image_s * 1e3:.3f} | 100% |")


if __name__ == "__main__":
    main()
