"""Patch geometry of the anchor generator: hand-computed cases and property tests (spec 3.3-3.7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.modeling.patches import (
    anchor_patch_positions,
    anchors_to_pixels,
    bilinear_resize_weights,
    crop_offsets,
    crops_to_image_frame,
    extract_patch_tokens,
    finite_or_zero,
    maps_to_tokens,
    pad_to_patch,
    patches_to_image_frame,
    rank_in_group,
    shift_inside,
    split_into_crops,
    square_boxes_xyxy,
    valid_region_cells,
)

P = 15
STRIDES = st.sampled_from([8, 16, 32])


def padded_cells(size: int, stride: int) -> int:
    """Feature-map length of an image side after padding up to a multiple of 32."""
    return math.ceil(size / 32) * 32 // stride


# ------------------------------------------------------------------------------- hand-computed


def test_valid_region_rounds_half_to_even():
    # Fixture cases: 330/32 = 10.31, 464/32 = 14.5 -> 14; 272/32 = 8.5 -> 8, 400/32 = 12.5 -> 12;
    # 240/32 = 7.5 -> 8, 350/32 = 10.94 -> 11.
    sizes = torch.tensor([[330, 464], [272, 400], [240, 350]])
    got = valid_region_cells(sizes, 32, (20, 20))
    assert got.tolist() == [[10, 14], [8, 12], [8, 11]]


def test_valid_region_is_clamped_to_the_map_and_at_least_one():
    sizes = torch.tensor([[8, 1000]])
    assert valid_region_cells(sizes, 32, (3, 20)).tolist() == [[1, 20]]


def test_crop_position_inside_region_is_floor_of_centre_minus_half_patch():
    # stride 16, image 464 x 330: centre (200, 180) px = (12.5, 11.25) cells -> floor(5.0, 3.75) = (5, 3).
    got = anchor_patch_positions(torch.tensor([[200.0, 180.0]]), torch.tensor([[464.0, 330.0]]), 16, P)
    assert got.tolist() == [[5, 3]]


def test_crop_position_shifts_back_at_right_bottom_edge():
    # ceil(464/16) = 29, ceil(330/16) = 21. Centre (450, 320) -> (28.125, 20.0) cells -> top-left
    # floor(20.625, 12.5) = (20, 12); excess (29 - 35, 21 - 27) = (-6, -6) -> (14, 6).
    got = anchor_patch_positions(torch.tensor([[450.0, 320.0]]), torch.tensor([[464.0, 330.0]]), 16, P)
    assert got.tolist() == [[14, 6]]


def test_crop_position_clamps_to_zero_at_left_top_and_in_narrow_images():
    wh = torch.tensor([[464.0, 330.0], [200.0, 330.0]])
    # (100, 50) -> (6.25, 3.125) -> floor(-1.25, -4.375) = (-2, -5) -> clamp (0, 0).
    # Narrow image: ceil(200/16) = 13 < 15; (150, 200) -> (9.375, 12.5) -> (1, 5); x: 1 + (13 - 16) -> 0.
    got = anchor_patch_positions(torch.tensor([[100.0, 50.0], [150.0, 200.0]]), wh, 16, P)
    assert got.tolist() == [[0, 0], [0, 5]]


def test_finite_or_zero_replaces_only_nan_and_infinity():
    values = torch.tensor([[1.5, float("nan")], [float("inf"), -float("inf")], [-0.25, 3e38]])
    out = finite_or_zero(values)
    assert torch.equal(out, torch.tensor([[1.5, 0.0], [0.0, 0.0], [-0.25, 3e38]]))


def test_shift_inside_moves_only_when_the_patch_ends_outside():
    top_left = torch.tensor([[3.0, 10.0], [-4.0, 0.0]])
    limit = torch.tensor([[20.0, 20.0], [20.0, 20.0]])
    assert shift_inside(top_left, limit, P).tolist() == [[3.0, 5.0], [0.0, 0.0]]


def test_square_boxes():
    got = square_boxes_xyxy(torch.tensor([[100.0, 50.0]]), 240.0)
    assert got.tolist() == [[-20.0, -70.0, 220.0, 170.0]]


def test_patch_decoding_to_image_frame_and_pixels():
    # Patch (2, 3) at stride 16 in a 464 x 330 image: cx = (0.5 * 15 + 2) * 16 = 152 px,
    # cy = (0.5 * 15 + 3) * 16 = 168 px, w = 0.2 * 15 * 16 = 48 px, h = 0.1 * 240 = 24 px.
    raw = torch.tensor([[[0.5, 0.5, 0.2, 0.1]]])
    wh = torch.tensor([[464.0, 330.0]])
    norm = patches_to_image_frame(raw, torch.tensor([[2, 3]]), wh, 16, P)
    assert torch.allclose(norm, torch.tensor([[[152 / 464, 168 / 330, 48 / 464, 24 / 330]]]))
    px = anchors_to_pixels(norm, torch.zeros(1, 1), wh, 3.0, True)
    assert torch.allclose(px, torch.tensor([[[152.0, 168.0, 48.0, 24.0, 0.5]]]), atol=1e-4)


def test_anchor_zeroing_rules():
    wh = torch.tensor([[100.0, 100.0]])
    norm = torch.tensor(
        [[
            [0.5, 0.5, 0.5, 0.5],  # kept
            [1.0, 0.5, 0.1, 0.1],  # cx >= 1: out of boundary
            [0.5, 1.2, 0.1, 0.1],  # cy >= 1
            [-0.3, -0.3, 0.1, 0.1],  # left/top overflow is not checked
            [0.5, 0.5, 0.029, 0.5],  # 2.9 px wide: too small
            [0.5, 0.5, 0.5, 0.03],  # exactly 3 px high: kept
        ]]
    )
    conf = anchors_to_pixels(norm, torch.zeros(1, 6), wh, 3.0, True)[0, :, 4]
    assert conf.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5, 0.0, 0.5])
    # The coarse stage does not apply the boundary rule.
    conf = anchors_to_pixels(norm, torch.zeros(1, 6), wh, 3.0, False)[0, :, 4]
    assert conf.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.0, 0.5])


def test_crops_to_image_frame():
    offsets = crop_offsets(P)
    assert offsets.tolist() == [[0, 0], [0, 15], [15, 0], [15, 15]]
    boxes = torch.tensor([0.2, 0.4, 0.6, 0.8]).expand(1, 4, 1, 4)
    got = crops_to_image_frame(boxes, offsets, 30, P)[0, :, 0]
    expected = torch.tensor(
        [[0.1, 0.2, 0.3, 0.4], [0.6, 0.2, 0.3, 0.4], [0.1, 0.7, 0.3, 0.4], [0.6, 0.7, 0.3, 0.4]]
    )
    assert torch.allclose(got, expected)


def test_split_into_crops_order_and_token_layout():
    grid = torch.arange(2 * 30 * 30, dtype=torch.float32).view(1, 2, 30, 30)
    crops = split_into_crops(grid, P)  # [1, 4, 2, 15, 15]
    assert torch.equal(crops[0, 1], grid[0, :, :15, 15:])
    assert torch.equal(crops[0, 2], grid[0, :, 15:, :15])
    tokens = maps_to_tokens(crops)  # [1, 4, 225, 2]
    # token index y * 15 + x, channel last
    assert torch.equal(tokens[0, 3, 2 * 15 + 7], grid[0, :, 15 + 2, 15 + 7])


def test_extract_patch_tokens_matches_slicing():
    features = torch.randn(2, 3, 20, 24)
    batch_idx = torch.tensor([1, 0, 1])
    crop_pos = torch.tensor([[9, 5], [0, 0], [2, 1]])
    tokens = extract_patch_tokens(features, batch_idx, crop_pos, P)
    for i, (b, (x, y)) in enumerate(zip(batch_idx.tolist(), crop_pos.tolist())):
        expected = features[b, :, y : y + P, x : x + P].flatten(1).t()  # [225, 3]
        assert torch.equal(tokens[i], expected)


def test_pad_to_patch_pads_bottom_right_only_when_needed():
    small = torch.ones(1, 2, 4, 20)
    padded = pad_to_patch(small, P)
    assert padded.shape == (1, 2, 15, 20)
    assert torch.equal(padded[:, :, :4], small) and padded[:, :, 4:].abs().sum() == 0
    large = torch.ones(1, 2, 16, 16)
    assert pad_to_patch(large, P) is large


def test_rank_in_group():
    group = torch.tensor([1, 0, 1, 1, 0, 2])
    assert rank_in_group(group, 3).tolist() == [0, 0, 1, 2, 1, 0]
    assert rank_in_group(torch.zeros(0, dtype=torch.long), 3).numel() == 0


# ------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    valid=st.lists(st.integers(1, 45), min_size=1, max_size=3),
    extra=st.integers(0, 5),
    out=st.sampled_from([30, 15, 7]),
)
def test_resize_weights_match_interpolate(valid, extra, out):
    total = max(valid) + extra
    features = torch.randn(len(valid), 3, total, total)
    v = torch.tensor(valid)
    weights = bilinear_resize_weights(v, total, out)  # [B, out, total]
    got = weights[:, None] @ features @ weights[:, None].transpose(-1, -2)
    for b, n in enumerate(valid):
        expected = F.interpolate(features[b : b + 1, :, :n, :n], size=(out, out), mode="bilinear",
                                 align_corners=False)
        assert torch.allclose(got[b], expected[0], atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    w=st.integers(16, 1400),
    h=st.integers(16, 1400),
    stride=STRIDES,
    fx=st.floats(0.0, 1.0),
    fy=st.floats(0.0, 1.0),
)
def test_anchor_patches_lie_inside_padded_map(w, h, stride, fx, fy):
    centre = torch.tensor([[fx * w, fy * h]])
    pos = anchor_patch_positions(centre, torch.tensor([[float(w), float(h)]]), stride, P)[0]
    width = max(padded_cells(w, stride), P)
    height = max(padded_cells(h, stride), P)
    assert pos[0] >= 0 and pos[0] + P <= width
    assert pos[1] >= 0 and pos[1] + P <= height


@settings(max_examples=100, deadline=None)
@given(
    w=st.integers(16, 1400),
    h=st.integers(16, 1400),
    stride=st.sampled_from([8, 16]),
    x0=st.integers(0, 200),
    y0=st.integers(0, 200),
    raw=st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_decoded_patch_anchor_centres_lie_in_the_patch(w, h, stride, x0, y0, raw):
    wh = torch.tensor([[float(w), float(h)]])
    norm = patches_to_image_frame(torch.tensor([[raw]]), torch.tensor([[x0, y0]]), wh, stride, P)
    px = anchors_to_pixels(norm, torch.zeros(1, 1), wh, 3.0, True)[0, 0]
    tol = 1e-3 * max(x0, y0, 1) * stride
    assert x0 * stride - tol <= px[0] <= (x0 + P) * stride + tol
    assert y0 * stride - tol <= px[1] <= (y0 + P) * stride + tol
    assert px[2] <= P * stride + tol and px[3] <= P * stride + tol
