"""Datasets, transforms and Lightning datamodules for semantic segmentation and COCO instance segmentation."""

from comer.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, SegmentationDataset, discover_pairs
from comer.data.coco import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    CocoAnnotationError,
    CocoDataModule,
    CocoDetection,
    CocoLayoutError,
    DetectionCollate,
)
from comer.data.datamodule import ADE20KDataModule, SegmentationDataModule
from comer.data.sampler import InfiniteShuffleSampler
from comer.data.synthetic import SyntheticSegDataModule, generate_synthetic_ade20k
from comer.data.synthetic_coco import SyntheticCocoDataModule, generate_synthetic_coco
from comer.data.transforms import build_test_transform, build_train_transform, normalize_images

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "ADE20KDataModule",
    "COCO_CATEGORY_IDS",
    "COCO_CLASSES",
    "CocoAnnotationError",
    "CocoDataModule",
    "CocoDetection",
    "CocoLayoutError",
    "DetectionCollate",
    "InfiniteShuffleSampler",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SyntheticCocoDataModule",
    "SyntheticSegDataModule",
    "build_test_transform",
    "build_train_transform",
    "discover_pairs",
    "generate_synthetic_ade20k",
    "generate_synthetic_coco",
    "normalize_images",
]
