import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from asag.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSpec,
    DetectionTransform,
    DropEmptyBoxes,
    RandomSizeCrop,
    ResizeShortSide,
    build_eval_transforms,
    build_train_transforms,
    resized_hw,
)
from official import load_inputs

# ------------------------------------------------------------------------------ the resize rule


@pytest.mark.parametrize(
    ("hw", "size", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1066)),  # 640/480*800 = 1066.7 <= 1333: floor -> 1066
        ((640, 480), 800, 1333, (1066, 800)),
        # 2000/500*800 = 3200 > 1333: S = round(1333*500/2000) = round(333.25) = 333, long = int(333*4) = 1332
        ((500, 2000), 800, 1333, (333, 1332)),
        ((2000, 500), 800, 1333, (1332, 333)),
        # S = round(1333*0.3) = round(399.9) = 400 (torchvision's int() would give 399); long = int(1333.3)
        ((300, 1000), 800, 1333, (400, 1333)),
        ((100, 100), 800, 1333, (800, 800)),
        ((427, 640), 800, 1333, (800, 1199)),
        ((500, 2000), 600, None, (600, 2400)),  # no max size (3x crop branch pre-resize)
        ((1080, 1920), 800, 1500, (800, 1422)),  # CrowdHuman max size 1500
    ],
)
def test_resize_rule_worked_numbers(hw, size, max_size, expected):
    assert resized_hw(*hw, size, max_size) == expected


@pytest.mark.parametrize("case", ["a", "b"])
def test_resize_rule_matches_official_fixture_sizes(fixtures_dir, case):
    """Stage "resize": the fixtures' original sizes resize to their stored unpadded sizes."""
    inputs = load_inputs(fixtures_dir, case)
    for (h0, w0), (h, w) in zip(inputs["orig_sizes"].tolist(), inputs["image_sizes"].tolist()):
        assert resized_hw(h0, w0, min(h, w), 1333) == (h, w)


@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(16, 1000), st.integers(16, 2000))
def test_resize_rule_properties(h, w, size, max_size):
    nh, nw = resized_hw(h, w, size, max_size)
    short, long = min(h, w), max(h, w)
    n_short, n_long = (nh, nw) if h <= w else (nw, nh)
    if long / short * size <= max_size:
        assert n_short == size
    else:
        assert abs(n_short - max_size * short / long) <= 0.5 or n_short == 1
    assert n_long == int(n_short * long / short)


# ------------------------------------------------------------------------- box/image consistency


def _inputs(h: int, w: int, boxes_xyxy: list[list[float]]):
    pixels = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    boxes = tv_tensors.BoundingBoxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
                                     format="XYXY", canvas_size=(h, w))
    return image, {"boxes": boxes, "labels": torch.arange(len(boxes_xyxy))}


@st.composite
def scenes(draw, min_side=8, max_side=120):
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    n = draw(st.integers(0, 6))
    boxes = []
    for _ in range(n):
        x1 = draw(st.floats(0, w - 1, allow_nan=False))
        y1 = draw(st.floats(0, h - 1, allow_nan=False))
        x2 = draw(st.floats(x1 + 0.5, w, allow_nan=False))
        y2 = draw(st.floats(y1 + 0.5, h, allow_nan=False))
        boxes.append([x1, y1, x2, y2])
    return h, w, boxes


def _within(boxes: torch.Tensor, h: int, w: int) -> bool:
    lo = boxes.min() >= 0 if boxes.numel() else True
    return bool(lo) and bool((boxes[:, [0, 2]] <= w).all()) and bool((boxes[:, [1, 3]] <= h).all())


@settings(max_examples=40, deadline=None)
@given(scenes())
def test_flip_twice_is_identity_and_flip_mirrors(scene):
    h, w, boxes = scene
    image, target = _inputs(h, w, boxes)
    flip = v2.RandomHorizontalFlip(p=1.0)
    once_img, once = flip(image, target)
    twice_img, twice = flip(once_img, once)
    original = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    expected = torch.stack([w - original[:, 2], original[:, 1], w - original[:, 0], original[:, 3]], dim=1)
    torch.testing.assert_close(once["boxes"].as_subclass(torch.Tensor), expected, atol=1e-4, rtol=0)
    assert _within(once["boxes"], h, w)
    torch.testing.assert_close(twice["boxes"].as_subclass(torch.Tensor), original, atol=1e-4, rtol=0)
    assert np.array_equal(np.asarray(twice_img), np.asarray(image))


@settings(max_examples=40, deadline=None)
@given(scenes(), st.integers(8, 200), st.integers(16, 400))
def test_resize_scales_boxes_exactly(scene, size, max_size):
    h, w, boxes = scene
    image, target = _inputs(h, w, boxes)
    out_img, out = ResizeShortSide((size,), max_size)(image, target)
    nh, nw = resized_hw(h, w, size, max_size)
    assert (out_img.height, out_img.width) == (nh, nw)
    scale = torch.tensor([nw / w, nh / h, nw / w, nh / h])
    original = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), original * scale, atol=1e-3, rtol=1e-5)
    assert out["boxes"].canvas_size == (nh, nw)


@settings(max_examples=60, deadline=None)
@given(scenes(), st.integers(1, 60), st.integers(0, 2**31 - 1))
def test_crop_keeps_only_boxes_inside_clipped(scene, min_size, seed):
    h, w, boxes = scene
    image, target = _inputs(h, w, boxes)
    crop = RandomSizeCrop(min_size, min_size + 30)
    torch.manual_seed(seed)
    params = crop.make_params([image])
    torch.manual_seed(seed)
    out_img, out = v2.Compose([crop, DropEmptyBoxes()])(image, target)
    top, left, ch, cw = params["top"], params["left"], params["height"], params["width"]
    assert (out_img.height, out_img.width) == (ch, cw)
    assert min(min_size, h) <= ch <= min(h, min_size + 30) and min(min_size, w) <= cw <= min(w, min_size + 30)
    original = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    shifted = original - torch.tensor([left, top, left, top], dtype=torch.float32)
    clipped = torch.stack([shifted[:, 0].clamp(0, cw), shifted[:, 1].clamp(0, ch),
                           shifted[:, 2].clamp(0, cw), shifted[:, 3].clamp(0, ch)], dim=1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), clipped[keep], atol=1e-4, rtol=0)
    assert out["labels"].tolist() == torch.arange(len(boxes))[keep].tolist()
    assert _within(out["boxes"], ch, cw)
    # the crop shows exactly the image window
    assert np.array_equal(np.asarray(out_img), np.asarray(image)[top : top + ch, left : left + cw])


@settings(max_examples=30, deadline=None)
@given(scenes(min_side=40, max_side=160), st.integers(0, 2**31 - 1))
def test_full_3x_pipeline_keeps_boxes_in_the_image(scene, seed):
    h, w, boxes = scene
    image, _ = _inputs(h, w, boxes)
    transform = build_train_transforms(
        scales=(64, 72, 80), max_size=120, crop=CropSpec(pre_scales=(48, 56), min_size=24, max_size=40,
                                                         final_max_size=100, prob=0.5)
    )
    torch.manual_seed(seed)
    sample = transform(image, torch.tensor(boxes).reshape(-1, 4), torch.arange(len(boxes)), image_id=3)
    t = sample.target
    assert t.size == tuple(sample.image.shape[-2:]) and t.orig_size == (h, w) and t.image_id == 3
    aspect = max(t.size) / min(t.size)  # rounding S moves the long side by at most one aspect ratio
    capped = any(abs(max(t.size) - cap) <= aspect + 1 for cap in (100, 120))
    assert min(t.size) in (64, 72, 80) or capped
    assert t.boxes.shape == (len(t.labels), 4)
    cx, cy, bw, bh = t.boxes.unbind(-1)
    assert bool((bw > 0).all()) and bool((bh > 0).all())
    eps = 1e-5
    assert bool((cx - bw / 2 >= -eps).all()) and bool((cx + bw / 2 <= 1 + eps).all())
    assert bool((cy - bh / 2 >= -eps).all()) and bool((cy + bh / 2 <= 1 + eps).all())


# --------------------------------------------------------------------------- tensors and targets


def test_eval_transform_normalises_image_and_boxes():
    image = PIL.Image.new("RGB", (640, 480), (255, 128, 0))
    boxes = torch.tensor([[64.0, 48.0, 320.0, 240.0]])
    sample = build_eval_transforms(800, 1333)(image, boxes, torch.tensor([2]), image_id=11)
    assert sample.image.shape == (3, 800, 1066)
    assert sample.target.size == (800, 1066) and sample.target.orig_size == (480, 640)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(sample.image.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4, rtol=0)
    # xyxy (64, 48, 320, 240) of a 640x480 image -> normalised cxcywh; the resize keeps it up to rounding
    torch.testing.assert_close(sample.target.boxes, torch.tensor([[0.3, 0.3, 0.4, 0.4]]), atol=2e-3, rtol=0)
    assert sample.target.labels.tolist() == [2]


def test_no_resize_no_normalisation_is_exact():
    image = PIL.Image.new("RGB", (100, 50), (51, 102, 204))
    sample = DetectionTransform(mean=None, std=None)(image, torch.tensor([[10.0, 5.0, 30.0, 45.0]]),
                                                     torch.tensor([0]))
    torch.testing.assert_close(sample.image[:, 0, 0], torch.tensor([0.2, 0.4, 0.8]))
    torch.testing.assert_close(sample.target.boxes, torch.tensor([[0.2, 0.5, 0.2, 0.8]]))


def test_1x_pipeline_sizes_and_flip_probability():
    image = PIL.Image.new("RGB", (640, 480))
    boxes = torch.tensor([[0.0, 0.0, 64.0, 48.0]])
    transform = build_train_transforms((800,), 1333, crop=None, flip_prob=1.0)
    sample = transform(image, boxes, torch.tensor([0]))
    assert sample.target.size == (800, 1066)
    # flipped: the box now touches the right border
    torch.testing.assert_close(sample.target.boxes[0, 0] + sample.target.boxes[0, 2] / 2, torch.tensor(1.0))
    no_flip = build_train_transforms((800,), 1333, crop=None, flip_prob=0.0)(image, boxes, torch.tensor([0]))
    torch.testing.assert_close(no_flip.target.boxes[0, 0], torch.tensor(0.05), atol=1e-3, rtol=0)
