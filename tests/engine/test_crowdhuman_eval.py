"""CrowdHuman metrics: hand-computed AP / mMR / Recall, edge cases, the toolkit's matching and miss-rate
rules as independent brute force, and the evaluation entry point end to end."""

import functools
import json
import math

import numpy as np
import pytest
import torch
from engine_fakes import FakeLabelMap, OracleDetector, SyntheticDataset, collate, make_coco
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from asag.config import Config, config_from_dict
from asag.engine.crowdhuman_eval import (
    FALSE_POSITIVE,
    IGNORED,
    MISS_RATE_FLOOR,
    TRUE_POSITIVE,
    ImageGroundTruth,
    average_precision,
    box_ioa,
    crowdhuman_metrics,
    detection_curves,
    evaluate_coco_results,
    fppi_reference_points,
    greedy_match,
    log_average_miss_rate,
    match_image,
    sample_miss_rates,
)
from asag.engine.distributed import build_eval_sampler
from asag.engine.evaluator import evaluate_crowdhuman
from asag.errors import ConfigError
from asag.structures import Detections


def gt(people=(), regions=(), size=(100.0, 100.0)) -> ImageGroundTruth:
    """Ground truth from xyxy person boxes and ignore regions; size is (width, height)."""
    boxes = torch.tensor([*people, *regions], dtype=torch.float64).reshape(-1, 4)
    ignore = torch.tensor([False] * len(people) + [True] * len(regions))
    return ImageGroundTruth(boxes, ignore, *size)


def dets(*pairs) -> Detections:
    """Detections from (score, xyxy box) pairs, in any order."""
    scores = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    boxes = torch.tensor([p[1] for p in pairs], dtype=torch.float32).reshape(-1, 4)
    return Detections(boxes, scores, torch.zeros(len(pairs), dtype=torch.int64))


# ----------------------------------------------------------------------- the hand-computed example

A, B = [10, 10, 30, 50], [50, 10, 70, 50]  # people of image 1 (20 x 40 = 800 px each)
R = [75, 60, 100, 100]  # ignore region of image 1 (25 x 40)
C, D = [0, 0, 20, 40], [90, 0, 120, 40]  # people of image 2; D leaves the 100 px wide image
E = [40, 40, 60, 80]  # the person of image 4, never detected

EXAMPLE_GT = [gt([A, B], [R]), gt([C, D]), gt(), gt([E])]
EXAMPLE_DETS = [
    dets(
        (0.6, [50, 10, 70, 30]),  # top half of B: IoU 400 / 800 = 0.5, not above 0.5 -> FP
        (0.9, A),  # TP on A
        (0.8, [12, 10, 32, 50]),  # IoU 0.82 with A, but A is taken; not on R -> FP (duplicate)
        (0.7, [80, 70, 90, 90]),  # inside R: IoA 1 -> ignored
        (0.3, [65, 60, 85, 100]),  # half on R: IoA 400 / 800 = 0.5, not above 0.5 -> FP
    ),
    dets(
        (0.85, [90, 0, 110, 40]),  # clipped to [90, 0, 100, 40] = D clipped: IoU 1 -> TP
        (0.5, C),  # TP on C
    ),
    dets((0.4, [10, 10, 20, 20])),  # image 3 has no people -> FP
    dets(),  # image 4: nothing detected, E is missed
]


def test_hand_computed_example():
    m = crowdhuman_metrics(EXAMPLE_DETS, EXAMPLE_GT)
    # G = 5 people (A, B, C, D, E; R not counted), N = 4 images. Ranked list without the ignored 0.7:
    #   entry score outcome  TP FP  recall  precision  fppi  miss
    #   1     0.90  TP       1  0   0.2     1          0     0.8
    #   2     0.85  TP       2  0   0.4     1          0     0.6
    #   3     0.80  FP       2  1   0.4     2/3        0.25  0.6
    #   4     0.60  FP       2  2   0.4     1/2        0.5   0.6
    #   5     0.50  TP       3  2   0.6     3/5        0.5   0.4
    #   6     0.40  FP       3  3   0.6     1/2        0.75  0.4
    #   7     0.30  FP       3  4   0.6     3/7        1.0   0.4
    # AP, trapezoids between consecutive entries (only recall steps count):
    #   1->2: 0.2 * (1 + 1) / 2 = 0.2;  4->5: 0.2 * (1/2 + 3/5) / 2 = 0.11;  AP = 0.31
    assert m.ap == pytest.approx(0.31, abs=1e-12)
    assert m.recall == pytest.approx(0.6, abs=1e-12)
    # mMR. No FPPI of the list equals a reference point except r = 1 at the last entry, so both rules
    # give the same samples. Caltech rule, the miss rate at the last entry with fppi <= r:
    #   r = 0.01 ... 0.1778 (6 points): entry 2 (fppi 0)    -> 0.6
    #   r = 0.3162:                      entry 3 (fppi 0.25) -> 0.6
    #   r = 0.5623:                      entry 5 (fppi 0.5)  -> 0.4
    #   r = 1:                           entry 7 (fppi 1.0)  -> 0.4
    #   mMR = exp((7 ln 0.6 + 2 ln 0.4) / 9) = 0.6^(7/9) * 0.4^(2/9) = 0.548302...
    assert m.mmr == pytest.approx(0.6 ** (7 / 9) * 0.4 ** (2 / 9), abs=1e-12)
    assert m.mmr == pytest.approx(0.548302, abs=1e-6)
    assert (m.num_images, m.num_people, m.num_ignore, m.num_detections) == (4, 5, 1, 8)
    assert (m.num_true_positives, m.num_false_positives, m.num_ignored) == (3, 4, 1)
    assert "AP 0.3100  mMR 0.5483  Recall 0.6000" in m.summary


def test_hand_computed_outcomes_per_image():
    first = match_image(EXAMPLE_DETS[0].boxes, EXAMPLE_DETS[0].scores, EXAMPLE_GT[0])
    assert first.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.3])  # sorted, descending
    assert first.outcome.tolist() == [TRUE_POSITIVE, FALSE_POSITIVE, IGNORED, FALSE_POSITIVE, FALSE_POSITIVE]
    assert (first.num_people, first.num_ignore) == (2, 1)
    second = match_image(EXAMPLE_DETS[1].boxes, EXAMPLE_DETS[1].scores, EXAMPLE_GT[1])
    assert second.outcome.tolist() == [TRUE_POSITIVE, TRUE_POSITIVE]


def test_clipping_decides_the_match():
    # D = [90, 0, 120, 40]. In the 100 px wide image D clips to [90, 0, 100, 40]:
    #   detection [90, 0, 100, 40]: IoU 1 -> TP;  in a 300 px image: IoU 10 * 40 / (30 * 40) = 1/3 -> FP
    #   detection [90, 0, 200, 40] clips to [90, 0, 100, 40] too: TP; unclipped IoU 30 / 110 -> FP
    for box in ([90, 0, 100, 40], [90, 0, 200, 40]):
        d = dets((0.5, box))
        assert match_image(d.boxes, d.scores, gt([D])).outcome.tolist() == [TRUE_POSITIVE]
        wide_image = gt([D], size=(300.0, 100.0))
        assert match_image(d.boxes, d.scores, wide_image).outcome.tolist() == [FALSE_POSITIVE]


def test_ignore_region_only_when_no_person_matches():
    # The detection overlaps person P (IoU 0.6) and lies inside ignore region Q: the person wins.
    person, region = [0, 0, 10, 10], [0, 0, 50, 50]
    d = dets((0.9, [0, 0, 10, 6]), (0.8, [0, 0, 10, 6]))  # IoU 60 / 100 = 0.6
    match = match_image(d.boxes, d.scores, gt([person], [region]))
    # the second copy finds the person taken and falls back to the region: ignored, not a duplicate FP
    assert match.outcome.tolist() == [TRUE_POSITIVE, IGNORED]


def test_highest_iou_free_person_is_taken():
    # det [0, 0, 10, 10]; P1 = [0, 0, 10, 12] (IoU 100/120 = 0.833), P2 = [0, 0, 10, 10] (IoU 1).
    d = dets((0.9, [0, 0, 10, 10]), (0.8, [0, 0, 10, 12]))
    match = match_image(d.boxes, d.scores, gt([[0, 0, 10, 12], [0, 0, 10, 10]]))
    # first detection takes P2 (IoU 1), the second gets P1 (IoU 1): two TPs
    assert match.outcome.tolist() == [TRUE_POSITIVE, TRUE_POSITIVE]


# ---------------------------------------------------------------------------------------- edge cases


def test_no_detections():
    m = crowdhuman_metrics([dets(), dets()], [gt([A]), gt([B, C])])
    assert (m.ap, m.recall, m.mmr) == (0.0, 0.0, 1.0)  # every FPPI sample is the origin's miss rate 1
    assert (m.num_people, m.num_detections) == (3, 0)


def test_no_ground_truth_gives_undefined_metrics():
    m = crowdhuman_metrics([dets((0.9, A)), dets()], [gt(), gt()])
    assert (m.ap, m.recall, m.mmr) == (-1.0, -1.0, -1.0)
    assert (m.num_false_positives, m.num_people) == (1, 0)
    empty = crowdhuman_metrics([], [])
    assert (empty.ap, empty.num_images) == (-1.0, 0)


def test_all_detections_on_ignore_regions():
    d = dets((0.9, [80, 70, 90, 90]), (0.8, [76, 61, 99, 99]))  # IoA 1 with R each
    m = crowdhuman_metrics([d], [gt([A], [R])])
    assert (m.ap, m.recall, m.mmr) == (0.0, 0.0, 1.0)
    assert (m.num_ignored, m.num_true_positives, m.num_false_positives) == (2, 0, 0)
    only_regions = crowdhuman_metrics([d], [gt([], [R])])  # no person at all: undefined
    assert (only_regions.ap, only_regions.mmr, only_regions.num_ignored) == (-1.0, -1.0, 2)


def test_perfect_detector():
    m = crowdhuman_metrics([dets((0.9, A), (0.8, B)), dets((0.7, C))], [gt([A, B]), gt([C])])
    # recall 1/3, 2/3, 1 at precision 1: AP = (2/3 - 1/3) + (1 - 2/3) = 2/3 (no segment from recall 0)
    assert m.ap == pytest.approx(2 / 3, abs=1e-12)
    assert m.recall == 1.0
    assert m.mmr == pytest.approx(MISS_RATE_FLOOR)  # miss rate 0 everywhere, floored at 1e-10


def test_zero_area_boxes_are_harmless():
    # a person box and a detection entirely outside the image both clip to zero area
    d = dets((0.9, [150, 0, 160, 10]))
    m = crowdhuman_metrics([d], [gt([[120, 0, 130, 10], A], [[200, 0, 210, 10]])])
    assert (m.num_false_positives, m.recall) == (1, 0.0)


# --------------------------------------------------------------------------------- curves and mMR


def test_reference_points():
    refs = fppi_reference_points()
    assert len(refs) == 9 and refs[0] == 0.01 and refs[4] == 0.1 and refs[-1] == 1.0
    assert torch.allclose(refs[1:] / refs[:-1], torch.full((8,), 10**0.25, dtype=torch.float64))


def test_caltech_miss_rate_sampling_rule():
    refs = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)
    # equal FPPI: the last entry at that FPPI (lowest miss rate) is taken
    fppi = torch.tensor([0.0, 0.01, 0.01, 0.05], dtype=torch.float64)
    miss = torch.tensor([0.9, 0.9, 0.7, 0.7], dtype=torch.float64)
    caltech = functools.partial(sample_miss_rates, rule="caltech")
    assert caltech(fppi, miss, refs).tolist() == [0.7, 0.7, 0.7]  # curve ends at 0.05 < 0.1
    # the first entry is an FP beyond r = 0.01 and 0.1: no entry qualifies -> 1 (the origin)
    fppi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    miss = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert caltech(fppi, miss, refs).tolist() == [1.0, 1.0, 0.5]
    # the rule holds for any values: a reference before the first entry samples 1, not that entry
    assert caltech(fppi, miss * 0.5, refs).tolist() == [1.0, 1.0, 0.25]
    assert caltech(fppi[:0], miss[:0], refs).tolist() == [1.0, 1.0, 1.0]


def test_toolkit_miss_rate_sampling_rule_is_the_default():
    refs = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)
    # equal FPPI 0.01 = r: the first entry reaching it (miss 0.9), not the last one (0.7)
    fppi = torch.tensor([0.0, 0.01, 0.01, 0.05], dtype=torch.float64)
    miss = torch.tensor([0.9, 0.9, 0.7, 0.7], dtype=torch.float64)
    assert sample_miss_rates(fppi, miss, refs).tolist() == [0.9, 0.7, 0.7]  # 0.1, 1: never reached
    # the first entry is already beyond r = 0.01 and 0.1: it is taken (0.8); r = 1 is never reached: the last
    fppi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    miss = torch.tensor([0.8, 0.5], dtype=torch.float64)
    assert sample_miss_rates(fppi, miss, refs).tolist() == [0.8, 0.8, 0.5]
    assert sample_miss_rates(fppi[:0], miss[:0], refs).tolist() == [1.0, 1.0, 1.0]


def test_log_average_miss_rate_of_a_tie_at_fppi_one():
    # one image, ranked FP then TP of 2 people: fppi [1, 1], miss [1, 0.5]
    curves = detection_curves(torch.tensor([False, True]), num_people=2, num_images=1)
    assert curves.fppi.tolist() == [1.0, 1.0] and curves.miss_rate.tolist() == [1.0, 0.5]
    # toolkit (default): every reference r <= 1 takes the first entry, the FP: miss 1 everywhere -> mMR 1
    assert log_average_miss_rate(curves.fppi, curves.miss_rate) == 1.0
    # caltech: nothing at fppi <= r < 1 (origin, 1) for 8 points, the last entry (0.5) at r = 1
    caltech = log_average_miss_rate(curves.fppi, curves.miss_rate, rule="caltech")
    assert caltech == pytest.approx(0.5 ** (1 / 9), abs=1e-12)


def test_average_precision_trapezoid():
    # (0.5, 1) -> (0.5, 0.5) -> (1, 2/3): 0 + 0.5 * (0.5 + 2/3) / 2 = 7/24
    recall = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    precision = torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64)
    assert average_precision(recall, precision) == pytest.approx(7 / 24, abs=1e-12)
    assert average_precision(recall[:1], precision[:1]) == 0.0


def test_curves_reject_empty_denominators():
    with pytest.raises(ValueError):
        detection_curves(torch.tensor([True]), num_people=0, num_images=1)


def toolkit_sample(fppi: list[float], miss: list[float], r: float) -> float:
    """The CrowdHuman toolkit's rule: the first entry with fppi >= r, else the last entry."""
    index = next((i for i, f in enumerate(fppi) if f >= r), len(fppi) - 1)
    return miss[index]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(1, 30), st.integers(0, 10))
def test_sampling_rules_against_the_toolkit_rule(is_tp, num_images, extra_people):
    num_people = sum(is_tp) + extra_people
    assume(num_people > 0)
    curves = detection_curves(torch.tensor(is_tp), num_people, num_images)
    refs = fppi_reference_points()
    theirs = [toolkit_sample(curves.fppi.tolist(), curves.miss_rate.tolist(), float(r)) for r in refs]
    toolkit = sample_miss_rates(curves.fppi, curves.miss_rate, refs, rule="toolkit").tolist()
    assert toolkit == pytest.approx(theirs, abs=1e-15)
    caltech = sample_miss_rates(curves.fppi, curves.miss_rate, refs, rule="caltech").tolist()
    if not any(bool((curves.fppi == r).any()) for r in refs):  # the rules differ on exact ties only
        assert caltech == pytest.approx(theirs, abs=1e-15)
    assert all(c <= t + 1e-15 for c, t in zip(caltech, theirs))  # a tie can only lower the sample


def test_exact_fppi_tie_separates_the_rules():
    # 10 images, G = 4; ranked TP, FP (fppi 0.1 = r), TP, TP, FP (fppi 0.2)
    curves = detection_curves(torch.tensor([True, False, True, True, False]), num_people=4, num_images=10)
    r = torch.tensor([0.1], dtype=torch.float64)
    # caltech: last entry with fppi <= 0.1 is the 4th (3 TPs): miss 1/4; toolkit: the FP itself: miss 3/4
    assert sample_miss_rates(curves.fppi, curves.miss_rate, r, rule="caltech").tolist() == [0.25]
    assert sample_miss_rates(curves.fppi, curves.miss_rate, r, rule="toolkit").tolist() == [0.75]
    with pytest.raises(ValueError, match="unknown miss-rate rule"):
        sample_miss_rates(curves.fppi, curves.miss_rate, r, rule="dollar")


# A tie on whole images: 10 images, 4 people P1-P4 in image 1; ranked TP 0.9, FP 0.8, TP 0.7, TP 0.6, FP 0.5.
P1, P2, P3, P4 = [0, 0, 10, 20], [20, 0, 30, 20], [40, 0, 50, 20], [60, 0, 70, 20]
TIE_GT = [gt([P1, P2, P3, P4])] + [gt() for _ in range(9)]
TIE_DETS = [dets((0.9, P1), (0.8, [0, 60, 10, 80]), (0.7, P2), (0.6, P3), (0.5, [20, 60, 30, 80]))] + [
    dets() for _ in range(9)]
# entry  outcome  fppi  miss
#   1    TP       0     0.75
#   2    FP       0.1   0.75
#   3    TP       0.1   0.5
#   4    TP       0.1   0.25
#   5    FP       0.2   0.25
# toolkit: r = 0.01 ... 0.1 (5 points): first fppi >= r is entry 2 -> 0.75; r = 0.1778: entry 5 -> 0.25;
#          r = 0.3162 ... 1 (never reached): the last entry -> 0.25.      mMR = 0.75^(5/9) 0.25^(4/9)
# caltech: r = 0.01 ... 0.0562 (4 points): last fppi <= r is entry 1 -> 0.75; r = 0.1: entry 4 -> 0.25;
#          r >= 0.1778: entry 4 or 5 -> 0.25.                              mMR = 0.75^(4/9) 0.25^(5/9)
TIE_MMR = {"toolkit": 0.75 ** (5 / 9) * 0.25 ** (4 / 9), "caltech": 0.75 ** (4 / 9) * 0.25 ** (5 / 9)}


def test_hand_computed_tie_under_both_rules():
    assert TIE_MMR["toolkit"] == pytest.approx(0.460264, abs=1e-6)
    assert TIE_MMR["caltech"] == pytest.approx(0.407374, abs=1e-6)
    default = crowdhuman_metrics(TIE_DETS, TIE_GT)
    assert default.mmr == pytest.approx(TIE_MMR["toolkit"], abs=1e-12)
    for rule, expected in TIE_MMR.items():
        m = crowdhuman_metrics(TIE_DETS, TIE_GT, miss_rate_rule=rule)
        assert m.mmr == pytest.approx(expected, abs=1e-12)
        assert (m.ap, m.recall) == (default.ap, default.recall)  # the rule only changes mMR


def test_example_under_the_toolkit_rule():
    # r = 0.5623: first entry with fppi >= r is entry 6 (0.75) -> 0.4; r = 1: entry 7 -> 0.4; r <= 0.1778:
    # the first entry with fppi >= r is entry 3 (0.25) -> 0.6; r = 0.3162: entry 4 (0.5) -> 0.6. Same
    # samples as the Caltech rule (no FPPI of the example equals a reference point except 1.0 at the end).
    m = crowdhuman_metrics(EXAMPLE_DETS, EXAMPLE_GT, miss_rate_rule="toolkit")
    assert m.mmr == pytest.approx(0.6 ** (7 / 9) * 0.4 ** (2 / 9), abs=1e-12)


# ------------------------------------------------------------------------ matching vs brute force


def toolkit_match(iou: np.ndarray, ioa: np.ndarray, thr: float = 0.5) -> list[int]:
    """Caltech matching written as nested loops over person boxes, then ignore regions (toolkit order)."""
    taken = [False] * iou.shape[1]
    outcome = []
    for k in range(iou.shape[0]):
        best, best_iou = -1, thr
        for j in range(iou.shape[1]):
            if not taken[j] and iou[k, j] > best_iou:
                best, best_iou = j, iou[k, j]
        if best >= 0:
            taken[best] = True
            outcome.append(TRUE_POSITIVE)
        elif any(ioa[k, r] > thr for r in range(ioa.shape[1])):
            outcome.append(IGNORED)
        else:
            outcome.append(FALSE_POSITIVE)
    return outcome


box = st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 40), st.integers(1, 40)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(box, max_size=12), st.lists(box, max_size=6), st.lists(box, max_size=3))
def test_matching_equals_nested_loop_toolkit_matching(det_boxes, people, regions):
    scores = [1.0 - 0.01 * i for i in range(len(det_boxes))]  # already descending, distinct
    d = dets(*zip(scores, det_boxes)) if det_boxes else dets()
    truth = gt(people, regions, size=(80.0, 80.0))
    match = match_image(d.boxes, d.scores, truth)
    clipped = d.boxes.double().clamp(0, 80)
    from torchvision.ops import box_iou

    people_t = torch.tensor(people, dtype=torch.float64).reshape(-1, 4).clamp(0, 80)
    regions_t = torch.tensor(regions, dtype=torch.float64).reshape(-1, 4).clamp(0, 80)
    iou = box_iou(clipped, people_t).nan_to_num(0.0).numpy()
    ioa = box_ioa(clipped, regions_t).numpy()
    assert match.outcome.tolist() == toolkit_match(iou, ioa)
    # a TP count can never exceed the people, each person is matched at most once
    assert int((match.outcome == TRUE_POSITIVE).sum()) <= len(people)


def test_greedy_match_prefers_first_of_equal_overlaps():
    iou = np.array([[0.7, 0.7], [0.7, 0.7], [0.7, 0.7]])
    outcome = greedy_match(iou, np.array([False, True, False]))
    assert outcome.tolist() == [TRUE_POSITIVE, TRUE_POSITIVE, FALSE_POSITIVE]


# -------------------------------------------------------------------------------------- invariances


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(box, max_size=5), min_size=1, max_size=4),
       st.lists(st.lists(box, max_size=4), min_size=4, max_size=4), st.randoms(use_true_random=False))
def test_metrics_ignore_image_order_and_stay_in_range(det_lists, people_lists, rng):
    n = len(det_lists)
    truth = [gt(people_lists[i], size=(80.0, 80.0)) for i in range(n)]
    scores = iter(rng.sample(range(1, 1000), 20))  # distinct scores: no ties between images
    detections = [dets(*[(next(scores) / 1000, b) for b in boxes]) for boxes in det_lists]
    m = crowdhuman_metrics(detections, truth)
    order = list(range(n))
    rng.shuffle(order)
    shuffled = crowdhuman_metrics([detections[i] for i in order], [truth[i] for i in order])
    assert (shuffled.ap, shuffled.mmr, shuffled.recall) == pytest.approx((m.ap, m.mmr, m.recall), abs=1e-12)
    if m.num_people:
        assert 0.0 <= m.ap <= m.recall <= 1.0
        assert MISS_RATE_FLOOR * (1 - 1e-9) <= m.mmr <= 1.0
        assert m.recall == pytest.approx(m.num_true_positives / m.num_people)


def test_ignored_detections_change_nothing():
    base = crowdhuman_metrics(EXAMPLE_DETS, EXAMPLE_GT)
    on_region = torch.tensor([[78.0, 62.0, 98.0, 98.0]])
    first = EXAMPLE_DETS[0]
    scores = torch.cat([first.scores, torch.tensor([0.95])])  # ranked first, but ignored
    labels = torch.zeros(len(scores), dtype=torch.int64)
    extended = Detections(torch.cat([first.boxes, on_region]), scores, labels)
    m = crowdhuman_metrics([extended, *EXAMPLE_DETS[1:]], EXAMPLE_GT)
    assert (m.ap, m.mmr, m.recall) == (base.ap, base.mmr, base.recall)
    assert m.num_ignored == base.num_ignored + 1


# ------------------------------------------------------------------------------- COCO and end to end


def example_coco(truths=EXAMPLE_GT) -> dict:
    """The hand-computed example as COCO ground truth (xywh boxes; the ignore region has iscrowd 1)."""
    images, annotations = [], []
    for image_id, truth in enumerate(truths, start=1):
        images.append({"id": image_id, "width": 100, "height": 100, "file_name": f"{image_id}.jpg"})
        for xyxy, ignore in zip(truth.boxes.tolist(), truth.ignore.tolist()):
            x1, y1, x2, y2 = xyxy
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(ignore)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}


def oracle_table(detections=EXAMPLE_DETS) -> dict:
    return {i: (d.boxes, d.scores, d.labels) for i, d in enumerate(detections, start=1) if len(d)}


def test_coco_results_give_the_hand_computed_numbers():
    results = {}
    for image_id, d in enumerate(EXAMPLE_DETS, start=1):
        results[image_id] = [{"image_id": image_id, "category_id": 1, "score": float(s),
                              "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                             for b, s in zip(d.boxes.tolist(), d.scores.tolist())]
    m = evaluate_coco_results(make_coco(example_coco()), results)
    assert (m.ap, m.recall) == pytest.approx((0.31, 0.6), abs=1e-6)
    assert m.mmr == pytest.approx(0.548302, abs=1e-6)


def test_evaluation_entry_point_end_to_end(tmp_path):
    coco = example_coco()
    dataset = SyntheticDataset(coco)
    dataset.cat_index = {1: 0}  # one class, person
    loader = DataLoader(dataset, batch_size=3, sampler=build_eval_sampler(dataset), collate_fn=collate)
    result = evaluate_crowdhuman(OracleDetector(oracle_table()), loader, coco_gt=make_coco(coco),
                                 label_map=FakeLabelMap((1,)), device="cpu", results_json=tmp_path / "r.json")
    assert result.ap == pytest.approx(0.31, abs=1e-6)
    assert result.mmr == pytest.approx(0.548302, abs=1e-6)
    assert result.recall == pytest.approx(0.6, abs=1e-6)
    assert (result.num_images, result.num_detections, result.num_people, result.num_ignore) == (4, 8, 5, 1)
    assert (result.num_true_positives, result.num_false_positives, result.num_ignored) == (3, 4, 1)
    assert result.images_per_second > 0 and result.mean_queries is not None
    assert len(json.loads((tmp_path / "r.json").read_text())) == 8
    assert result.results_path == str(tmp_path / "r.json")
    assert "mMR 0.5483" in result.summary


@pytest.mark.parametrize("rule", [None, "toolkit", "caltech"])
def test_evaluation_entry_point_samples_by_the_rule(rule):
    coco = example_coco(TIE_GT)
    dataset = SyntheticDataset(coco)
    dataset.cat_index = {1: 0}
    loader = DataLoader(dataset, batch_size=4, sampler=build_eval_sampler(dataset), collate_fn=collate)
    kwargs = {} if rule is None else {"miss_rate_rule": rule}
    result = evaluate_crowdhuman(OracleDetector(oracle_table(TIE_DETS)), loader, coco_gt=make_coco(coco),
                                 label_map=FakeLabelMap((1,)), device="cpu", **kwargs)
    assert result.num_images == 10
    assert result.mmr == pytest.approx(TIE_MMR[rule or "toolkit"], abs=1e-9)


def test_miss_rate_rule_is_an_evaluation_config_field():
    assert Config().evaluation.miss_rate_rule == "toolkit"
    cfg = config_from_dict({"evaluation": {"miss_rate_rule": "caltech"}})
    assert cfg.evaluation.miss_rate_rule == "caltech"
    with pytest.raises(ConfigError, match="evaluation.miss_rate_rule"):
        config_from_dict({"evaluation": {"miss_rate_rule": "dollar"}})


def test_multi_category_ground_truth_is_rejected():
    coco = example_coco()
    coco["categories"].append({"id": 2, "name": "car"})
    with pytest.raises(ConfigError, match="2 categories"):
        evaluate_coco_results(make_coco(coco), {1: []})


def test_mmr_formula_on_the_example_matches_logs():
    # the same number as in test_hand_computed_example, spelt out with logarithms
    expected = math.exp((7 * math.log(0.6) + 2 * math.log(0.4)) / 9)
    assert crowdhuman_metrics(EXAMPLE_DETS, EXAMPLE_GT).mmr == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------ the command line


def single_class_copy(root, out) -> None:
    """Rewrite the synthetic data set's JSON files as one 'person' class, every third box an ignore
    region (like ``asag data convert-crowdhuman``)."""
    for split in ("train", "val"):
        data = json.loads((root / f"{split}.json").read_text())
        for index, ann in enumerate(data["annotations"]):
            ann["category_id"], ann["iscrowd"] = 1, int(split == "val" and index % 3 == 2)
        data["categories"] = [{"id": 1, "name": "person", "supercategory": "person"}]
        (out / f"{split}.json").write_text(json.dumps(data))


@pytest.mark.slow
def test_train_and_eval_commands_use_the_crowdhuman_backend(tmp_path, capsys):
    from asag.cli import main
    from asag.data.synthetic import generate_synthetic

    generate_synthetic(tmp_path, 4, seed=3, val_images=3)
    single_class_copy(tmp_path, tmp_path)
    data = [f"data.root={tmp_path}", "data.format=coco", "data.train_images=images/train",
            "data.train_annotations=train.json", "data.val_images=images/val",
            "data.val_annotations=val.json", "model.num_classes=1", "evaluation.metric=crowdhuman"]
    run = tmp_path / "run"
    train = ["train", "tiny_cpu", *data, f"runtime.output_dir={run}", "schedule.max_iters_per_epoch=1"]
    assert main(train) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluation = next(r for r in records if r["kind"] == "eval")
    assert {"ap", "mmr", "recall", "num_ignore"} <= set(evaluation) and evaluation["num_ignore"] > 0
    assert (run / "best.pth").is_file()
    capsys.readouterr()
    assert main(["eval", str(run / "last.pth"), *data, "--out", str(tmp_path)]) == 0
    assert "mMR" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and 0.0 <= metrics["recall"] <= 1.0 and metrics["mmr"] <= 1.0


def test_train_command_rejects_a_multi_class_data_set_before_training(tmp_path, capsys):
    from asag.cli import main
    from asag.data.synthetic import generate_synthetic

    generate_synthetic(tmp_path, 1, seed=3, val_images=1)
    args = ["train", "tiny_cpu", "data.format=synthetic", f"data.root={tmp_path}",
            f"runtime.output_dir={tmp_path}", "evaluation.metric=crowdhuman"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "val.json has 5 categories" in err and "Traceback" not in err
    assert not (tmp_path / "last.pth").exists()
