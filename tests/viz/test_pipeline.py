"""Pipeline drawing (supplement Figure C-2): box extraction from the model output by hand-computed cases,
and the drawn panels looked at pixel by pixel, on a hand-made trace and on a tiny model's real output."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.build import build_model, build_transforms
from asag.config import load_config
from asag.data import LabelMap, collate
from asag.data.synthetic import SHAPE_CLASSES, generate_synthetic
from asag.errors import DataError
from asag.structures import AnchorOutput, HeadOutput, OutputAnchors, PatchPredictions
from asag.viz.draw import class_colour
from asag.viz.pipeline import (
    ANCHOR_COLOUR,
    PATCH_COLOURS,
    STAGES,
    BoxSet,
    PipelineTrace,
    clip_to_image,
    draw_stage,
    ground_truth_for,
    load_ground_truth,
    patch_squares_xyxy,
    pipeline_panels,
    probed_patches,
    rescale_xyxy,
    run_pipeline,
    stage_boxes,
    trace_image,
    valid_proposals,
)

GREY = (90, 90, 90)
LABELS = LabelMap((1, 2, 3, 4, 5), SHAPE_CLASSES)


# ------------------------------------------------------------------------------------- helpers


def midpoints(box: list[float]) -> list[tuple[int, int]]:
    """(x, y) pixels in the middle of the four sides of an integer-truncated xyxy box."""
    x1, y1, x2, y2 = (int(v) for v in box)
    mx, my = (x1 + x2) // 2, (y1 + y2) // 2
    return [(x1, my), (x2, my), (mx, y1), (mx, y2)]


def colour_near(pixels: np.ndarray, x: int, y: int, colour, radius: int = 1) -> bool:
    window = pixels[max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1]
    return bool((window == np.asarray(colour)).all(-1).any())


def is_shade_of(pixel, colours, tolerance: float = 1.0) -> bool:
    """Whether ``pixel`` is ``t * colour`` (0 <= t <= 1) for one of ``colours``."""
    p = np.asarray(pixel, dtype=np.float64)
    for colour in colours:
        c = np.asarray(colour, dtype=np.float64)
        t = float(np.clip(p @ c / max(c @ c, 1.0), 0.0, 1.0))
        if np.abs(p - t * c).max() <= tolerance:
            return True
    return False


def drawn_fraction(panel: PIL.Image.Image, boxes: torch.Tensor, allowed: list[list]) -> float:
    """Fraction of boxes with one of their ``allowed`` colours on at least one side's midpoint (boxes
    clipped as drawn)."""
    pixels = np.asarray(panel)
    clipped, inside = clip_to_image(boxes.reshape(-1, 4), (panel.height, panel.width))
    hits = [any(colour_near(pixels, x, y, c) for x, y in midpoints(b) for c in cs)
            for b, cs, k in zip(clipped.tolist(), allowed, inside.tolist()) if k]
    return sum(hits) / max(len(hits), 1)


# ------------------------------------------------------------------------- box extraction (pure)


def test_patch_squares_hand_computed():
    crop_pos = torch.tensor([[2, 3], [0, 0]])  # (x, y) cells
    squares = patch_squares_xyxy(crop_pos, stride=16, patch_size=15)
    expected = torch.tensor([[32.0, 48.0, 272.0, 288.0], [0.0, 0.0, 240.0, 240.0]])
    torch.testing.assert_close(squares, expected)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200), st.sampled_from([8, 16]), st.integers(1, 20))
def test_patch_squares_are_squares_at_the_scaled_corner(x, y, stride, patch):
    (square,) = patch_squares_xyxy(torch.tensor([[x, y]]), stride, patch).tolist()
    assert square[:2] == [x * stride, y * stride]
    assert square[2] - square[0] == square[3] - square[1] == patch * stride


def test_rescale_hand_computed():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out = rescale_xyxy(boxes, from_hw=(100, 200), to_hw=(50, 400))  # y halves, x doubles
    torch.testing.assert_close(out, torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


def anchor_output() -> AnchorOutput:
    """Two images; P4 patches of both, a loss-only one of image 0; one P3 patch of image 1."""
    coarse = [PatchPredictions("P6", torch.zeros(2, 1, 3, 5), torch.arange(2)),
              PatchPredictions("P5", torch.zeros(2, 4, 3, 5), torch.arange(2), crop_pos=torch.zeros(4, 2))]
    p4 = PatchPredictions("P4", torch.zeros(3, 2, 5), torch.tensor([0, 0, 1]),
                          crop_pos=torch.tensor([[1, 2], [5, 5], [3, 0]]),
                          loss_only=torch.tensor([False, True, False]), stride=16)
    p3 = PatchPredictions("P3", torch.zeros(1, 2, 5), torch.tensor([1]), crop_pos=torch.tensor([[4, 6]]),
                          loss_only=torch.tensor([False]), stride=8)
    boxes = torch.tensor([[[50.0, 40.0, 20.0, 10.0], [100.0, 100.0, 200.0, 200.0]],
                          [[10.0, 10.0, 4.0, 6.0], [30.0, 30.0, 10.0, 10.0]]])  # pixel cxcywh
    valid = torch.tensor([[True, False], [True, True]])
    groups = OutputAnchors.from_groups([[torch.zeros(1, 5)], [torch.zeros(1, 5)] * 3])
    return AnchorOutput([*coarse, p4, p3], boxes, valid, groups)


def test_probed_patches_skip_loss_only_and_other_images():
    anchors = anchor_output()
    first = probed_patches(anchors, 0, patch_size=15)
    assert list(first) == ["P4", "P3"]
    torch.testing.assert_close(first["P4"], torch.tensor([[16.0, 32.0, 256.0, 272.0]]))
    assert first["P3"].shape == (0, 4)
    second = probed_patches(anchors, 1, patch_size=15)
    torch.testing.assert_close(second["P4"], torch.tensor([[48.0, 0.0, 288.0, 240.0]]))
    torch.testing.assert_close(second["P3"], torch.tensor([[32.0, 48.0, 152.0, 168.0]]))


def test_valid_proposals_skip_denoising_and_padded_rows():
    # 1 denoising row, then 3 matching rows of which the last is padding; image (h, w) = (100, 200)
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.1, 0.2], [0.5, 0.25, 0.5, 0.5],
                           [0.5, 0.5, 1.0, 1.0]]])
    logits = torch.tensor([[[9.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])
    xyxy, labels = valid_proposals(HeadOutput(logits, boxes), valid, num_dn=1, image=0, size_hw=(100, 200))
    torch.testing.assert_close(xyxy, torch.tensor([[40.0, 40.0, 60.0, 60.0], [50.0, 0.0, 150.0, 50.0]]))
    assert labels.tolist() == [1, 0]


def test_clip_keeps_overlapping_boxes_and_drops_outside_ones():
    boxes = torch.tensor([[-10.0, 5.0, 50.0, 120.0], [200.0, 0.0, 300.0, 10.0], [1.0, 2.0, 3.0, 4.0]])
    clipped, inside = clip_to_image(boxes, (100, 150))
    assert inside.tolist() == [True, False, True]
    torch.testing.assert_close(clipped[0], torch.tensor([0.0, 5.0, 50.0, 99.0]))
    torch.testing.assert_close(clipped[2], boxes[2])


# --------------------------------------------------------------------------- drawing (hand trace)


def hand_trace() -> PipelineTrace:
    """Disjoint boxes on a 120 x 160 image, one or two per stage."""
    return PipelineTrace(
        image_hw=(120, 160),
        patches={"P4": BoxSet(torch.tensor([[4.0, 4.0, 100.0, 100.0]]), captions=["P4"]),
                 "P3": BoxSet(torch.tensor([[110.0, 10.0, 150.0, 50.0]]), captions=["P3"])},
        anchors=BoxSet(torch.tensor([[20.0, 30.0, 60.0, 90.0], [90.0, 60.0, 140.0, 110.0]])),
        anchors_per_stage=[1, 1],
        proposals=BoxSet(torch.tensor([[10.0, 10.0, 70.0, 50.0], [80.0, 70.0, 150.0, 115.0]]),
                         torch.tensor([1, 3])),
        detections=BoxSet(torch.tensor([[30.0, 40.0, 110.0, 100.0]]), torch.tensor([5]), ["ring 0.90"]),
        score_threshold=0.5,
        ground_truth=BoxSet(torch.tensor([[25.0, 35.0, 115.0, 105.0]]), torch.tensor([2]), ["ellipse"]),
    )


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_panel_shows_its_boxes_in_its_colour_and_nothing_else(stage):
    trace = hand_trace()
    image = PIL.Image.new("RGB", (160, 120), GREY)
    panel = draw_stage(image, trace, stage)
    pixels = np.asarray(panel)
    boxes, colours = stage_boxes(trace, stage)
    for box, colour in zip(boxes.boxes_xyxy.tolist(), colours):
        x1, y1, x2, y2 = (int(v) for v in box)
        # the bottom and right sides are free of captions: every midpoint is exactly the stage colour
        assert tuple(pixels[(y1 + y2) // 2, x2]) == colour
        assert tuple(pixels[y2, (x1 + x2) // 2]) == colour
        assert tuple(pixels[(y1 + y2) // 2, (x1 + x2) // 2]) == GREY  # outlines only, no fill
    changed = (pixels != np.asarray(GREY)).any(-1)
    assert changed.any()
    # every changed pixel is a box colour or a shade of it (black caption text, anti-aliased)
    assert all(is_shade_of(p, colours) for p in {tuple(c) for c in pixels[changed].tolist()})


def test_stage_colours_follow_figure_c2_and_class_colours():
    trace = hand_trace()
    assert stage_boxes(trace, "patches")[1] == [PATCH_COLOURS["P4"], PATCH_COLOURS["P3"]]
    assert stage_boxes(trace, "anchors")[1] == [ANCHOR_COLOUR] * 2
    assert stage_boxes(trace, "proposals")[1] == [class_colour(1), class_colour(3)]
    assert stage_boxes(trace, "gt")[1] == [class_colour(2)]
    assert PATCH_COLOURS["P4"] == (255, 0, 0) and ANCHOR_COLOUR == (255, 255, 255)  # red and white


def test_panels_titles_count_boxes_and_skip_missing_ground_truth():
    trace = hand_trace()
    image = PIL.Image.new("RGB", (160, 120), GREY)
    panels = pipeline_panels(image, trace)
    assert list(panels) == list(STAGES)
    assert panels["patches"].title == "probed patches: P4 x1 (red), P3 x1 (orange)"
    assert panels["anchors"].title == "anchors: 2 (1 P5/P6 + 1 P4)"
    assert panels["detections"].title == "detections: 1 (score >= 0.50)"
    trace.ground_truth = None
    assert "gt" not in pipeline_panels(image, trace)
    trace.patches = {}
    assert pipeline_panels(image, trace, ["patches"])["patches"].title.endswith("none (no probing)")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 90), st.integers(0, 50), st.integers(4, 60), st.integers(4, 60))
def test_any_box_inside_the_image_is_outlined(x, y, w, h):
    trace = hand_trace()
    trace.anchors = BoxSet(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32))
    panel = draw_stage(PIL.Image.new("RGB", (160, 120), GREY), trace, "anchors")
    pixels = np.asarray(panel)
    for px, py in midpoints([x, y, min(x + w, 159), min(y + h, 119)]):
        assert tuple(pixels[py, px]) == ANCHOR_COLOUR


# -------------------------------------------------------------------------------- ground truth


def test_ground_truth_read_and_rescaled(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "sub/a.png", "width": 200, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 1200,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "x"}, {"id": 3, "name": "triangle"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    index = load_ground_truth(path)
    gt = ground_truth_for(index, tmp_path / "a.png", image_hw=(50, 400))  # read at another size
    torch.testing.assert_close(gt.boxes_xyxy, torch.tensor([[20.0, 10.0, 80.0, 30.0]]))
    assert gt.category_ids.tolist() == [3] and gt.captions == ["triangle"]
    assert ground_truth_for(index, "other.png", (50, 400)) is None
    with pytest.raises(DataError, match="missing.json"):
        load_ground_truth(tmp_path / "missing.json")


# ------------------------------------------------------------------ a tiny model's real output


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A tiny ASAG-A on one synthetic image: the image, its trace and the run."""
    root = tmp_path_factory.mktemp("synthetic")
    paths = generate_synthetic(root, 1, seed=0, val_images=1)
    cfg = load_config("tiny_cpu")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = PIL.Image.open(next(paths.val_images.iterdir())).convert("RGB")
    batch = collate([build_transforms(cfg.data, train=False)(image, torch.zeros(0, 4),
                                                              torch.zeros(0, dtype=torch.int64))])
    run = run_pipeline(model, batch.images, batch.image_sizes, batch.orig_sizes)
    trace = trace_image(run, 0, LABELS, model.anchor_generator.patch_size, score_threshold=0.0)
    return image, trace, run


def test_trace_boxes_are_the_model_outputs_in_original_pixels(traced):
    image, trace, run = traced
    (h, w), (oh, ow) = run.image_sizes[0].tolist(), run.orig_sizes[0].tolist()
    assert trace.image_hw == (image.height, image.width) == (oh, ow)
    anchors = run.output.anchors
    assert len(trace.anchors) == int(anchors.valid_mask[0].sum()) == len(trace.proposals)
    xyxy = trace.anchors.boxes_xyxy
    centres = (xyxy[:, :2] + xyxy[:, 2:]) / 2 * torch.tensor([w / ow, h / oh])  # resized pixels
    torch.testing.assert_close(centres, anchors.boxes[0, anchors.valid_mask[0], :2], rtol=1e-5, atol=1e-3)
    assert trace.anchors_per_stage[0] >= 5  # the coarse stage outputs at least min_anchors
    torch.testing.assert_close(trace.detections.boxes_xyxy, run.detections[0].boxes)


@pytest.mark.parametrize("stage", ["patches", "anchors", "proposals", "detections"])
def test_real_output_every_stage_is_drawn_where_its_boxes_are(traced, stage):
    image, trace, _ = traced
    panel = draw_stage(image, trace, stage)
    boxes, colours = stage_boxes(trace, stage)
    if stage != "patches":
        assert len(boxes) > 0
    if len(boxes) == 0:
        return
    assert not np.array_equal(np.asarray(panel), np.asarray(image))
    # A box drawn later may hide a side of an earlier one in another class colour (the untrained model
    # puts several classes on one box), so: every box shows one of the stage's colours, and the last
    # drawn box shows its own.
    palette = sorted(set(colours))
    assert drawn_fraction(panel, boxes.boxes_xyxy, [palette] * len(boxes)) == 1.0
    assert drawn_fraction(panel, boxes.boxes_xyxy[-1:], [[colours[-1]]]) == 1.0
    if stage in ("patches", "anchors"):  # one colour per level: nothing can hide a box
        assert drawn_fraction(panel, boxes.boxes_xyxy, [[c] for c in colours]) == 1.0
