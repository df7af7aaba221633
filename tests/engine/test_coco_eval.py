import contextlib
import io
import json

import pytest
import torch
from engine_fakes import CATEGORY_NAMES, FakeLabelMap, coco_gt_dict, make_coco
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools.cocoeval import COCOeval

from asag.engine.coco_eval import (
    BACKENDS,
    COCO_STAT_NAMES,
    detections_to_coco_results,
    run_coco_eval,
    write_results_json,
)
from asag.structures import Detections


def gt_as_results(gt: dict, shift: float = 0.0) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
         "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
        for a in gt["annotations"]
    ]


def test_detections_to_results_by_hand():
    dets = [
        Detections(torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.9, 0.5]),
                   torch.tensor([1, 2])),
        Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)),
        Detections(torch.tensor([[1.0, 2.0, 4.0, 8.0]]), torch.tensor([0.25]), torch.tensor([0])),
    ]
    results = detections_to_coco_results(dets, [11, 12, 13], FakeLabelMap((1, 3, 7)))
    assert results == [
        {"image_id": 11, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 11, "category_id": 7, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.5},
        {"image_id": 13, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.25},
    ]
    assert detections_to_coco_results(dets[1:2], [5], FakeLabelMap()) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_one(backend):
    gt = coco_gt_dict()
    metrics = run_coco_eval(make_coco(gt), gt_as_results(gt), per_class=True, backend=backend)
    assert metrics.ap == 1.0 and metrics.ap50 == 1.0 and metrics.ap75 == 1.0
    assert (metrics.aps, metrics.apm, metrics.apl) == (1.0, 1.0, 1.0)
    assert metrics.per_class_ap == dict.fromkeys(CATEGORY_NAMES, 1.0)
    assert metrics.num_images == 6 and metrics.num_detections == 18
    assert metrics.backend == backend
    assert "Average Precision" in metrics.summary
    assert len(metrics.summary.splitlines()) == len(COCO_STAT_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_boxes_match_direct_pycocotools(backend):
    gt = coco_gt_dict()
    results = gt_as_results(gt, shift=4.0)
    coco = make_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    metrics = run_coco_eval(coco, results, backend=backend)
    assert metrics.stats == pytest.approx(list(reference.stats), abs=1e-12)
    assert 0.0 < metrics.ap < 1.0  # the shift matters for small boxes


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_box_iou_062_by_hand(backend):
    # GT 100x100 at (0, 0); detection shifted right by d: IoU = (100 - d) / (100 + d) = 0.62 for d = 23.45...
    d = 100 * (1 - 0.62) / (1 + 0.62)
    gt = {"images": [{"id": 1, "width": 200, "height": 200}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 100.0],
                           "area": 10000.0, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": [d, 0.0, 100.0, 100.0], "score": 0.8}]
    metrics = run_coco_eval(make_coco(gt), results, backend=backend)
    # matched at IoU thresholds 0.50, 0.55, 0.60 out of 10 -> AP = 0.3; AP50 = 1; AP75 = 0
    assert metrics.ap == pytest.approx(0.3)
    # (pycocotools divides tp by tp + fp + eps, so a single true positive gives 1 - 1e-16)
    assert metrics.ap50 == pytest.approx(1.0) and metrics.ap75 == 0.0
    assert metrics.aps == -1.0 and metrics.apl == pytest.approx(0.3)  # no small GT: undefined


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zero_ap(backend):
    gt = coco_gt_dict()
    metrics = run_coco_eval(make_coco(gt), [], per_class=True, backend=backend)
    assert metrics.ap == 0.0 and metrics.ap50 == 0.0 and metrics.ar100 == 0.0
    assert metrics.per_class_ap == dict.fromkeys(CATEGORY_NAMES, 0.0)
    assert metrics.num_detections == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_subset(backend):
    gt = coco_gt_dict()
    results = [r for r in gt_as_results(gt) if r["image_id"] <= 2]
    assert run_coco_eval(make_coco(gt), results, backend=backend).ap < 1.0
    subset = run_coco_eval(make_coco(gt), results, image_ids=[1, 2], backend=backend)
    assert subset.ap == 1.0 and subset.num_images == 2


def test_stat_names_order():
    assert COCO_STAT_NAMES[:6] == ("ap", "ap50", "ap75", "aps", "apm", "apl")


def test_write_results_json(tmp_path):
    path = write_results_json(tmp_path / "out" / "results.json", [{"image_id": 1, "score": 0.5}])
    assert json.loads(path.read_text()) == [{"image_id": 1, "score": 0.5}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


boxes_strategy = st.lists(
    st.tuples(*[st.floats(0, 1000, allow_nan=False, width=32)] * 2, *[st.floats(0.5, 500, width=32)] * 2),
    min_size=1,
    max_size=6,
)


@settings(max_examples=50, deadline=None)
@given(boxes=boxes_strategy, label=st.integers(0, 2), image_id=st.integers(1, 10**6))
def test_results_bbox_is_xywh_of_xyxy(boxes, label, image_id):
    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
    n = len(xyxy)
    dets = Detections(xyxy, torch.linspace(1, 0, n), torch.full((n,), label))
    results = detections_to_coco_results([dets], [image_id], FakeLabelMap())
    assert len(results) == n
    got = torch.tensor([r["bbox"] for r in results])  # [N, 4] xywh
    assert torch.allclose(got[:, :2], xyxy[:, :2]) and torch.allclose(got[:, :2] + got[:, 2:], xyxy[:, 2:])
    assert {r["category_id"] for r in results} == {(1, 3, 7)[label]}
    assert {r["image_id"] for r in results} == {image_id}
