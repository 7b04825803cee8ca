"""The ADE20K data path gives the network the same inputs as before it was made faster (uint8 through
the loader, OpenCV decoding, table-driven photometric distortion, histogram crop checks, padding in the
collate, normalisation on the device).

The golden hashes were computed with the pipeline of commit 0a99658 (Pillow decoding, np.unique checks,
float32 photometric steps, albumentations Normalize + PadIfNeeded in the loader; float32 images and int64
labels in the batch) on the files in tests/data/seg_golden (ADE-like 150-class samples written by
benchmarks/data_pipeline.py's generator; training image 3 is mostly one class, so cat_max_ratio redraws
crops). Training: the first 12 batches of 2 (seed 0: every photometric branch, crop redraws, padded
crops); test: both validation images (one 40x220, elongated). Each entry: file, sha256 of the float32
normalised image (padding 0) and of the int64 label, and the unpadded size (train) or the test size.
"""
import hashlib
from pathlib import Path

import torch

from comer.data.datamodule import ADE20KDataModule
from comer.data.transforms import normalize_images

ROOT = Path(__file__).parent / "data" / "seg_golden"
RECIPE = dict(crop_size=(64, 64), scale=(256, 64), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, test_scale=(256, 64),
              size_divisor=32, batch_size=2, num_workers=0, pin_memory=False, seed=0)

GOLDEN_TRAIN = [
    ("ADE_train_00000000.jpg", "0fd5605ab98f6f79", "ccf884ca3836f97f", 64, 64),
    ("ADE_train_00000001.jpg", "298cbfcbbdf93c62", "2030b98a9e64e73e", 64, 64),
    ("ADE_train_00000003.jpg", "81e1843b7e22cff8", "d95948c2f2839594", 64, 64),
    ("ADE_train_00000002.jpg", "d682f284d69f5315", "5b74955b29e7c312", 64, 64),
    ("ADE_train_00000001.jpg", "f593b1caadd20c14", "7debeea67d805a21", 64, 64),
    ("ADE_train_00000003.jpg", "edfe274253033094", "dbf1ea2ca424294b", 64, 64),
    ("ADE_train_00000002.jpg", "64d3dc10b24e1fde", "21741ac7370fa381", 64, 64),
    ("ADE_train_00000000.jpg", "6df7c0e6fedab3e4", "23e5979d11069414", 58, 64),
    ("ADE_train_00000000.jpg", "60a8387ad91a4f26", "77bd0191f6df0323", 41, 55),
    ("ADE_train_00000001.jpg", "0f128175f3e67049", "e9b1640a2142a8f6", 64, 64),
    ("ADE_train_00000003.jpg", "c952b0dd80ec64e9", "f4e1f12bba1a960a", 64, 64),
    ("ADE_train_00000002.jpg", "9b7ffe7d3209a48e", "eeb85aefea8f1f8e", 64, 64),
    ("ADE_train_00000002.jpg", "ab174a7b5fd87126", "3049d71177f1e4ac", 64, 64),
    ("ADE_train_00000003.jpg", "2d7979690ef7d368", "813b63ff64166f7e", 44, 44),
    ("ADE_train_00000001.jpg", "03da508ec5f40697", "a571dcc378337eca", 64, 64),
    ("ADE_train_00000000.jpg", "875f4607cf5bf460", "49801e01d21b23d0", 64, 64),
    ("ADE_train_00000002.jpg", "a48618be6874e799", "fa6ad9ac34d5ec54", 57, 64),
    ("ADE_train_00000001.jpg", "660e16c445d89a3c", "32efae11d83f3a25", 64, 64),
    ("ADE_train_00000003.jpg", "f3283a75a439eb20", "d25bd7b6239fe900", 64, 64),
    ("ADE_train_00000000.jpg", "5d0a580da20f2e38", "822ff2c8cd55b4ae", 64, 64),
    ("ADE_train_00000003.jpg", "2d68741475c4e45f", "28f773a55bebf438", 64, 64),
    ("ADE_train_00000001.jpg", "a850c8116245aed9", "a6f339e9bfacf4c5", 64, 64),
    ("ADE_train_00000000.jpg", "cf65ec98164fd079", "6eef22133d7b7700", 64, 64),
    ("ADE_train_00000002.jpg", "f3b222b1a9b973ed", "594bbaf12f4b5759", 36, 64),
]
GOLDEN_TEST = [
    ("ADE_valid_00000000.jpg", (64, 96), "774bbd1b1d2e0273", "402fd2d95382a417"),
    ("ADE_valid_00000001.jpg", (64, 256), "991282ed6ecd59da", "4a588267d8766e8a"),
]


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def golden_datamodule() -> ADE20KDataModule:
    dm = ADE20KDataModule(root=ROOT, **RECIPE)
    dm.setup("fit")
    return dm


def test_training_samples_are_unchanged():
    batches = iter(golden_datamodule().train_dataloader())
    seen = []
    for _ in range(len(GOLDEN_TRAIN) // 2):
        batch = next(batches)
        assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.uint8
        images = normalize_images(batch["image"], batch["image_sizes"])  # what the LightningModule does
        for i in range(2):
            seen.append((Path(batch["path"][i]).name, digest(images[i]), digest(batch["label"][i].long()),
                         *batch["image_sizes"][i]))
    assert seen == GOLDEN_TRAIN


def test_test_samples_are_unchanged():
    seen = []
    for batch in golden_datamodule().val_dataloader():
        image = normalize_images(batch["image"])
        seen.append((Path(batch["path"][0]).name, tuple(image.shape[-2:]), digest(image[0]), digest(batch["label"][0].long())))
    assert seen == GOLDEN_TEST
