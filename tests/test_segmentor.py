"""EncoderDecoder: losses (golden values, mmseg's cross-entropy, aux weight, all-ignore batches),
sliding-window inference against whole-image inference, flip and multi-scale TTA, build_segmentor."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comer.heads import FCNHead, UPerHead
from comer.models import EncoderDecoder, build_segmentor
from comer.models.segmentor import window_starts

from comer import ShapeSpec


class PyramidStub(nn.Module):
    """Backbone with the contract's interface: res2..res5 at strides 4..32 (1x1 conv + avg pool)."""

    def __init__(self, channels=(6, 8, 10, 12)):
        super().__init__()
        self.strides = (4, 8, 16, 32)
        self.names = ("res2", "res3", "res4", "res5")
        self.projs = nn.ModuleList(nn.Conv2d(3, c, 1) for c in channels)

    def output_shape(self):
        return {n: ShapeSpec(p.out_channels, s) for n, p, s in zip(self.names, self.projs, self.strides)}

    def forward(self, x):
        return {n: F.avg_pool2d(p(x), s) for n, p, s in zip(self.names, self.projs, self.strides)}


class PixelStub(nn.Module):
    """Stride-1 'backbone' computing a per-pixel function: translation-equivariant."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.proj = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return {"res2": self.proj(x)}


class Passthrough(nn.Module):
    def __init__(self, num_classes, feature="res2"):
        super().__init__()
        self.num_classes = num_classes
        self.feature = feature

    def forward(self, features):
        return features[self.feature]


class WindowMean(nn.Module):
    """Backbone whose output at every pixel is the mean of its whole input (depends on the window)."""

    def forward(self, x):
        return {"res2": x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()}


def tiny_segmentor(num_classes=5, **kwargs):
    return build_segmentor(
        PyramidStub(),
        partial(UPerHead, channels=8, pool_scales=(1, 2)),
        partial(FCNHead, channels=8),
        num_classes=num_classes,
        **kwargs,
    )


def pixel_model(num_classes=4):
    return EncoderDecoder(PixelStub(num_classes), Passthrough(num_classes)).eval()


def fixed_batch():
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 5, (2, 64, 64), generator=generator)
    labels[:, :8] = 255
    return images, labels


def test_loss_golden_and_equals_cross_entropy():
    model = tiny_segmentor().eval()  # eval: BN running stats and no dropout -> deterministic
    images, labels = fixed_batch()
    losses = model.loss(images, labels)
    assert set(losses) == {"loss_seg", "loss_aux"}
    features = model.backbone(images)
    up = partial(F.interpolate, size=(64, 64), mode="bilinear", align_corners=False)
    # mmseg's CrossEntropyLoss (avg_non_ignore=False): mean over all pixels, ignored ones count 0.
    seg = F.cross_entropy(up(model.decode_head(features)), labels, ignore_index=255, reduction="none").mean()
    aux = F.cross_entropy(up(model.auxiliary_head(features)), labels, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(losses["loss_seg"], seg)
    torch.testing.assert_close(losses["loss_aux"], 0.4 * aux)
    # Golden values, computed once with torch 2.13 CPU (seed 0 for the weights, 1234 for the batch).
    torch.testing.assert_close(losses["loss_seg"].item(), GOLDEN_SEG, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_aux"].item(), GOLDEN_AUX, rtol=1e-5, atol=1e-6)


# Near-zero initial logits: each loss is about ln(5) * 56/64 valid rows = 1.408 (aux times 0.4).
GOLDEN_SEG = 1.4086174964904785
GOLDEN_AUX = 0.5633176565170288


def test_avg_non_ignore_equals_plain_cross_entropy_at_label_size():
    model = tiny_segmentor(avg_non_ignore=True, aux_loss_weight=1.0).eval()
    images, _ = fixed_batch()
    labels = torch.randint(0, 5, (2, 40, 48))  # labels at another size: logits resized to them
    labels[0, :10] = 255
    losses = model.loss(images, labels)
    features = model.backbone(images)
    up = partial(F.interpolate, size=(40, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["loss_seg"], F.cross_entropy(up(model.decode_head(features)), labels, ignore_index=255))
    torch.testing.assert_close(losses["loss_aux"], F.cross_entropy(up(model.auxiliary_head(features)), labels, ignore_index=255))


def test_aux_weight_scales_aux_loss():
    images, labels = fixed_batch()
    torch.manual_seed(3)
    weighted = tiny_segmentor().eval()
    plain = tiny_segmentor(aux_loss_weight=1.0).eval()
    plain.load_state_dict(weighted.state_dict())
    ratio = weighted.loss(images, labels)["loss_aux"] / plain.loss(images, labels)["loss_aux"]
    torch.testing.assert_close(ratio, torch.tensor(0.4))
    assert "loss_aux" not in EncoderDecoder(weighted.backbone, weighted.decode_head).loss(images, labels)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_all_ignored_batch_gives_zero_loss_and_zero_grads(avg_non_ignore):
    model = tiny_segmentor(avg_non_ignore=avg_non_ignore).train()
    images, _ = fixed_batch()
    labels = torch.full((2, 64, 64), 255, dtype=torch.int64)
    losses = model.loss(images, labels)
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() == 0.0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.all(g == 0) for g in grads)


def test_bad_labels_are_rejected():
    model = tiny_segmentor().eval()
    images, labels = fixed_batch()
    labels[0, 20, 20] = 7
    with pytest.raises(ValueError, match=r"\[7\].*outside \[0, 5\)"):
        model.loss(images, labels)
    with pytest.raises(ValueError, match="int64"):
        model.loss(images, labels.float())


def test_window_starts_clip_to_the_image():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]  # last window shifted back to end at 683
    assert window_starts(1200, 512, 341) == [0, 341, 682, 688]
    assert window_starts(100, 128, 64) == [0]  # shorter than the crop: one window, the whole axis


def test_slide_equals_whole_when_window_covers_image():
    model = tiny_segmentor().eval()
    images, _ = fixed_batch()
    whole = model.inference(images, mode="whole")
    slide = model.inference(images, mode="slide", crop_size=(64, 64), stride=(48, 48))
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(whole, model(images).softmax(1))
    torch.testing.assert_close(whole.sum(1), torch.ones(2, 64, 64))


@pytest.mark.parametrize("crop, stride", [((32, 32), (20, 12)), ((48, 96), (16, 40)), ((96, 96), (64, 64))])
def test_slide_equals_whole_for_translation_equivariant_model(crop, stride):
    model = pixel_model()
    images = torch.randn(2, 3, 64, 80)
    whole = model.inference(images, mode="whole")
    slide = model.inference(images, mode="slide", crop_size=crop, stride=stride)
    torch.testing.assert_close(slide, whole)


def test_slide_averages_overlaps_with_count_map():
    # Each window predicts its own mean; overlapping windows are averaged pixel by pixel.
    model = EncoderDecoder(WindowMean(), Passthrough(3)).eval()
    ramp = torch.arange(64.0).expand(1, 3, 32, 64).contiguous()  # value = column index
    logits = model.slide_logits(ramp, crop_size=(32, 32), stride=(32, 16))
    # windows start at columns 0, 16, 32 with means 15.5, 31.5, 47.5
    expected = torch.cat([torch.full((16,), 15.5), torch.full((16,), 23.5), torch.full((16,), 39.5), torch.full((16,), 47.5)])
    torch.testing.assert_close(logits[0, 0, 5], expected)


@pytest.mark.parametrize("max_windows", [1, 2, 8])
def test_slide_windows_batched_in_chunks_keep_images_apart(max_windows):
    """Windows of a batch of 2 go through the network in chunks; each image still gets its own windows."""
    model = EncoderDecoder(WindowMean(), Passthrough(3), max_windows_per_forward=max_windows).eval()
    images = torch.stack([torch.arange(64.0).expand(3, 32, 64), -torch.arange(64.0).expand(3, 32, 64)])
    logits = model.slide_logits(images, crop_size=(32, 32), stride=(32, 16))
    expected = torch.cat([torch.full((16,), 15.5), torch.full((16,), 23.5), torch.full((16,), 39.5), torch.full((16,), 47.5)])
    torch.testing.assert_close(logits[0, 0, 5], expected)
    torch.testing.assert_close(logits[1, 0, 5], -expected)


def test_flip_tta_flips_back_and_averages_probabilities():
    images = torch.randn(1, 3, 32, 64)
    model = pixel_model()  # per-pixel model: its flipped prediction flipped back is the same
    torch.testing.assert_close(model.inference(images, flip=True), model.inference(images))

    class RampHead(Passthrough):  # not flip-equivariant: adds a left-to-right ramp to class 0
        def forward(self, features):
            x = features["res2"].clone()
            x[:, 0] += torch.linspace(-2, 2, x.shape[-1])
            return x

    model = EncoderDecoder(PixelStub(), RampHead(4)).eval()
    with torch.no_grad():
        direct = model(images).softmax(1)
        mirrored = model(images.flip(-1)).softmax(1).flip(-1)
    torch.testing.assert_close(model.inference(images, flip=True), (direct + mirrored) / 2)
    assert not torch.allclose(direct, mirrored, atol=1e-3)


def test_multiscale_views_are_used_as_given_and_averaged():
    """Each test scale's view comes from the data pipeline (resized from the original image); the model
    feeds each as it is and averages the probabilities at the output size."""
    seen = []

    class SizeProbe(nn.Module):  # logits: class 0 gets height/32 everywhere, class 1 gets 0
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            logits = torch.zeros(x.shape[0], 2, x.shape[2], x.shape[3])
            logits[:, 0] = x.shape[2] / 32
            return {"res2": logits}

    model = EncoderDecoder(SizeProbe(), Passthrough(2)).eval()
    views = [torch.zeros(1, 3, 32, 64), torch.zeros(1, 3, 64, 96), torch.zeros(1, 3, 96, 128)]
    probs = model.inference(views, output_size=(50, 70))
    assert seen == [(32, 64), (64, 96), (96, 128)]
    expected = sum(torch.sigmoid(torch.tensor(float(k))) for k in (1, 2, 3)) / 3
    assert probs.shape == (1, 2, 50, 70)
    torch.testing.assert_close(probs[0, 0], torch.full((50, 70), expected.item()))
    torch.testing.assert_close(model.inference(views[1]), model.inference([views[1]]))
    seen.clear()
    model.inference(views[:2], mode="slide", crop_size=(48, 48), stride=(32, 32), flip=True, output_size=(50, 70))
    assert set(seen) == {(32, 48), (48, 48)}  # views slid separately (window height = the view's 32)


class ShapeRecorder(nn.Module):
    """A backbone that depends on its whole input (not translation-equivariant) and records input sizes."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.proj = nn.Conv2d(3, num_classes, 3, padding=1)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape))
        return {"res2": self.proj(x) + x.mean(dim=(1, 2, 3), keepdim=True)}


def mmseg_slide_by_hand(model, image, crop, stride, num_classes):
    """mmseg 0.x EncoderDecoder.slide_inference, one window at a time."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    _, _, h_img, w_img = image.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = image.new_zeros((1, num_classes, h_img, w_img))
    count = image.new_zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            logits = model(image[:, :, y1:y2, x1:x2])
            preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@pytest.mark.parametrize("max_windows", [1, 3, 8])
def test_slide_feeds_windows_of_an_elongated_image_unpadded(max_windows):
    """An image shorter than the crop (ADE20K images more than 4:1 after the test resize): every window is
    the image's full height, fed without padding, as mmseg does."""
    model = EncoderDecoder(ShapeRecorder(), Passthrough(3), max_windows_per_forward=max_windows).eval()
    image = torch.randn(1, 3, 32, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.slide_logits(image, crop_size=(64, 64), stride=(43, 43))
    windows = len(window_starts(200, 64, 43))
    assert {size[1:] for size in model.backbone.sizes} == {(3, 32, 64)}  # never padded to 64x64
    assert sum(size[0] for size in model.backbone.sizes) == windows
    assert max(size[0] for size in model.backbone.sizes) == min(max_windows, windows)
    model.backbone.sizes.clear()
    with torch.no_grad():
        expected = mmseg_slide_by_hand(model, image, (64, 64), (43, 43), 3)
    torch.testing.assert_close(logits, expected)
    padded = F.pad(image[..., :64], (0, 0, 0, 32))  # what zero-padding a window would have fed instead
    with torch.no_grad():
        assert not torch.allclose(model(padded)[..., :32, :], model(image[..., :64]), atol=1e-3)


def test_inference_rejects_bad_arguments():
    model = pixel_model()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="'tiles'"):
        model.inference(images, mode="tiles")
    with pytest.raises(ValueError, match="gaps"):
        model.inference(images, mode="slide", crop_size=(16, 16), stride=(20, 20))
    with pytest.raises(ValueError, match="crop_size"):
        model.inference(images, mode="slide", crop_size=(0, 16), stride=(8, 8))


def test_build_segmentor_reads_channels_from_backbone():
    backbone = PyramidStub(channels=(6, 8, 10, 12))
    model = build_segmentor(backbone, partial(UPerHead, channels=8), partial(FCNHead, channels=4), num_classes=7)
    assert model.decode_head.lateral_convs[0].conv.in_channels == 6
    assert model.decode_head.psp_modules[0][1].conv.in_channels == 12
    assert model.auxiliary_head.convs[0].conv.in_channels == 10
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7, 64, 64)
    assert build_segmentor(backbone, partial(UPerHead, channels=8), num_classes=7).auxiliary_head is None
    with pytest.raises(TypeError, match="factories"):
        build_segmentor(backbone, UPerHead(backbone.output_shape(), num_classes=7), num_classes=7)
    with pytest.raises(TypeError, match="output_shape"):
        build_segmentor(nn.Identity(), partial(UPerHead), num_classes=7)
