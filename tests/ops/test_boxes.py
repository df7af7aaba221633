"""Box geometry: hand-computed xyzr values, round trips, refinement and IoF."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.ops.boxes import (
    full_image_boxes_cxcywh_px,
    intersection_over_foreground,
    normalized_cxcywh_from_xyzr,
    refine_xyzr,
    xyxy_to_xyzr,
    xyzr_to_xyxy,
)


def test_xyzr_hand_computed():
    # (0, 0, 8, 16) px = (0, 0, 2, 4) cells: centre (1, 2), z = log2(8)/2 = 1.5, r = log2(4/2)/2 = 0.5
    xyzr = xyxy_to_xyzr(torch.tensor([0.0, 0.0, 8.0, 16.0]))
    torch.testing.assert_close(xyzr, torch.tensor([1.0, 2.0, 1.5, 0.5]), atol=1e-6, rtol=0)
    square = xyxy_to_xyzr(torch.tensor([10.0, 20.0, 26.0, 36.0]))  # 4x4 cells centred at (4.5, 7)
    torch.testing.assert_close(square, torch.tensor([4.5, 7.0, 2.0, 0.0]), atol=1e-6, rtol=0)


def test_xyzr_decode_hand_computed():
    # z = 1.5, r = 0.5: w = 2^1.5 * 2^-0.5 = 2, h = 2^1.5 * 2^0.5 = 4 cells; stride 4 -> 8 x 16 px
    xyxy = xyzr_to_xyxy(torch.tensor([1.0, 2.0, 1.5, 0.5]))
    torch.testing.assert_close(xyxy, torch.tensor([0.0, 0.0, 8.0, 16.0]), atol=1e-5, rtol=0)
    cells = xyzr_to_xyxy(torch.tensor([1.0, 2.0, 1.5, 0.5]), stride=1.0)
    torch.testing.assert_close(cells, torch.tensor([0.0, 0.0, 2.0, 4.0]), atol=1e-6, rtol=0)


def test_xyzr_stride_argument():
    box = torch.tensor([0.0, 0.0, 16.0, 16.0])
    torch.testing.assert_close(xyxy_to_xyzr(box, stride=8.0), torch.tensor([1.0, 1.0, 1.0, 0.0]))


box_side = st.floats(min_value=1.0, max_value=1000.0)
box_pos = st.floats(min_value=-100.0, max_value=1500.0)


@settings(max_examples=200, deadline=None)
@given(x0=box_pos, y0=box_pos, w=box_side, h=box_side, stride=st.sampled_from([1.0, 4.0, 8.0]))
def test_xyzr_round_trip(x0, y0, w, h, stride):
    box = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float64)
    back = xyzr_to_xyxy(xyxy_to_xyzr(box, stride), stride)
    # the 1e-7 guards inside the logs perturb the size by about 1e-7 * (aspect + 1 / area_cells)
    aspect = max(w / h, h / w)
    rel = 2e-7 * (aspect + stride**2 / (w * h)) + 1e-12
    assert torch.allclose(back, box, atol=max(w, h) * rel + 1e-9, rtol=0)


@settings(max_examples=100, deadline=None)
@given(z=st.floats(-2, 8), r=st.floats(-3, 3), x=st.floats(0, 300), y=st.floats(0, 300))
def test_xyzr_decode_then_encode(x, y, z, r):
    xyzr = torch.tensor([x, y, z, r], dtype=torch.float64)
    again = xyxy_to_xyzr(xyzr_to_xyxy(xyzr))
    assert torch.allclose(again, xyzr, atol=1e-5, rtol=1e-6)


def test_refine_hand_computed():
    xyzr = torch.tensor([[[1.0, 2.0, 1.0, 0.0]]])
    deltas = torch.tensor([[[0.5, -0.25, 0.1, 0.2]]])
    # x += 0.5 * 2^1, y -= 0.25 * 2^1, z += 0.1, r += 0.2
    expected = torch.tensor([[[2.0, 1.5, 1.1, 0.2]]])
    torch.testing.assert_close(refine_xyzr(xyzr, deltas), expected)
    torch.testing.assert_close(refine_xyzr(xyzr, torch.zeros_like(deltas)), xyzr)


def test_iof_hand_computed():
    a = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 5.0], [5.0, 5.0, 5.0, 6.0]]])
    iof = intersection_over_foreground(a, a)
    # overlap(a0, a1) = 1x1 = 1: / area(a0) = 4, / area(a1) = 8; a2 has zero area -> 0 / 1e-6 = 0
    expected = torch.tensor([[[1.0, 0.25, 0.0], [0.125, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(iof, expected)


def test_iof_rectangular_batch():
    b1 = torch.tensor([[[0.0, 0.0, 4.0, 4.0]], [[0.0, 0.0, 1.0, 1.0]]])  # [2, 1, 4]
    b2 = torch.tensor([[[2.0, 0.0, 6.0, 4.0], [10.0, 10.0, 11.0, 11.0]],
                       [[0.0, 0.0, 10.0, 10.0], [0.5, 0.5, 1.0, 1.0]]])  # [2, 2, 4]
    iof = intersection_over_foreground(b1, b2)
    assert iof.shape == (2, 1, 2)
    torch.testing.assert_close(iof, torch.tensor([[[0.5, 0.0]], [[1.0, 0.25]]]))


boxes_strategy = st.lists(
    st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0.5, 50), st.floats(0.5, 50)),
    min_size=1, max_size=6,
)


@settings(max_examples=100, deadline=None)
@given(raw=boxes_strategy, scale=st.floats(0.5, 4.0))
def test_iof_properties(raw, scale):
    t = torch.tensor(raw, dtype=torch.float64)
    boxes = torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=-1)[None]  # [1, N, 4]
    iof = intersection_over_foreground(boxes, boxes)
    assert ((iof >= 0) & (iof <= 1 + 1e-12)).all()
    assert torch.allclose(iof.diagonal(dim1=1, dim2=2), torch.ones(1, len(raw), dtype=torch.float64))
    assert torch.allclose(intersection_over_foreground(boxes * scale, boxes * scale), iof)


def test_normalized_cxcywh_from_xyzr():
    # image (h, w) = (100, 200); box (20, 10, 60, 50) px = cells (5, 2.5, 15, 12.5)
    xyzr = xyxy_to_xyzr(torch.tensor([[[20.0, 10.0, 60.0, 50.0]]]))
    out = normalized_cxcywh_from_xyzr(xyzr, torch.tensor([[100, 200]]))
    torch.testing.assert_close(out, torch.tensor([[[0.2, 0.3, 0.2, 0.4]]]), atol=1e-6, rtol=0)
    assert abs(xyzr[0, 0, 2].item() - math.log2(10.0)) < 1e-6


def test_full_image_boxes():
    out = full_image_boxes_cxcywh_px(torch.tensor([[100, 200], [30, 40]]), 3)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[0, 2], torch.tensor([100.0, 50.0, 200.0, 100.0]))
    torch.testing.assert_close(out[1, 0], torch.tensor([20.0, 15.0, 40.0, 30.0]))
