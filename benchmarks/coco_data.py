"""COCO data loading throughput: images/s of one loader worker on the training and test paths.

Generates (once, under --root) a synthetic layout with COCO-like sizes (640x480-ish images, 10-30
instances, polygon masks, crowd RLEs), then times ``CocoDetection.__getitem__`` (JPEG decode, target
decoding, the recipe's augmentation, mask rasterisation) plus ``DetectionCollate`` in this process, i.e.
one DataLoader worker's rate; a loader with N workers delivers at most about N times that, on N free cores.

    python benchmarks/coco_data.py                       # the official recipe's sizes
    python benchmarks/coco_data.py --num-images 64 --root /tmp/coco_bench
    python benchmarks/coco_data.py --smoke               # tiny sizes, seconds: checks the script only
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import torch  # noqa: E402

from comer.data.coco import CocoDetection, DetectionCollate  # noqa: E402
from comer.data.det_transforms import build_det_test_pipeline, build_det_train_pipeline  # noqa: E402
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
        rows = []
        for name, pipeline, train in (
            ("train", build_det_train_pipeline(**sizes["train"]), True),
            ("test", build_det_test_pipeline(**sizes["test"]), False),
        ):
            dataset = CocoDetection(root, "train2017" if train else "val2017", pipeline, train=train, seed=0)
            per_image_s, mean_instances = time_path(dataset, collate, args.batch_size, repeats)
            rows.append((name, len(dataset) * repeats, 1.0 / per_image_s, 1e3 * per_image_s, mean_instances))
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


if __name__ == "__main__":
    main()
