"""Feature-map heat maps (supplement Figure C-3): hand-computed reductions, colours and blends, padding
cut away, and a tiny model's real features looked at where they are high."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.build import build_model, build_transforms
from asag.config import load_config
from asag.data import collate
from asag.data.synthetic import generate_synthetic
from asag.viz.features import (
    FPN_STRIDES,
    HEAT_ALPHA,
    JET_COLOURS,
    colour_bar,
    colourise,
    feature_panels,
    heat_map,
    mean_activation,
    normalise_unit,
    overlay_heat,
    with_colour_bar,
)

LOW, HIGH = JET_COLOURS[0], JET_COLOURS[-1]


def test_mean_activation_hand_computed():
    feature = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[3.0, 0.0], [-3.0, 8.0]]])  # [2, 2, 2]
    torch.testing.assert_close(mean_activation(feature), torch.tensor([[2.0, 1.0], [0.0, 6.0]]))


def test_normalise_unit_hand_computed_and_constant():
    torch.testing.assert_close(normalise_unit(torch.tensor([2.0, 4.0, 6.0])), torch.tensor([0.0, 0.5, 1.0]))
    assert normalise_unit(torch.full((3, 3), 7.0)).eq(0).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=30))
def test_normalise_unit_range_and_order(values):
    x = torch.tensor(values, dtype=torch.float64)
    y = normalise_unit(x)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    if float(x.max() - x.min()) > 0:
        assert float(y[x.argmax()]) == 1.0 and float(y[x.argmin()]) == 0.0
        assert (y[x.argsort()].diff() >= 0).all()  # order preserved


def test_colourise_stops_and_midpoint():
    colours = colourise(torch.tensor([[0.0, 0.5, 1.0, 0.125]]))  # [1, 4, 3]
    assert [tuple(c) for c in colours[0].tolist()] == [LOW, (128, 255, 128), HIGH, (0, 0, 255)]


def test_heat_map_peaks_at_the_hot_cell_and_ignores_the_padding():
    # a 4 x 4 map at stride 8 of a 32 x 32 padded batch; the image is 16 x 24 (2 x 3 cells)
    feature = torch.zeros(2, 4, 4)
    feature[:, 1, 2] = 1.0  # hot cell inside the image: pixels y 8..15, x 16..23
    feature[:, 0, 3] = 50.0  # hotter cell in the padding column (top right): must not count
    heat = heat_map(feature, stride=8, size_hw=(16, 24), orig_hw=(32, 48))  # drawn at twice the size
    assert heat.shape == (32, 48)
    assert float(heat.min()) == 0.0 and float(heat.max()) == 1.0
    y, x = divmod(int(heat.argmax()), 48)
    assert 16 <= y < 32 and 32 <= x < 48  # the hot cell, doubled
    assert float(heat[:8, :16].max()) < 0.05 and float(heat[:8, 40:].max()) < 0.05  # far from it: cold


def test_overlay_blends_hand_computed():
    image = PIL.Image.new("RGB", (4, 2), (100, 100, 100))
    heat = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    out = np.asarray(overlay_heat(image, heat))
    a = HEAT_ALPHA
    hot = tuple(round((1 - a) * 100 + a * c) for c in HIGH)
    cold = tuple(round((1 - a) * 100 + a * c) for c in LOW)
    assert tuple(out[0, 3]) == hot and tuple(out[1, 0]) == cold
    with pytest.raises(ValueError, match="does not match"):
        overlay_heat(image, torch.zeros(3, 3))


def test_colour_bar_runs_from_low_to_high():
    bar = np.asarray(colour_bar(50, 6))
    assert bar.shape == (6, 50, 3)
    assert tuple(bar[0, 0]) == LOW and tuple(bar[-1, -1]) == HIGH
    figure = with_colour_bar(PIL.Image.new("RGB", (50, 20), (1, 2, 3)))
    assert figure.size == (50, 20 + 12) and figure.getpixel((0, 0)) == (1, 2, 3)


# ------------------------------------------------------------------ a tiny model's real features


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = generate_synthetic(root, 1, seed=1, val_images=1)
    cfg = load_config("tiny_cpu")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = PIL.Image.open(next(paths.val_images.iterdir())).convert("RGB")
    batch = collate([build_transforms(cfg.data, train=False)(image, torch.zeros(0, 4),
                                                              torch.zeros(0, dtype=torch.int64))])
    with torch.no_grad():
        features = model.extract_features(batch.images)
    return image, features, tuple(batch.image_sizes[0].tolist())


@pytest.mark.parametrize("level", ["P3", "P5"])
def test_overlay_differs_from_the_image_where_activations_are_high(real, level):
    image, features, size_hw = real
    (panel,) = feature_panels(image, features, 0, [level], size_hw)
    assert panel.image.size == image.size and level in panel.title
    feature = features[["P2", "P3", "P4", "P5"].index(level)][0]
    heat = heat_map(feature, FPN_STRIDES[level], size_hw, (image.height, image.width))
    y, x = divmod(int(heat.argmax()), image.width)
    before = np.asarray(image, dtype=np.int64)[y, x]
    after = np.asarray(panel.image, dtype=np.int64)[y, x]
    expected = np.round((1 - HEAT_ALPHA) * before + HEAT_ALPHA * np.asarray(HIGH))
    assert np.abs(after - expected).max() <= 1  # the hottest pixel carries the "high" colour
    assert np.abs(after - before).max() > 20
    hot, cold = heat > 0.75, heat < 0.25
    assert hot.any() and cold.any()
    # hot regions lean red, cold regions blue, relative to the image
    shift = np.asarray(panel.image, dtype=np.int64) - np.asarray(image, dtype=np.int64)
    red_minus_blue = torch.from_numpy(shift[..., 0] - shift[..., 2]).float()
    assert float(red_minus_blue[hot].mean()) > float(red_minus_blue[cold].mean()) + 30


def test_unknown_level_is_rejected(real):
    image, features, size_hw = real
    with pytest.raises(ValueError, match="P7"):
        feature_panels(image, features, 0, ["P7"], size_hw)
