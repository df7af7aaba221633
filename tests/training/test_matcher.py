"""Hungarian matchers (spec 8.3): costs, assignment, valid masks, errors, and the official matchings."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import official
from asag.training.matcher import (
    AnchorMatcher,
    GroupedTargets,
    HungarianMatcher,
    Matching,
    NonFiniteCostError,
    focal_class_cost,
    matching_cost,
)
from asag.training.query_weighting import area_weight, inverse_area_weight

CRITERION_CASES = ["nodn_epoch1", "nodn_epoch0", "dn_epoch1"]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _targets(*images: list[tuple[float, float, float, float, int]]) -> GroupedTargets:
    boxes = [torch.tensor([b[:4] for b in img], dtype=torch.float32).reshape(-1, 4) for img in images]
    labels = [torch.tensor([b[4] for b in img], dtype=torch.int64) for img in images]
    return GroupedTargets.from_lists(boxes, labels)


def _pairs(matching: Matching, targets: GroupedTargets) -> list[set[tuple[int, int]]]:
    """Per group: {(query, target index inside the group)}."""
    local = matching.target - targets.offsets()[matching.group]
    out = [set() for _ in range(matching.num_groups)]
    for g, q, t in zip(matching.group.tolist(), matching.query.tolist(), local.tolist()):
        out[g].add((q, t))
    return out


# ------------------------------------------------------------------------------------------ costs


def test_focal_class_cost_hand_values():
    p = torch.tensor([0.5, 0.9, 0.01])
    eps = 1e-8
    expected = [
        0.25 * 0.25 * -math.log(0.5 + eps) - 0.75 * 0.25 * -math.log(0.5 + eps),
        0.25 * 0.01 * -math.log(0.9 + eps) - 0.75 * 0.81 * -math.log(0.1 + eps),
        0.25 * 0.99**2 * -math.log(0.01 + eps) - 0.75 * 1e-4 * -math.log(0.99 + eps),
    ]
    torch.testing.assert_close(focal_class_cost(p), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert focal_class_cost(torch.tensor([0.9])) < focal_class_cost(torch.tensor([0.1]))


def test_matching_cost_hand_value():
    # Concentric boxes, the prediction half as tall: L1 = 0.2, IoU = GIoU = 0.5; p(target class) = 0.5.
    prob = torch.full((1, 1, 3), 0.5)
    prob[0, 0, 2] = 0.5
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    targets = _targets([(0.5, 0.5, 0.2, 0.4, 2)])
    weight = area_weight(targets.boxes)  # 4 - 3 sqrt(0.08)
    cost = matching_cost(prob, pred, targets.padded(), weight[None])
    cls = 0.25 * 0.25 * -math.log(0.5 + 1e-8) - 0.75 * 0.25 * -math.log(0.5 + 1e-8)
    expected = (5 * 0.2 + 2 * cls - 2 * 0.5) * (4 - 3 * math.sqrt(0.08))
    assert cost.shape == (1, 1, 1)
    assert abs(float(cost) - expected) < 1e-5


# --------------------------------------------------------------------------------------- matching


def _head(boxes_per_image: list[list[tuple[float, float, float, float]]], num_classes: int = 4):
    boxes = torch.tensor(boxes_per_image, dtype=torch.float32)  # (B, N, 4)
    logits = torch.zeros(boxes.shape[0], boxes.shape[1], num_classes)
    return logits, boxes


def test_obvious_assignment():
    logits, boxes = _head([[(0.2, 0.2, 0.1, 0.1), (0.8, 0.8, 0.1, 0.1), (0.5, 0.5, 0.9, 0.9)]])
    targets = _targets([(0.8, 0.8, 0.1, 0.1, 1), (0.2, 0.2, 0.1, 0.1, 3)])
    matching = HungarianMatcher()(logits, boxes, targets, area_weight(targets.boxes))
    assert _pairs(matching, targets) == [{(1, 0), (0, 1)}]
    assert matching.query.dtype == torch.int64


def test_valid_mask_not_a_prefix_returns_real_indices():
    # Query 0 is a perfect fit but invalid; the valid queries are 1 and 3 (not a prefix).
    fit, other, near = (0.3, 0.3, 0.2, 0.2), (0.7, 0.7, 0.2, 0.2), (0.31, 0.3, 0.2, 0.2)
    logits, boxes = _head([[fit, other, fit, near]])
    valid = torch.tensor([[False, True, False, True]])
    targets = _targets([(0.3, 0.3, 0.2, 0.2, 0)])
    matching = HungarianMatcher()(logits, boxes, targets, area_weight(targets.boxes), valid)
    assert matching.query.tolist() == [3]


def test_batched_matching_equals_per_image_matching():
    torch.manual_seed(0)
    logits = torch.randn(3, 30, 5)
    boxes = torch.rand(3, 30, 4) * 0.5 + 0.2
    valid = torch.rand(3, 30) > 0.3
    images = [
        [(0.3, 0.4, 0.2, 0.1, 1), (0.6, 0.6, 0.3, 0.3, 4)],
        [],
        [(0.5, 0.5, 0.5, 0.5, 0), (0.2, 0.8, 0.1, 0.1, 2), (0.8, 0.2, 0.05, 0.3, 2)],
    ]
    targets = _targets(*images)
    matcher = HungarianMatcher()
    joint = _pairs(matcher(logits, boxes, targets, area_weight(targets.boxes), valid), targets)
    for b, image in enumerate(images):
        single = _targets(image)
        one = slice(b, b + 1)
        alone = matcher(logits[one], boxes[one], single, area_weight(single.boxes), valid[one])
        assert _pairs(alone, single)[0] == joint[b]
    assert joint[1] == set()


def test_more_targets_than_queries_and_empty_batch():
    torch.manual_seed(1)
    logits, boxes = torch.randn(1, 10, 3), torch.rand(1, 10, 4) * 0.5 + 0.25
    many = GroupedTargets.from_lists([torch.rand(500, 4) * 0.5 + 0.25], [torch.randint(0, 3, (500,))])
    matching = HungarianMatcher()(logits, boxes, many, area_weight(many.boxes))
    assert len(matching) == 10
    assert len(set(matching.target.tolist())) == 10 and sorted(matching.query.tolist()) == list(range(10))
    empty = GroupedTargets.from_lists([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0).long()] * 2)
    logits2, boxes2 = torch.randn(2, 10, 3), torch.rand(2, 10, 4)
    result = HungarianMatcher()(logits2, boxes2, empty, area_weight(empty.boxes))
    assert len(result) == 0 and result.num_groups == 2


def test_nan_cost_raises_clear_error():
    logits, boxes = _head([[(0.2, 0.2, 0.1, 0.1), (0.8, 0.8, 0.1, 0.1)]])
    logits[0, 1, 2] = float("nan")
    targets = _targets([(0.8, 0.8, 0.1, 0.1, 2), (0.2, 0.2, 0.1, 0.1, 1)])
    with pytest.raises(NonFiniteCostError, match=r"stage 'aux_1'.* 1 non-finite entries"):
        HungarianMatcher()(logits, boxes, targets, area_weight(targets.boxes), stage="aux_1")
    assert issubclass(NonFiniteCostError, ValueError)
    # A NaN in a query that does not take part (padded) is harmless.
    valid = torch.tensor([[True, False]])
    matching = HungarianMatcher()(logits, boxes, targets, area_weight(targets.boxes), valid, stage="main")
    assert matching.query.tolist() == [0]


def test_nan_box_in_anchor_matcher_names_the_part():
    anchors = torch.rand(2, 5, 5)
    anchors[1, 3, 0] = float("nan")
    targets = _targets([(0.5, 0.5, 0.2, 0.2, 7)], [(0.4, 0.4, 0.2, 0.2, 1), (0.6, 0.6, 0.1, 0.1, 3)])
    with pytest.raises(NonFiniteCostError, match=r"'anchor_P4P3patches'.* 2 non-finite"):
        AnchorMatcher()(anchors, targets, area_weight(targets.boxes), stage="anchor_P4P3patches")


def test_costs_computed_in_float32_outside_autocast():
    torch.manual_seed(2)
    logits, boxes = torch.randn(2, 20, 4), torch.rand(2, 20, 4) * 0.5 + 0.25
    targets = _targets([(0.3, 0.3, 0.2, 0.2, 1)], [(0.6, 0.6, 0.3, 0.1, 2), (0.4, 0.5, 0.2, 0.2, 0)])
    weight = area_weight(targets.boxes)
    reference = HungarianMatcher()(logits, boxes, targets, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = HungarianMatcher()(logits.bfloat16(), boxes, targets, weight)
    # bf16 inputs lose precision, but the matcher itself must run (cdist/giou in float32) and agree here.
    assert _pairs(under_autocast, targets) == _pairs(reference, targets)


def test_anchor_matcher_is_class_agnostic():
    anchors = torch.tensor([[[0.3, 0.3, 0.2, 0.2, _logit(0.9)], [0.7, 0.7, 0.2, 0.2, _logit(0.1)]]])
    targets = _targets([(0.7, 0.7, 0.2, 0.2, 55), (0.3, 0.3, 0.2, 0.2, 12)])
    matching = AnchorMatcher()(anchors, targets, inverse_area_weight(targets.boxes))
    assert _pairs(matching, targets) == [{(1, 0), (0, 1)}]


def test_identity_matching():
    targets = _targets([(0.1, 0.1, 0.1, 0.1, 1)] * 3, [], [(0.2, 0.2, 0.1, 0.1, 0)] * 2)
    m = Matching.identity(targets)
    assert m.group.tolist() == [0, 0, 0, 2, 2]
    assert m.query.tolist() == [0, 1, 2, 0, 1]
    assert m.target.tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- official matchings


def _check_official(matching: Matching, targets: GroupedTargets, debug: dict) -> None:
    local = matching.target - targets.offsets()[matching.group]
    assert torch.bincount(matching.group, minlength=matching.num_groups).tolist() == debug["match_counts"]
    assert matching.query.tolist() == debug["match_src"].tolist()
    assert local.tolist() == debug["match_tgt"].tolist()


def _image_targets(d: dict) -> GroupedTargets:
    n = d["targets.num"]
    boxes = [d[f"targets.{b}.boxes"] for b in range(n)]
    return GroupedTargets.from_lists(boxes, [d[f"targets.{b}.labels"] for b in range(n)])


@pytest.mark.parametrize("case", CRITERION_CASES)
@pytest.mark.parametrize(
    "stage,prefix", [("main", "outputs"), ("aux_0", "outputs.aux_outputs.0"), ("rpn", "outputs.rpn")]
)
def test_official_head_matching(fixtures_dir, case, stage, prefix):
    d = official.load(fixtures_dir, f"criterion_asag_a_{case}.pt")
    num_dn = d["num_dn"] if d["use_dn"] else 0
    targets = _image_targets(d)
    logits = d[f"{prefix}.pred_logits"][:, num_dn:]
    boxes = d[f"{prefix}.pred_boxes"][:, num_dn:]
    valid = d["outputs.anchors.valid_mask"]
    matching = HungarianMatcher()(logits, boxes, targets, area_weight(targets.boxes), valid, stage)
    _check_official(matching, targets, official.group(d, f"debug.get_weight.{stage}"))


@pytest.mark.parametrize("case", CRITERION_CASES)
@pytest.mark.parametrize("part,entries", [("P6", [0]), ("P5crops", [1]), ("P4P3patches", [2, 3])])
def test_official_anchor_matching(fixtures_dir, case, part, entries):
    """The official per-patch targets (stored) -> our anchor matcher -> the official indices."""
    d = official.load(fixtures_dir, f"criterion_asag_a_{case}.pt")
    debug = official.group(d, f"debug.get_weight.anchor_{part}")
    raw = [d[f"outputs.anchors.anchors_for_loss.{i}.raw"] for i in entries]
    anchors = torch.cat([r.flatten(0, 1) if r.dim() == 4 else r for r in raw])  # (G, K, 5)
    counts = torch.tensor(debug["target_counts"])
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    source = torch.arange(len(group))
    targets = GroupedTargets(debug["target_boxes"], debug["target_labels"], group, len(counts), source)
    weight = inverse_area_weight(targets.boxes) if debug["inverse"] else area_weight(targets.boxes)
    matching = AnchorMatcher()(anchors, targets, weight, f"anchor_{part}")
    _check_official(matching, targets, debug)


@settings(max_examples=40, deadline=None)
@given(
    num_queries=st.integers(1, 12),
    counts=st.lists(st.integers(0, 15), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_matching_is_a_one_to_one_assignment_of_valid_queries(num_queries, counts, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = len(counts)
    logits = torch.randn(batch, num_queries, 3, generator=gen)
    boxes = torch.rand(batch, num_queries, 4, generator=gen) * 0.5 + 0.25
    valid = torch.rand(batch, num_queries, generator=gen) > 0.4
    targets = GroupedTargets.from_lists(
        [torch.rand(n, 4, generator=gen) * 0.5 + 0.25 for n in counts],
        [torch.randint(0, 3, (n,), generator=gen) for n in counts],
    )
    matching = HungarianMatcher()(logits, boxes, targets, area_weight(targets.boxes), valid)
    for g, n in enumerate(counts):
        rows = matching.query[matching.group == g]
        cols = matching.target[matching.group == g]
        assert len(rows) == min(int(valid[g].sum()), n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert bool(valid[g, rows].all())
        assert bool((targets.group[cols] == g).all())
