"""Training patches of the anchor generator (spec 3.7): hand-computed and property tests of their
geometry, ground-truth patches against the official epoch-0 fixture, the top-up rules of the list."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import official
from asag.modeling.patches import ceil_cells
from asag.structures import ImageTargets, PatchSet
from asag.training.patch_sampling import (
    centrality_scores,
    ground_truth_boxes,
    gt_patch_positions,
    merge_per_image,
    random_patch_positions,
    training_patches,
)

P = 15
STRIDES = st.sampled_from([8, 16, 32])


def padded_cells(size: int, stride: int) -> int:
    """Feature-map length of an image side after padding up to a multiple of 32."""
    return math.ceil(size / 32) * 32 // stride


@pytest.mark.parametrize("level,stride", [("P4", 16), ("P3", 8)])
def test_gt_patches_consistent_with_the_epoch0_criterion_fixture(fixtures_dir, level, stride):
    """The official epoch-0 patches are GT patches: same objects, same order, positions inside the
    range that the jitter can reach (the fixture's random draws cannot be replayed)."""
    ref = official.load(fixtures_dir, "criterion_asag_a_nodn_epoch0.pt")
    targets = [
        ImageTargets(boxes=ref[f"targets.{b}.boxes"], labels=ref[f"targets.{b}.labels"]) for b in range(2)
    ]
    image_wh = torch.tensor([[w, h] for h, w in ref["hw"]], dtype=torch.float32)
    boxes, images = ground_truth_boxes(targets, image_wh, stride, P, 0.25)
    high = gt_patch_positions(boxes, image_wh[images], stride, P, torch.zeros(len(images), 2))
    low = gt_patch_positions(boxes, image_wh[images], stride, P, torch.full((len(images), 2), 1 - 1e-6))
    with_offset = ref[f"debug.ag.{level}.batch_idx_with_offset"]
    real = with_offset < 100  # the rest are random loss-only patches
    assert torch.equal(with_offset[real], images)
    got = ref[f"debug.ag.{level}.crop_pos"][real]
    assert ((got >= low) & (got <= high)).all(), (got.tolist(), low.tolist(), high.tolist())


def test_training_patches_top_up_predicted_patches_to_the_minimum():
    """Predicted patches stay real and first; images short of ``min_patches`` get GT patches, then random
    ones (both loss-only)."""
    image_wh = torch.tensor([[320.0, 256.0], [208.0, 176.0]])
    targets = [ImageTargets(torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]), torch.tensor([1, 2])),
               ImageTargets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))]
    predicted = PatchSet(torch.tensor([1, 0, 1, 1, 1]), torch.zeros(5, 2, dtype=torch.int64),
                         torch.zeros(5, dtype=torch.bool))
    torch.manual_seed(0)
    out = training_patches(predicted, targets, image_wh, 16, P, 0.25, 4)
    assert out.batch_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # image 0: its predicted patch, both GT patches, one random; image 1: its four predicted patches
    assert out.loss_only.tolist() == [False, True, True, True] + [False] * 4


def test_merge_per_image_keeps_the_part_order_inside_each_image():
    parts = [PatchSet(torch.tensor([1, 0]), torch.tensor([[1, 1], [2, 2]]), torch.tensor([False, False])),
             PatchSet(torch.tensor([0, 1]), torch.tensor([[3, 3], [4, 4]]), torch.tensor([True, True]))]
    merged = merge_per_image(parts)
    assert merged.batch_idx.tolist() == [0, 0, 1, 1]
    assert merged.crop_pos[:, 0].tolist() == [2, 3, 1, 4]
    assert merged.loss_only.tolist() == [False, True, False, True]


def test_gt_patch_position_without_jitter_starts_at_the_box():
    # Box (40, 40)-(60, 70) px at stride 8 -> cells (5, 5)-(7.5, 8.75); image 320 x 256.
    box = torch.tensor([[40.0, 40.0, 60.0, 70.0]])
    got = gt_patch_positions(box, torch.tensor([[320.0, 256.0]]), 8, P, torch.zeros(1, 2))
    assert got.tolist() == [[5, 5]]


def test_gt_patch_position_with_full_jitter_uses_the_slack():
    # slack = (5 + 15) - (7.5, 8.75) = (12.5, 11.25); u = 0.5 -> floor(5 - 6.25, 5 - 5.625) -> clamp 0.
    box = torch.tensor([[40.0, 40.0, 60.0, 70.0]])
    got = gt_patch_positions(box, torch.tensor([[320.0, 256.0]]), 8, P, torch.full((1, 2), 0.5))
    assert got.tolist() == [[0, 0]]
    # u = 0.2 -> floor(5 - 2.5, 5 - 2.25) = (2, 2).
    got = gt_patch_positions(box, torch.tensor([[320.0, 256.0]]), 8, P, torch.full((1, 2), 0.2))
    assert got.tolist() == [[2, 2]]


def test_random_patch_positions_range():
    # ceil(320/8) - 15 = 25 -> x in [0, 25); ceil(64/8) - 15 < 1 -> y in [0, 1) = 0.
    wh = torch.tensor([[320.0, 64.0], [320.0, 64.0]])
    got = random_patch_positions(wh, 8, P, torch.tensor([[0.0, 0.99], [0.999, 0.5]]))
    assert got.tolist() == [[0, 0], [24, 0]]


def test_centrality_scores_per_group():
    centres = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [100.0, 100.0]])
    group = torch.tensor([0, 0, 0, 1])
    # image 0: distances^2 to the others: (25 + 100), (25 + 25), (100 + 25); image 1 alone: 0.
    assert centrality_scores(centres, group).tolist() == [-125.0, -50.0, -125.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(
    w=st.integers(16, 1400),
    h=st.integers(16, 1400),
    stride=STRIDES,
    box=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.001, 1), st.floats(0.001, 1)),
    jitter=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
)
def test_gt_patches_lie_inside_padded_map_and_contain_the_box(w, h, stride, box, jitter):
    limit = stride * P / 2  # only boxes smaller than half a patch make GT patches
    bw, bh = min(box[2] * w, limit * 0.999), min(box[3] * h, limit * 0.999)
    x1, y1 = box[0] * (w - bw), box[1] * (h - bh)
    xyxy = torch.tensor([[x1, y1, x1 + bw, y1 + bh]], dtype=torch.float32)
    pos = gt_patch_positions(xyxy, torch.tensor([[float(w), float(h)]]), stride, P, torch.tensor([jitter]))[0]
    for axis, size in ((0, w), (1, h)):
        assert pos[axis] >= 0 and pos[axis] + P <= max(padded_cells(size, stride), P)
        # The patch starts at or before the box; the floor after the jitter may leave the box's far
        # edge up to one cell outside (release behaviour).
        assert pos[axis] <= xyxy[0, axis] / stride + 1e-4
        assert pos[axis] + P > xyxy[0, axis + 2] / stride - 1


@settings(max_examples=200, deadline=None)
@given(w=st.integers(16, 1400), h=st.integers(16, 1400), stride=STRIDES,
       u=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)))
def test_random_patches_lie_inside_padded_map(w, h, stride, u):
    wh = torch.tensor([[float(w), float(h)]])
    pos = random_patch_positions(wh, stride, P, torch.tensor([u]))[0]
    assert pos[0] >= 0 and pos[0] + P <= max(padded_cells(w, stride), P)
    assert pos[1] >= 0 and pos[1] + P <= max(padded_cells(h, stride), P)
    assert (pos[0] + P <= ceil_cells(wh, stride)[0, 0]) or pos[0] == 0
