"""Detection drawings: labels on a filled strip inside the image, small images scaled up."""

import numpy as np
import PIL.Image
import pytest

from asag.api import Detection
from asag.viz.draw import class_colour, draw_detections, label_origin, text_colour


@pytest.mark.parametrize("box, label, image, expected", [
    ((50, 40, 90, 80), (30, 18), (200, 100), (50, 22)),  # room above the box: above it
    ((10, 5, 60, 50), (30, 18), (200, 100), (10, 5)),  # no room above: inside the box's top
    ((190, 40, 199, 80), (30, 18), (200, 100), (170, 22)),  # at the right edge: shifted left
    ((-5, -3, 20, 20), (30, 18), (200, 100), (0, 0)),  # box leaves the image: clamped
    ((20, 40, 60, 80), (250, 18), (200, 100), (0, 22)),  # wider than the image: at its left edge
    ((20, 10, 60, 19), (30, 18), (200, 20), (20, 2)),  # no room above, bottom edge: shifted up
])
def test_label_origin_keeps_the_strip_inside(box, label, image, expected):
    x, y = label_origin(box, label, image)
    assert (x, y) == expected
    assert x >= 0 and y >= 0 and y + label[1] <= image[1] and (x + label[0] <= image[0] or x == 0)


def test_text_colour_contrasts_with_the_strip():
    assert text_colour((255, 225, 25)) == (0, 0, 0)  # yellow: black text
    assert text_colour((0, 130, 200)) == (255, 255, 255)  # blue (luma 99.1): white text
    assert text_colour((60, 180, 75)) == (0, 0, 0)  # green (luma 132.2): black text


def test_drawing_is_scaled_up_with_a_filled_label_inside():
    image = PIL.Image.new("RGB", (100, 80), (128, 128, 128))
    corner = Detection([0.0, 0.0, 40.0, 30.0], 0.9, 1, "ellipse")
    edge = Detection([90.0, 50.0, 100.0, 80.0], 0.8, 4, "ring")
    drawn = draw_detections(image, [corner, edge], min_side=160)
    assert drawn.size == (200, 160)  # short side 80 -> 160: scale 2
    pixels = np.asarray(drawn)
    green = class_colour(1)
    # the box [0, 0, 40, 30] scaled to [0, 0, 80, 60]: its right edge at x = 80, bottom at y = 60
    assert tuple(pixels[40, 80]) == green and tuple(pixels[60, 40]) == green
    # the label strip sits inside the image at the top-left corner (no room above the box): filled with
    # the class colour around black text
    strip = pixels[0:16, 0:60].reshape(-1, 3)
    assert (strip == green).all(axis=1).mean() > 0.5
    assert (strip == (0, 0, 0)).all(axis=1).any()
    # the label of the box at the bottom-right corner is shifted left to stay inside: its colour appears
    # at the image's right border above the box (box top at y = 100 after scaling)
    assert tuple(pixels[90, 199]) == class_colour(4)
    assert draw_detections(image, [], min_side=None).size == (100, 80)
    assert draw_detections(PIL.Image.new("RGB", (800, 600)), [corner], min_side=160).size == (800, 600)
