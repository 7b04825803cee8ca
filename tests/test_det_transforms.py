"""Detection augmentation: mmdet 2.x geometry on compact instances; image, boxes and masks stay aligned."""
import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from comer.data.det_transforms import (
    Compose,
    DetSample,
    OneOf,
    RandomCrop,
    RandomFlip,
    Resize,
    build_det_test_pipeline,
    build_det_train_pipeline,
    crop,
    finalize,
    hflip,
    mask_boxes,
    rasterize,
    resize,
)

COLOURS = np.array([(250, 20, 20), (20, 250, 20), (20, 20, 250), (250, 250, 20)], np.uint8)


def rect_polygon(x1, y1, x2, y2):
    return [np.array([x1, y1, x2, y1, x2, y2, x1, y2], np.float64)]


def rectangles_sample(height=60, width=80, rects=((5, 5, 30, 25), (40, 10, 75, 50), (10, 35, 35, 58)), bitmap=()):
    """A grey image with one uniquely coloured rectangle per instance; polygon masks (bitmaps for indices in
    ``bitmap``), boxes equal to the rectangles."""
    image = np.full((height, width, 3), 128, np.uint8)
    masks = []
    for i, (x1, y1, x2, y2) in enumerate(rects):
        image[y1:y2, x1:x2] = COLOURS[i]
        if i in bitmap:
            m = np.zeros((height, width), np.uint8)
            m[y1:y2, x1:x2] = 1
            masks.append(m)
        else:
            masks.append(rect_polygon(x1, y1, x2, y2))
    boxes = np.array(rects, np.float32).reshape(-1, 4)
    return DetSample(image, boxes, np.arange(len(rects), dtype=np.int64), masks)


def assert_aligned(target, colours=COLOURS, box_tol=1.01):
    """Box == box of its mask (within rounding); the instance's coloured rectangle sits where its mask is:
    same centre and extent (bilinear resizes blend a band of a few pixels at the edges), and none of its
    colour lies outside the mask."""
    mask_box, nonempty = mask_boxes(target.masks)
    for i, label in enumerate(target.labels):
        assert nonempty[i]
        np.testing.assert_allclose(target.boxes[i], mask_box[i], atol=box_tol)
        m = target.masks[i].astype(bool)
        distance = np.abs(target.image.astype(int) - colours[label]).max(-1)
        outside = ~cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (distance[outside] <= 3).sum() == 0
        if min(mask_box[i][2:] - mask_box[i][:2]) < 5:
            continue  # a sliver left by a crop: its few pixels are all edge blend
        coloured = distance <= 60  # mostly this instance's colour
        ys, xs = np.nonzero(coloured)
        colour_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(colour_box, mask_box[i], atol=2.5)
        my, mx = np.nonzero(m)
        np.testing.assert_allclose([xs.mean(), ys.mean()], [mx.mean(), my.mean()], atol=1.0)


def test_rasterize_pixel_corner_convention():
    masks = rasterize([rect_polygon(2, 1, 6, 4), []], 6, 8)
    assert masks.dtype == np.uint8 and masks.shape == (2, 6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[1:4, 2:6] = 1
    np.testing.assert_array_equal(masks[0], expected)
    assert masks[1].sum() == 0  # an instance left without polygons has an empty mask
    boxes, nonempty = mask_boxes(masks)
    np.testing.assert_array_equal(boxes[0], [2, 1, 6, 4])
    assert nonempty.tolist() == [True, False]


def test_hflip_moves_everything_the_same_way():
    sample = rectangles_sample(bitmap=(1,))
    flipped = hflip(sample)
    np.testing.assert_array_equal(flipped.boxes[0], [80 - 30, 5, 80 - 5, 25])
    target = finalize(flipped)
    assert_aligned(target, box_tol=0)
    np.testing.assert_array_equal(target.image, sample.image[:, ::-1])
    twice = finalize(hflip(flipped))
    np.testing.assert_array_equal(twice.masks, finalize(sample).masks)


def test_resize_scales_boxes_polygons_and_bitmaps():
    sample = rectangles_sample(bitmap=(2,))
    out = resize(sample, (120, 100))  # y x2, x x1.25
    assert out.image.shape == (120, 100, 3) and out.scale == (2.0, 1.25)
    np.testing.assert_allclose(out.boxes[1], [50, 20, 93.75, 100])
    assert_aligned(finalize(out))


def test_resize_step_is_mmcv_rescale():
    sample = DetSample(np.zeros((480, 640, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [])
    rng = np.random.default_rng(0)
    assert Resize([800], 1333)(sample, rng).size == (800, 1067)  # short side limits
    tall = DetSample(np.zeros((1000, 200, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [])
    assert Resize([800], 1333)(tall, rng).size == (1333, 267)  # long side limits
    assert build_det_test_pipeline((1333, 800))(sample, rng).size == (800, 1067)
    assert build_det_test_pipeline((800, 1333))(sample, rng).size == (800, 1067)  # either order


def test_crop_recomputes_cut_boxes_and_drops_emptied_instances():
    # Instance 0: a triangle whose box overlaps the crop window but whose mask does not.
    # Instance 1: a rectangle cut by the window. Instance 2: entirely inside. Instance 3: entirely outside.
    triangle = [np.array([0, 0, 20, 0, 0, 20], np.float64)]
    masks = [triangle, rect_polygon(30, 10, 70, 40), rect_polygon(45, 45, 55, 55), rect_polygon(0, 50, 10, 60)]
    boxes = np.array([[0, 0, 20, 20], [30, 10, 70, 40], [45, 45, 55, 55], [0, 50, 10, 60]], np.float32)
    sample = DetSample(np.zeros((64, 80, 3), np.uint8), boxes, np.arange(4), masks)
    cropped = crop(sample, top=15, left=15, height=45, width=50)  # window x 15..65, y 15..60
    assert cropped.labels.tolist() == [0, 1, 2]  # instance 3's clipped box is empty: dropped
    assert cropped.cut.tolist() == [True, True, False]
    target = finalize(cropped)
    assert target.labels.tolist() == [1, 2]  # the triangle's cropped mask is empty: dropped
    np.testing.assert_array_equal(target.boxes, [[15, 0, 50, 25], [30, 30, 40, 40]])
    assert target.masks.shape == (2, 45, 50)


def test_random_crop_absolute_range():
    sample = DetSample(np.zeros((100, 50, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [])
    step = RandomCrop((30, 60))
    sizes = {step(sample, np.random.default_rng(s)).size for s in range(200)}
    assert all(30 <= h <= 60 and 30 <= w <= 50 for h, w in sizes)  # width capped by the image (mmdet)
    assert max(h for h, _ in sizes) == 60 and min(h for h, _ in sizes) == 30
    assert RandomCrop((1024, 1024))(sample, np.random.default_rng(0)).size == (100, 50)  # smaller image: kept


def test_one_of_draws_each_policy():
    marks = []

    def mark(name):
        def step(sample, rng):
            marks.append(name)
            return sample
        return step

    pipeline = OneOf([[mark("a")], [mark("b1"), mark("b2")]])
    sample = rectangles_sample()
    for seed in range(40):
        pipeline(sample, np.random.default_rng(seed))
    assert {"a", "b1", "b2"} <= set(marks) and marks.count("b1") == marks.count("b2")


@pytest.mark.parametrize("bitmap", [(), (0, 1, 2)])
def test_train_pipeline_keeps_image_boxes_and_masks_aligned(bitmap):
    """Many random draws of the whole (small-size) recipe: each instance's box equals its mask's box, and
    its coloured rectangle follows it in the image."""
    pipeline = build_det_train_pipeline(
        short_sides=[40, 56, 72, 88], max_size=150, crop_policy_short_sides=[40, 50, 60],
        crop_policy_crop_size=[30, 50], crop_size=[64, 64], flip_prob=0.5,
    )
    seen_cut = seen_flip = 0
    for seed in range(30):
        sample = rectangles_sample(bitmap=bitmap)
        out = pipeline(sample, np.random.default_rng(seed))
        target = finalize(out)
        assert target.image.dtype == np.uint8 and target.masks.dtype == np.uint8
        assert target.masks.shape == (len(target.labels), *target.image.shape[:2])
        assert max(target.image.shape[:2]) <= 64
        # nearest-resized bitmaps vs scaled polygons may differ by a pixel at the box edges
        assert_aligned(target, box_tol=1.01 if not bitmap else 2.01)
        seen_cut += int(out.cut.any())
        left_colour = target.image[:, : target.image.shape[1] // 2].reshape(-1, 3)
        seen_flip += int((np.abs(left_colour.astype(int) - COLOURS[1]).max(-1) <= 3).sum() > 10)
    assert seen_cut > 0 and seen_flip > 0  # crops cut instances and flips happened


def test_train_pipeline_is_a_function_of_the_generator():
    pipeline = build_det_train_pipeline(short_sides=[40, 56, 72], max_size=150, crop_policy_short_sides=[40, 50],
                                        crop_policy_crop_size=[30, 50], crop_size=[48, 48])
    a = finalize(pipeline(rectangles_sample(), np.random.default_rng(7)))
    b = finalize(pipeline(rectangles_sample(), np.random.default_rng(7)))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.masks, b.masks)


def test_recipe_sizes_on_a_coco_sized_image():
    pipeline = build_det_train_pipeline()  # the official recipe
    image = np.zeros((480, 640, 3), np.uint8)
    sizes = set()
    for seed in range(12):
        sample = DetSample(image, np.array([[100, 100, 300, 300]], np.float32), np.zeros(1, np.int64),
                           [rect_polygon(100, 100, 300, 300)])
        out = pipeline(sample, np.random.default_rng(seed))
        sizes.add(out.size)
    for h, w in sizes:
        assert 384 <= h <= 800 and w <= 1024  # short side <= 800, then cropped to at most 1024
    assert len(sizes) > 3


def test_polygon_and_rle_instances_transform_alike():
    poly = rectangles_sample(rects=((5, 5, 30, 25),))
    bits = rectangles_sample(rects=((5, 5, 30, 25),), bitmap=(0,))
    pipeline = Compose([RandomFlip(1.0), Resize([37], 200), RandomCrop((30, 30))])
    a = finalize(pipeline(poly, np.random.default_rng(3)))
    b = finalize(pipeline(bits, np.random.default_rng(3)))
    inter = (a.masks & b.masks).sum()
    union = (a.masks | b.masks).sum()
    assert inter / union > 0.85


def test_rle_decode_matches_polygon():
    """pycocotools' polygon rasterisation and an RLE of the same region agree (the loader mixes both)."""
    bitmap = np.zeros((20, 30), np.uint8, order="F")
    bitmap[4:9, 3:12] = 1
    rle = mask_utils.encode(bitmap)
    np.testing.assert_array_equal(mask_utils.decode(rle), rasterize([rect_polygon(3, 4, 12, 9)], 20, 30)[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="flip probability"):
        RandomFlip(1.5)
    with pytest.raises(ValueError, match="short_sides"):
        Resize([], 1333)
    with pytest.raises(ValueError, match="crop size range"):
        RandomCrop((600, 384))
    with pytest.raises(ValueError, match="both be set"):
        build_det_train_pipeline(crop_policy_short_sides=[400], crop_policy_crop_size=None)
