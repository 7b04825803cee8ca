"""COCO layout: parsing and checks, targets (category mapping, crowd, polygon/RLE masks), augmentation alignment,
batches, resumable stream, bad input, the synthetic generator and the data benchmark's smoke mode."""
import json
import logging
import runpy
import sys
from pathlib import Path

import cv2
import hydra
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from omegaconf import OmegaConf

from comer.data.ade20k import UnreadableSampleError
from comer.data.coco import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    CocoAnnotationError,
    CocoDataModule,
    CocoDetection,
    CocoLayoutError,
    DetectionCollate,
)
from comer.data.det_transforms import Compose, build_det_train_pipeline
from comer.data.transforms import normalize_images
from comer.data.synthetic_coco import (
    CATEGORY_IDS,
    EMPTY_EVERY,
    SyntheticCocoDataModule,
    generate_synthetic_coco,
    mask_to_polygons,
    mask_to_uncompressed_rle,
    read_marker,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL_AUG = dict(
    train_scales=[48, 56, 64, 72], max_size=120, crop_policy_scales=[40, 50], crop_policy_crop_size=[32, 48],
    crop_size=[80, 80], test_scale=[120, 72],
)
SYN = dict(num_train=12, num_val=5, image_size=(64, 96), instances_per_image=(2, 6), crowd_prob=0.5, generation_seed=0)


def dm_kwargs(root, **over):
    kw = dict(root=root, batch_size=2, num_workers=0, pin_memory=False, seed=0, **SMALL_AUG)
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "coco"
    return generate_synthetic_coco(root, SYN["num_train"], SYN["num_val"], SYN["image_size"],
                                   SYN["instances_per_image"], SYN["crowd_prob"], seed=0)


@pytest.fixture(scope="module")
def synthetic_dm(synthetic_root):
    dm = CocoDataModule(**dm_kwargs(synthetic_root))
    dm.setup("fit")
    return dm


# -- hand-made layouts -----------------------------------------------------------------------------------
def rect_poly(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def ann(ann_id, image_id, category_id, bbox, segmentation, iscrowd=0, area=None):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "segmentation": segmentation, "area": float(area if area is not None else bbox[2] * bbox[3])}


def write_layout(root, split, images, annotations, categories=((5, "cat"), (9, "dog")), pixels=None):
    """images: list of (id, height, width); pixels: optional {image id: uint8 RGB array}."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, height, width in images:
        name = f"{image_id:012d}.jpg"
        image = (pixels or {}).get(image_id)
        if image is None:
            image = np.full((height, width, 3), 100, np.uint8)
        cv2.imwrite(str(root / split / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
        entries.append({"id": image_id, "file_name": name, "height": height, "width": width})
    doc = {"images": entries, "annotations": annotations,
           "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in categories]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return doc


def hand_made(root):
    """train: image 10 (one cat, one crowd dog, one degenerate, one outside), 11 (only crowd), 12 (nothing),
    13 (RLE dog, compressed), 14 (RLE cat, uncompressed, and a polygon with a 2-point part);
    val: images 20 (cat) and 21 (nothing)."""
    bitmap = np.zeros((40, 50), np.uint8, order="F")
    bitmap[5:15, 20:30] = 1
    compressed = mask_utils.encode(bitmap)
    compressed = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    uncompressed = mask_to_uncompressed_rle(bitmap)
    train = [
        ann(1, 10, 5, [4, 6, 10, 8], rect_poly(4, 6, 14, 14)),
        ann(2, 10, 9, [20, 5, 10, 10], uncompressed, iscrowd=1, area=100),
        ann(3, 10, 5, [1, 1, 0.5, 10], rect_poly(1, 1, 1.5, 11)),
        ann(4, 10, 9, [60, 60, 5, 5], rect_poly(60, 60, 65, 65)),
        ann(5, 11, 9, [20, 5, 10, 10], uncompressed, iscrowd=1, area=100),
        ann(6, 13, 9, [20, 5, 10, 10], compressed),
        ann(7, 14, 5, [20, 5, 10, 10], uncompressed),
        ann(8, 14, 9, [0, 0, 6, 4], rect_poly(0, 0, 6, 4) + [[1, 1, 2, 2]]),
    ]
    write_layout(root, "train2017", [(i, 40, 50) for i in (10, 11, 12, 13, 14)], train)
    write_layout(root, "val2017", [(20, 40, 50), (21, 30, 30)], [ann(9, 20, 5, [4, 6, 10, 8], rect_poly(4, 6, 14, 14))])
    return bitmap


@pytest.fixture
def hand_root(tmp_path):
    hand_made(tmp_path)
    return tmp_path


def plain(root, split, train=True, **kw):
    """The dataset without augmentation (targets in original pixels)."""
    return CocoDetection(root, split, Compose([]), train=train, **kw)


# -- constants -------------------------------------------------------------------------------------------
def test_coco_constants():
    assert len(COCO_CLASSES) == 80 == len(set(COCO_CLASSES)) == len(COCO_CATEGORY_IDS)
    assert COCO_CATEGORY_IDS[:3] == (1, 2, 3) and COCO_CATEGORY_IDS[-1] == 90
    assert COCO_CATEGORY_IDS[COCO_CLASSES.index("stop sign")] == 13 and 12 not in COCO_CATEGORY_IDS
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"


# -- targets from hand-made annotations --------------------------------------------------------------------
def test_targets_categories_crowd_and_filtering(hand_root, caplog):
    with caplog.at_level(logging.INFO, logger="comer.data.coco"):
        ds = plain(hand_root, "train2017")
    assert ds.categories.category_ids == (5, 9) and ds.categories.label_of == {5: 0, 9: 1}
    # 11 (only crowd) and 12 (nothing) skipped; crowd, degenerate and outside instances left out
    assert [ds.image_id(i) for i in range(len(ds))] == [10, 13, 14]
    s = ds.stats
    assert (s.images, s.kept_images, s.images_without_instances, s.crowd, s.degenerate, s.outside) == (5, 3, 2, 2, 1, 1)
    assert s.dropped_polygon_parts == 1
    text = caplog.text
    assert "skipped 2 images without a usable instance" in text and "dropped 1 degenerate boxes" in text
    assert "dropped 1 boxes outside their image" in text and "2 crowd instances left to the evaluator" in text
    item = ds[0]
    assert item["image_id"] == 10 and item["original_size"] == (40, 50) == item["image_size"]
    assert item["gt_labels"].tolist() == [0]  # the cat only (category 5 -> label 0)
    np.testing.assert_array_equal(item["gt_boxes"].numpy(), [[4, 6, 14, 14]])
    expected = np.zeros((40, 50), np.uint8)
    expected[6:14, 4:14] = 1
    np.testing.assert_array_equal(item["gt_masks"][0].numpy(), expected)
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 40, 50)


def test_polygon_and_rle_masks_to_bitmaps(hand_root):
    bitmap = hand_made(hand_root)
    ds = plain(hand_root, "train2017")
    rle_item, mixed_item = ds[1], ds[2]
    assert rle_item["gt_labels"].tolist() == [1]  # compressed RLE, category 9
    np.testing.assert_array_equal(rle_item["gt_masks"][0].numpy(), bitmap)
    assert mixed_item["gt_labels"].tolist() == [0, 1]
    np.testing.assert_array_equal(mixed_item["gt_masks"][0].numpy(), bitmap)  # uncompressed RLE
    corner = np.zeros((40, 50), np.uint8)
    corner[0:4, 0:6] = 1  # the polygon; its 2-point part is dropped
    np.testing.assert_array_equal(mixed_item["gt_masks"][1].numpy(), corner)


def test_validation_keeps_every_image_without_targets(hand_root):
    ds = plain(hand_root, "val2017", train=False)
    assert len(ds) == 2 and [ds.image_id(i) for i in range(2)] == [20, 21]
    item = ds[1]
    assert item["image_id"] == 21 and item["original_size"] == (30, 30) and "gt_boxes" not in item


def test_category_mapping_both_ways_on_the_synthetic_layout(synthetic_dm, synthetic_root):
    dm = synthetic_dm
    assert dm.label_to_category_id == list(CATEGORY_IDS) and dm.num_classes == len(CATEGORY_IDS)
    assert dm.class_names == ["disc", "box", "triangle", "bar", "arc", "blob"]
    doc = json.loads((synthetic_root / "annotations" / "instances_train2017.json").read_text())
    ds = plain(synthetic_root, "train2017")
    for index in range(4):
        item = ds[index]
        anns = [a for a in doc["annotations"] if a["image_id"] == item["image_id"] and not a["iscrowd"]]
        assert [dm.label_to_category_id[k] for k in item["gt_labels"].tolist()] == [a["category_id"] for a in anns]
        for box, a in zip(item["gt_boxes"].numpy(), anns):
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose(box, [x, y, x + w, y + h], atol=1e-4)


# -- augmentation through the dataset ----------------------------------------------------------------------
def test_dataset_augmentation_moves_a_coloured_rectangle_with_its_box(tmp_path):
    image = np.full((120, 160, 3), 90, np.uint8)
    image[30:70, 50:110] = (240, 30, 30)
    write_layout(tmp_path, "train2017", [(1, 120, 160)], [ann(1, 1, 5, [50, 30, 60, 40], rect_poly(50, 30, 110, 70))],
                 pixels={1: image})
    pipeline = build_det_train_pipeline(short_sides=[80, 100, 140], max_size=300, crop_policy_short_sides=[70, 90],
                                        crop_policy_crop_size=[50, 80], crop_size=[96, 96])
    ds = CocoDetection(tmp_path, "train2017", pipeline, train=True, seed=3)
    for position in range(25):
        item = ds[(0, position)]
        img = item["image"].permute(1, 2, 0).numpy().astype(int)
        red = (np.abs(img - (240, 30, 30)).max(-1) <= 40)
        if not len(item["gt_boxes"]):
            assert red.sum() <= 3  # the crop missed the rectangle
            continue
        (box,), (mask,) = item["gt_boxes"].numpy(), item["gt_masks"].numpy()
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.01)
        ys, xs = np.nonzero(red)
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=2.5)
        assert item["image_size"] == tuple(mask.shape) and max(mask.shape) <= 96
    assert ds[(0, 7)]["gt_boxes"].tolist() == ds[(0, 7)]["gt_boxes"].tolist()  # seeded by position


# -- batches -------------------------------------------------------------------------------------------------
def test_train_batch_layout(synthetic_dm):
    batch = next(iter(synthetic_dm.train_dataloader()))
    images = batch["images"]
    assert images.dtype == torch.uint8 and images.shape[0] == 2 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    assert set(batch) == {"images", "image_sizes", "original_sizes", "scale_factors", "image_ids", "gt_boxes",
                          "gt_labels", "gt_masks", "skipped"}
    for i, (h, w) in enumerate(batch["image_sizes"]):
        assert images[i, :, h:].sum() == 0 and images[i, :, :, w:].sum() == 0  # zero padding
        boxes, labels, masks = batch["gt_boxes"][i], batch["gt_labels"][i], batch["gt_masks"][i]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and masks.dtype == torch.uint8
        assert masks.shape == (len(boxes), h, w) and len(labels) == len(boxes)
        assert ((labels >= 0) & (labels < 6)).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (boxes[:, :2] >= 0).all()
    assert all(isinstance(i, int) for i in batch["image_ids"])


def test_val_batch_scale_factors_map_back(synthetic_dm):
    dm = synthetic_dm
    loader = dm.val_dataloader()
    ids = []
    for batch in loader:
        assert "gt_boxes" not in batch
        (h, w), (H, W), (sy, sx) = batch["image_sizes"][0], batch["original_sizes"][0], batch["scale_factors"][0]
        assert abs(h / H - sy) < 1e-9 and abs(w / W - sx) < 1e-9
        assert min(h, w) == 72 or max(h, w) == 120  # fits test_scale (120, 72)
        ids += batch["image_ids"]
    assert len(ids) == SYN["num_val"] == len(set(ids))  # every validation image, the empty one included


def test_val_loader_is_sharded_over_ranks(synthetic_dm, monkeypatch):
    dm = synthetic_dm
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(dm, "_rank_and_world", lambda rank=rank: (rank, 2))
        seen.append([i for b in dm.val_dataloader() for i in b["image_ids"]])
    assert (len(seen[0]), len(seen[1])) == (3, 2)  # 5 images over 2 ranks: each image once, no padding
    assert sorted(seen[0] + seen[1]) == sorted(set(seen[0]) | set(seen[1])) and len(set(seen[0] + seen[1])) == 5


def test_collate_and_normalize_padding():
    collate = DetectionCollate(32)
    samples = [
        {"image": torch.full((3, 20, 40), 200, dtype=torch.uint8), "image_id": 1, "image_size": (20, 40),
         "original_size": (10, 20), "scale_factor": (2.0, 2.0), "skipped": []},
        {"image_id": 3, "skipped": [("3.jpg", "cannot read")]},  # an unreadable evaluation image, left out
        {"image": torch.full((3, 33, 10), 100, dtype=torch.uint8), "image_id": 2, "image_size": (33, 10),
         "original_size": (33, 10), "scale_factor": (1.0, 1.0), "skipped": []},
    ]
    batch = collate(samples)
    assert batch["images"].shape == (2, 3, 64, 64) and batch["image_ids"] == [1, 2]
    assert batch["skipped"] == [("3.jpg", "cannot read")]
    normalized = normalize_images(batch["images"], batch["image_sizes"], mean=(100, 100, 100), std=(50, 50, 50))
    assert normalized.dtype == torch.float32
    assert torch.all(normalized[0, :, :20, :40] == 2) and torch.all(normalized[0, :, 20:] == 0)
    assert torch.all(normalized[1, :, :33, :10] == 0) and normalized[0, :, :, 40:].abs().sum() == 0
    assert collate(samples[1:2])["images"].shape == (0, 3, 0, 0)


# -- resumable stream -------------------------------------------------------------------------------------
def _batches(dm, count):
    out = []
    for batch in dm.train_dataloader():
        out.append((batch["image_ids"], [b.clone() for b in batch["gt_boxes"]], batch["images"].clone()))
        dm.samples_consumed += len(batch["image_ids"])  # what on_after_batch_transfer counts on one device
        if len(out) == count:
            return out


def test_resume_reproduces_the_stream(synthetic_root):
    full = CocoDataModule(**dm_kwargs(synthetic_root))
    full.setup("fit")
    expected = _batches(full, 5)
    resumed = CocoDataModule(**dm_kwargs(synthetic_root))
    resumed.setup("fit")
    resumed.load_state_dict({"samples_consumed": 4})  # two batches of two
    assert resumed.state_dict() == {"samples_consumed": 4}
    for (ids_a, boxes_a, images_a), (ids_b, boxes_b, images_b) in zip(expected[2:], _batches(resumed, 3)):
        assert ids_a == ids_b and torch.equal(images_a, images_b)
        assert all(torch.equal(a, b) for a, b in zip(boxes_a, boxes_b))
    with pytest.raises(KeyError, match="samples_consumed"):
        resumed.load_state_dict({})


def test_worker_processes_give_the_same_batches(synthetic_root):
    a = CocoDataModule(**dm_kwargs(synthetic_root))
    b = CocoDataModule(**dm_kwargs(synthetic_root, num_workers=2))
    for dm in (a, b):
        dm.setup("fit")
    for (ids_a, boxes_a, _), (ids_b, boxes_b, _) in zip(_batches(a, 3), _batches(b, 3)):
        assert ids_a == ids_b and all(torch.equal(x, y) for x, y in zip(boxes_a, boxes_b))


# -- bad input --------------------------------------------------------------------------------------------
def test_missing_root_and_files_raise_early(tmp_path):
    with pytest.raises(CocoLayoutError, match="does not exist") as info:
        CocoDataModule(**dm_kwargs(tmp_path / "nowhere"))
    assert "nowhere" in str(info.value) and "instances_" in str(info.value)  # names the path and the layout
    hand_made(tmp_path)
    (tmp_path / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(CocoLayoutError, match="instances_val2017.json") as info:
        CocoDataModule(**dm_kwargs(tmp_path))
    assert "Expected" in str(info.value)
    CocoDataModule(**dm_kwargs(tmp_path, val_split="train2017"))  # the constructor only checks the layout


def test_evaluation_only_without_train_split(hand_root):
    import shutil
    shutil.rmtree(hand_root / "train2017")
    dm = CocoDataModule(**dm_kwargs(hand_root, train_split=None))
    dm.setup("validate")
    assert dm.label_to_category_id == [5, 9] and len(dm.val_dataset) == 2
    with pytest.raises(RuntimeError, match="evaluation only"):
        dm.setup("fit")


def _corrupt(root, mutate):
    path = root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][0]["bbox"].__setitem__(2, -3), r"annotation id 1: bbox .* negative width or height"),
        (lambda d: d["annotations"][0].__setitem__("segmentation", "abc"), r"annotation id 1: 'segmentation' is neither polygons"),
        (lambda d: d["annotations"][0].__setitem__("segmentation", {"counts": 5}), r"annotation id 1: 'segmentation' is neither"),
        (lambda d: d["annotations"][1].__setitem__("category_id", 4), r"annotation id 2: category_id 4 is not in 'categories'"),
        (lambda d: d["annotations"][2].__setitem__("image_id", 99), r"annotation id 3: image_id 99 has no entry in 'images'"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotation id 1: missing key\(s\) \['bbox'\]"),
        (lambda d: d["images"][0].pop("height"), r"image id 10 has no positive int 'height'"),
        (lambda d: d["annotations"][0]["segmentation"][0].__setitem__(0, "x"), r"annotation id 1 \(image id 10\): cannot decode"),
    ],
)
def test_malformed_annotations_name_file_entry_and_problem(hand_root, mutate, message):
    path = _corrupt(hand_root, mutate)
    with pytest.raises(CocoAnnotationError, match=message) as info:
        ds = plain(hand_root, "train2017")
        ds[0]  # polygon coordinates are checked when decoded
    assert str(path) in str(info.value)


def test_bad_json_and_missing_image_file(hand_root):
    path = hand_root / "annotations" / "instances_train2017.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(CocoAnnotationError, match="not valid JSON") as info:
        plain(hand_root, "train2017")
    assert str(path) in str(info.value)
    (hand_root / "val2017" / f"{21:012d}.jpg").unlink()
    with pytest.raises(CocoAnnotationError, match=r"image id 21 names file .*000000000021.jpg.*does not exist"):
        plain(hand_root, "val2017", train=False)


def test_unreadable_images(hand_root, caplog):
    (hand_root / "train2017" / f"{10:012d}.jpg").write_bytes(b"not a jpeg")
    (hand_root / "val2017" / f"{20:012d}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableSampleError, match="000000000010.jpg"):
        plain(hand_root, "train2017")[0]
    train = plain(hand_root, "train2017", skip_unreadable=True)
    stand_in = train[(0, 5)]  # in the stream: another image, drawn by the position, takes the place
    assert stand_in["image_id"] in (13, 14) and stand_in["image_id"] == train[(0, 5)]["image_id"]
    assert stand_in["skipped"][0][0].endswith("000000000010.jpg") and "image" in stand_in
    assert "image" not in train[0] and train[0]["skipped"]  # outside the stream: left out
    dm = CocoDataModule(**dm_kwargs(hand_root, skip_unreadable=True, val_batch_size=2))
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [b["image_ids"] for b in batches] == [[21]]  # dropped, not replaced by a neighbour
    assert batches[0]["skipped"][0][0].endswith("000000000020.jpg") and len(batches[0]["image_sizes"]) == 1

    class Trainer:
        training, world_size = False, 1

    dm.trainer = Trainer()
    dm.on_after_batch_transfer(batches[0], 0)
    dm.on_after_batch_transfer(batches[0], 0)
    assert dm.skipped_samples() == {"val2017": [batches[0]["skipped"][0][0]]}
    assert caplog.text.count("skip_unreadable: left out") == 1


def test_an_image_whose_size_differs_from_its_entry(hand_root):
    cv2.imwrite(str(hand_root / "train2017" / f"{10:012d}.jpg"), np.zeros((41, 50, 3), np.uint8))
    with pytest.raises(UnreadableSampleError, match=r"decodes to 41x50 .* height 40 and width 50"):
        plain(hand_root, "train2017")[0]


def test_num_classes_is_checked_against_the_files(hand_root):
    dm = CocoDataModule(**dm_kwargs(hand_root, num_classes=80))
    assert dm.num_classes == 80  # before setup: the configured number (the model is built from it)
    with pytest.raises(CocoAnnotationError, match=r"lists 2 categories but num_classes=80"):
        dm.setup("validate")
    with pytest.raises(ValueError, match="has 6 categories"):
        SyntheticCocoDataModule(num_train=4, num_val=2, image_size=(48, 64), instances_per_image=(2, 3),
                                crowd_prob=0.0, generation_seed=1, **dm_kwargs(hand_root / "syn", num_classes=5))


def test_train_and_val_categories_must_agree(hand_root):
    doc = json.loads((hand_root / "annotations" / "instances_val2017.json").read_text())
    doc["categories"].append({"id": 11, "name": "cow"})
    (hand_root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    dm = CocoDataModule(**dm_kwargs(hand_root))
    with pytest.raises(CocoAnnotationError, match="different categories"):
        dm.setup("fit")


# -- synthetic generator ----------------------------------------------------------------------------------
def test_synthetic_layout(synthetic_root):
    marker = read_marker(synthetic_root)
    assert marker["num_train"] == SYN["num_train"] and not list(synthetic_root.parent.glob(".*tmp*"))
    for split, count in (("train2017", SYN["num_train"]), ("val2017", SYN["num_val"])):
        doc = json.loads((synthetic_root / "annotations" / f"instances_{split}.json").read_text())
        assert len(doc["images"]) == count
        assert [c["id"] for c in doc["categories"]] == list(CATEGORY_IDS)
        per_image = {i["id"]: [] for i in doc["images"]}
        for a in doc["annotations"]:
            per_image[a["image_id"]].append(a)
        empties = [index for index, image in enumerate(doc["images"]) if not per_image[image["id"]]]
        assert 3 in empties and 3 % EMPTY_EVERY == 3
        for image in doc["images"]:
            h, w = image["height"], image["width"]
            assert 64 <= h <= 96 and 64 <= w <= 96 and (synthetic_root / split / image["file_name"]).is_file()
            for a in per_image[image["id"]]:
                if a["iscrowd"]:
                    assert isinstance(a["segmentation"]["counts"], list)  # uncompressed, as COCO's crowd RLEs
                    rle = mask_utils.frPyObjects(a["segmentation"], h, w)
                else:
                    assert all(len(p) >= 6 for p in a["segmentation"])
                    rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
                assert a["area"] == mask_utils.area(rle) > 0
                np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(rle))
    train = json.loads((synthetic_root / "annotations" / "instances_train2017.json").read_text())
    assert any(a["iscrowd"] for a in train["annotations"])
    assert sum(len(a["segmentation"]) > 1 for a in train["annotations"] if not a["iscrowd"]) >= 1  # split by occluders


def test_polygons_reproduce_masks_with_holes():
    mask = np.zeros((40, 50), np.uint8)
    cv2.circle(mask, (25, 20), 15, 1, -1)
    cv2.rectangle(mask, (20, 15), (28, 22), 0, -1)  # an occluder inside: a hole
    cv2.circle(mask, (5, 5), 3, 1, -1)  # a second part
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 40, 50)))
    assert (decoded != mask).sum() <= 2
    rle = mask_to_uncompressed_rle(mask)
    np.testing.assert_array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, 40, 50)), mask)


def test_synthetic_generation_is_deterministic_and_guarded(tmp_path):
    args = dict(num_train=3, num_val=1, image_size=(48, 64), instances_per_image=(2, 4), crowd_prob=0.5)
    a = generate_synthetic_coco(tmp_path / "a", seed=5, **args)
    b = generate_synthetic_coco(tmp_path / "b", seed=5, **args)
    c = generate_synthetic_coco(tmp_path / "c", seed=6, **args)
    rel = "annotations/instances_train2017.json"
    assert (a / rel).read_bytes() == (b / rel).read_bytes() != (c / rel).read_bytes()
    stamp = (a / rel).stat().st_mtime_ns
    generate_synthetic_coco(tmp_path / "a", seed=5, **args)
    assert (a / rel).stat().st_mtime_ns == stamp  # kept
    (tmp_path / "real").mkdir()
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        generate_synthetic_coco(tmp_path / "real", seed=5, **args)


def test_synthetic_datamodule_generates_in_prepare_data(tmp_path):
    dm = SyntheticCocoDataModule(num_train=4, num_val=2, image_size=(48, 64), instances_per_image=(2, 3),
                                 crowd_prob=0.0, generation_seed=1, **dm_kwargs(tmp_path / "syn"))
    assert not (tmp_path / "syn").exists()
    dm.prepare_data()
    dm.setup("fit")
    assert dm.label_to_category_id == list(CATEGORY_IDS) and dm.val_annotation_file.is_file()


@pytest.mark.parametrize("name", ["coco", "synthetic_det"])
def test_data_configs_instantiate(name, synthetic_root, tmp_path):
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "seed": 0,
                            "data": OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")})
    if name == "coco":
        cfg.data.root = str(synthetic_root)
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, CocoDataModule) and dm.batch_size >= 1 and dm.num_classes == (80 if name == "coco" else 6)
    if name == "coco":  # the official recipe
        steps = dm.train_pipeline.steps
        assert steps[1].policies[0][0].short_sides == tuple(range(480, 801, 32)) and steps[2].high == 1024


def test_benchmark_smoke(monkeypatch, capsys):
    """benchmarks/coco_data.py --smoke runs end to end (in this process: a subprocess would spend its time importing)."""
    monkeypatch.setattr(sys, "argv", ["coco_data.py", "--smoke"])
    threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / "coco_data.py"), run_name="__main__")
    finally:  # the script pins one thread, as in a loader worker
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    out = capsys.readouterr().out
    assert "NOT a benchmark" in out
    summary, train_stages, test_stages = out.split("\n### ")
    rows = [line.strip("|").split("|") for line in summary.splitlines() if line.startswith("| ")][1:]
    assert [row[0].strip() for row in rows] == ["train", "test"]
    assert all(float(row[2]) > 0 for row in rows)
    stages = lambda text: [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:]
    assert stages(train_stages) == ["decode image", "targets", "RandomFlip", "OneOf", "RandomCrop",
                                    "finalize (masks rasterised)", "to tensor", "collate",
                                    "end to end (dataset + collate)"]
    assert stages(test_stages)[0] == "decode image" and "targets" not in stages(test_stages)
