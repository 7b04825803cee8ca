"""Greedy NMS and per-class NMS: hand-made cases, ties, and a naive Python loop on random boxes."""
import importlib

import pytest
import torch

from comer.kernels import batched_nms, nms

nms_module = importlib.import_module("comer.kernels.nms")  # the package re-exports the function as `nms`


def naive_iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def naive_nms(boxes, scores, iou_threshold):
    """The textbook loop: visit by decreasing score (ties: lower index first), keep a box unless a kept box
    overlaps it with IoU > threshold."""
    boxes, scores = boxes.tolist(), scores.tolist()
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if all(naive_iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def random_case(n, seed, num_scores=None, spread=200.0):
    """n boxes clustered (lots of overlap) with scores; num_scores quantises scores to force ties."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 8, 1), 2, generator=generator, dtype=torch.float64) * spread
    xy = centres[torch.randint(len(centres), (n,), generator=generator)]
    xy = xy + torch.randn(n, 2, generator=generator, dtype=torch.float64) * 6
    wh = 8 + torch.rand(n, 2, generator=generator, dtype=torch.float64) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=generator, dtype=torch.float64)
    if num_scores:
        scores = (scores * num_scores).floor() / num_scores
    return boxes, scores


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks and kept-box chunks small enough that a few hundred boxes cross several of each."""
    monkeypatch.setattr(nms_module, "NMS_BLOCK_SIZE", 32)
    monkeypatch.setattr(nms_module, "KEPT_CHUNK_SIZE", 24)


# ---------------------------------------------------------------- hand-made cases

def test_hand_made_chain():
    # A and B overlap (IoU 70 / 130), B and C too, A and C only 40 / 160: greedy drops B, which then
    # cannot drop C. D is far away. Output by decreasing score.
    boxes = torch.tensor([[3.0, 0, 13, 10], [0, 0, 10, 10], [50, 50, 60, 60], [6, 0, 16, 10]])
    scores = torch.tensor([0.8, 0.9, 0.3, 0.7])
    keep = nms(boxes, scores, 0.5)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [1, 3, 2]
    assert nms(boxes, scores, 0.2).tolist() == [1, 2]  # C's 0.25 now suppresses it
    assert nms(boxes, scores, 0.6).tolist() == [1, 0, 3, 2]  # 0.538 suppresses nothing


def test_suppression_needs_iou_strictly_above_threshold():
    boxes = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1]])  # IoU exactly 1 / 2
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_equal_scores_keep_the_lower_index_first():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [40, 0, 50, 10]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.7, 0.5])
    # 3 (highest) drops its duplicates 0 and 1; the tied survivors come in index order
    assert nms(boxes, scores, 0.5).tolist() == [3, 2, 4]
    assert nms(boxes[:3], scores[:3], 0.5).tolist() == [0, 2]


def test_zero_area_boxes_suppress_nothing():
    boxes = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 5, 0]])  # two identical points, a segment
    assert nms(boxes, torch.tensor([0.3, 0.2, 0.1]), 0.0).tolist() == [0, 1, 2]


def test_empty_input():
    for fn, args in ((nms, ()), (batched_nms, (torch.zeros(0, dtype=torch.int64),))):
        keep = fn(torch.zeros(0, 4), torch.zeros(0), *args, 0.5)
        assert keep.dtype == torch.int64 and keep.shape == (0,)


# ---------------------------------------------------------------- against the naive loop

@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", range(3))
def test_matches_naive_loop_across_blocks(small_blocks, seed, threshold):
    boxes, scores = random_case(300, seed, num_scores=40 if seed == 2 else None)
    keep = nms(boxes, scores, threshold)
    expected = naive_nms(boxes, scores, threshold)
    assert 10 < len(expected) < 300  # suppression happened, and not everywhere
    assert keep.tolist() == expected


def test_matches_naive_loop_with_default_blocks():
    boxes, scores = random_case(1100, seed=5, num_scores=100, spread=120.0)  # crosses one 1024 block edge
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == naive_nms(boxes, scores, 0.5)


def test_block_size_does_not_change_the_result(monkeypatch):
    boxes, scores = random_case(2000, seed=7, spread=600.0)
    boxes, scores = boxes.float(), scores.float()
    monkeypatch.setattr(nms_module, "NMS_BLOCK_SIZE", 2048)  # a single block: the fixed point alone
    keep = nms(boxes, scores, 0.5)
    assert 500 < len(keep) < 1900
    for block, chunk in ((256, 4096), (100, 64)):
        monkeypatch.setattr(nms_module, "NMS_BLOCK_SIZE", block)
        monkeypatch.setattr(nms_module, "KEPT_CHUNK_SIZE", chunk)
        assert nms(boxes, scores, 0.5).tolist() == keep.tolist()


# ---------------------------------------------------------------- batched

def per_class_loop(boxes, scores, idxs, threshold):
    kept = []
    for label in idxs.unique().tolist():
        members = (idxs == label).nonzero().squeeze(1)
        kept += members[nms(boxes[members], scores[members], threshold)].tolist()
    return sorted(kept, key=lambda i: (-float(scores[i]), i))


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_matches_per_class_loop(small_blocks, seed):
    boxes, scores = random_case(300, seed, num_scores=30)
    idxs = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(seed))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = per_class_loop(boxes, scores, idxs, 0.5)
    assert keep.tolist() == expected
    assert len(expected) > len(nms(boxes, scores, 0.5))  # classes did not suppress each other


def test_batched_nms_keeps_overlapping_boxes_of_different_classes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([0, 1, 0, 1])
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.arange(4), 0.5).tolist() == [0, 1, 2, 3]


def test_batched_nms_is_exact_on_large_coordinates():
    # Offsetting boxes by class * (max coordinate + 1) would move class 10000 to 1.001e7, where fp32 spacing
    # is 1: x2 = 500.4 would round to 500 and the IoU 0.5004 to 0.5, not suppressed. Masking by class is exact.
    boxes = torch.tensor([[0.0, 0.0, 1000.0, 1.0], [0.0, 0.0, 500.4, 1.0]])
    assert float(boxes[1, 2] + 1.001e7) == 1.001e7 + 500  # what the offset would do
    idxs = torch.tensor([10000, 10000])
    assert batched_nms(boxes, torch.tensor([0.9, 0.8]), idxs, 0.5).tolist() == [0]


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    boxes, scores = random_case(5, seed=0)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\]"):
        nms(torch.rand(5, 5), scores, 0.5)
    with pytest.raises(ValueError, match=r"scores must have shape \[5\]"):
        nms(boxes, scores[:4], 0.5)
    with pytest.raises(ValueError, match="boxes must be finite"):
        nms(torch.cat([boxes[:4], torch.tensor([[0.0, 0.0, float("nan"), 1.0]], dtype=boxes.dtype)]), scores, 0.5)
    with pytest.raises(ValueError, match="scores must be finite"):
        nms(boxes, torch.cat([scores[:4], scores.new_tensor([float("inf")])]), 0.5)
    with pytest.raises(ValueError, match="idxs must be an integer tensor"):
        batched_nms(boxes, scores, torch.zeros(5), 0.5)
    with pytest.raises(ValueError, match=r"idxs must have shape \[5\]"):
        batched_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="iou_threshold must be a Python number"):
        nms(boxes, scores, torch.tensor(0.5))
