"""Images/s of one data-loading worker on mmsegmentation 1.2.2's ADE20K pipelines: the baseline of
``benchmarks/data_pipeline.py``.

Runs the official ViT-CoMer ADE20K pipelines in mmseg 1.2.2's transforms: the training pipeline of mmseg's
``configs/_base_/datasets/ade20k.py`` (which the official configs inherit) and the test pipeline of the official
``segmentation/configs/ade20k/upernet_vit_comer_*_512_160k_ade20k.py`` (resize to fit (2048, 512), then
``ResizeToMultiple(size_divisor=32)``, as our recipe does; mmseg's own base test pipeline has no
``ResizeToMultiple``: ``--mmseg-base-test`` runs that one). The values are written out below. Both go through
mmseg's ``ADE20KDataset`` and mmengine's default collate (``pseudo_collate``), in this one process with one thread
(torch and OpenCV), over the files that ``benchmarks/data_pipeline.py --data-dir DIR`` writes. The figure is the same as there: CPU seconds of
the process per image, end to end over all batches, median of the repeats. As in mmseg 1.x, the
normalisation is not part of the data path (its ``SegDataPreProcessor`` runs it on the device), as it is
not part of ours.

It needs its own environment, as mmseg 1.2.2 pins mmcv below 2.2; ``mmcv-lite`` is mmcv without its
compiled ops, which the data transforms do not use (``mmcv.ops`` is replaced by an empty module so that
``mmseg.utils`` imports)::

    python3 -m venv /tmp/mmseg && /tmp/mmseg/bin/pip install torch==2.13.0 mmcv-lite==2.1.0 \\
        mmengine==0.10.7 mmsegmentation==1.2.2 ftfy regex
    python benchmarks/data_pipeline.py --data-dir /tmp/ade_bench          # ours; writes the files once
    /tmp/mmseg/bin/python benchmarks/data_pipeline_mmseg.py --data-dir /tmp/ade_bench

Interleave the two (ours, mmseg, ours, mmseg, ...) and compare the pairs.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

TRAIN_BATCH = 2  # per device: the recipe's global 16 over 8 GPUs (as in data_pipeline.py)
CROP_SIZE = (512, 512)
SCALE = (2048, 512)
RATIO_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75
SIZE_DIVISOR = 32
DATASET_DIR = "ADEChallengeData2016"


def import_mmseg_without_ops():
    """mmseg's datasets, with ``mmcv.ops`` (compiled, absent from mmcv-lite, unused by the data
    transforms) standing in as an empty module."""
    stub = types.ModuleType("mmcv.ops")
    stub.point_sample = None  # mmseg.utils.mask_classification imports it; the data path never calls it
    sys.modules.setdefault("mmcv.ops", stub)
    # the official config sets reduce_zero_label in LoadAnnotations, which mmseg 1.x warns about on every sample
    warnings.filterwarnings("ignore", message="`reduce_zero_label` will be deprecated")
    import mmseg
    from mmengine.registry import DefaultScope
    from mmseg.datasets import ADE20KDataset  # registers mmseg's datasets and transforms (not its models)
    DefaultScope.get_instance("data_pipeline_mmseg", scope_name="mmseg")  # mmseg's Resize/RandomFlip over mmcv's
    return mmseg, ADE20KDataset


def official_pipelines(resize_to_multiple: bool = True) -> tuple[list[dict], list[dict]]:
    """The train and test pipelines of the official ViT-CoMer ADE20K configs in mmseg 1.2.2's transforms (the
    normalisation is the data preprocessor's, on the device); without ``resize_to_multiple``, the test pipeline
    of mmseg's own ``configs/_base_/datasets/ade20k.py``."""
    train = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomResize", scale=SCALE, ratio_range=RATIO_RANGE, keep_ratio=True),
        dict(type="RandomCrop", crop_size=CROP_SIZE, cat_max_ratio=CAT_MAX_RATIO),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        dict(type="PackSegInputs"),
    ]
    test = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=SCALE, keep_ratio=True),
        *([dict(type="ResizeToMultiple", size_divisor=SIZE_DIVISOR)] if resize_to_multiple else []),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="PackSegInputs"),
    ]
    return train, test


def seconds_per_image(dataset, batch_size: int, collate) -> float:
    """CPU seconds of this process per image: every sample through the pipeline, collated in batches."""
    count = len(dataset) // batch_size * batch_size
    start = time.process_time()
    for first in range(0, count, batch_size):
        collate([dataset[i] for i in range(first, first + batch_size)])
    return (time.process_time() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="the folder data_pipeline.py --data-dir wrote (holds ADEChallengeData2016/)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mmseg-base-test", action="store_true",
                        help="the test pipeline of mmseg's base ADE20K config (no ResizeToMultiple)")
    args = parser.parse_args()
    root = args.data_dir / DATASET_DIR
    if not root.is_dir():
        sys.exit(f"{root} does not exist: write the files first with "
                 f"`python benchmarks/data_pipeline.py --data-dir {args.data_dir}`")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    np.random.seed(0)
    mmseg, ADE20KDataset = import_mmseg_without_ops()
    from mmengine.dataset import pseudo_collate

    train_pipeline, test_pipeline = official_pipelines(resize_to_multiple=not args.mmseg_base_test)
    train = ADE20KDataset(data_root=str(root), pipeline=train_pipeline,
                          data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"))
    test = ADE20KDataset(data_root=str(root), pipeline=test_pipeline,
                         data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"))
    results = {"train": [], "test": []}
    for _ in range(args.repeats):  # the two paths interleaved, so that a busy spell hits both
        results["train"].append(seconds_per_image(train, TRAIN_BATCH, pseudo_collate))
        results["test"].append(seconds_per_image(test, 1, pseudo_collate))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, cv2 threads "
          f"{cv2.getNumThreads()}, torch {torch.__version__}, OpenCV {cv2.__version__}, mmseg {mmseg.__version__}; "
          f"{len(train)} samples x {args.repeats} repeats, medians\n")
    test_kind = "mmseg's base config, no ResizeToMultiple" if args.mmseg_base_test else "the official ViT-CoMer config"
    for path, values in results.items():
        kind = f" ({test_kind})" if path == "test" else ""
        print(f"mmseg {path} path{kind}: {1 / statistics.median(values):.1f} images/s per worker")


if __name__ == "__main__":
    main()
