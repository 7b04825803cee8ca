"""Prediction pictures: the legend lists exactly the classes present, panels carry captions drawn in the picture."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comer.data.transforms import IGNORE_INDEX
from comer.training.detection_drawing import detection_overlay, detection_panel, draw_instances
from comer.training.visualization import (PANEL_CAPTIONS, caption_band, comparison_panel, labelled_overlay,
                                          legend_band, overlay, present_classes)

NAMES = ["sky", "road", "car", "tree", "person"]
# Saturated colours that neither the text (black), the band (white) nor the swatch outline (grey) use.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180]], dtype=np.uint8)
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # images given in 0..255


def colours_in(picture: np.ndarray) -> set[int]:
    """The palette rows found (as exact pixels) in ``picture``."""
    pixels = {tuple(p) for p in picture.reshape(-1, 3)}
    return {index for index, colour in enumerate(PALETTE) if tuple(colour) in pixels}


def test_present_classes_leaves_out_ignored_and_unknown_values():
    pred = np.array([[0, 3], [IGNORE_INDEX, 3]])
    label = np.array([[3, 1], [1, 7]])  # 7: beyond the 5 classes
    assert present_classes([pred, label], len(NAMES)) == [0, 1, 3]
    assert present_classes([np.full((2, 2), IGNORE_INDEX)], len(NAMES)) == []


def test_legend_shows_a_swatch_for_each_class_listed_and_no_other():
    band = legend_band([1, 3], NAMES, PALETTE, width=200, column_width=200)
    assert colours_in(band) == {1, 3}
    assert legend_band([], NAMES, PALETTE, width=200, column_width=200).shape == (0, 200, 3)


def test_a_narrow_legend_wraps_onto_more_rows_keeping_every_class():
    wide = legend_band(list(range(5)), NAMES, PALETTE, width=400, column_width=100)
    narrow = legend_band(list(range(5)), NAMES, PALETTE, width=90, column_width=100)
    assert narrow.shape[0] > wide.shape[0] and narrow.shape[1] == 90
    assert colours_in(narrow) == colours_in(wide) == set(range(5))


def test_labelled_overlay_is_the_overlay_with_the_legend_of_its_classes_below():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    labels = np.zeros((48, 64), dtype=np.int64)
    labels[10:30, 5:40] = 2
    labels[40:, :] = IGNORE_INDEX
    picture = labelled_overlay(rgb, labels, NAMES, PALETTE, IGNORE_INDEX)
    np.testing.assert_array_equal(picture[:48], overlay(rgb, labels, PALETTE, IGNORE_INDEX))
    assert picture.shape[0] > 48 and colours_in(picture[48:]) == {0, 2}


def test_comparison_panel_has_captions_above_and_the_legend_of_prediction_and_truth_below():
    height, width = 40, 120
    image = torch.full((3, height, width), 128.0)
    pred = torch.zeros(height, width, dtype=torch.long)
    pred[:, 60:] = 4
    label = torch.ones(height, width, dtype=torch.long)
    label[:5] = IGNORE_INDEX
    panel = comparison_panel(image, pred, label, NAMES, PALETTE, IGNORE_INDEX, MEAN, STD)

    captions = caption_band(PANEL_CAPTIONS, width)
    top = captions.shape[0]
    np.testing.assert_array_equal(panel[:top], captions)
    for column in range(3):  # each caption is drawn: its column of the band is not one flat colour
        assert len(np.unique(captions[:, column * width:(column + 1) * width].reshape(-1, 3), axis=0)) > 1
    rgb = np.full((height, width, 3), 128, dtype=np.uint8)
    body = np.concatenate([rgb, overlay(rgb, pred.numpy(), PALETTE, IGNORE_INDEX),
                           overlay(rgb, label.numpy(), PALETTE, IGNORE_INDEX)], axis=1)
    np.testing.assert_array_equal(panel[top:top + height], body)  # image | prediction | truth as before
    legend = panel[top + height:]
    assert legend.shape[0] > 0 and colours_in(legend) == {0, 1, 4}


@pytest.mark.parametrize("threshold,expected", [(0.5, {2, 3}), (0.95, {3})])
def test_detection_panel_captions_and_legend_of_the_drawn_classes(threshold, expected):
    height, width = 64, 96
    image = torch.full((3, height, width), 90, dtype=torch.uint8)
    prediction = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]),
                  "labels": torch.tensor([2, 0]), "scores": torch.tensor([0.9, 0.2])}
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([3])}
    panel = detection_panel(image, prediction, target, NAMES, PALETTE, score_threshold=threshold)
    captions = caption_band(("prediction", "ground truth"), width)
    np.testing.assert_array_equal(panel[:captions.shape[0]], captions)
    legend = panel[captions.shape[0] + height:]
    assert panel.shape[1] == 2 * width and colours_in(legend) == expected  # class 0 scored below the threshold


def test_detection_overlay_is_the_drawn_predictions_with_their_legend():
    height, width = 64, 96
    image = torch.full((3, height, width), 90, dtype=torch.uint8)
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 8:20, 8:30] = True
    prediction = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]), "masks": masks,
                  "labels": torch.tensor([1, 4]), "scores": torch.tensor([0.8, 0.1])}
    picture = detection_overlay(image, prediction, NAMES, PALETTE, score_threshold=0.5)
    drawn = draw_instances(image.permute(1, 2, 0).numpy(), prediction["boxes"][:1], prediction["labels"][:1],
                           masks[:1], NAMES, PALETTE, scores=prediction["scores"][:1])
    np.testing.assert_array_equal(picture[:height], drawn)
    assert picture.shape[1] == width and colours_in(picture[height:]) == {1}
