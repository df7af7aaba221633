"""Query Weighting (spec 8.2, 8.4): hand-computed values, properties, and the official table."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import official
from asag.training import query_weighting as qw


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


NORM_ZERO = _sigmoid(-1.5) / _sigmoid(3.0)  # 0.191508 (spec 8.4)


def test_norm_hand_values():
    out = qw.norm(_t(0.0, 1.0 / 3.0, 1.0))
    expected = _t(NORM_ZERO, 0.5 / _sigmoid(3.0), 1.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert abs(NORM_ZERO - 0.191508) < 1e-6
    assert abs(1.0 / _sigmoid(3.0) - 1.049787) < 1e-6


def test_w_pos_hand_values():
    # p = 1, u = 1 -> Norm(1) = 1; p = 0 -> Norm(0); p = 0.5, u = 0.25 -> Norm(0.5^0.4 0.25^0.6).
    out = qw.w_pos(_t(1.0, 0.0, 0.5), _t(1.0, 0.7, 0.25))
    x = 0.5**0.4 * 0.25**0.6
    expected = _t(1.0, NORM_ZERO, _sigmoid(4.5 * (x - 1.0 / 3.0)) / _sigmoid(3.0))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_w_neg_at_the_breakpoints():
    breakpoint_iou = 0.5 ** (1.0 / 0.6)  # u^0.6 = 0.5 exactly: g = 1 on both sides
    p = 0.6
    below = qw.w_neg(_t(p), _t(breakpoint_iou * (1 - 1e-9)))
    at = qw.w_neg(_t(p), _t(breakpoint_iou))
    expected = _sigmoid(4.5 * (p**0.4 - 1.0 / 3.0)) / _sigmoid(3.0) - NORM_ZERO
    torch.testing.assert_close(below, _t(expected), rtol=0, atol=1e-9)
    torch.testing.assert_close(at, _t(expected), rtol=0, atol=1e-12)  # g(0.5) = (4/3)(1 - 0.25) = 1
    # u = 1 -> g = 0 -> Norm(0) - Norm(0) = 0, whatever the score.
    torch.testing.assert_close(qw.w_neg(_t(0.1, 0.9, 1.0), _t(1.0, 1.0, 1.0)), _t(0.0, 0.0, 0.0))
    # Below the breakpoint the IoU does not matter: w_neg = Norm(p^0.4) - Norm(0).
    torch.testing.assert_close(qw.w_neg(_t(p), _t(0.0)), _t(expected), rtol=0, atol=1e-12)
    # Above it: u^0.6 = 0.8 -> g = (4/3)(1 - 0.64) = 0.48.
    u = 0.8 ** (1.0 / 0.6)
    expected_above = _sigmoid(4.5 * (p**0.4 * 0.48 - 1.0 / 3.0)) / _sigmoid(3.0) - NORM_ZERO
    torch.testing.assert_close(qw.w_neg(_t(p), _t(u)), _t(expected_above), rtol=0, atol=1e-12)


def test_negative_decay_values():
    torch.testing.assert_close(qw.negative_decay(_t(0.0, 0.49, 0.5, 0.8, 1.0)), _t(1.0, 1.0, 1.0, 0.48, 0.0))


def test_area_weights_hand_values():
    boxes = _t(0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.3, 0.3, 0.2, 0.05).reshape(4, 4)
    # sqrt(w h) = 0, 0.5, 1, 0.1
    torch.testing.assert_close(qw.area_weight(boxes), _t(4.0, 2.5, 1.0, 3.7))
    torch.testing.assert_close(qw.inverse_area_weight(boxes), _t(1.0, 2.5, 4.0, 1.3))
    torch.testing.assert_close(qw.area_weight(boxes, max_weight=1.0), _t(1.0, 1.0, 1.0, 1.0))


unit = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(p=unit, u=unit)
def test_weights_ranges(p, u):
    wp = float(qw.w_pos(_t(p), _t(u)))
    wn = float(qw.w_neg(_t(p), _t(u)))
    assert NORM_ZERO - 1e-12 <= wp <= 1.0 + 1e-12
    assert -1e-12 <= wn <= 1.0 - NORM_ZERO + 1e-12


@settings(max_examples=200, deadline=None)
@given(p=unit, u1=unit, u2=unit)
def test_w_pos_monotone_in_iou_and_w_neg_antitone(p, u1, u2):
    lo, hi = sorted((u1, u2))
    assert float(qw.w_pos(_t(p), _t(lo))) <= float(qw.w_pos(_t(p), _t(hi))) + 1e-12
    assert float(qw.w_neg(_t(p), _t(lo))) >= float(qw.w_neg(_t(p), _t(hi))) - 1e-12


@settings(max_examples=200, deadline=None)
@given(w=unit, h=unit)
def test_area_weights_sum_to_a_plus_one(w, h):
    box = _t(0.5, 0.5, w, h)
    standard, inverse = float(qw.area_weight(box)), float(qw.inverse_area_weight(box))
    assert 1.0 - 1e-12 <= standard <= 4.0 + 1e-12
    assert abs(standard + inverse - 5.0) < 1e-12


def test_official_query_weighting_table(fixtures_dir):
    table = official.load(fixtures_dir, "query_weighting_table.pt")
    p, u = table["p"], table["u"]
    assert p.dtype == torch.float32
    torch.testing.assert_close(qw.w_pos(p, u), table["decoder.w_pos"], rtol=0, atol=2e-7)
    torch.testing.assert_close(qw.w_neg(p, u), table["decoder.w_neg"], rtol=0, atol=2e-7)
    # Anchors: the soft classification target is the IoU itself, the box weight is w_pos.
    torch.testing.assert_close(u, table["anchor.pos_weight_iou"], rtol=0, atol=0)
    torch.testing.assert_close(qw.w_pos(p, u), table["anchor.box_weight"], rtol=0, atol=2e-7)
    target = table["target_box_cxcywh"].expand(len(p), 4)
    torch.testing.assert_close(qw.area_weight(target), table["decoder.area_weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(qw.area_weight(target), table["anchor.area_weight"], rtol=0, atol=1e-6)


def test_official_area_weight_table(fixtures_dir):
    table = official.load(fixtures_dir, "query_weighting_table.pt")
    wh = table["area.sizes_wh"]
    boxes = torch.cat([torch.full_like(wh, 0.5), wh], dim=1)
    close = torch.testing.assert_close
    close(qw.area_weight(boxes), table["area.standard_decoder"], rtol=0, atol=1e-6)
    close(qw.area_weight(boxes), table["area.standard_anchor"], rtol=0, atol=1e-6)
    close(qw.inverse_area_weight(boxes), table["area.inverse_anchor_P6"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spec_float64_reference(fixtures_dir, dtype):
    table = official.load(fixtures_dir, "query_weighting_table.pt")
    p, u = table["p"].to(dtype), table["u"].to(dtype)
    tol = 2e-7 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(qw.w_pos(p, u).double(), table["spec_float64.w_pos"], rtol=0, atol=tol)
    torch.testing.assert_close(qw.w_neg(p, u).double(), table["spec_float64.w_neg"], rtol=0, atol=tol)
