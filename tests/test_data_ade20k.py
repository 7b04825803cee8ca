import io
import logging
from collections import Counter

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
    check_label_range,
    collate_samples,
    discover_pairs,
    read_annotation,
    read_image,
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
    reduced = reduce_zero_label(raw)
    assert reduced.dtype == np.uint8
    np.testing.assert_array_equal(reduced, [[255, 0, 1], [149, 255, 74]])
    np.testing.assert_array_equal(raw, [[0, 1, 2], [150, 0, 75]])  # the input is left alone


def test_dataset_item_is_uint8_reduced_and_keeps_sizes(tiny_ade):
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True)
    raw = np.asarray(Image.open(ds.samples[1].annotation))
    item = ds[1]
    assert item["image"].shape == (3, 44, 56) and item["image"].dtype == torch.uint8
    rgb = np.asarray(Image.open(ds.samples[1].image).convert("RGB"))
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), rgb)  # RGB, channel first
    assert item["label"].dtype == torch.uint8
    np.testing.assert_array_equal(item["label"].numpy(), reduce_zero_label(raw))
    assert item["path"].endswith("ADE_train_0001.jpg") and item["skipped"] == []
    # reduce_zero_label=False keeps raw values
    ds_raw = SegmentationDataset(tiny_ade, "training", num_classes=151, reduce_zero_label=False)
    np.testing.assert_array_equal(ds_raw[1]["label"].numpy(), raw)


# -- decoding: the pixels mmseg sees (OpenCV for images, Pillow's values for labels) --------------------
def _jpeg(image, **save):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize("save", [dict(quality=95), dict(quality=75, subsampling=0), dict(quality=90, progressive=True),
                                  dict(quality=85, subsampling=1)])
def test_read_image_gives_pillows_pixels_for_ordinary_jpegs(tmp_path, save):
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    for name, image in (("rgb", smooth), ("grey", smooth[..., 0])):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(_jpeg(image, **save))
        decoded = read_image(path)
        assert decoded.dtype == np.uint8 and decoded.shape == (48, 64, 3)
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))


def test_read_image_applies_exif_orientation_as_mmseg(tmp_path):
    """mmseg decodes with OpenCV's IMREAD_COLOR, which turns the image as its EXIF orientation says."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "turned.jpg"
    image.save(path, exif=exif, quality=95)
    decoded = read_image(path)
    assert decoded.shape == (24, 16, 3)
    from PIL import ImageOps
    np.testing.assert_array_equal(decoded, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))


def test_read_annotation_gives_pillows_values(tmp_path):
    values = np.random.default_rng(2).integers(0, 151, (20, 30)).astype(np.uint8)
    grey, palette = tmp_path / "grey.png", tmp_path / "palette.png"
    Image.fromarray(values).save(grey)
    indexed = Image.fromarray(values, mode="L").convert("P")
    indexed.putpalette(list(np.random.default_rng(3).integers(0, 256, 768)))
    indexed.save(palette)
    assert Image.open(palette).mode == "P"
    for path in (grey, palette):
        label = read_annotation(path)
        assert label.dtype == np.uint8 and label.shape == (20, 30)
        np.testing.assert_array_equal(label, np.asarray(Image.open(path)))  # palette: the indices
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UnreadableSampleError, match=r"rgb\.png.*mode 'RGB'"):
        read_annotation(tmp_path / "rgb.png")
    (tmp_path / "cut.png").write_bytes(grey.read_bytes()[:60])
    with pytest.raises(UnreadableSampleError, match=r"cut\.png"):
        read_annotation(tmp_path / "cut.png")


@pytest.mark.parametrize("reduce", [True, False])
def test_label_range_check_agrees_with_listing_every_value(reduce):
    rng = np.random.default_rng(4)
    for trial in range(200):
        label = rng.integers(0, 150, (9, 11)).astype(np.uint8)
        if trial % 2:
            label[rng.integers(0, 9), rng.integers(0, 11)] = rng.choice([149, 150, 151, 200, 254, 255])
        values = np.unique(label)
        bad = values[values > 150] if reduce else values[(values >= 150) & (values != 255)]
        if bad.size:
            with pytest.raises(LabelRangeError, match=f"label value {bad[0]};"):
                check_label_range(label, 150, reduce, "x.png")
        else:
            check_label_range(label, 150, reduce, "x.png")


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
    """A JPEG whose header is intact but whose data is cut passes the header check and fails when decoded."""
    path = tiny_ade / ADE / "images" / "training" / "ADE_train_0002.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 20])  # cut just after the start of the scan data
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True)  # setup passes
    ds[0]
    with pytest.raises(UnreadableSampleError, match=r"Cannot read image '.*ADE_train_0002\.jpg'"):
        ds[2]


def test_unreadable_header_fails_when_the_dataset_is_built_naming_the_file(tiny_ade):
    (tiny_ade / ADE / "images" / "training" / "ADE_train_0002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableSampleError, match=r"Cannot read image '.*ADE_train_0002\.jpg'"):
        SegmentationDataModule(**dm_kwargs(tiny_ade)).setup("fit")


def test_image_and_label_of_different_sizes_fail_when_the_dataset_is_built(tiny_ade):
    """Sizes come from the file headers, so the whole split is checked before any model is built."""
    write_sample(tiny_ade, "validation", "ADE_valid_0001", np.ones((20, 30)), image=np.zeros((20, 31, 3), np.uint8))
    with pytest.raises(UnreadableSampleError, match=r"ADE_valid_0001\.jpg' is \(20, 31\) but annotation "
                                                    r"'.*ADE_valid_0001\.png' is \(20, 30\)"):
        SegmentationDataModule(**dm_kwargs(tiny_ade)).setup("fit")


def test_header_check_applies_the_exif_orientation(tiny_ade):
    """A JPEG stored 16x24 with EXIF orientation 6 decodes 24x16: its 24x16 label matches."""
    image = Image.fromarray(np.zeros((16, 24, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tiny_ade / ADE / "images" / "training" / "ADE_train_0001.jpg", exif=exif)
    Image.fromarray(np.ones((24, 16), np.uint8)).save(tiny_ade / ADE / "annotations" / "training" / "ADE_train_0001.png")
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True)
    assert tuple(ds[1]["label"].shape) == (24, 16)


def test_skip_unreadable_counts_bad_pairs_when_built_and_leaves_them_out_when_read(tiny_ade, caplog):
    (tiny_ade / ADE / "images" / "training" / "ADE_train_0002.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="comer.data.ade20k"):
        ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True, skip_unreadable=True)
    assert "1 of 3 image/annotation pairs cannot be used" in caplog.text and "ADE_train_0002.jpg" in caplog.text
    assert "image" not in ds[2]


def test_file_suffixes_match_in_any_case(tmp_path):
    """Upper-case .JPG images and .PNG labels pair like lower-case ones."""
    label = np.ones((8, 8), np.uint8)
    write_sample(tmp_path, "training", "lower", label)
    write_sample(tmp_path, "training", "upper", label)
    for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
        folder = tmp_path / ADE / kind / "training"
        (folder / f"upper{suffix}").rename(folder / f"upper{suffix.upper()}")
    pairs = discover_pairs(tmp_path, "training")
    assert [(p.image.name, p.annotation.name) for p in pairs] == [("lower.jpg", "lower.png"), ("upper.JPG", "upper.PNG")]


def test_skip_unreadable_leaves_an_evaluation_sample_out(tiny_ade):
    (tiny_ade / ADE / "images" / "training" / "ADE_train_0002.jpg").write_bytes(b"not a jpeg")
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True, skip_unreadable=True)
    record = ds[2]
    assert "image" not in record and record["path"].endswith("ADE_train_0002.jpg")
    [(path, reason)] = record["skipped"]
    assert path == record["path"] and "Cannot read image" in reason
    batch = collate_samples([ds[0], record, ds[1]], pad_to=(48, 60))
    assert [p.split("/")[-1] for p in batch["path"]] == ["ADE_train_0000.jpg", "ADE_train_0001.jpg"]
    assert batch["skipped"] == record["skipped"]
    empty = collate_samples([record])
    assert empty["image"].shape[0] == 0 and empty["path"] == [] and empty["skipped"] == record["skipped"]


def test_skip_unreadable_fills_a_stream_position_uniformly_and_reproducibly(tiny_ade):
    """In the training stream an unreadable sample's position gets a sample drawn uniformly from the split
    (seeded by the position), never systematically its neighbour."""
    for i in range(3, 12):
        write_sample(tiny_ade, "training", f"ADE_train_{i:04d}", np.full((8, 8), 3))
    (tiny_ade / ADE / "images" / "training" / "ADE_train_0002.jpg").write_bytes(b"not a jpeg")
    ds = SegmentationDataset(tiny_ade, "training", num_classes=150, reduce_zero_label=True, skip_unreadable=True)
    picks = Counter()
    for position in range(600):
        sample = ds[(2, position)]
        assert [p for p, _ in sample["skipped"]] == [str(ds.samples[2].image)] * len(sample["skipped"])
        assert sample["skipped"] and not sample["path"].endswith("ADE_train_0002.jpg")
        picks[sample["path"]] += 1
    assert len(picks) == 11  # every readable file can stand in
    assert max(picks.values()) < 2 * min(picks.values())  # ~600/12 each (600/11 counting redraws)
    assert ds[(2, 17)]["path"] == ds[(2, 17)]["path"]  # deterministic


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
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == torch.uint8
    assert len(batch["path"]) == 2 and all(p.endswith(".jpg") for p in batch["path"])
    assert len(batch["image_sizes"]) == 2 and batch["skipped"] == []
    assert set(batch["label"].unique().tolist()) <= set(range(150)) | {255}
    val = list(dm.val_dataloader())
    assert [b["path"][0].split("/")[-1] for b in val] == ["ADE_valid_0000.jpg", "ADE_valid_0001.jpg"]
    # 40x60 -> fit (128, 32): factor 0.8 -> (32, 48) -> multiple of 32: (32, 64); label unchanged
    assert val[0]["image"].shape == (1, 3, 32, 64) and val[0]["image"].dtype == torch.uint8
    assert val[0]["label"].shape == (1, 40, 60) and val[0]["label"].dtype == torch.uint8
    assert "views" not in val[0] and "image_sizes" not in val[0]


def test_train_batch_pads_to_the_crop_and_records_sizes(tiny_ade):
    """Images smaller than the crop sit top-left: image 0 and label 255 around them, their sizes listed."""
    dm = SegmentationDataModule(**dm_kwargs(tiny_ade, crop_size=48, ratio_range=(0.5, 0.5)))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 48, 48)
    for i, (h, w) in enumerate(batch["image_sizes"]):
        assert h < 48 and w < 48
        assert (batch["image"][i, :, h:] == 0).all() and (batch["image"][i, :, :, w:] == 0).all()
        assert (batch["label"][i, h:] == 255).all() and (batch["label"][i, :, w:] == 255).all()
        assert (batch["label"][i, :h, :w] != 255).any()


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


def test_unreadable_validation_sample_is_dropped_by_worker_processes(tiny_ade):
    (tiny_ade / ADE / "images" / "validation" / "ADE_valid_0001.jpg").write_bytes(b"broken")
    dm = SegmentationDataModule(**dm_kwargs(tiny_ade, skip_unreadable=True, num_workers=2))
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert len(batches) == 2 and batches[0]["path"][0].endswith("ADE_valid_0000.jpg")
    assert batches[1]["path"] == [] and batches[1]["image"].shape[0] == 0  # left out, not replaced
    assert [p.split("/")[-1] for p, _ in batches[1]["skipped"]] == ["ADE_valid_0001.jpg"]
