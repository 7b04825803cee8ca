"""Validation under DDP: each of 2 gloo processes evaluates its share of the images, every image exactly
once, and the dataset-level metrics (mIoU; COCO AP) equal those of one process, on validation sets whose
size 2 does not divide. Real processes through torchrun, as a multi-GPU run starts them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comer.data.sampler import EvaluationShardSampler
from distributed_eval_worker import composed, output_dir, validate

WORKER = Path(__file__).resolve().parent / "distributed_eval_worker.py"
WORLD_SIZE = 2
TIMEOUT_S = 600


@pytest.mark.parametrize("dataset_size,world_size", [(5, 2), (7, 3), (2, 4), (0, 2), (6, 1)])
def test_shards_cover_every_index_once(dataset_size, world_size):
    shards = [list(EvaluationShardSampler(dataset_size, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(dataset_size))
    assert [len(EvaluationShardSampler(dataset_size, r, world_size)) for r in range(world_size)] == \
        [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_sampler_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank"):
        EvaluationShardSampler(5, rank=2, world_size=2)


def test_datamodule_gives_each_rank_its_share(tmp_path):
    """The segmentation and COCO datamodules' validation loaders under a (pretend) trainer of rank r of 2."""
    for task in ("seg", "det"):
        from comer.app.builders import build_datamodule

        datamodule = build_datamodule(composed(task, tmp_path / task), "validate")
        ids = []
        for rank in range(WORLD_SIZE):
            datamodule._rank_and_world = lambda rank=rank: (rank, WORLD_SIZE)
            ids.append(list(datamodule.val_dataloader().sampler))
        assert sorted(ids[0] + ids[1]) == list(range(len(datamodule.val_dataset))), task
        assert len(datamodule.val_dataset) % WORLD_SIZE == 1, task


@pytest.mark.slow
@pytest.mark.parametrize("task", ["seg", "det"])
def test_two_gloo_processes_score_like_one(task, tmp_path):
    """About a minute per task: two torchrun processes import torch, Lightning and comer. The model is freshly
    initialised (its mIoU is far from 0 and 1, so a repeated or missing image changes it); for detection the
    results json (every detection of every image) must also be the same."""
    from comer.app.builders import build_model

    state_file = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(build_model(composed(task, tmp_path)).state_dict(), state_file)
    single = validate(task, tmp_path, state_file, devices=1)  # also generates the data both runs read
    out_json = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}", "--standalone",
         str(WORKER), task, str(tmp_path), str(state_file), str(out_json), str(WORLD_SIZE)],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = json.loads(out_json.read_text())
    key = "val/mIoU" if task == "seg" else "val/bbox_mAP"
    assert key in single and set(distributed) == set(single)
    assert distributed == pytest.approx(single, abs=1e-6)
    if task == "det":
        detections = [json.loads((output_dir(tmp_path, devices) / "predictions" / "coco_results.bbox.json").read_text())
                      for devices in (1, WORLD_SIZE)]
        assert detections[0], "the fresh model detects something, so the comparison means something"
        key = lambda d: (d["image_id"], -d["score"], d["category_id"])  # noqa: E731
        ordered = [sorted(d, key=key) for d in detections]
        assert len({d["image_id"] for d in ordered[0]}) > 1, "detections on images of both ranks' shares"
        assert len(ordered[0]) == len(ordered[1])
        for a, b in zip(*ordered):
            assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)
