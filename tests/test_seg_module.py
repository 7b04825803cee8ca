"""SegmentationModule on CPU with tiny stub segmentors (the EncoderDecoder contract: loss / inference), fed
uint8 batches as the datamodules make them."""
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from comer.training import NonFiniteLossError, SegmentationModule, poly_warmup_scheduler
from comer.data.transforms import IMAGENET_MEAN, normalize_images
from comer.training.visualization import PANEL_CAPTIONS, caption_band, default_palette

NUM_CLASSES = 3
CLASS_NAMES = ["sky", "road", "car"]
DIM = 8


class StubSegmentor(nn.Module):
    """backbone.vit.{patch_embed, pos_embed, blocks} + a CNN-branch conv + decode/auxiliary heads."""

    def __init__(self, nan_at_call: int | None = None):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.vit = nn.Module()
        self.backbone.vit.patch_embed = nn.Conv2d(3, DIM, 1)
        self.backbone.vit.pos_embed = nn.Parameter(torch.zeros(1, DIM, 1, 1))
        self.backbone.vit.blocks = nn.ModuleList(nn.Conv2d(DIM, DIM, 1) for _ in range(2))
        self.backbone.spm = nn.Conv2d(3, DIM, 3, padding=1)
        self.decode_head = nn.Conv2d(DIM, NUM_CLASSES, 1)
        self.auxiliary_head = nn.Conv2d(DIM, NUM_CLASSES, 1)
        self.nan_at_call = nan_at_call
        self.loss_calls = 0
        self.inference_calls = []

    def features(self, images):
        x = self.backbone.vit.patch_embed(images) + self.backbone.vit.pos_embed
        for block in self.backbone.vit.blocks:
            x = x + torch.relu(block(x))
        return x + self.backbone.spm(images)

    def loss(self, images, labels):
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        x = self.features(images)
        losses = {"loss_seg": F.cross_entropy(self.decode_head(x), labels, ignore_index=255),
                  "loss_aux": 0.4 * F.cross_entropy(self.auxiliary_head(x), labels, ignore_index=255)}
        if self.loss_calls == self.nan_at_call:
            losses["loss_seg"] = losses["loss_seg"] * float("nan")
        self.loss_calls += 1
        return losses

    def inference(self, views, mode, crop_size, stride, flip, output_size):
        self.inference_calls.append(dict(mode=mode, crop_size=crop_size, stride=stride, flip=flip,
                                         views=[v.clone() for v in views]))
        probs = [F.interpolate(self.decode_head(self.features(v)), size=output_size, mode="bilinear").softmax(dim=1)
                 for v in views]
        return sum(probs) / len(probs)


class FixedPrediction(StubSegmentor):
    """Predicts a given class map per image, looked up by its first normalised value: 0 below 1, else 1."""

    def __init__(self, maps: dict[int, torch.Tensor]):
        super().__init__()
        self.maps = maps

    def inference(self, views, mode, crop_size, stride, flip, output_size):
        key = int(float(views[0][0, 0, 0, 0]) > 1.0)
        pred = self.maps[key]
        assert tuple(output_size) == tuple(pred.shape)
        return F.one_hot(pred, NUM_CLASSES).permute(2, 0, 1)[None].float()


def _module(model, lr=0.05, warmup_iters=5, **overrides):
    args = dict(model=model, optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
                scheduler=partial(poly_warmup_scheduler, power=1.0, min_lr=0.0, warmup_iters=warmup_iters,
                                  warmup_ratio=1e-6),
                layer_decay=0.9, num_classes=NUM_CLASSES, class_names=CLASS_NAMES, inference_mode="slide",
                crop_size=[8, 8], stride=6, num_val_images_to_log=2)
    return SegmentationModule(**(args | overrides))


def _trainer(tmp_path, max_steps, **kwargs):
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                limit_val_batches=0, default_root_dir=tmp_path, log_every_n_steps=1)
    return pl.Trainer(**(args | kwargs))


def _collate(items):
    batch = {"image": torch.stack([i["image"] for i in items]), "label": torch.stack([i["label"] for i in items]),
             "path": [i["path"] for i in items]}
    if "views" in items[0]:
        batch["views"] = tuple(torch.stack([i["views"][k] for i in items]) for k in range(len(items[0]["views"])))
        batch["ratios"] = items[0]["ratios"]
    return batch


def _train_loader(num_batches=20):
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
    label = ((image[0] > 124).to(torch.uint8) + (image[1] > 150).to(torch.uint8))
    label[0, :3] = 255
    items = [{"image": image, "label": label, "path": f"/data/img_{i}.jpg"} for i in range(2)]
    return DataLoader(items * num_batches, batch_size=2, collate_fn=_collate)


class Record(Callback):
    def __init__(self):
        self.losses, self.params = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def test_training_decreases_the_loss_and_logs(tmp_path):
    module = _module(StubSegmentor())
    record = Record()
    trainer = _trainer(tmp_path, 20, callbacks=[record])
    trainer.fit(module, train_dataloaders=_train_loader())
    assert trainer.global_step == 20
    assert record.losses[-1] < 0.7 * record.losses[0]
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_seg", "train/loss_aux", "train/lr", "train/images_per_sec"):
        assert key in metrics, key
    torch.testing.assert_close(metrics["train/loss"], metrics["train/loss_seg"] + metrics["train/loss_aux"])
    assert float(metrics["train/images_per_sec"]) > 0
    # The last step (iteration 19 of 20) ran at lr 0.05 * (1 - 19/20); stepped per iteration.
    assert float(metrics["train/lr"]) == pytest.approx(0.05 / 20, rel=1e-5)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["layer_0_decay"]["lr_scale"] == pytest.approx(0.9 ** 3)
    assert groups["layer_3_decay"]["initial_lr"] == pytest.approx(0.05)


def test_non_finite_loss_raises_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    module = _module(StubSegmentor(nan_at_call=3))
    record = Record()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, 10, callbacks=[record, checkpoints], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match=r"global step 3\b.*img_0\.jpg.*img_1\.jpg"):
        trainer.fit(module, train_dataloaders=_train_loader())
    assert len(record.params) == 3
    for now, before in zip(module.parameters(), record.params[-1]):
        torch.testing.assert_close(now.detach(), before, rtol=0, atol=0)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_resume_continues_the_schedule_with_hydra_style_arguments(tmp_path):
    listy = dict(crop_size=OmegaConf.create([8, 8]), scales=OmegaConf.create([1.0]),
                 class_names=OmegaConf.create(CLASS_NAMES), palette=OmegaConf.create([[1, 2, 3]] * 3))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = _trainer(tmp_path, 4, callbacks=[checkpoints], enable_checkpointing=True)
    first.fit(_module(StubSegmentor(), **listy), train_dataloaders=_train_loader())
    resumed = _trainer(tmp_path, 6)
    module = _module(StubSegmentor(), **listy)
    resumed.fit(module, train_dataloaders=_train_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.global_step == 6
    # max_iters is the resumed run's 6: after 6 scheduler steps the lr is 0.05 * (1 - 6/6) = 0.
    head = {g["name"]: g for g in resumed.optimizers[0].param_groups}["layer_3_decay"]
    assert head["lr"] == pytest.approx(0.0, abs=1e-12)
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 6
    restored = SegmentationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", model=StubSegmentor(),
                                                       optimizer=None, scheduler=None)
    assert restored.inference_kwargs == module.inference_kwargs
    assert restored.palette.tolist() == [[1, 2, 3]] * 3


# label 4x6 (original size) with two ignored pixels; image at the "test scale" 8x12.
LABEL_A = torch.tensor([[0, 0, 1, 1, 2, 2],
                        [0, 0, 1, 1, 2, 2],
                        [0, 0, 1, 1, 2, 255],
                        [0, 0, 1, 1, 2, 255]])
PRED_A = torch.tensor([[0, 1, 1, 1, 2, 2]] * 4)
LABEL_B = torch.zeros(4, 6, dtype=torch.long)
PRED_B = torch.zeros(4, 6, dtype=torch.long)


GREY = (124, 116, 104)  # the ImageNet mean rounded: about 0 once normalised (FixedPrediction key 0)
WHITE = (250, 250, 250)  # over 2 once normalised (key 1)


def _val_loader():
    items = [{"image": torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 12).contiguous(),
              "label": label.to(torch.uint8), "path": f"/val/{name}.jpg"}
             for rgb, label, name in ((GREY, LABEL_A, "a"), (WHITE, LABEL_B, "b"))]
    return DataLoader(items, batch_size=1, collate_fn=_collate)


def test_validation_metrics_over_the_whole_set_and_pictures(tmp_path):
    module = _module(FixedPrediction({0: PRED_A, 1: PRED_B}))
    trainer = _trainer(tmp_path, 1, logger=CSVLogger(tmp_path, name="csv"), limit_val_batches=None)
    results = trainer.validate(module, dataloaders=_val_loader(), verbose=False)[0]
    # Totals over both images: class 0 I=4+24 U=8+24; class 1 I=8 U=12; class 2 I=6 U=6.
    iou = [28 / 32, 8 / 12, 1.0]
    assert results["val/mIoU"] == pytest.approx(sum(iou) / 3, rel=1e-6)
    assert results["val/aAcc"] == pytest.approx((28 + 8 + 6) / (32 + 8 + 6), rel=1e-6)
    for name, value in zip(CLASS_NAMES, iou):
        assert results[f"val/IoU/{name}"] == pytest.approx(value, rel=1e-6)

    directory = tmp_path / "val_images" / "step_000000"  # the run directory, not the logger version folder
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["00_a.png", "01_b.png"]
    captioned = np.asarray(Image.open(directory / "00_a.png"))
    top = caption_band(PANEL_CAPTIONS, 6).shape[0]  # captions above, the legend below
    assert captioned.shape[1:] == (18, 3) and captioned.shape[0] > top + 4
    panel = captioned[top:top + 4]  # label size, image | prediction | truth
    grey = np.array(GREY, dtype=np.uint8)  # the pictures show the image's own pixels
    assert (grey == np.round(np.array(IMAGENET_MEAN))).all()
    np.testing.assert_array_equal(panel[:, :6], np.broadcast_to(grey, (4, 6, 3)))
    colour = default_palette(NUM_CLASSES)[1]
    blended = np.round(0.5 * grey + 0.5 * colour).astype(np.uint8)
    np.testing.assert_array_equal(panel[0, 6 + 1], blended)  # predicted class 1 at (0, 1)
    np.testing.assert_array_equal(panel[3, 12 + 5], grey)  # ignored pixel in the truth overlay
    tested = trainer.test(module, dataloaders=_val_loader(), verbose=False)[0]
    assert tested["test/mIoU"] == pytest.approx(sum(iou) / 3, rel=1e-6)
    assert tested["test/IoU/road"] == pytest.approx(8 / 12, rel=1e-6)
    # Running again starts the metric afresh: image b alone is all class 0, predicted right.
    only_b = DataLoader([_val_loader().dataset[1]], batch_size=1, collate_fn=_collate)
    again = trainer.validate(module, dataloaders=only_b, verbose=False)[0]
    assert again["val/mIoU"] == pytest.approx(1.0)
    assert np.isnan(again["val/IoU/road"])


def _multiscale_val_loader(ratios=(0.5, 1.0)):
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 8, 12), generator=g, dtype=torch.uint8)
    views = tuple(torch.randint(0, 256, (3, int(8 * r), int(12 * r)), generator=g, dtype=torch.uint8) for r in ratios)
    item = {"image": image, "views": views, "ratios": tuple(ratios), "label": LABEL_A.to(torch.uint8), "path": "/v/a.jpg"}
    return DataLoader([item], batch_size=1, collate_fn=_collate)


def test_inference_recipe_is_forwarded_and_predict_returns_label_maps(tmp_path):
    model = StubSegmentor()
    module = _module(model, inference_mode="whole", crop_size=16, stride=[10, 12], flip=True)
    trainer = _trainer(tmp_path, 1)
    maps = trainer.predict(module, dataloaders=_val_loader())
    call = model.inference_calls[0]
    assert {k: v for k, v in call.items() if k != "views"} == dict(mode="whole", crop_size=(16, 16), stride=(10, 12),
                                                                  flip=True)
    [view] = call["views"]  # the normalised image
    assert torch.equal(view, normalize_images(_val_loader().dataset[0]["image"][None]))
    assert [m[0].shape for m in maps] == [torch.Size([4, 6])] * 2
    assert maps[0][0].dtype == torch.int64


def test_multiscale_views_come_from_the_batch_normalised(tmp_path):
    model = StubSegmentor()
    module = _module(model, inference_mode="whole", scales=[0.5, 1.0])
    trainer = _trainer(tmp_path, 1, limit_val_batches=None)
    trainer.validate(module, dataloaders=_multiscale_val_loader(), verbose=False)
    views = model.inference_calls[0]["views"]
    item = _multiscale_val_loader().dataset[0]
    assert [tuple(v.shape) for v in views] == [(1, 3, 4, 6), (1, 3, 8, 12)]
    for view, raw in zip(views, item["views"]):
        assert torch.equal(view, normalize_images(raw[None]))
    with pytest.raises(ValueError, match=r"module.scales=\[0.5, 1.0\] but the batch holds test views for the ratios "
                                         r"\[1.0\].*test_ratios"):
        trainer.validate(module, dataloaders=_val_loader(), verbose=False)
    with pytest.raises(ValueError, match=r"ratios \[0.5, 1.0\]"):
        trainer.validate(_module(StubSegmentor()), dataloaders=_multiscale_val_loader(), verbose=False)


def test_training_normalises_uint8_batches_on_the_device_with_padding_at_zero(tmp_path):
    seen = []

    class Spy(StubSegmentor):
        def loss(self, images, labels):
            seen.append((images.clone(), labels.clone()))
            return super().loss(images, labels)

    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    label = torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    batch = {"image": image, "label": label, "image_sizes": [(8, 8), (5, 6)], "path": ["p", "q"]}
    trainer = _trainer(tmp_path, 1)
    trainer.fit(_module(Spy()), train_dataloaders=DataLoader([batch], batch_size=None))
    images, labels = seen[0]
    assert torch.equal(images, normalize_images(image, [(8, 8), (5, 6)]))
    assert (images[1, :, 5:] == 0).all() and (images[1, :, :, 6:] == 0).all() and (images[1, :, :5, :6] != 0).all()
    assert labels.dtype == torch.int64 and torch.equal(labels, label.long())


@pytest.mark.parametrize("overrides, match", [
    (dict(class_names=["a", "b"]), "class_names"),
    (dict(inference_mode="sliding"), "inference_mode"),
    (dict(crop_size=[8, 8, 8]), "crop_size"),
    (dict(palette=[[0, 0, 0]] * 2), "palette"),
])
def test_bad_arguments_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        _module(StubSegmentor(), **overrides)


def test_validation_pictures_go_to_wandb_when_it_is_the_logger(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    class RecordingWandb(WandbLogger):
        """Never starts a W&B run; records what the module sends."""

        def __init__(self):
            super().__init__(save_dir=str(tmp_path), offline=True)
            self.images = []
            self.tables = []

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, images, step, kwargs))

        def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
            self.tables.append((key, columns, data, step))

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    logger = RecordingWandb()
    module = _module(FixedPrediction({0: PRED_A, 1: PRED_B}), num_val_images_to_log=1)
    trainer = _trainer(tmp_path, 1, logger=logger, limit_val_batches=None)
    trainer.validate(module, dataloaders=_val_loader(), verbose=False)
    [(key, images, step, kwargs)] = logger.images
    assert key == "val/images" and step == 0
    assert len(images) == 1 and images[0].shape[1:] == (18, 3) and images[0].shape[0] > 4  # captioned
    assert kwargs["caption"][0].startswith("a:")
    # ... and the PNG is written in the logger's save_dir as well.
    assert [p.name for p in (tmp_path / "val_images" / "step_000000").iterdir()] == ["00_a.png"]
    # The per-class table goes to W&B as a table and to the run directory as text.
    [(key, columns, rows, step)] = logger.tables
    assert key == "val/per_class" and columns == ["class", "IoU", "Acc"] and step == 0
    assert [row[0] for row in rows] == list(module.class_names)
    assert "mIoU" in (tmp_path / "metric_tables" / "val_step_000000.txt").read_text()
