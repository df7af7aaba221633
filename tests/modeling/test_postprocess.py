"""Post-processing (spec section 10): hand-computed cases and the official PostProcess fixtures."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import box_convert

from asag.modeling.postprocess import PostProcessor, contiguous_to_category_ids, postprocess
from asag.structures import Detections, HeadOutput
from official import CASES, LEVELS, VARIANTS, load

# COCO 2017: contiguous index -> category id (data, the official 80-entry table).
COCO_CATEGORY_IDS = torch.tensor([
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
])  # fmt: skip

ATOL_SCORES = 1e-5  # README "Verification and tolerances"
ATOL_BOXES = 1e-2
HEADS = ["main", "aux_0"]
FILES = list(itertools.product(VARIANTS, CASES, LEVELS))


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def test_hand_computed_top_k():
    # one image, 2 queries, 3 classes; scores: q0 = (0.9, 0.2, 0.6), q1 = (0.3, 0.8, 0.1)
    logits = torch.tensor([[[0.9, 0.2, 0.6], [0.3, 0.8, 0.1]]]).logit()
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    orig = torch.tensor([[200, 100]])  # (h, w)
    (det,) = postprocess(logits, boxes, orig, top_k=4)
    torch.testing.assert_close(det.scores, torch.tensor([0.9, 0.8, 0.6, 0.3]))
    assert det.labels.tolist() == [0, 1, 2, 0]
    box0 = torch.tensor([40.0, 60.0, 60.0, 140.0])  # (0.4, 0.3, 0.6, 0.7) * (W, H, W, H)
    box1 = torch.tensor([0.0, 100.0, 50.0, 200.0])
    torch.testing.assert_close(det.boxes, torch.stack([box0, box1, box0, box1]))


def test_top_k_capped_by_available_entries():
    logits = torch.randn(2, 3, 4)
    boxes = torch.rand(2, 3, 4)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    dets = postprocess(logits, boxes, torch.tensor([[10, 10], [10, 10]]), valid, top_k=100)
    assert [len(d) for d in dets] == [12, 4]
    assert (dets[0].scores[:-1] >= dets[0].scores[1:]).all()
    # every detection of image 1 comes from query 0
    torch.testing.assert_close(dets[1].scores.sort().values, logits[1, 0].sigmoid().sort().values)
    every = postprocess(logits, boxes, torch.tensor([[10, 10]] * 2), valid, top_k=None)
    assert [len(d) for d in every] == [12, 4]


def test_invalid_queries_never_detected_and_batch_one_unchanged():
    torch.manual_seed(0)
    logits, boxes = torch.randn(1, 5, 3), torch.rand(1, 5, 4)
    logits[0, 4] = 10.0  # a confident padded query
    orig = torch.tensor([[50, 60]])
    valid = torch.tensor([[True, True, True, True, False]])
    (masked,) = postprocess(logits, boxes, orig, valid, top_k=6)
    assert (masked.scores < torch.sigmoid(torch.tensor(10.0))).all()
    (all_valid,) = postprocess(logits, boxes, orig, torch.ones(1, 5, dtype=torch.bool), top_k=6)
    (ignored,) = postprocess(logits, boxes, orig, None, top_k=6)
    assert torch.equal(all_valid.scores, ignored.scores) and torch.equal(all_valid.boxes, ignored.boxes)


def test_post_processor_drops_denoising_rows():
    logits = torch.full((1, 4, 2), -5.0)
    logits[0, 0, 0] = 5.0  # a DN query with a high score
    logits[0, 2, 1] = 1.0
    head = HeadOutput(logits=logits, boxes=torch.rand(1, 4, 4))
    valid = torch.ones(1, 3, dtype=torch.bool)
    (det,) = PostProcessor(topk=1)(head, valid, torch.tensor([[10, 10]]), num_dn=1)
    assert det.labels.tolist() == [1]
    torch.testing.assert_close(det.scores, torch.sigmoid(torch.tensor([1.0])))


def test_class_wise_nms():
    # two overlapping boxes of class 0 (IoU 0.34 / 0.46 = 0.74), the second one also as class 1, a far box;
    # both images identical (NMS groups are per image and class)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.56, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1]])
    logits = torch.full((3, 2), -10.0)
    for (q, c), p in zip([(0, 0), (1, 0), (1, 1), (2, 0)], [0.9, 0.8, 0.7, 0.6]):
        logits[q, c] = _logit(p)
    logits, boxes = logits.expand(2, 3, 2), boxes.expand(2, 3, 4)
    orig = torch.tensor([[100, 100], [100, 100]])
    dets = postprocess(logits, boxes, orig, None, top_k=4, nms_iou=0.7)
    for det in dets:  # the 0.8 box of class 0 is suppressed; the class-1 copy and the far box stay
        torch.testing.assert_close(det.scores, torch.tensor([0.9, 0.7, 0.6]))
        assert det.labels.tolist() == [0, 1, 0]
    loose = postprocess(logits, boxes, orig, None, top_k=4, nms_iou=0.8)
    assert len(loose[0]) == 4
    head = HeadOutput(logits=logits, boxes=boxes)
    module_dets = PostProcessor(topk=4, nms=True, nms_threshold=0.7)(head, None, orig)
    assert [d.labels.tolist() for d in module_dets] == [[0, 1, 0], [0, 1, 0]]
    assert len(PostProcessor(topk=4, nms=False, nms_threshold=0.7)(head, None, orig)[0]) == 4


def test_contiguous_to_category_ids():
    assert contiguous_to_category_ids(torch.tensor([0, 11, 79]), COCO_CATEGORY_IDS).tolist() == [1, 13, 90]
    assert len(COCO_CATEGORY_IDS) == 80 and len(set(COCO_CATEGORY_IDS.tolist())) == 80


def _compare(det, ref: dict, prefix: str) -> None:
    scores_diff = (det.scores - ref[f"{prefix}.scores"]).abs().max().item()
    assert scores_diff <= ATOL_SCORES, f"{prefix}.scores: {scores_diff:.2e}"
    category_ids = contiguous_to_category_ids(det.labels, COCO_CATEGORY_IDS)
    assert torch.equal(category_ids, ref[f"{prefix}.labels"]), f"{prefix}.labels"
    boxes_diff = (det.boxes - ref[f"{prefix}.boxes"]).abs().max().item()
    assert boxes_diff <= ATOL_BOXES, f"{prefix}.boxes: {boxes_diff:.2e}"


@pytest.mark.parametrize(("variant", "case", "level"), FILES)
def test_matches_official_postprocess_ignoring_valid_mask(fixtures_dir, variant, case, level):
    """The release ignores the valid mask; with ``valid_mask=None`` we reproduce it on every list."""
    ref = load(fixtures_dir, f"eval_{variant}_case_{case}_{level}.pt")
    for head in HEADS:
        logits, boxes = ref[f"heads.{head}.pred_logits"], ref[f"heads.{head}.pred_boxes"]
        dets = postprocess(logits, boxes, ref["orig_sizes"])
        for b, det in enumerate(dets):
            _compare(det, ref, f"post.{head}.{b}")


@pytest.mark.parametrize(("variant", "case", "level"), FILES)
def test_matches_official_postprocess_with_valid_mask(fixtures_dir, variant, case, level):
    """With the valid mask: identical lists wherever no query is padded (batch 1 always). Otherwise the
    official list without the padded queries' detections must be a prefix of ours: removing padded
    queries only moves later valid detections up."""
    ref = load(fixtures_dir, f"eval_{variant}_case_{case}_{level}.pt")
    valid = ref["ag.valid_mask"]
    for head in HEADS:
        logits, boxes = ref[f"heads.{head}.pred_logits"], ref[f"heads.{head}.pred_boxes"]
        dets = postprocess(logits, boxes, ref["orig_sizes"], valid)
        for b, det in enumerate(dets):
            prefix = f"post.{head}.{b}"
            if valid[b].all():
                _compare(det, ref, prefix)
                continue
            # padded queries are identical rows (full-image anchors): identify their detections by the box
            scale = ref["orig_sizes"][b].flip(0).repeat(2)
            pad_box = box_convert(boxes[b][~valid[b]][0], "cxcywh", "xyxy") * scale
            ours_padded = (det.boxes - pad_box).abs().amax(dim=1) < 1e-3
            assert not ours_padded.any(), f"{prefix}: a padded query produced a detection"
            from_valid = (ref[f"{prefix}.boxes"] - pad_box).abs().amax(dim=1) >= 1e-3  # [100]
            kept = int(from_valid.sum())
            fields = ("scores", "labels", "boxes")
            expected = {f"{prefix}.{k}": ref[f"{prefix}.{k}"][from_valid] for k in fields}
            _compare(Detections(det.boxes[:kept], det.scores[:kept], det.labels[:kept]), expected, prefix)
