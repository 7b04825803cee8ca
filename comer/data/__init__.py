"""Datasets, transforms and Lightning datamodules for semantic segmentation."""

from comer.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, SegmentationDataset, discover_pairs
from comer.data.datamodule import ADE20KDataModule, SegmentationDataModule
from comer.data.sampler import InfiniteShuffleSampler
from comer.data.synthetic import SyntheticSegDataModule, generate_synthetic_ade20k
from comer.data.transforms import build_test_transform, build_train_transform

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "ADE20KDataModule",
    "InfiniteShuffleSampler",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SyntheticSegDataModule",
    "build_test_transform",
    "build_train_transform",
    "discover_pairs",
    "generate_synthetic_ade20k",
]
