"""Images/s of one data-loading worker on the ADE20K training and test sample paths, stage by stage.

Writes ADE20K-sized samples (683x512 and 512x683 JPEGs, label PNGs with 150 classes in regions and
unlabelled borders, as in the release) in the release layout into a temporary folder, then runs the
ADE20K datamodule of the official recipe (train: ratio-range resize of (2048, 512), 512 crop with
cat-max-ratio 0.75, flip, photometric distortion, batch 2; test: resize to fit (2048, 512), sides up
to a multiple of 32, batch 1) in this one process with one thread (torch and OpenCV), as one
DataLoader worker does. Prints, per path, the end-to-end images/s through the datamodule's
DataLoader (median of the repeats), the minor page faults per image, and the median time of each
stage called on its own with the same seeds: image decode, label decode, label checks (range check
and zero-label reduction), each transform of the pipeline, the sample's conversion to tensors
(whatever ``SegmentationDataset.__getitem__`` does beyond the stages) and the batch collation. Where
the normalisation runs on the device, its cost on this CPU is printed below the table.

    python benchmarks/data_pipeline.py                   # 100 samples, 5 repeats, Markdown tables
    python benchmarks/data_pipeline.py --num-images 200 --repeats 9
    python benchmarks/data_pipeline.py --smoke           # 4 samples, 1 repeat: checks the script only

Figures depend on the CPU and on what else runs on it; compare runs on the same machine, interleaved.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comer.data import ade20k  # noqa: E402
from comer.data.datamodule import ADE20KDataModule  # noqa: E402
from comer.data.seeding import sample_seed, seed_pipeline  # noqa: E402

NUM_CLASSES = 150
SIZES = ((512, 683), (683, 512))  # (height, width): ADE20K's common landscape and portrait sizes
JPEG_QUALITY = 90
TRAIN_BATCH = 2  # per device: the recipe's global 16 over 8 GPUs
RECIPE = dict(crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
              test_scale=(2048, 512), size_divisor=32)
SMOKE_SIZES = ((96, 128), (128, 96))
SMOKE_RECIPE = dict(crop_size=(64, 64), scale=(256, 64), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                    test_scale=(256, 64), size_divisor=32)


# ----------------------------------------------------------------------------------------- data
def synthetic_sample(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An ADE-like pair: 8-24 irregular regions of classes 1..150 (frequent classes more likely),
    one-pixel unlabelled (0) borders on part of the region boundaries, and an image whose regions
    have their own colour, shading and texture."""
    regions = int(rng.integers(8, 25))
    frequent = np.minimum(rng.zipf(1.3, regions), NUM_CLASSES)
    classes = np.where(rng.random(regions) < 0.5, frequent, rng.integers(1, NUM_CLASSES + 1, regions)).astype(np.uint8)
    coarse_h, coarse_w = max(height // 8, 2), max(width // 8, 2)
    seeds = rng.uniform(0, 1, (regions, 2)) * (coarse_h, coarse_w)
    yy, xx = np.mgrid[0:coarse_h, 0:coarse_w].astype(np.float32)
    distance = (yy[None] - seeds[:, :1, None]) ** 2 + (xx[None] - seeds[:, 1:, None]) ** 2
    distance += rng.normal(0, 0.15 * coarse_h, distance.shape[1:]).astype(np.float32)[None] ** 2
    owner = distance.argmin(0).astype(np.uint8)
    owner = cv2.resize(owner, (width, height), interpolation=cv2.INTER_NEAREST)
    label = classes[owner]
    edges = cv2.morphologyEx(owner, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    label[edges & (rng.random((height, width)) < 0.7)] = 0
    colours = rng.integers(30, 226, (regions, 3)).astype(np.float32)
    shade = cv2.resize(rng.uniform(0.7, 1.2, (max(height // 32, 2), max(width // 32, 2))).astype(np.float32),
                       (width, height), interpolation=cv2.INTER_CUBIC)
    texture = rng.normal(0, 14, (height, width, 3)).astype(np.float32)
    image = colours[owner] * shade[..., None] + cv2.GaussianBlur(texture, (3, 3), 0)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_dataset(root: Path, num_images: int, sizes, seed: int = 0) -> Path:
    """``num_images`` pairs in both splits of ``root/ADEChallengeData2016`` (alternating sizes)."""
    rng = np.random.default_rng(seed)
    for split in (ade20k.TRAIN_SPLIT, ade20k.VAL_SPLIT):
        image_dir = root / ade20k.DATASET_DIR / ade20k.IMAGE_DIR / split
        label_dir = root / ade20k.DATASET_DIR / ade20k.ANNOTATION_DIR / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(num_images):
            image, label = synthetic_sample(rng, *sizes[i % len(sizes)])
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(image_dir / f"{stem}{ade20k.IMAGE_SUFFIX}", quality=JPEG_QUALITY)
            Image.fromarray(label).save(label_dir / f"{stem}{ade20k.ANNOTATION_SUFFIX}")
    return root


# ----------------------------------------------------------------------------------------- timing
def datamodule(root: Path, recipe: dict) -> ADE20KDataModule:
    dm = ADE20KDataModule(root=root, batch_size=TRAIN_BATCH, num_workers=0, pin_memory=False, seed=0, **recipe)
    dm.setup("fit")
    return dm


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def end_to_end(loader_fn, num_batches: int, images_per_batch_fn) -> tuple[float, float]:
    """(seconds per image, minor page faults per image) over ``num_batches`` batches of a fresh loader."""
    iterator = iter(loader_fn())
    images, faults, start = 0, minor_faults(), time.process_time()
    for _ in range(num_batches):
        images += images_per_batch_fn(next(iterator))
    elapsed = time.process_time() - start
    return elapsed / images, (minor_faults() - faults) / images


class Stages:
    """Median seconds per call of each named stage, over all calls of all repeats."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def time(self, name: str, fn, *args, **kwargs):
        start = time.process_time()
        out = fn(*args, **kwargs)
        self.times.setdefault(name, []).append(time.process_time() - start)
        return out

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


def run_stages(dm: ADE20KDataModule, train: bool, stages: Stages, positions: range) -> None:
    """Each stage of ``positions`` samples called on its own, as the dataset calls them."""
    dataset = dm.train_dataset if train else dm.val_dataset
    pipeline = dm.train_transform if train else dm.test_transform
    samples = []
    for position in positions:
        index = position % len(dataset)
        paths = dataset.samples[index]
        image = stages.time("decode image", ade20k.read_image, paths.image)
        label = stages.time("decode label", ade20k.read_annotation, paths.annotation)

        def checks(label=label, path=paths.annotation):
            ade20k.check_label_range(label, dataset.num_classes, dataset.reduce_zero_label, path)
            return ade20k.reduce_zero_label(label)

        label = stages.time("label checks", checks)
        seed_pipeline(pipeline, sample_seed(dataset.seed, position))
        data = {"image": image, "mask": label} if train else {"image": image}
        for transform in pipeline.transforms:
            data = stages.time(f"{type(transform).__name__}", transform, **data)
        key = (index, position) if train else index
        start = time.process_time()
        sample = dataset[key]
        whole = time.process_time() - start
        staged = sum(stages.times[name][-1] for name in stages.times if name not in ("to tensor", "collate"))
        stages.times.setdefault("to tensor", []).append(max(whole - staged, 0.0))
        samples.append(sample)
    batch = TRAIN_BATCH if train else 1
    collate = dm.train_dataloader().collate_fn if train else dm.val_dataloader().collate_fn
    for i in range(0, len(samples) - batch + 1, batch):
        stages.time("collate", collate, samples[i : i + batch])
        stages.times["collate"][-1] /= batch


def device_normalisation_cost(dm: ADE20KDataModule, train: bool) -> float | None:
    """Seconds per image of the on-device normalisation, run here on the CPU (None where the loader
    still normalises)."""
    try:
        from comer.data.transforms import normalize_images
    except ImportError:
        return None
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    batch = next(iter(loader))
    times = []
    for _ in range(5):
        start = time.process_time()
        normalize_images(batch["image"], batch.get("image_sizes"))
        times.append(time.process_time() - start)
    return statistics.median(times) / batch["image"].shape[0]


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, help="reuse (or create) the generated data here")
    parser.add_argument("--smoke", "--cpu-smoke", dest="smoke", action="store_true",
                        help="4 small samples, 1 repeat: checks the script, NOT a benchmark")
    args = parser.parse_args()
    if args.smoke:
        args.num_images, args.repeats = 4, 1
    sizes, recipe = (SMOKE_SIZES, SMOKE_RECIPE) if args.smoke else (SIZES, RECIPE)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory(prefix="ade_bench_") as tmp:
        root = args.data_dir or Path(tmp)
        if not (root / ade20k.DATASET_DIR).is_dir():
            write_dataset(root, args.num_images, sizes)
        dm = datamodule(root, recipe)
        n = len(dm.train_dataset)
        train_batches = n // TRAIN_BATCH
        results = {"train": ([], []), "test": ([], [])}
        stage_times = {"train": Stages(), "test": Stages()}
        for _ in range(args.repeats):  # the two paths interleaved, so that a busy spell hits both
            per_image, faults = end_to_end(dm.train_dataloader, train_batches, lambda b: len(b["path"]))
            results["train"][0].append(per_image)
            results["train"][1].append(faults)
            per_image, faults = end_to_end(dm.val_dataloader, n, lambda b: len(b["path"]))
            results["test"][0].append(per_image)
            results["test"][1].append(faults)
            run_stages(dm, True, stage_times["train"], range(train_batches * TRAIN_BATCH))
            run_stages(dm, False, stage_times["test"], range(n))

        if args.smoke:
            print("SMOKE RUN: tiny images, one repeat -- NOT a benchmark")
        print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
              f"cv2 threads {cv2.getNumThreads()}, torch {torch.__version__}, OpenCV {cv2.__version__}; "
              f"{n} samples x {args.repeats} repeats, medians\n")
        for path in ("train", "test"):
            per_image, faults = (statistics.median(v) for v in results[path])
            stages = stage_times[path]
            print(f"### {path} path: {1 / per_image:.1f} images/s per worker, "
                  f"{faults:.1f} minor page faults per image\n")
            print("| stage | ms per image | share |")
            print("|---|---|---|")
            for name in stages.times:
                ms = stages.median(name) * 1e3
                print(f"| {name} | {ms:.3f} | {ms / (per_image * 1e3):.0%} |")
            print(f"| end to end (DataLoader, one process) | {per_image * 1e3:.3f} | 100% |")
            device = device_normalisation_cost(dm, path == "train")
            if device is not None:
                print(f"\nnormalisation on the device (here: this CPU, one thread): {device * 1e3:.3f} ms per image")
            print()


if __name__ == "__main__":
    main()
