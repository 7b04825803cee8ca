"""CocoMetric: known COCOeval numbers on hand-made predictions, results json round trip, repeats, DDP gather."""
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO

from comer.data.coco import CocoDataModule
from comer.metrics import CocoMetric, evaluate_results_file
from comer.metrics.coco import load_coco_gt, metric_names

CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}]
LABEL_TO_CATEGORY = [5, 9]


def rect_ann(ann_id, image_id, category_id, x, y, w, h, iscrowd=0, size=None):
    if iscrowd:
        bitmap = np.zeros(size, np.uint8, order="F")
        bitmap[y : y + h, x : x + w] = 1
        rle = mask_utils.encode(bitmap)
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
            "area": float(w * h), "iscrowd": iscrowd, "segmentation": segmentation}


@pytest.fixture
def gt_file(tmp_path):
    """Image 1 (100x120): a medium cat, a small dog, a crowd of dogs. Image 2 (200x200): a large cat.
    Image 3 (50x50): nothing. Images 4 (100x100): one cat 20x40; 5 (100x100): two cats."""
    doc = {
        "images": [{"id": 1, "height": 100, "width": 120, "file_name": "1.jpg"},
                   {"id": 2, "height": 200, "width": 200, "file_name": "2.jpg"},
                   {"id": 3, "height": 50, "width": 50, "file_name": "3.jpg"},
                   {"id": 4, "height": 100, "width": 100, "file_name": "4.jpg"},
                   {"id": 5, "height": 100, "width": 100, "file_name": "5.jpg"}],
        "annotations": [rect_ann(1, 1, 5, 10, 10, 40, 30), rect_ann(2, 1, 9, 60, 50, 20, 20),
                        rect_ann(3, 1, 9, 90, 0, 30, 30, iscrowd=1, size=(100, 120)),
                        rect_ann(4, 2, 5, 0, 0, 150, 100),
                        rect_ann(5, 4, 5, 10, 10, 20, 40),
                        rect_ann(6, 5, 5, 10, 10, 20, 20), rect_ann(7, 5, 5, 50, 50, 30, 30)],
        "categories": CATEGORIES,
    }
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(doc))
    return path


def prediction(rects, scale=1.0, input_size=None, pad=32, labels=None, scores=None):
    """Boxes (x, y, w, h in original pixels) -> a prediction in network-input pixels (x ``scale``) with
    rectangle masks over the padded input."""
    n = len(rects)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in rects], dtype=torch.float32).reshape(-1, 4) * scale
    h, w = input_size
    hp, wp = -(-h // pad) * pad, -(-w // pad) * pad
    masks = torch.zeros((n, hp, wp), dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
        masks[i, y1:y2, x1:x2] = True
    return {"boxes": boxes, "masks": masks,
            "scores": torch.tensor(scores if scores is not None else [0.9] * n),
            "labels": torch.tensor(labels if labels is not None else [0] * n, dtype=torch.int64)}


def update(metric, image_id, original_size, pred, scale):
    h, w = (round(s * scale) for s in original_size)
    metric.update([pred], [image_id], [(h, w)], [original_size], [(h / original_size[0], w / original_size[1])])


def perfect(metric, scale=2.0):
    update(metric, 1, (100, 120), prediction([(10, 10, 40, 30), (60, 50, 20, 20)], scale, (200, 240), labels=[0, 1]), scale)
    update(metric, 2, (200, 200), prediction([(0, 0, 150, 100)], scale, (400, 400)), scale)
    update(metric, 3, (50, 50), prediction([], scale, (100, 100)), scale)


def test_perfect_predictions_score_one(gt_file):
    metric = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    perfect(metric)
    result = metric.compute()
    assert sorted(result) == sorted(metric_names()) and len(result) == 24
    assert all(value == pytest.approx(1.0) for value in result.values()), result


def test_no_predictions_score_zero(gt_file):
    metric = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    for image_id, size in ((1, (100, 120)), (2, (200, 200)), (3, (50, 50))):
        update(metric, image_id, size, prediction([], 1.0, size), 1.0)
    assert all(value == 0.0 for value in metric.compute().values())
    # only an image without ground truth: pycocotools' -1 ("no category has ground truth here")
    empty = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    update(empty, 3, (50, 50), prediction([], 1.0, (50, 50)), 1.0)
    assert all(value == -1.0 for value in empty.compute().values())


def test_known_numbers(gt_file):
    metric = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    # image 4: one cat [10,10,20,40]; the prediction [10,10,20,25] has IoU 0.625 -> matched at IoU 0.5, 0.55, 0.6
    update(metric, 4, (100, 100), prediction([(10, 10, 20, 25)], 1.0, (100, 100)), 1.0)
    result = metric.compute()
    for iou_type in ("bbox", "segm"):
        assert result[f"{iou_type}_mAP"] == pytest.approx(0.3)
        assert result[f"{iou_type}_mAP_50"] == pytest.approx(1.0) and result[f"{iou_type}_mAP_75"] == 0.0
        assert result[f"{iou_type}_mAP_s"] == pytest.approx(0.3) and result[f"{iou_type}_AR_100"] == pytest.approx(0.3)
        assert result[f"{iou_type}_mAP_m"] == -1.0 and result[f"{iou_type}_mAP_l"] == -1.0
    # image 5: two cats, one found exactly: recall 0.5 at precision 1 -> AP = 51/101 (101 recall points)
    half = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    update(half, 5, (100, 100), prediction([(10, 10, 20, 20)], 1.0, (100, 100)), 1.0)
    result = half.compute()
    assert result["bbox_mAP"] == pytest.approx(51 / 101) and result["segm_mAP"] == pytest.approx(51 / 101)
    assert result["bbox_AR_100"] == pytest.approx(0.5)


def test_results_json_round_trip(gt_file, tmp_path):
    metric = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    update(metric, 1, (100, 120), prediction([(10, 12, 40, 30), (58, 50, 20, 22), (0, 0, 30, 30)], 1.5, (150, 180),
                                             labels=[0, 1, 1], scores=[0.9, 0.6, 0.3]), 1.5)
    update(metric, 2, (200, 200), prediction([(5, 0, 150, 90)], 1.5, (300, 300)), 1.5)
    update(metric, 3, (50, 50), prediction([(1, 1, 10, 10)], 1.5, (75, 75), labels=[1]), 1.5)
    expected = metric.compute()
    files = metric.save_results(tmp_path / "out" / "results")
    assert sorted(files) == ["bbox", "segm"] and files["bbox"].name == "results.bbox.json"
    bbox = json.loads(files["bbox"].read_text())
    segm = json.loads(files["segm"].read_text())
    assert len(bbox) == len(segm) == 5
    assert bbox[0] == {"image_id": 1, "category_id": 5, "score": pytest.approx(0.9),
                       "bbox": pytest.approx([10, 12, 40, 30], abs=1e-4)}
    assert isinstance(segm[0]["segmentation"]["counts"], str) and "bbox" not in segm[0]
    assert segm[0]["segmentation"]["size"] == [100, 120] and {r["category_id"] for r in segm} == {5, 9}
    coco_gt = COCO(str(gt_file))
    for iou_type, path in files.items():
        assert len(coco_gt.loadRes(str(path)).getAnnIds()) == 5
        reread = evaluate_results_file(gt_file, path, iou_type, image_ids=metric.image_ids)
        assert reread == {k: v for k, v in expected.items() if k.startswith(iou_type)}
    assert 0 < expected["bbox_mAP"] < 1 and 0 < expected["segm_mAP"] < 1


def test_repeats_are_counted_once_and_states_merge(gt_file):
    single = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    perfect(single)
    expected = single.compute()
    a, b = CocoMetric(gt_file, LABEL_TO_CATEGORY), CocoMetric(gt_file, LABEL_TO_CATEGORY)
    update(a, 1, (100, 120), prediction([(10, 10, 40, 30), (60, 50, 20, 20)], 1.0, (100, 120), labels=[0, 1]), 1.0)
    update(a, 1, (100, 120), prediction([], 1.0, (100, 120)), 1.0)  # a repeat: ignored
    update(b, 2, (200, 200), prediction([(0, 0, 150, 100)], 1.0, (200, 200)), 1.0)
    update(b, 3, (50, 50), prediction([], 1.0, (50, 50)), 1.0)
    update(b, 1, (100, 120), prediction([], 1.0, (100, 120)), 1.0)  # DistributedSampler padding on another rank
    a.merge([b.state()])
    assert a.image_ids == [1, 2, 3] and a.num_repeats == 2
    assert a.compute() == expected
    a.reset()
    assert a.image_ids == [] and a.num_repeats == 0


def test_prints_are_silenced(gt_file, capsys):
    metric = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    perfect(metric)
    metric.compute()
    assert capsys.readouterr().out == ""


def test_bad_use(gt_file):
    metric = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match="labels outside 0..1"):
        update(metric, 1, (100, 120), prediction([(0, 0, 5, 5)], 1.0, (100, 120), labels=[2]), 1.0)
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()
    update(metric, 77, (10, 10), prediction([], 1.0, (10, 10)), 1.0)
    with pytest.raises(ValueError, match=r"not in the ground truth .*\[77\]"):
        metric.compute()
    boxes_only = CocoMetric(gt_file, LABEL_TO_CATEGORY, iou_types=("bbox",))
    pred = prediction([(10, 10, 40, 30)], 1.0, (100, 120))
    pred.pop("masks")
    update(boxes_only, 1, (100, 120), pred, 1.0)
    assert sorted(boxes_only.compute()) == sorted(metric_names(("bbox",)))
    with pytest.raises(ValueError, match="no 'masks'"):
        update(CocoMetric(gt_file, LABEL_TO_CATEGORY), 1, (100, 120), pred, 1.0)
    with pytest.raises(ValueError, match="exactly one of"):
        CocoMetric(None, LABEL_TO_CATEGORY)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        CocoMetric(gt_file.parent / "nowhere.json", LABEL_TO_CATEGORY).coco_gt


RANK_IMAGES = {0: [(1, (100, 120), [(10, 10, 40, 30), (60, 50, 20, 20)], [0, 1]), (3, (50, 50), [], [])],
               1: [(2, (200, 200), [(0, 0, 150, 100)], [0]), (1, (100, 120), [], [])]}  # image 1 repeated (padding)


def _rank_metric(gt_file, rank):
    metric = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    for image_id, size, rects, labels in RANK_IMAGES[rank]:
        update(metric, image_id, size, prediction(rects, 1.0, size, labels=labels), 1.0)
    return metric


def test_distributed_compute_path(gt_file, monkeypatch):
    """compute() under a (simulated) 2-rank process group: rank 0 gathers both states, counts image 1 once,
    evaluates and broadcasts; both ranks return the single-process numbers."""
    single = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    perfect(single, scale=1.0)
    expected = single.compute()
    metrics = {rank: _rank_metric(gt_file, rank) for rank in (0, 1)}
    broadcast = {}
    current = {"rank": 0}

    def gather_object(obj, gathered, dst):
        assert dst == 0 and obj is metrics[current["rank"]].state()
        if current["rank"] == 0:
            gathered[:] = [metrics[0].state(), metrics[1].state()]

    def broadcast_object_list(payload, src):
        if current["rank"] == 0:
            broadcast["value"] = payload[0]
        else:
            payload[0] = broadcast["value"]

    monkeypatch.setattr(CocoMetric, "_distributed", staticmethod(lambda: True))
    monkeypatch.setattr(dist, "get_rank", lambda: current["rank"])
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "gather_object", gather_object)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    results = {}
    for rank in (0, 1):
        current["rank"] = rank
        results[rank] = metrics[rank].compute()
    assert results[0] == results[1] == expected
    assert metrics[0].image_ids == [1, 2, 3] and metrics[0].num_repeats == 1  # rank 0 keeps the union
    assert metrics[1].image_ids == [1, 2]
    assert len(metrics[0].results("bbox")) == 3  # what save_results writes on rank 0: every rank's images


def _ddp_worker(rank, world, init_file, gt_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metric = _rank_metric(gt_file, rank)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(metric.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_compute_over_gloo(gt_file, tmp_path):
    """Two real gloo processes (about a minute: each spawned process imports torch and comer)."""
    mp.spawn(_ddp_worker, args=(2, tmp_path / "init", gt_file, tmp_path), nprocs=2, join=True)
    single = CocoMetric(gt_file, LABEL_TO_CATEGORY)
    perfect(single, scale=1.0)
    expected = single.compute()
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(expected)


def test_ground_truth_through_the_val_loader_scores_one(tmp_path):
    """End to end on the synthetic layout: the ground truth, moved into network-input pixels with the batch's
    scale factors (masks resized and padded as a model would output them), evaluates to AP 1 (bbox) and
    nearly 1 (segm: masks resized twice)."""
    from comer.data.synthetic_coco import generate_synthetic_coco

    root = generate_synthetic_coco(tmp_path / "syn", 2, 6, (64, 96), (2, 6), 0.5, seed=1)
    dm = CocoDataModule(root, batch_size=1, num_workers=0, pin_memory=False, seed=0, test_scale=(200, 120),
                        val_batch_size=2)
    dm.setup("validate")
    metric = CocoMetric(dm.val_annotation_file, dm.label_to_category_id)
    gt = load_coco_gt(dm.val_annotation_file)
    label_of = {c: k for k, c in enumerate(dm.label_to_category_id)}
    for batch in dm.val_dataloader():
        preds = []
        for image_id, (h, w), (sy, sx) in zip(batch["image_ids"], batch["image_sizes"], batch["scale_factors"]):
            anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
            boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                                   (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns]).reshape(-1, 4)
            masks = torch.zeros((len(anns), *batch["images"].shape[2:]), dtype=torch.bool)
            for i, a in enumerate(anns):
                m = torch.from_numpy(gt.annToMask(a)).float()[None, None]
                masks[i, :h, :w] = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")[0, 0] > 0
            preds.append({"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(anns)), "masks": masks,
                          "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64)})
        metric.update(preds, batch["image_ids"], batch["image_sizes"], batch["original_sizes"], batch["scale_factors"])
    assert len(metric.image_ids) == 6
    result = metric.compute()
    assert result["bbox_mAP"] == pytest.approx(1.0) and result["bbox_AR_100"] == pytest.approx(1.0)
    assert result["segm_mAP_50"] == pytest.approx(1.0) and result["segm_mAP"] > 0.8
