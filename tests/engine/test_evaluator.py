import contextlib
import io
import json

import pytest
from engine_fakes import (
    CATEGORY_NAMES,
    FakeLabelMap,
    OracleDetector,
    SyntheticDataset,
    TinyDetector,
    coco_gt_dict,
    collate,
    make_coco,
    oracle_table,
)
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader

from asag.engine.distributed import build_eval_sampler
from asag.engine.evaluator import evaluate


def eval_loader(gt: dict, batch_size: int = 2) -> DataLoader:
    dataset = SyntheticDataset(gt)
    return DataLoader(dataset, batch_size=batch_size, sampler=build_eval_sampler(dataset), collate_fn=collate)


def run(model, gt, **kw):
    loader = eval_loader(gt)
    return evaluate(model, loader, coco_gt=make_coco(gt), label_map=FakeLabelMap(), device="cpu", **kw)


def test_perfect_predictions_ap_one_and_statistics(tmp_path):
    gt = coco_gt_dict()
    result = run(OracleDetector(oracle_table(gt)), gt, results_json=tmp_path / "res.json", per_class=True)
    assert result.ap == 1.0 and result.ap50 == 1.0 and result.ap75 == 1.0
    assert (result.aps, result.apm, result.apl) == (1.0, 1.0, 1.0)
    assert result.per_class_ap == dict.fromkeys(CATEGORY_NAMES, 1.0)
    assert result.num_images == 6 and result.num_detections == 18
    # valid queries 3 + id % 3 for ids 1..6: 4, 5, 3, 4, 5, 3
    assert result.mean_queries == 4.0
    # P4: id % 2 real patches (1, 0, 1, 0, 1, 0), loss-only ones excluded; P3: one per batch of 2
    assert result.mean_patches == {"P4": 0.5, "P3": 0.5}
    assert result.images_per_second > 0
    written = json.loads((tmp_path / "res.json").read_text())
    assert result.results_path == str(tmp_path / "res.json")
    assert len(written) == 18
    first = next(a for a in gt["annotations"] if a["image_id"] == 1)
    assert written[0]["image_id"] == 1 and written[0]["category_id"] == first["category_id"]
    assert written[0]["bbox"] == pytest.approx(first["bbox"])


def test_shifted_boxes_equal_independent_pycocotools():
    gt = coco_gt_dict()
    result = run(OracleDetector(oracle_table(gt, shift=3.0, score_fn=lambda a: 1.0 / a["id"])), gt)

    coco = make_coco(gt)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0 / a["id"],
         "bbox": [a["bbox"][0] + 3.0, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
        for a in gt["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert result.stats == pytest.approx(list(reference.stats), abs=1e-7)
    assert [result.ap, result.ap50, result.ap75] == pytest.approx(list(reference.stats[:3]), abs=1e-7)
    assert 0.0 < result.ap < 1.0


def test_no_detections_give_zero_ap(tmp_path):
    gt = coco_gt_dict()
    result = run(OracleDetector({}), gt, results_json=tmp_path / "empty.json")
    assert result.ap == 0.0 and result.ap50 == 0.0 and result.num_detections == 0
    assert result.num_images == 6
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_partial_pass_scores_only_seen_images():
    gt = coco_gt_dict()
    loader = eval_loader(gt, batch_size=2)
    model = OracleDetector(oracle_table(gt))
    coco = make_coco(gt)
    result = evaluate(model, loader, coco_gt=coco, label_map=FakeLabelMap(), device="cpu", max_batches=1)
    assert result.num_images == 2 and result.ap == 1.0


class Wrapper(nn.Module):  # stands in for DistributedDataParallel (.module)
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_real_forward_unwraps_and_restores_training_mode():
    gt = coco_gt_dict()
    model = TinyDetector()
    model.train()
    result = run(Wrapper(model), gt)
    assert model.training
    assert result.num_detections == 6 * 5  # top-5 per image
    assert -1.0 <= result.ap <= 1.0 and result.mean_queries == 4.0
    assert result.mean_patches == {"P4": 0.0, "P3": 0.0}  # anchor output present, nothing probed


def test_eval_sampler_covers_everything_once():
    gt = coco_gt_dict(7)
    dataset = SyntheticDataset(gt)
    from asag.engine.distributed import InferenceShardSampler

    shards = [list(InferenceShardSampler(dataset, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(InferenceShardSampler(dataset, rank=r, world_size=3)) for r in range(3)] == [3, 2, 2]
    assert list(build_eval_sampler(dataset)) == list(range(7))


def test_bf16_evaluation_runs_on_cpu():
    gt = coco_gt_dict()
    result = run(TinyDetector(), gt, amp="bf16")
    assert result.num_detections == 30
    with pytest.raises(Exception, match="fp16"):
        run(TinyDetector(), gt, amp="fp16")
