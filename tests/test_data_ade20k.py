import numpy as np
import pytest
import torch
from PIL import Image

from comer.data.ade20k import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    DatasetLayoutError,
    LabelRangeError,
    SegmentationDataset,
    UnreadableSampleError,
    discover_pairs,
    reduce_zero_label,
)
from comer.data.datamodule import SegmentationDataModule
from comer.data.sampler import InfiniteShuffleSampler

ADE = "ADEChallengeData2016"


def write_sample(root, split, stem, label, image=None):
    h, w = label.shape
    img_dir, ann_dir = root / ADE / "images" / split, root / ADE / "annotations" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(img_dir / f"{stem}.jpg")
    Image.fromarray(label.astype(np.uint8)).save(ann_dir / f"{stem}.png")


@pytest.fixture
def tiny_ade(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            h, w = 40 + 4 * i, 60 - 4 * i
            write_sample(tmp_path, split, f"ADE_{split[:5]}_{i:04d}", rng.integers(0, 151, (h, w)))
    return tmp_path


def dm_kwargs(root, **over):
    kw = dict(
        root=root, num_classes=150, class_names=list(ADE20K_CLASSES), crop_size=32, scale=(128, 32),
        ratio_range=(0.5, 2.0), cat_max_ratio=0.75, test_scale=(128, 32), size_divisor=32, batch_size=2,
        num_workers=0, pin_memory=False, seed=0, reduce_zero_label=True,
    )
    kw.update(over)
    return kw


# -- constants ---------------------------------------------------------------------------------
def test_ade20k_class_names_and_palette():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K_CLASSES[-1] == "flag" and ADE20K_CLASSES[12] == "person"
    assert len(ADE20K_PALETTE) == 150 and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_PALETTE)
    assert ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[-1] == (92, 0, 255)


# -- discovery and pairing ---------------------------------------------------------------------
def test_discovery_from_parent_or_dataset_dir(tiny_ade):
    for root in (tiny_ade, tiny_ade / ADE):
        pairs = discover_pairs(root, "training")
        assert [p.image.stem for p in pairs] == ["ADE_train_0000", "ADE_train_0001", "ADE_train_0002"]
        assert all(p.annotation.stem == p.image.stem and p.annotation.suffix == ".png" for p in pairs)
    assert len(discover_pairs(tiny_ade, "validation")) == 2


def test_label_reduction_numbers():
    raw = np.array([[0, 1, 2], [150, 0, 75]], np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(raw), [[255, 0, 1], [149, 255, 74]])


def test_dataset_item_reduces_and_keeps_sizes(tiny_ade):
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True)
    raw = np.asarray(Image.open(ds.samples[1].annotation))
    item = ds[1]
    assert item["image"].shape == (3, 44, 56) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), reduce_zero_label(raw).astype(np.int64))
    assert item["path"].endswith("ADE_train_0001.jpg")
    # reduce_zero_label=False keeps raw values
    ds_raw = SegmentationDataset(tiny_ade, "training", num_classes=151, reduce_zero_label=False)
    np.testing.assert_array_equal(ds_raw[1]["label"].numpy(), raw)


# -- bad input ---------------------------------------------------------------------------------
def test_missing_root_names_path_layout_and_synthetic(tmp_path):
    dm = SegmentationDataModule(**dm_kwargs(tmp_path / "nowhere"))
    with pytest.raises(DatasetLayoutError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert "ADEChallengeData2016/images" in msg and "task=synthetic_seg" in msg


def test_wrong_root_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match="does not have the ADE20K layout"):
        discover_pairs(tmp_path, "training")


def test_image_without_annotation_named(tiny_ade):
    (tiny_ade / ADE / "annotations" / "training" / "ADE_train_0001.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"ADE_train_0001\.jpg' has no annotation"):
        SegmentationDataModule(**dm_kwargs(tiny_ade)).setup("fit")


def test_annotation_without_image_named(tiny_ade):
    (tiny_ade / ADE / "images" / "validation" / "ADE_valid_0000.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"ADE_valid_0000\.png' has no image"):
        SegmentationDataModule(**dm_kwargs(tiny_ade)).setup("validate")


def test_corrupt_image_raises_at_load_naming_file(tiny_ade):
    (tiny_ade / ADE / "images" / "training" / "ADE_train_0002.jpg").write_bytes(b"not a jpeg")
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True)  # setup passes
    ds[0]
    with pytest.raises(UnreadableSampleError, match=r"Cannot read image '.*ADE_train_0002\.jpg'"):
        ds[2]


def test_skip_unreadable_skips_and_counts(tiny_ade):
    (tiny_ade / ADE / "images" / "training" / "ADE_train_0002.jpg").write_bytes(b"not a jpeg")
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True, skip_unreadable=True)
    item = ds[2]
    assert item["path"].endswith("ADE_train_0000.jpg")  # the next readable sample (wrapping)
    assert ds.num_skipped == 1
    ds[1]
    assert ds.num_skipped == 1


def test_label_out_of_range_names_file_and_value(tiny_ade):
    write_sample(tiny_ade, "training", "ADE_train_0001", np.full((8, 8), 151))
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True)
    with pytest.raises(LabelRangeError, match=r"ADE_train_0001\.png' holds label value 151; allowed values are 0\.\.150"):
        ds[1]
    # without reduction 255 is ignore and allowed, num_classes is not
    write_sample(tiny_ade, "training", "ADE_train_0001", np.array([[0, 255], [149, 3]]))
    assert SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=False)[1]["label"].max() == 255
    write_sample(tiny_ade, "training", "ADE_train_0001", np.array([[0, 150], [149, 3]]))
    with pytest.raises(LabelRangeError, match="value 150"):
        SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=False)[1]


def test_class_names_must_match_num_classes(tmp_path):
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes=150"):
        SegmentationDataModule(**dm_kwargs(tmp_path, class_names=["a", "b"]))


# -- datamodule batches ------------------------------------------------------------------------
def test_train_and_val_batches(tiny_ade):
    dm = SegmentationDataModule(**dm_kwargs(tiny_ade))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == torch.int64
    assert len(batch["path"]) == 2 and all(p.endswith(".jpg") for p in batch["path"])
    assert set(batch["label"].unique().tolist()) <= set(range(150)) | {255}
    val = list(dm.val_dataloader())
    assert [b["path"][0].split("/")[-1] for b in val] == ["ADE_valid_0000.jpg", "ADE_valid_0001.jpg"]
    # 40x60 -> fit (128, 32): factor 0.8 -> (32, 48) -> multiple of 32: (32, 64); label unchanged
    assert val[0]["image"].shape == (1, 3, 32, 64)
    assert val[0]["label"].shape == (1, 40, 60)


def test_state_dict_roundtrip_sets_sampler_start(tiny_ade):
    dm = SegmentationDataModule(**dm_kwargs(tiny_ade))
    dm.load_state_dict({"samples_consumed": 6})
    dm.setup("fit")
    assert dm.state_dict() == {"samples_consumed": 6}
    assert dm.train_sampler().start == 6
    with pytest.raises(KeyError, match="samples_consumed"):
        dm.load_state_dict({})


def test_resumed_loader_gives_the_same_batches(tiny_ade):
    def batches(start, n):
        dm = SegmentationDataModule(**dm_kwargs(tiny_ade))
        dm.samples_consumed = start
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(n)]

    full = batches(0, 4)
    resumed = batches(4, 2)  # two batches of 2 consumed
    for a, b in zip(full[2:], resumed):
        assert a["path"] == b["path"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


# -- sampler -----------------------------------------------------------------------------------
def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_is_deterministic_and_covers_each_pass():
    a = _take(InfiniteShuffleSampler(7, seed=3), 21)
    assert a == _take(InfiniteShuffleSampler(7, seed=3), 21)
    assert a != _take(InfiniteShuffleSampler(7, seed=4), 21)
    indices = [i for i, _ in a]
    for p in range(3):
        assert sorted(indices[7 * p : 7 * p + 7]) == list(range(7))  # a permutation per pass
    assert indices[:7] != indices[7:14]  # reshuffled each pass
    assert [pos for _, pos in a] == list(range(21))


def test_sampler_ranks_are_disjoint_and_interleave_the_global_stream():
    world = 3
    stream = _take(InfiniteShuffleSampler(12, seed=1), 24)
    per_rank = [_take(InfiniteShuffleSampler(12, seed=1, rank=r, world_size=world), 8) for r in range(world)]
    for r in range(world):
        assert per_rank[r] == stream[r::world]
    first_pass = [set(i for i, pos in s if pos < 12) for s in per_rank]
    assert sum(len(s) for s in first_pass) == 12 and set.union(*first_pass) == set(range(12))


@pytest.mark.parametrize("k", [0, 5, 13, 26])
def test_sampler_resume_from_position(k):
    world = 2
    for r in range(world):
        full = _take(InfiniteShuffleSampler(9, seed=7, rank=r, world_size=world), 30)
        resumed = _take(InfiniteShuffleSampler(9, seed=7, rank=r, world_size=world, start=2 * k), 30 - k)
        assert resumed == full[k:]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        InfiniteShuffleSampler(5, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dataset_size"):
        InfiniteShuffleSampler(0, 0)


def test_skipped_count_is_shared_by_worker_processes(tiny_ade):
    (tiny_ade / ADE / "images" / "validation" / "ADE_valid_0001.jpg").write_bytes(b"broken")
    dm = SegmentationDataModule(**dm_kwargs(tiny_ade, skip_unreadable=True, num_workers=2))
    dm.setup("validate")
    paths = [b["path"][0].split("/")[-1] for b in dm.val_dataloader()]
    assert paths == ["ADE_valid_0000.jpg", "ADE_valid_0000.jpg"]  # the broken one replaced
    assert dm.num_skipped == 1
