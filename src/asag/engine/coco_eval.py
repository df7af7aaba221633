"""COCO-style box evaluation with pycocotools: detections -> result records -> COCOeval metrics.

Result records follow the COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` with boxes in original-image pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from torch import Tensor
from torchvision.ops import box_convert

from asag.outputs import atomic_write_text
from asag.structures import Detections

# Order of COCOeval.stats for bbox evaluation (pycocotools ``summarize``).
COCO_STAT_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar100", "ars", "arm", "arl")
# Indices into COCOeval.eval["precision"] of shape [T, R, K, A, M]: area range "all", maxDets 100.
_AREA_ALL, _MAX_DETS_LAST = 0, -1


class LabelMapping(Protocol):
    """Maps contiguous labels ``0..C-1`` to the data set's category ids."""

    def to_category_ids(self, labels: Tensor) -> Tensor: ...


@dataclass
class CocoMetrics:
    """pycocotools bbox metrics, in [0, 1]; -1 where undefined (no ground truth in that range).

    ap: AP@[.50:.95]; ap50 / ap75: AP at IoU 0.5 / 0.75; aps / apm / apl: AP for small / medium /
    large objects; ar1 / ar10 / ar100: AR with 1 / 10 / 100 detections per image; ars / arm / arl:
    AR@100 by object size. per_class_ap: category name -> AP@[.50:.95] (None unless asked).
    summary: pycocotools' printed summary.
    """

    ap: float
    ap50: float
    ap75: float
    aps: float
    apm: float
    apl: float
    ar1: float
    ar10: float
    ar100: float
    ars: float
    arm: float
    arl: float
    per_class_ap: dict[str, float] | None
    summary: str
    num_detections: int
    num_images: int

    @property
    def stats(self) -> list[float]:
        """The 12 numbers in pycocotools' ``stats`` order."""
        return [getattr(self, name) for name in COCO_STAT_NAMES]


def detections_to_coco_results(
    detections: Sequence[Detections], image_ids: Sequence[int], label_map: LabelMapping
) -> list[dict]:
    """COCO result records for a batch.

    Args:
        detections: one :class:`Detections` per image (boxes ``[K, 4]`` xyxy, original pixels).
        image_ids: the data set's image id of each image.
        label_map: maps the contiguous labels to category ids.
    Returns:
        one dict per detection, ``bbox`` as ``[x, y, w, h]`` in original pixels.
    """
    counts = [len(d) for d in detections]
    if sum(counts) == 0:
        return []
    boxes_xyxy = torch.cat([d.boxes.detach().float().cpu() for d in detections])  # [N, 4]
    boxes_xywh = box_convert(boxes_xyxy, in_fmt="xyxy", out_fmt="xywh")  # [N, 4]
    scores = torch.cat([d.scores.detach().float().cpu() for d in detections])  # [N]
    labels = torch.cat([d.labels.detach().cpu() for d in detections])  # [N]
    category_ids = label_map.to_category_ids(labels)  # [N]
    ids = torch.repeat_interleave(torch.as_tensor(list(image_ids), dtype=torch.int64), torch.tensor(counts))
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(ids.tolist(), category_ids.tolist(), boxes_xywh.tolist(), scores.tolist())
    ]


def write_results_json(path: str | os.PathLike, results: Sequence[dict]) -> Path:
    """Write the result records as a JSON array (atomically: temporary file, then rename)."""
    return atomic_write_text(path, json.dumps(list(results)))


def load_results(coco_gt: COCO, results: Sequence[dict]) -> COCO:
    """The detections as a pycocotools COCO object; an empty list gives an empty result set (where
    ``COCO.loadRes`` would fail)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes([dict(r) for r in results])  # loadRes edits the records
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def accumulated_eval(
    coco_gt: COCO,
    coco_dt: COCO,
    *,
    image_ids: Sequence[int] | None = None,
    setup: Callable[[Params], None] | None = None,
    evaluator_class: type[COCOeval] = COCOeval,
) -> COCOeval:
    """A pycocotools bbox ``COCOeval`` of ``coco_dt`` against ``coco_gt``, evaluated and accumulated
    (its ``eval["precision"]`` is ``[T, R, K, A, M]``), with pycocotools' printing silenced.

    Args:
        image_ids: restrict the evaluation to these images (default: every image of ``coco_gt``).
        setup: changes the parameters before the evaluation (IoU thresholds, categories, areas ...).
        evaluator_class: ``COCOeval`` or a subclass.
    """
    evaluator = evaluator_class(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted({int(i) for i in image_ids})
    if setup is not None:
        setup(evaluator.params)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def run_coco_eval(
    coco_gt: COCO,
    results: Sequence[dict],
    *,
    image_ids: Sequence[int] | None = None,
    per_class: bool = False,
) -> CocoMetrics:
    """Run pycocotools' bbox evaluation of ``results`` against ``coco_gt``.

    Args:
        image_ids: restrict the evaluation to these images (default: every image of ``coco_gt``);
            pass the ids actually run so that a partial pass is not penalised for unseen images.
        per_class: also compute AP@[.50:.95] per category.
    """
    evaluator = accumulated_eval(coco_gt, load_results(coco_gt, results), image_ids=image_ids)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(COCO_STAT_NAMES, evaluator.stats)}
    return CocoMetrics(
        **stats,
        per_class_ap=_per_class_ap(evaluator, coco_gt) if per_class else None,
        summary=_summary_lines(buffer.getvalue()),
        num_detections=len(results),
        num_images=len(evaluator.params.imgIds),
    )


def _summary_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip().startswith("Average"))


def _per_class_ap(evaluator: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP@[.50:.95] per category (area all, 100 detections); -1 for categories without ground truth."""
    precision = evaluator.eval["precision"][:, :, :, _AREA_ALL, _MAX_DETS_LAST]  # [T, R, K]
    out: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        valid = values[values > -1]
        out[category_name(coco_gt, cat_id)] = float(np.mean(valid)) if valid.size else -1.0
    return out


def category_name(coco_gt: COCO, cat_id: int) -> str:
    """The category's ``name``, or its id as text when it has none."""
    return str(coco_gt.cats[cat_id].get("name", cat_id))
