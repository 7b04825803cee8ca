"""Released mmdet 2.x Mask R-CNN checkpoints load strictly: a random state dict with the official backbone
names (from the key manifest) and mmdet's head names loads into comer_s_det's Mask R-CNN, every tensor
lands where its name says, and key or shape mismatches are named before anything is loaded."""
from __future__ import annotations

import functools

import pytest
import torch

from comer.checkpoint import CheckpointKeyError, CheckpointShapeError, load_detector_checkpoint
from comer.models import build_detector
from official_oracle import cached_official_state_dict
from test_backbone import official_to_ours  # the independent rendering of the backbone name map

FPN_CHANNELS, FC_WIDTH, ANCHORS, CLASSES = 256, 1024, 3, 80


def mmdet_head_shapes(backbone_channels: int, num_classes: int = CLASSES) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of mmdet 2.x's R50-FPN Mask R-CNN heads (FPN, RPNHead, Shared2FCBBoxHead, FCNMaskHead)."""
    shapes = {}
    for i in range(4):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (FPN_CHANNELS, backbone_channels, 1, 1)
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (FPN_CHANNELS, FPN_CHANNELS, 3, 3)
        shapes[f"roi_head.mask_head.convs.{i}.conv.weight"] = (FPN_CHANNELS, FPN_CHANNELS, 3, 3)
    shapes.update({
        "rpn_head.rpn_conv.weight": (FPN_CHANNELS, FPN_CHANNELS, 3, 3),
        "rpn_head.rpn_cls.weight": (ANCHORS, FPN_CHANNELS, 1, 1),
        "rpn_head.rpn_reg.weight": (4 * ANCHORS, FPN_CHANNELS, 1, 1),
        "roi_head.bbox_head.shared_fcs.0.weight": (FC_WIDTH, FPN_CHANNELS * 7 * 7),
        "roi_head.bbox_head.shared_fcs.1.weight": (FC_WIDTH, FC_WIDTH),
        "roi_head.bbox_head.fc_cls.weight": (num_classes + 1, FC_WIDTH),
        "roi_head.bbox_head.fc_reg.weight": (4 * num_classes, FC_WIDTH),
        "roi_head.mask_head.upsample.weight": (FPN_CHANNELS, FPN_CHANNELS, 2, 2),  # ConvTranspose2d: in, out, k, k
        "roi_head.mask_head.conv_logits.weight": (num_classes, FPN_CHANNELS, 1, 1),
    })
    shapes.update({k.replace(".weight", ".bias"): (shape[1] if "upsample" in k else shape[0],)
                   for k, shape in list(shapes.items())})
    return shapes


@functools.lru_cache(maxsize=1)
def _released_checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    heads = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in mmdet_head_shapes(384).items()}
    return cached_official_state_dict("s_det", dtype=torch.float32) | heads


def released_checkpoint() -> dict[str, torch.Tensor]:
    """A random mmdet 2.x ViT-CoMer-S (DINOv2 config) Mask R-CNN state dict, as in a released ``.pth``."""
    return dict(_released_checkpoint())


@pytest.fixture(scope="module")
def detector():
    return build_detector("comer_s_det")


def test_released_checkpoint_loads_strictly_and_round_trips(detector, tmp_path):
    source = released_checkpoint()
    path = tmp_path / "mask_rcnn_comer_s.pth"
    torch.save({"meta": {"mmdet_version": "2.22.0", "CLASSES": ["c"] * CLASSES}, "state_dict": source}, path)
    report = load_detector_checkpoint(detector, path)
    assert report.format == "official"
    assert report.head_keys == sorted(k for k in source if not k.startswith("backbone."))
    state = detector.state_dict()
    assert len(state) == len(source)  # nothing of ours is left out, nothing extra is made up
    for key, value in source.items():
        ours = key if not key.startswith("backbone.") else "backbone." + official_to_ours(key)
        assert torch.equal(state[ours], value.to(state[ours].dtype)), key
    # our own state dict (our backbone names) loads back, equal tensor for tensor, over zeroed weights
    state = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for tensor in detector.state_dict().values():
            tensor.zero_()
    assert load_detector_checkpoint(detector, {"state_dict": state}).format == "comer"
    assert all(torch.equal(v, state[k]) for k, v in detector.state_dict().items())


def test_missing_and_unexpected_keys_are_named_and_nothing_is_loaded(detector):
    source = released_checkpoint()
    del source["roi_head.mask_head.conv_logits.bias"]
    source["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(3)
    before = {k: v.clone() for k, v in detector.state_dict().items() if k.startswith(("backbone.level", "neck.lateral"))}
    with pytest.raises(CheckpointKeyError, match=r"(?s)head keys do not match the detector; unexpected:\s+"
                                                 r"roi_head\.bbox_head\.fc_extra\.weight\s+missing:\s+"
                                                 r"roi_head\.mask_head\.conv_logits\.bias$"):
        load_detector_checkpoint(detector, {"state_dict": source})
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in before.items())


def test_a_checkpoint_for_other_classes_names_the_shapes():
    with torch.device("meta"):  # the checks run before any tensor is loaded
        small = build_detector("comer_s_det", num_classes=3)
    with pytest.raises(CheckpointShapeError, match=r"roi_head\.bbox_head\.fc_cls\.weight: checkpoint \(81, 1024\) "
                                                   r"vs model \(4, 1024\)"):
        load_detector_checkpoint(small, released_checkpoint())


def test_a_missing_backbone_key_is_named():
    source = released_checkpoint()
    del source["backbone.blocks.3.gamma1"]
    with torch.device("meta"):
        detector = build_detector("comer_s_det")
    with pytest.raises(CheckpointKeyError, match=r"vit\.blocks\.3\.ls1\.gamma"):
        load_detector_checkpoint(detector, source)
