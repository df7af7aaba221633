"""Anchor / proposal recall: greedy matching and AR values by hand, box extraction, properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.engine.recall import (
    IOU_THRESHOLDS,
    RecallAccumulator,
    RecallEvaluator,
    anchor_boxes_xyxy,
    greedy_matched_ious,
    ground_truth_xyxy,
    proposal_boxes_xyxy,
    recall_at,
)
from asag.structures import AnchorOutput, HeadOutput, ImageTargets, ModelOutput, QuerySet

# ------------------------------------------------------------------------------ greedy matching


def test_greedy_takes_the_best_pair_first_not_the_best_assignment():
    # the optimal assignment would be 0.8 + 0.85; greedy takes 0.9 first and leaves gt 1 with 0.1
    ious = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    assert greedy_matched_ious(ious).tolist() == pytest.approx([0.9, 0.1])


def test_greedy_uses_each_box_once():
    ious = torch.tensor([[0.6], [0.7]])  # one box, two ground truths
    assert greedy_matched_ious(ious).tolist() == pytest.approx([0.0, 0.7])
    assert greedy_matched_ious(torch.zeros(2, 0)).tolist() == [0.0, 0.0]
    assert greedy_matched_ious(torch.zeros(0, 3)).numel() == 0


def test_recall_at_thresholds_by_hand():
    matched = torch.tensor([0.9, 0.1, 0.62, 0.5])
    r = recall_at(matched, (0.5, 0.6, 0.65, 0.95))
    assert r == [0.75, 0.5, 0.25, 0.0]
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_accumulator_ar_by_hand_with_box_count_cut_and_sizes():
    small = torch.tensor([0.0, 0.0, 20.0, 20.0])  # area 400 < 32^2
    large = torch.tensor([100.0, 100.0, 300.0, 200.0])  # area 20000 >= 96^2
    gt = torch.stack([small, large])
    boxes = torch.stack([
        large,  # IoU 1 with the large object
        torch.tensor([0.0, 0.0, 20.0, 14.5]),  # IoU 0.725 with the small object
    ])
    acc = RecallAccumulator(proposal_nums=(1, 2))
    acc.add(gt, boxes)
    res = acc.result()
    # N = 1: only the large object is found (IoU 1 at every threshold) -> recall 1/2 everywhere
    assert res.ar["all"][1] == pytest.approx(0.5)
    # N = 2: the small object reaches IoU 0.725, i.e. the thresholds 0.50..0.70 (5 of 10)
    assert res.recall["all"][2] == pytest.approx([1.0] * 5 + [0.5] * 5)
    assert res.ar["all"][2] == pytest.approx(0.75)
    assert res.ar["small"][1] == 0.0 and res.ar["small"][2] == pytest.approx(0.5)
    assert res.ar["large"][1] == 1.0 and res.ar["medium"][2] == 0.0
    assert res.num_gt == {"all": 2, "small": 1, "medium": 0, "large": 1}
    assert res.mean_boxes == 2.0


def test_size_ranges_are_matched_separately():
    # one box sits on both objects' best spot: pooled matching gives it to the large object, the
    # small range alone gives it to the small object
    small = torch.tensor([0.0, 0.0, 30.0, 30.0])
    large = torch.tensor([0.0, 0.0, 40.0, 40.0])  # 1600 px: medium
    box = torch.tensor([[0.0, 0.0, 38.0, 38.0]])  # IoU 0.62 with small, 0.90 with large
    acc = RecallAccumulator(proposal_nums=(1,))
    acc.add(torch.stack([small, large]), box)
    res = acc.result()
    assert res.recall["all"][1][0] == 0.5  # at IoU 0.5 only one of the two objects got the box
    assert res.recall["small"][1][0] == 1.0 and res.recall["medium"][1][0] == 1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 8), st.integers(0, 10_000))
def test_recall_properties(num_gt, num_boxes, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_gt + num_boxes, 2, generator=g) * 100
    wh = torch.rand(num_gt + num_boxes, 2, generator=g) * 50 + 1
    all_boxes = torch.cat([xy, xy + wh], dim=1)
    gt, boxes = all_boxes[:num_gt], all_boxes[num_gt:]
    acc = RecallAccumulator(proposal_nums=(2, 8))
    acc.add(gt, boxes)
    res = acc.result()
    for n in (2, 8):
        r = res.recall["all"][n]
        assert all(0.0 <= v <= 1.0 for v in r)
        assert r == sorted(r, reverse=True)  # stricter thresholds never recall more
    assert res.ar["all"][8] >= res.ar["all"][2] - 1e-9  # more boxes never recall less
    perfect = RecallAccumulator(proposal_nums=(num_gt,))
    perfect.add(gt, gt[torch.randperm(num_gt, generator=g)])
    assert perfect.result().ar["all"][num_gt] == 1.0


# ------------------------------------------------------------------------------ box extraction


def make_output(anchors_px, valid, proposals, logits, num_dn=0):
    b, q = valid.shape
    length = num_dn + q
    queries = QuerySet(boxes=torch.zeros(b, length, 4), valid_mask=valid, num_dn=num_dn,
                       attn_mask=torch.zeros(8 * b, length, length, dtype=torch.bool))
    return ModelOutput(anchors=AnchorOutput([], anchors_px, valid), queries=queries,
                       proposals=HeadOutput(logits, proposals), heads=[])


def test_anchor_boxes_are_rescaled_to_the_original_image_and_keep_valid_rows():
    # pixel cxcywh in the resized 100x200 (h x w) image; the second row is padding
    anchors = torch.tensor([[[50.0, 25.0, 20.0, 10.0], [100.0, 50.0, 200.0, 100.0]]])
    output = make_output(anchors, torch.tensor([[True, False]]), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3))
    boxes = anchor_boxes_xyxy(output, torch.tensor([[100, 200]]), torch.tensor([[300, 400]]))
    # x scales by 400/200 = 2, y by 300/100 = 3
    assert boxes[0].tolist() == [[80.0, 60.0, 120.0, 90.0]]


def test_proposals_skip_denoising_rows_and_padding_and_are_ranked_by_score():
    num_dn = 1
    proposals = torch.tensor([[[0.5, 0.5, 1.0, 1.0],  # denoising row
                               [0.25, 0.25, 0.1, 0.1],  # low score
                               [0.75, 0.5, 0.5, 0.2],  # high score
                               [0.5, 0.5, 0.2, 0.2]]])  # padded
    logits = torch.tensor([[[9.0, 9.0], [-3.0, -2.0], [1.0, -1.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])
    output = make_output(torch.zeros(1, 3, 4), valid, proposals, logits, num_dn=num_dn)
    boxes = proposal_boxes_xyxy(output, torch.tensor([[100, 200]]))  # (H, W) = (100, 200)
    torch.testing.assert_close(boxes[0], torch.tensor([[100.0, 40.0, 200.0, 60.0], [40.0, 20.0, 60.0, 30.0]]))


def test_ground_truth_in_original_pixels_and_evaluator_end_to_end():
    target = ImageTargets(boxes=torch.tensor([[0.5, 0.5, 0.5, 0.5]]), labels=torch.tensor([0]),
                          size=(50, 100), orig_size=(100, 200))
    assert ground_truth_xyxy([target])[0].tolist() == [[50.0, 25.0, 150.0, 75.0]]
    # the anchor covers the object exactly (resized frame 50x100); the proposal is off by half its width
    anchors = torch.tensor([[[50.0, 25.0, 50.0, 25.0]]])
    proposals = torch.tensor([[[0.75, 0.5, 0.5, 0.5]]])
    output = make_output(anchors, torch.tensor([[True]]), proposals, torch.zeros(1, 1, 2))
    evaluator = RecallEvaluator()
    evaluator.update(output, [target], torch.tensor([[50, 100]]), torch.tensor([[100, 200]]))
    res = evaluator.result()
    assert res["anchors"].ar["all"][100] == 1.0
    assert res["proposals"].ar["all"][100] == 0.0  # IoU 1/3
