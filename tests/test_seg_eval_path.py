"""The evaluation data path end to end (datamodule -> SegmentationModule -> EncoderDecoder): multi-scale views
made as mmseg's MultiScaleFlipAug makes them, and unreadable validation images left out of the score."""
import logging

import cv2
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comer.data.datamodule import SegmentationDataModule
from comer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, rescale_size
from comer.models import EncoderDecoder
from comer.training import SegmentationModule, poly_warmup_scheduler
from test_data_ade20k import ADE, dm_kwargs, write_sample

NUM_CLASSES = 4


class PixelNet(nn.Module):
    """A fixed 'backbone' whose logits depend on each pixel and on the whole input's mean."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, NUM_CLASSES, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.3, 0.3, 0.3]])[..., None, None])
            self.proj.bias.zero_()

    def forward(self, x):
        return {"res2": self.proj(x) + x.mean(dim=(2, 3), keepdim=True)[:, :1]}


class Head(nn.Module):
    num_classes = NUM_CLASSES

    def forward(self, features):
        return features["res2"]


def module(**recipe):
    return SegmentationModule(
        EncoderDecoder(PixelNet(), Head()).eval(), optimizer=None, scheduler=None, layer_decay=1.0,
        num_classes=NUM_CLASSES, class_names=[f"c{i}" for i in range(NUM_CLASSES)], num_val_images_to_log=0,
        **{"inference_mode": "slide", "crop_size": 32, "stride": 21, **recipe})


def labelled_dataset(root, count, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (40, 60) if i % 2 else (50, 30)
        label = np.kron(rng.integers(0, NUM_CLASSES + 1, (h // 10, w // 10)), np.ones((10, 10), np.int64))
        image = (np.kron(rng.integers(0, 256, (h // 5, w // 5, 3)), np.ones((5, 5, 1))) + rng.integers(0, 20, (h, w, 3)))
        write_sample(root, "validation", f"ADE_valid_{i:04d}", label, np.clip(image, 0, 255).astype(np.uint8))
    write_sample(root, "training", "ADE_train_0000", np.ones((8, 8), np.int64))
    return root


def validate(root, **dm_over):
    kwargs = dm_kwargs(root, num_classes=NUM_CLASSES, class_names=[f"c{i}" for i in range(NUM_CLASSES)], **dm_over)
    datamodule = SegmentationDataModule(**kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=root,
                         enable_model_summary=False, enable_checkpointing=False)
    [metrics] = trainer.validate(module(), datamodule=datamodule, verbose=False)
    return metrics, datamodule


def test_unreadable_validation_image_is_left_out_of_the_score_and_named(tmp_path, caplog):
    full = labelled_dataset(tmp_path / "full", 5)
    without = labelled_dataset(tmp_path / "without", 5)
    for kind, suffix in (("images", "jpg"), ("annotations", "png")):
        (without / ADE / kind / "validation" / f"ADE_valid_0002.{suffix}").unlink()
    broken = labelled_dataset(tmp_path / "broken", 5)
    (broken / ADE / "images" / "validation" / "ADE_valid_0002.jpg").write_bytes(b"\xff\xd8 truncated")

    reference, _ = validate(without)
    everything, _ = validate(full)
    with caplog.at_level(logging.WARNING, logger="comer.data.resumable"):
        scored, datamodule = validate(broken, skip_unreadable=True, num_workers=2)
    assert everything["val/mIoU"] != pytest.approx(reference["val/mIoU"])  # the image matters to the score
    for key in ("val/mIoU", "val/aAcc", "val/mAcc"):
        assert scored[key] == pytest.approx(reference[key], abs=1e-7)
    path = str(broken / ADE / "images" / "validation" / "ADE_valid_0002.jpg")
    assert datamodule.skipped_samples() == {"validation": [path]}
    assert f"left out '{path}' from split 'validation' (1 file(s)" in caplog.text


def test_without_skip_unreadable_the_run_stops_naming_the_file(tmp_path):
    broken = labelled_dataset(tmp_path, 2)
    (broken / ADE / "images" / "validation" / "ADE_valid_0001.jpg").write_bytes(b"")
    with pytest.raises(Exception, match=r"ADE_valid_0001\.jpg"):
        validate(broken)


def mmseg_views_by_hand(image, test_scale, ratios, size_divisor=32):
    """MultiScaleFlipAug(img_scale, img_ratios) + Resize(keep_ratio) + ResizeToMultiple + Normalize,
    written out with OpenCV on the original image."""
    views = []
    for ratio in ratios:
        scale = (int(test_scale[0] * ratio), int(test_scale[1] * ratio))
        h, w = rescale_size(*image.shape[:2], scale)
        view = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        h2, w2 = -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor
        if (h2, w2) != (h, w):
            view = cv2.resize(view, (w2, h2), interpolation=cv2.INTER_LINEAR)
        normalised = (view.astype(np.float32) - np.float32(IMAGENET_MEAN)) * np.reciprocal(np.float32(IMAGENET_STD))
        views.append(torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None])
    return views


@pytest.mark.parametrize("flip", [False, True])
def test_multiscale_test_rescales_the_original_image_per_scale(tmp_path, flip):
    root = labelled_dataset(tmp_path, 2)
    ratios = (0.5, 0.75, 1.0, 1.5)
    kwargs = dm_kwargs(root, num_classes=NUM_CLASSES, class_names=[f"c{i}" for i in range(NUM_CLASSES)],
                       test_scale=(96, 48), test_ratios=ratios)
    datamodule = SegmentationDataModule(**kwargs)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    net = module(scales=list(ratios), flip=flip)

    original = cv2.cvtColor(cv2.imread(batch["path"][0]), cv2.COLOR_BGR2RGB)
    expected_views = mmseg_views_by_hand(original, (96, 48), ratios)
    views = net._test_views(batch)
    sizes = [tuple(v.shape[-2:]) for v in views]
    assert sizes == [tuple(e.shape[-2:]) for e in expected_views] and len(set(sizes)) == len(ratios)
    for view, expected in zip(views, expected_views):
        assert torch.equal(view, expected)

    # mmseg's aug_test: per view (and flip) slide logits -> resized to the original size -> softmax, averaged
    model = net.model
    probs = []
    for view in expected_views:
        for flipped in ((False, True) if flip else (False,)):
            x = view.flip(-1) if flipped else view
            logits = F.interpolate(model.slide_logits(x, (32, 32), (21, 21)), size=original.shape[:2], mode="bilinear",
                                   align_corners=False).softmax(1)
            probs.append(logits.flip(-1) if flipped else logits)
    expected = torch.stack(probs).mean(0).argmax(1)
    with torch.no_grad():
        predicted = net.predict_labels(views, original.shape[:2])
    assert torch.equal(predicted, expected)
    single = net.predict_labels(views[2:3], original.shape[:2])
    assert not torch.equal(single, predicted)  # the other scales do change the prediction
