"""CrowdHuman metrics (spec section 10): AP, log-average miss rate (mMR) and Recall of full-body boxes.

The protocol of the CrowdHuman benchmark (Shao et al., 2018), which uses Caltech-style matching
(Dollár et al., "Pedestrian Detection: An Evaluation of the State of the Art", TPAMI 2012):

1. Detections and ground-truth boxes are clipped to the image, ``[0, W] x [0, H]``.
2. Per image, detections are visited in descending score order. Each one takes the still unmatched
   person box (``iscrowd = 0``) with the highest IoU, if that IoU is above 0.5: a true positive (TP).
   Otherwise, if its intersection over its own area (IoA) with some ignore region (``iscrowd = 1``) is
   above 0.5, it is *ignored*: neither TP nor FP. Otherwise it is a false positive (FP). Ignore regions
   can absorb any number of detections; person boxes at most one.
3. The TPs and FPs of all images form one list ranked by score (a stable sort: ties keep image order,
   then per-image score order). After each entry ``i`` of the list:
   ``recall_i = TP_i / G``, ``precision_i = TP_i / i``, ``miss_i = 1 - recall_i``, ``fppi_i = FP_i / N``,
   with ``G`` person boxes (ignore regions excluded) and ``N`` evaluated images.
4. **AP**: trapezoidal area under the precision-recall points of the ranked list,
   ``sum_i (recall_i - recall_{i-1}) (precision_i + precision_{i-1}) / 2`` over consecutive entries.
   As in the CrowdHuman toolkit, the curve starts at the first entry: no segment is added from
   recall 0.
5. **mMR**: the miss rate sampled at 9 FPPI reference points ``r`` log-spaced in ``[1e-2, 1]`` and
   averaged in log space, ``exp(mean(log(max(miss(r), 1e-10))))``. Two sampling rules
   (``evaluation.miss_rate_rule``); they give the same sample unless some ``fppi_i`` equals ``r``
   exactly:

   * ``toolkit`` (default): the rule of the CrowdHuman evaluation toolkit, which produced the published
     CrowdHuman numbers (the paper's included). ``miss(r)`` is the miss rate of the *first* entry with
     ``fppi_i >= r``, or of the final entry when the curve never reaches ``r``. On an exact tie the
     entry taken is the FP that brings the FPPI to ``r``: the TPs ranked after it at the same FPPI
     are not counted.
   * ``caltech``: the rule of Dollár's Caltech toolbox. ``miss(r)`` is the miss rate of the *last*
     entry with ``fppi_i <= r`` (among entries of equal FPPI the last, i.e. the lowest miss rate); the
     final miss rate when the curve never reaches ``r``; 1 (the curve's origin, nothing detected) when
     the list starts with an FP whose FPPI ``1 / N`` already exceeds ``r``.

   A tie can only make the toolkit's sample higher. Exact ties do happen: on the 4370 CrowdHuman val
   images at r = 0.1 (437 FPs) and r = 1, where they were observed to change mMR by 0.01-0.02.
6. **Recall**: the final recall of the ranked list.

All three are in ``[0, 1]`` (mMR: lower is better). Without any person box (``G = 0``) they are
undefined and reported as -1, the convention of pycocotools. Without detections (or with all of them
ignored) AP and Recall are 0 and mMR is 1.

The protocol has one class: detection labels are not used, and a ground truth with several
categories is rejected. Differences from the CrowdHuman toolkit, all negligible: reference points
are exact powers of ten (the toolkit rounds them to 4 decimals; 0.01, 0.1 and 1, where ties occur,
are exact in both), the left and top edges clip to ``W`` / ``H`` (the toolkit ``W - 1`` / ``H - 1``),
overlaps carry no epsilon in their denominators, and miss rates are floored at 1e-10 (the toolkit
reports mMR 0 for a miss rate of 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from asag.errors import ConfigError, DataError
from asag.ops.boxes import intersection_over_foreground
from asag.structures import Detections

# CrowdHuman toolkit (Caltech matching): a detection matches a person box at IoU above 0.5 and an
# ignore region at IoA (intersection over the detection's area) above 0.5.
IOU_THRESHOLD = 0.5
IOA_THRESHOLD = 0.5
# Dollár et al. (TPAMI 2012): 9 FPPI reference points log-spaced in [1e-2, 1] ("MR^-2").
FPPI_LOG10_RANGE = (-2.0, 0.0)
NUM_FPPI_POINTS = 9
# Dollár's toolbox: miss rates are floored before the logarithm (a perfect detector has mMR ~ 0).
MISS_RATE_FLOOR = 1e-10
# Reported for AP, mMR and Recall when the ground truth holds no person box (pycocotools convention).
UNDEFINED = -1.0
# How the miss rate is sampled at a reference FPPI (module docstring, step 5).
MissRateRule = Literal["caltech", "toolkit"]
MISS_RATE_RULES: tuple[str, ...] = ("toolkit", "caltech")
# The CrowdHuman toolkit's rule: the published CrowdHuman mMR numbers (the paper's included) come from it.
DEFAULT_MISS_RATE_RULE: MissRateRule = "toolkit"
# Outcome of one detection (the CrowdHuman toolkit's labels).
TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1
# Boxes are evaluated in double precision (areas of ~1e3 px boxes, ratios near the 0.5 thresholds).
EVAL_DTYPE = torch.float64


def fppi_reference_points() -> Tensor:
    """``[9]`` float64 FPPI values ``10^-2, 10^-1.75, ..., 10^0``."""
    low, high = FPPI_LOG10_RANGE
    return torch.logspace(low, high, NUM_FPPI_POINTS, dtype=EVAL_DTYPE)


# ------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class ImageGroundTruth:
    """Ground truth of one image.

    boxes: ``[G, 4]`` xyxy in original-image pixels (full-body boxes and ignore regions).
    ignore: ``[G]`` bool, True for ignore regions (``iscrowd = 1``).
    width, height: the image size in pixels (boxes are clipped to it).
    """

    boxes: Tensor
    ignore: Tensor
    width: float
    height: float

    @property
    def num_people(self) -> int:
        return int((~self.ignore).sum())


@dataclass(frozen=True)
class ImageMatch:
    """Matching result of one image.

    scores: ``[K]`` detection scores, descending. outcome: ``[K]`` int8, one of TRUE_POSITIVE,
    FALSE_POSITIVE, IGNORED for the detection at the same position. num_people / num_ignore: the
    image's person boxes and ignore regions.
    """

    scores: Tensor
    outcome: Tensor
    num_people: int
    num_ignore: int


@dataclass(frozen=True)
class RankedDetections:
    """The TPs and FPs of all images, ranked by descending score (ignored detections removed).

    scores: ``[M]``. is_tp: ``[M]`` bool. num_people: person boxes of all images (``G``).
    num_images: images evaluated (``N``). num_ignored: detections dropped as ignored.
    """

    scores: Tensor
    is_tp: Tensor
    num_people: int
    num_images: int
    num_ignored: int


@dataclass(frozen=True)
class DetectionCurves:
    """One point per entry of the ranked list, all ``[M]`` float64 (see the module docstring)."""

    recall: Tensor
    precision: Tensor
    miss_rate: Tensor
    fppi: Tensor


@dataclass(frozen=True)
class CrowdHumanMetrics:
    """CrowdHuman metrics in [0, 1] (-1 when the ground truth holds no person box).

    ap: area under the precision-recall curve. mmr: log-average miss rate over FPPI [1e-2, 1] (lower
    is better). recall: final recall. num_images: images evaluated. num_people / num_ignore: person
    boxes and ignore regions. num_detections: all detections; num_true_positives,
    num_false_positives, num_ignored: their outcomes.
    """

    ap: float
    mmr: float
    recall: float
    num_images: int
    num_people: int
    num_ignore: int
    num_detections: int
    num_true_positives: int
    num_false_positives: int
    num_ignored: int

    @property
    def summary(self) -> str:
        """One line: ``AP 0.9130  mMR 0.4350  Recall 0.9690`` and the counts behind them."""
        return (f"AP {self.ap:.4f}  mMR {self.mmr:.4f}  Recall {self.recall:.4f}  ({self.num_images} images, "
                f"{self.num_people} people, {self.num_ignore} ignore regions; {self.num_true_positives} TP, "
                f"{self.num_false_positives} FP, {self.num_ignored} ignored detections)")


# ---------------------------------------------------------------------------------------- matching


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """``[K, R]`` intersection over the area of ``boxes`` (0 for boxes of zero area).

    boxes: ``[K, 4]`` xyxy; regions: ``[R, 4]`` xyxy, same frame.
    """
    return intersection_over_foreground(boxes[None], regions[None])[0]


def safe_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``[K, G]`` IoU of xyxy boxes, 0 where both boxes have zero area (torchvision gives NaN)."""
    return box_iou(boxes1, boxes2).nan_to_num(nan=0.0)


def greedy_match(iou: np.ndarray, on_ignore: np.ndarray, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Caltech greedy matching of score-sorted detections to person boxes.

    Args:
        iou: ``[K, P]`` IoU of the detections (rows, descending score) with the person boxes.
        on_ignore: ``[K]`` bool, True where a detection lies on an ignore region (IoA above threshold).
        iou_threshold: a match needs an IoU strictly above it.
    Returns:
        ``[K]`` int8 outcomes: TRUE_POSITIVE, else IGNORED where ``on_ignore``, else FALSE_POSITIVE.
    """
    outcome = np.where(on_ignore, IGNORED, FALSE_POSITIVE).astype(np.int8)
    if iou.shape[1] == 0:
        return outcome
    free = np.ones(iou.shape[1], dtype=bool)
    for k in np.flatnonzero((iou > iou_threshold).any(axis=1)):  # only rows that can match anything
        overlaps = np.where(free, iou[k], -1.0)  # matched person boxes are out of reach
        j = int(overlaps.argmax())  # first of equal overlaps, as the toolkit
        if overlaps[j] > iou_threshold:
            free[j] = False
            outcome[k] = TRUE_POSITIVE
    return outcome


def match_image(
    det_boxes: Tensor,
    det_scores: Tensor,
    gt: ImageGroundTruth,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    ioa_threshold: float = IOA_THRESHOLD,
) -> ImageMatch:
    """Clip and match the detections of one image (steps 1-2 of the module docstring).

    Args:
        det_boxes: ``[K, 4]`` xyxy original-image pixels. det_scores: ``[K]``.
        gt: the image's ground truth (same frame).
    """
    scores = _as_eval(det_scores).reshape(-1)  # [K]
    order = torch.sort(scores, descending=True, stable=True).indices  # [K]
    boxes = clip_to_image(_as_eval(det_boxes).reshape(-1, 4)[order], gt.width, gt.height)  # [K, 4]
    gt_boxes = clip_to_image(_as_eval(gt.boxes).reshape(-1, 4), gt.width, gt.height)  # [G, 4]
    ignore = gt.ignore.detach().cpu().bool().reshape(-1)
    iou = safe_box_iou(boxes, gt_boxes[~ignore])  # [K, P]
    on_ignore = (box_ioa(boxes, gt_boxes[ignore]) > ioa_threshold).any(dim=1)  # [K]
    outcome = greedy_match(iou.numpy(), on_ignore.numpy(), iou_threshold)
    return ImageMatch(scores[order], torch.from_numpy(outcome), int((~ignore).sum()), int(ignore.sum()))


def _as_eval(tensor: Tensor) -> Tensor:
    return tensor.detach().cpu().to(EVAL_DTYPE)


def clip_to_image(boxes: Tensor, width: float, height: float) -> Tensor:
    """Clip ``[K, 4]`` xyxy pixel boxes to ``[0, width] x [0, height]``."""
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0.0), limits)


# ------------------------------------------------------------------------------------------ curves


def rank_matches(matches: Sequence[ImageMatch]) -> RankedDetections:
    """Rank the TPs and FPs of all images by descending score (step 3; stable for ties)."""
    num_people = sum(m.num_people for m in matches)
    if not matches:
        empty = torch.zeros(0, dtype=EVAL_DTYPE)
        return RankedDetections(empty, torch.zeros(0, dtype=torch.bool), num_people, 0, 0)
    scores = torch.cat([m.scores.to(EVAL_DTYPE) for m in matches])  # [K_all]
    outcome = torch.cat([m.outcome for m in matches])  # [K_all]
    kept = outcome != IGNORED
    scores, outcome = scores[kept], outcome[kept]
    order = torch.sort(scores, descending=True, stable=True).indices
    return RankedDetections(scores[order], outcome[order] == TRUE_POSITIVE, num_people, len(matches),
                            int((~kept).sum()))


def detection_curves(is_tp: Tensor, num_people: int, num_images: int) -> DetectionCurves:
    """Recall, precision, miss rate and FPPI after each entry of the ranked list.

    Args:
        is_tp: ``[M]`` bool, the ranked list (True: TP, False: FP).
        num_people: person boxes ``G`` (must be positive). num_images: images ``N`` (positive).
    """
    if num_people <= 0 or num_images <= 0:
        raise ValueError(f"curves need people and images, got {num_people} people, {num_images} images")
    tp = torch.cumsum(is_tp.to(EVAL_DTYPE), dim=0)  # [M]
    fp = torch.cumsum((~is_tp).to(EVAL_DTYPE), dim=0)  # [M]
    recall = tp / num_people
    precision = tp / (tp + fp)
    return DetectionCurves(recall=recall, precision=precision, miss_rate=1.0 - recall, fppi=fp / num_images)


def average_precision(recall: Tensor, precision: Tensor) -> float:
    """Trapezoidal area under ``[M]`` (recall, precision) points, from the first point (0 when M < 2)."""
    return float(torch.trapezoid(precision, recall)) if len(recall) > 1 else 0.0


def sample_miss_rates(
    fppi: Tensor, miss_rate: Tensor, references: Tensor, rule: MissRateRule = DEFAULT_MISS_RATE_RULE
) -> Tensor:
    """``[R]`` miss-rate samples of a curve at the FPPI references.

    fppi: ``[M]`` non-decreasing; miss_rate: ``[M]``; references: ``[R]``.
    rule: "toolkit" (default, the CrowdHuman toolkit's): the first point with ``fppi >= r``, the last
    point if there is none; "caltech": the last point with ``fppi <= r``, 1 if there is none. An empty
    curve samples 1 under both.
    """
    if rule not in MISS_RATE_RULES:
        raise ValueError(f"unknown miss-rate rule {rule!r}; expected one of {MISS_RATE_RULES}")
    if len(miss_rate) == 0:
        return torch.ones_like(references, dtype=EVAL_DTYPE)
    references = references.to(fppi.dtype)
    if rule == "toolkit":
        first = torch.searchsorted(fppi.contiguous(), references, right=False)  # [R] first fppi >= r
        return miss_rate[first.clamp(max=len(miss_rate) - 1)]
    last = torch.searchsorted(fppi.contiguous(), references, right=True) - 1  # [R] last fppi <= r
    return torch.where(last >= 0, miss_rate[last.clamp(min=0)], torch.ones_like(references))


def log_average_miss_rate(
    fppi: Tensor, miss_rate: Tensor, references: Tensor | None = None,
    rule: MissRateRule = DEFAULT_MISS_RATE_RULE,
) -> float:
    """``exp(mean(log(max(miss(r), 1e-10))))`` over the FPPI references (default: 9 in [1e-2, 1]),
    sampled by ``rule`` (see :func:`sample_miss_rates`)."""
    references = fppi_reference_points() if references is None else references
    samples = sample_miss_rates(fppi, miss_rate, references, rule).clamp(min=MISS_RATE_FLOOR)
    return float(torch.exp(torch.log(samples).mean()))


def final_recall(recall: Tensor) -> float:
    """The recall after the whole ranked list (0 for an empty list)."""
    return float(recall[-1]) if len(recall) else 0.0


# ----------------------------------------------------------------------------------------- metrics


def metrics_from_matches(
    matches: Sequence[ImageMatch], miss_rate_rule: MissRateRule = DEFAULT_MISS_RATE_RULE
) -> CrowdHumanMetrics:
    """AP, mMR and Recall (steps 3-6) from the per-image matching results."""
    ranked = rank_matches(matches)
    num_tp = int(ranked.is_tp.sum())
    counts = dict(
        num_images=ranked.num_images,
        num_people=ranked.num_people,
        num_ignore=sum(m.num_ignore for m in matches),
        num_detections=sum(len(m.scores) for m in matches),
        num_true_positives=num_tp,
        num_false_positives=len(ranked.is_tp) - num_tp,
        num_ignored=ranked.num_ignored,
    )
    if ranked.num_people == 0:
        return CrowdHumanMetrics(ap=UNDEFINED, mmr=UNDEFINED, recall=UNDEFINED, **counts)
    curves = detection_curves(ranked.is_tp, ranked.num_people, ranked.num_images)
    return CrowdHumanMetrics(
        ap=average_precision(curves.recall, curves.precision),
        mmr=log_average_miss_rate(curves.fppi, curves.miss_rate, rule=miss_rate_rule),
        recall=final_recall(curves.recall),
        **counts,
    )


def crowdhuman_metrics(
    detections: Sequence[Detections],
    ground_truth: Sequence[ImageGroundTruth],
    *,
    iou_threshold: float = IOU_THRESHOLD,
    ioa_threshold: float = IOA_THRESHOLD,
    miss_rate_rule: MissRateRule = DEFAULT_MISS_RATE_RULE,
) -> CrowdHumanMetrics:
    """CrowdHuman AP, mMR and Recall of ``detections`` (one per image, boxes ``[K, 4]`` xyxy original
    pixels; labels are not used: the protocol has one class) against ``ground_truth`` (same order).
    ``miss_rate_rule``: how miss rates are sampled at the FPPI references ("toolkit", the default, or
    "caltech"; module docstring, step 5)."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection sets for {len(ground_truth)} images")
    matches = [
        match_image(d.boxes, d.scores, gt, iou_threshold=iou_threshold, ioa_threshold=ioa_threshold)
        for d, gt in zip(detections, ground_truth)
    ]
    return metrics_from_matches(matches, miss_rate_rule)


# ------------------------------------------------------------------------------------ COCO format


def check_single_category(coco_gt: COCO, source: str = "the ground truth") -> None:
    """The CrowdHuman protocol scores one class; reject a multi-category ground truth (``source`` names
    it in the message, e.g. the annotation file)."""
    categories = coco_gt.dataset.get("categories", [])
    if len(categories) > 1:
        names = ", ".join(str(c.get("name", c.get("id"))) for c in categories[:5])
        raise ConfigError(
            f"evaluation.metric 'crowdhuman' scores a single class (person), but {source} has "
            f"{len(categories)} categories ({names}{', ...' if len(categories) > 5 else ''}); "
            "use evaluation.metric=coco"
        )


def ground_truth_from_coco(coco_gt: COCO, image_id: int) -> ImageGroundTruth:
    """One image's ground truth from a COCO object as written by ``asag data convert-crowdhuman``:
    ``bbox`` ``[x, y, w, h]`` original pixels; ``iscrowd = 1`` (or a true ``ignore`` key) marks ignore
    regions; the size comes from the image entry."""
    if image_id not in coco_gt.imgs:
        raise DataError(f"image id {image_id} is not in the ground truth")
    image = coco_gt.imgs[image_id]
    anns = coco_gt.imgToAnns.get(image_id, [])
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=EVAL_DTYPE).reshape(-1, 4)
    ignore = torch.tensor([bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0)) for a in anns],
                          dtype=torch.bool)
    boxes = box_convert(xywh, in_fmt="xywh", out_fmt="xyxy")  # [G, 4]
    return ImageGroundTruth(boxes, ignore, float(image["width"]), float(image["height"]))


def detections_from_coco_results(results: Sequence[Mapping]) -> Detections:
    """COCO result records of one image (``bbox`` ``[x, y, w, h]`` pixels, ``score``) as Detections
    (boxes ``[K, 4]`` xyxy; labels 0: the protocol has one class)."""
    xywh = torch.tensor([r["bbox"] for r in results], dtype=EVAL_DTYPE).reshape(-1, 4)
    scores = torch.tensor([float(r["score"]) for r in results], dtype=EVAL_DTYPE)
    labels = torch.zeros(len(results), dtype=torch.int64)
    return Detections(box_convert(xywh, in_fmt="xywh", out_fmt="xyxy"), scores, labels)


def evaluate_coco_results(
    coco_gt: COCO, results_by_image: Mapping[int, Sequence[Mapping]],
    miss_rate_rule: MissRateRule = DEFAULT_MISS_RATE_RULE,
) -> CrowdHumanMetrics:
    """CrowdHuman metrics of COCO result records grouped by image id; the images evaluated are the
    keys (an image without detections must be present with an empty list)."""
    check_single_category(coco_gt)
    image_ids = list(results_by_image)
    detections = [detections_from_coco_results(results_by_image[i]) for i in image_ids]
    ground_truth = [ground_truth_from_coco(coco_gt, i) for i in image_ids]
    return crowdhuman_metrics(detections, ground_truth, miss_rate_rule=miss_rate_rule)

