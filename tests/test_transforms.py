import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from comer.data.ade20k import collate_samples
from comer.data.seeding import seed_pipeline
from comer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CatMaxRatioCrop,
    PhotoMetricDistortion,
    RatioRangeResize,
    build_test_transform,
    build_train_transform,
    normalize_images,
    rescale_size,
)

PALETTE = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0], [0, 250, 250]], np.float32)


def _coded_sample(rng, h, w, block=8):
    """Blocky random labels and an image whose colour is the label's palette entry."""
    coarse = rng.integers(0, len(PALETTE), size=(-(-h // block), -(-w // block)))
    label = np.kron(coarse, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
    return PALETTE[label].astype(np.uint8), label


def test_rescale_size_matches_mmcv_rule():
    # factor = min(2048/long, 512/short), sides rounded half up
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 1000, (2048, 512)) == (512, 1707)  # short side limits: 1000*512/300 = 1706.7
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side limits: 100*2.048 = 204.8
    assert rescale_size(1000, 300, (512, 2048)) == (1707, 512)  # scale order does not matter


def test_ratio_range_resize_sizes_follow_the_sampled_ratio():
    t = A.Compose([RatioRangeResize((2048, 512), (0.5, 2.0))])
    image = np.zeros((300, 400, 3), np.uint8)
    shorts = []
    for seed in range(40):
        seed_pipeline(t, seed)
        h, w = t(image=image, mask=np.zeros((300, 400), np.uint8))["image"].shape[:2]
        assert abs(w / h - 4 / 3) < 0.01
        shorts.append(h)
    # short side = int(512 r) (the long side never limits for 4:3), r in [0.5, 2]
    assert 256 <= min(shorts) and max(shorts) <= 1024
    assert max(shorts) - min(shorts) > 300  # the ratio really varies


def test_train_pipeline_then_collate_and_device_normalisation_pad_as_mmseg():
    """Normalise, then pad to the crop (image 0, label 255): the pipeline keeps uint8 at the image's size,
    the collate pads and records the size, normalize_images normalises and zeroes the padding."""
    t = build_train_transform(64, (128, 32), (1.0, 1.0), 1.0, photometric=False)
    seed_pipeline(t, 0)
    image = np.full((20, 30, 3), 100, np.uint8)  # rescaled to (32, 48): smaller than the crop
    label = np.full((20, 30), 3, np.uint8)
    out = t(image=image, mask=label)
    assert out["image"].shape == (32, 48, 3) and out["image"].dtype == np.uint8 and out["mask"].shape == (32, 48)
    sample = {"image": torch.from_numpy(out["image"]).permute(2, 0, 1), "label": torch.from_numpy(out["mask"]),
              "path": "x.jpg", "skipped": []}
    batch = collate_samples([sample], pad_to=(64, 64))
    assert batch["image_sizes"] == [(32, 48)]
    images = normalize_images(batch["image"], batch["image_sizes"])
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32
    expected = (100 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(images[0, :, :32, :48].numpy(), np.broadcast_to(expected[:, None, None], (3, 32, 48)),
                               rtol=1e-6)
    assert (images[0, :, 32:] == 0).all() and (images[0, :, :, 48:] == 0).all()  # image pad 0 (bottom/right)
    mask = batch["label"][0]
    assert (mask[:32, :48] == 3).all()
    assert (mask[32:] == 255).all() and (mask[:, 48:] == 255).all()  # label pad 255


@pytest.mark.parametrize("seed", range(6))
def test_crop_and_flip_keep_label_exactly_aligned(seed):
    image, label = _coded_sample(np.random.default_rng(seed), 90, 120)
    # scale (120, 90) with ratio 1 leaves a 90x120 image at its size: only crop + flip act
    t = build_train_transform(48, (120, 90), (1.0, 1.0), 0.75, photometric=False)
    seed_pipeline(t, seed)
    out = t(image=image, mask=label)
    np.testing.assert_array_equal(out["image"], PALETTE[out["mask"]])


@pytest.mark.parametrize("seed", range(6))
def test_label_stays_aligned_with_image_through_resize_crop_flip(seed):
    image, label = _coded_sample(np.random.default_rng(seed), 90, 120, block=16)
    t = build_train_transform(48, (240, 90), (0.5, 2.0), 0.75, photometric=False)
    seed_pipeline(t, seed)
    out = t(image=image, mask=label)
    dist = ((out["image"][..., None, :] - PALETTE) ** 2).sum(-1)
    pure = (dist.min(-1) < 1) & (out["mask"] != 255)  # pixels away from bilinear-blended edges
    assert pure.mean() > 0.8
    agreement = (dist.argmin(-1)[pure] == out["mask"][pure]).mean()
    # cv2 nearest (label) and bilinear (image) sample slightly different source pixels on strong
    # downscales; a flipped or shifted crop gives 0.0-0.7 here
    assert agreement > 0.9


def test_flip_really_flips_both():
    image, label = _coded_sample(np.random.default_rng(0), 32, 32)
    t = A.Compose([A.HorizontalFlip(p=1.0)])
    out = t(image=image, mask=label)
    np.testing.assert_array_equal(out["mask"], label[:, ::-1])
    np.testing.assert_array_equal(out["image"], image[:, ::-1])


def _acceptable_by_unique(label, ratio, ignore_index=255):
    """mmseg's RandomCrop test, written as mmseg writes it."""
    values, counts = np.unique(label, return_counts=True)
    counts = counts[values != ignore_index]
    return len(counts) > 1 and np.max(counts) / np.sum(counts) < ratio


def test_cat_max_ratio_histogram_test_equals_mmsegs_unique_test():
    rng = np.random.default_rng(0)
    crop = CatMaxRatioCrop(8, 0.75)
    decisions = []
    for trial in range(400):
        label = rng.choice([0, 1, 2, 149, 255], p=rng.dirichlet(np.full(5, 0.3)), size=(12, 16)).astype(np.uint8)
        view = label[2:10, 3:11]  # a crop is a strided view
        decisions.append(crop._acceptable(view))
        assert decisions[-1] == _acceptable_by_unique(view, 0.75)
    assert 0.2 < np.mean(decisions) < 0.8  # both outcomes exercised


def test_cat_max_ratio_excludes_ignore_and_needs_two_classes():
    crop = CatMaxRatioCrop(4, 0.75)
    ignore_heavy = np.array([255] * 90 + [0] * 6 + [1] * 4, np.uint8)  # 0.6 of the labelled pixels
    assert crop._acceptable(ignore_heavy)
    assert not crop._acceptable(np.array([0] * 80 + [1] * 20, np.uint8))  # 0.8 >= 0.75
    assert not crop._acceptable(np.array([255] * 50 + [2] * 50, np.uint8))  # a single class


def test_cat_max_ratio_crop_rejects_dominated_crops():
    label = np.zeros((100, 100), np.uint8)
    label[:50, :50] = 1
    image = np.zeros((100, 100, 3), np.uint8)

    def acceptance(ratio):
        t = A.Compose([CatMaxRatioCrop(40, ratio)])
        ok = 0
        for seed in range(100):
            seed_pipeline(t, seed)
            out = t(image=image, mask=label)
            assert out["mask"].shape == (40, 40)
            ok += CatMaxRatioCrop(40, 0.75)._acceptable(out["mask"])
        return ok / 100

    # a single uniform draw is acceptable ~1/3 of the time; 11 draws make it ~1 - (2/3)^11
    assert acceptance(1.0) < 0.45
    assert acceptance(0.75) > 0.9


def test_crop_smaller_image_keeps_its_size():
    t = A.Compose([CatMaxRatioCrop((64, 64), 0.75)])
    out = t(image=np.zeros((30, 100, 3), np.uint8), mask=np.zeros((30, 100), np.uint8))
    assert out["image"].shape == (30, 64, 3)


def test_photometric_steps_numbers():
    pmd = PhotoMetricDistortion()
    grey = np.full((2, 2, 3), 100, np.uint8)
    none = dict(brightness=None, contrast_first=True, contrast=None, saturation=None, hue=None)
    # brightness: +20.7 -> 120.7 truncated to 120; clipped at 255
    assert (pmd.apply(grey, **{**none, "brightness": 20.7}) == 120).all()
    assert (pmd.apply(grey, **{**none, "brightness": 200.0}) == 255).all()
    # contrast x1.5 before vs after a brightness that clips differs as mmseg's order implies
    bright = np.full((1, 1, 3), 200, np.uint8)
    first = pmd.apply(bright, **{**none, "brightness": -100.0, "contrast": 1.5, "contrast_first": True})
    last = pmd.apply(bright, **{**none, "brightness": -100.0, "contrast": 1.5, "contrast_first": False})
    assert (first == 150).all() and (last == 150).all()  # brightness always precedes contrast
    # hue: +60 on OpenCV's 0..180 scale turns red into green; saturation 0.5 halves S
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_array_equal(pmd.apply(red, **{**none, "hue": 60})[0, 0], [0, 255, 0])
    half = pmd.apply(red, **{**none, "saturation": 0.5})[0, 0]
    assert half[0] == 255 and abs(int(half[1]) - 128) <= 1 and half[1] == half[2]


def _photometric_by_float_steps(img, brightness, contrast_first, contrast, saturation, hue):
    """mmseg's PhotoMetricDistortion steps on whole images in float32 (the tables must give these pixels)."""
    def convert(values, alpha=1.0, beta=0.0):
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if brightness is not None:
        img = convert(img, beta=brightness)
    if contrast_first and contrast is not None:
        img = convert(img, alpha=contrast)
    if saturation is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = convert(hsv[..., 1], alpha=saturation)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if hue is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + hue) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and contrast is not None:
        img = convert(img, alpha=contrast)
    return img


def test_photometric_tables_give_the_float_steps_pixels():
    pmd = PhotoMetricDistortion()
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image[:4] = 0
    image[4:8] = 255  # clipping at both ends
    for seed in range(300):
        pmd.set_random_seed(seed)
        params = pmd.get_params()
        np.testing.assert_array_equal(pmd.apply(image, **params), _photometric_by_float_steps(image, **params))
    for extreme in (dict(brightness=-32.0, contrast=0.5, saturation=1.5, hue=-18),
                    dict(brightness=31.999, contrast=1.4999, saturation=0.5, hue=17)):
        params = dict(contrast_first=False, **extreme)
        np.testing.assert_array_equal(pmd.apply(image, **params), _photometric_by_float_steps(image, **params))


def test_photometric_random_parameters_stay_in_range():
    pmd = PhotoMetricDistortion()
    draws = []
    for seed in range(300):
        pmd.set_random_seed(seed)
        draws.append(pmd.get_params())
    hues = [d["hue"] for d in draws if d["hue"] is not None]
    brightness = [d["brightness"] for d in draws if d["brightness"] is not None]
    contrasts = [d["contrast"] for d in draws if d["contrast"] is not None]
    assert min(hues) >= -18 and max(hues) <= 17
    assert all(-32 <= b <= 32 for b in brightness) and all(0.5 <= c <= 1.5 for c in contrasts)
    for values in (hues, brightness, contrasts):
        assert 0.4 < len(values) / len(draws) < 0.6  # each step happens with probability 1/2


def test_normalisation_numbers():
    image = torch.zeros((1, 3, 2, 2), dtype=torch.uint8)
    image[:, 0], image[:, 1], image[:, 2] = 10, 128, 250
    out = normalize_images(image)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [(10 - 123.675) / 58.395, (128 - 116.28) / 57.12, (250 - 103.53) / 57.375],
                               rtol=1e-6)


def test_device_normalisation_is_bit_identical_to_the_cpu_normalise_it_replaces():
    """albumentations.Normalize (what the loader ran before) and normalize_images give the same floats."""
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    images[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [124, 116, 104]]
    cpu = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=1.0, p=1.0)
    expected = np.stack([cpu(image=image)["image"] for image in images]).transpose(0, 3, 1, 2)
    out = normalize_images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert torch.equal(out, torch.from_numpy(np.ascontiguousarray(expected)))
    other = normalize_images(torch.from_numpy(images).permute(0, 3, 1, 2), mean=(1, 2, 3), std=(2, 4, 8))
    torch.testing.assert_close(other[1, 2], (torch.from_numpy(images[1, ..., 2]).float() - 3) / 8)
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(out)


def test_test_transform_rounds_up_to_multiple_of_32():
    t = build_test_transform((2048, 512), 32)
    assert t(image=np.zeros((300, 1000, 3), np.uint8))["image"].shape == (512, 1728, 3)  # 1707 -> 1728
    assert t(image=np.zeros((100, 1000, 3), np.uint8))["image"].shape == (224, 2048, 3)  # 205 -> 224
    assert build_test_transform((2048, 512), None)(image=np.zeros((100, 1000, 3), np.uint8))["image"].shape == (205, 2048, 3)


def test_test_transform_ratio_scales_the_test_size_as_multiscaleflipaug():
    """mmseg MultiScaleFlipAug: scale (int(2048 r), int(512 r)), the original image rescaled to fit it."""
    image = np.zeros((512, 683, 3), np.uint8)
    sizes = {r: build_test_transform((2048, 512), 32, r)(image=image)["image"].shape[:2] for r in (0.5, 0.75, 1.25, 1.75)}
    # 0.75: fit (1536, 384) -> factor 0.75 -> (384, 512.25 -> 512); 1.75: (896, 1195.25 -> 1195) -> 1216
    assert sizes == {0.5: (256, 352), 0.75: (384, 512), 1.25: (640, 864), 1.75: (896, 1216)}
    with pytest.raises(ValueError, match="ratio"):
        build_test_transform((2048, 512), 32, 0.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="crop_size"):
        build_train_transform(0, (2048, 512), (0.5, 2.0), 0.75)
    with pytest.raises(ValueError, match="ratio_range"):
        build_train_transform(512, (2048, 512), (2.0, 0.5), 0.75)
    with pytest.raises(ValueError, match="cat_max_ratio"):
        build_train_transform(512, (2048, 512), (0.5, 2.0), 1.5)
