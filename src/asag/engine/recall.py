"""Anchor and proposal recall (spec section 10, the release's ``--eval_recall`` mode).

Recall follows mmdetection's greedy rule: for the first ``N`` boxes of an image, repeatedly take the
(ground truth, box) pair with the highest IoU among the remaining ones, record that IoU for the ground
truth and remove both; a ground truth counts as recalled at threshold ``t`` when its recorded IoU is
``>= t``. (Taking pairs in descending IoU order and stopping below ``t`` gives the same count for
every ``t``, so one greedy pass serves all thresholds.) AR@N is the recall averaged over the IoU
thresholds 0.50:0.05:0.95, pooled over all ground truth of the data set.

By object size (COCO: small < 32^2, medium < 96^2, large otherwise), the size is the ground-truth box
area in original-image pixels (pycocotools uses the annotation's segmentation area instead); each
size range is matched separately, against its own ground truth only, like COCO's ARs/ARm/ARl.

Boxes handed to the accumulator are xyxy in original-image pixels:

* anchors: ``ModelOutput.anchors.boxes`` valid rows (pixel cxcywh of the resized image), in output order
  (coarse to fine, as the release feeds them; the anchor generator passes no confidence on);
* proposals: ``ModelOutput.proposals.boxes`` valid rows after the ``num_dn`` denoising rows (normalised
  cxcywh), ranked by their best class score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from asag.structures import ImageTargets, ModelOutput

# mmdetection / COCO recall thresholds 0.50:0.05:0.95.
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# Numbers of boxes per image of AR@100 / AR@300 / AR@1000.
PROPOSAL_NUMS = (100, 300, 1000)
# COCO object-size ranges on the area in original pixels (pycocotools' 32^2 and 96^2 limits).
SMALL_AREA = 32**2
MEDIUM_AREA = 96**2
AREA_RANGES = {
    "all": (0.0, math.inf),
    "small": (0.0, float(SMALL_AREA)),
    "medium": (float(SMALL_AREA), float(MEDIUM_AREA)),
    "large": (float(MEDIUM_AREA), math.inf),
}


def greedy_matched_ious(ious: Tensor) -> Tensor:
    """mmdetection's greedy assignment of boxes to ground truth.

    Args:
        ious: ``[G, P]`` IoU of every ground truth with every box.
    Returns:
        ``[G]`` the IoU each ground truth received (0 if no box was left for it). Pairs are taken in
        descending IoU order; each ground truth and each box is used at most once.
    """
    num_gt, num_boxes = ious.shape
    matched = ious.new_zeros(num_gt)
    if num_gt == 0 or num_boxes == 0:
        return matched
    ious = ious.clone()
    for _ in range(min(num_gt, num_boxes)):
        flat = int(ious.argmax())
        gt, box = divmod(flat, num_boxes)
        if ious[gt, box] < 0:
            break
        matched[gt] = ious[gt, box]
        ious[gt, :] = -1.0
        ious[:, box] = -1.0
    return matched


def recall_at(matched: Tensor, thresholds: Sequence[float] = IOU_THRESHOLDS) -> list[float]:
    """Fraction of ground truth with ``matched >= t`` for each threshold ``t`` (``matched`` ``[G]``)."""
    if matched.numel() == 0:
        return [0.0 for _ in thresholds]
    return [float((matched >= t).float().mean()) for t in thresholds]


@dataclass
class RecallResult:
    """Recall of one box source over a data set.

    recall: size range -> box count N -> recall per IoU threshold (``iou_thresholds`` order).
    ar: size range -> N -> recall averaged over the thresholds (AR@N).
    num_gt: size range -> number of ground-truth boxes.
    mean_boxes: mean number of boxes per image offered to the matching (before the cut at N).
    """

    iou_thresholds: list[float]
    proposal_nums: list[int]
    recall: dict[str, dict[int, list[float]]]
    ar: dict[str, dict[int, float]]
    num_gt: dict[str, int]
    mean_boxes: float


@dataclass
class RecallAccumulator:
    """Collects greedy-matched IoUs image by image (boxes and ground truth xyxy, original pixels)."""

    proposal_nums: tuple[int, ...] = PROPOSAL_NUMS
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS
    area_ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(AREA_RANGES))
    _matched: dict[tuple[str, int], list[Tensor]] = field(default_factory=dict)
    _num_boxes: int = 0
    _num_images: int = 0

    def add(self, gt_xyxy: Tensor, boxes_xyxy: Tensor) -> None:
        """One image: ``gt_xyxy`` ``[G, 4]`` and ``boxes_xyxy`` ``[P, 4]`` ranked (best first)."""
        gt_xyxy, boxes_xyxy = gt_xyxy.detach().float().cpu(), boxes_xyxy.detach().float().cpu()
        self._num_boxes += len(boxes_xyxy)
        self._num_images += 1
        areas = (gt_xyxy[:, 2] - gt_xyxy[:, 0]) * (gt_xyxy[:, 3] - gt_xyxy[:, 1])
        for name, (low, high) in self.area_ranges.items():
            gt = gt_xyxy[(areas >= low) & (areas < high)]
            ious = box_iou(gt, boxes_xyxy)  # [g, P]
            for n in self.proposal_nums:
                self._matched.setdefault((name, n), []).append(greedy_matched_ious(ious[:, :n]))

    def result(self) -> RecallResult:
        recall: dict[str, dict[int, list[float]]] = {}
        ar: dict[str, dict[int, float]] = {}
        num_gt: dict[str, int] = {}
        for name in self.area_ranges:
            recall[name], ar[name] = {}, {}
            for n in self.proposal_nums:
                parts = self._matched.get((name, n), [])
                matched = torch.cat(parts) if parts else torch.zeros(0)
                recall[name][n] = recall_at(matched, self.iou_thresholds)
                ar[name][n] = sum(recall[name][n]) / len(self.iou_thresholds)
                num_gt[name] = int(matched.numel())
        mean = self._num_boxes / self._num_images if self._num_images else 0.0
        return RecallResult(list(self.iou_thresholds), list(self.proposal_nums), recall, ar, num_gt, mean)


# ------------------------------------------------------------------------------ box extraction


def _orig_scale(orig_sizes: Tensor) -> Tensor:
    """``[B, 2]`` ``(H, W)`` -> ``[B, 4]`` float ``(W, H, W, H)``."""
    return orig_sizes.flip(-1).float().repeat(1, 2)


def ground_truth_xyxy(targets: Sequence[ImageTargets]) -> list[Tensor]:
    """Per image ``[G, 4]`` xyxy in original pixels from normalised cxcywh targets."""
    out = []
    for t in targets:
        scale = torch.tensor(t.orig_size, dtype=torch.float32).flip(-1).repeat(2)  # (W, H, W, H)
        out.append(box_convert(t.boxes.float().cpu().reshape(-1, 4), "cxcywh", "xyxy") * scale)
    return out


def anchor_boxes_xyxy(output: ModelOutput, image_sizes: Tensor, orig_sizes: Tensor) -> list[Tensor]:
    """Per image the valid anchors ``[n, 4]`` xyxy in original pixels, in output order.

    ``output.anchors.boxes`` ``[B, Q, 4]`` are pixel cxcywh of the resized image ``image_sizes`` ``[B, 2]``
    (h, w); they are rescaled by ``orig / resized`` per axis.
    """
    resized = image_sizes.flip(-1).float().repeat(1, 2).to(output.anchors.boxes.device)  # [B, 4]
    scale = _orig_scale(orig_sizes).to(resized) / resized  # [B, 4]
    boxes = box_convert(output.anchors.boxes.float(), "cxcywh", "xyxy") * scale[:, None]  # [B, Q, 4]
    return [boxes[b][output.valid_mask[b]].cpu() for b in range(len(boxes))]


def proposal_boxes_xyxy(output: ModelOutput, orig_sizes: Tensor) -> list[Tensor]:
    """Per image the valid proposals ``[n, 4]`` xyxy in original pixels, best class score first."""
    num_dn = output.num_dn
    boxes = output.proposals.boxes[:, num_dn:].float()  # [B, Q, 4] normalised cxcywh
    scores = output.proposals.logits[:, num_dn:].float().sigmoid().amax(dim=-1)  # [B, Q]
    scale = _orig_scale(orig_sizes).to(boxes)  # [B, 4]
    boxes = box_convert(boxes, "cxcywh", "xyxy") * scale[:, None]
    out = []
    for b in range(len(boxes)):
        valid = output.valid_mask[b]
        order = torch.argsort(scores[b][valid], descending=True, stable=True)
        out.append(boxes[b][valid][order].cpu())
    return out


@dataclass
class RecallEvaluator:
    """Anchor and proposal recall over a data set, fed batch by batch."""

    anchors: RecallAccumulator = field(default_factory=RecallAccumulator)
    proposals: RecallAccumulator = field(default_factory=RecallAccumulator)

    def update(self, output: ModelOutput, targets: Sequence[ImageTargets], image_sizes: Tensor,
               orig_sizes: Tensor) -> None:
        """Add one evaluated batch (``image_sizes`` / ``orig_sizes`` ``[B, 2]`` (h, w))."""
        gts = ground_truth_xyxy(targets)
        for gt, boxes in zip(gts, anchor_boxes_xyxy(output, image_sizes, orig_sizes)):
            self.anchors.add(gt, boxes)
        for gt, boxes in zip(gts, proposal_boxes_xyxy(output, orig_sizes)):
            self.proposals.add(gt, boxes)

    def result(self) -> dict[str, RecallResult]:
        return {"anchors": self.anchors.result(), "proposals": self.proposals.result()}


def format_recall(results: dict[str, RecallResult]) -> str:
    """Text table: one row per box source and size range, one column per AR@N."""
    first = next(iter(results.values()))
    columns = " ".join(f"{'AR@' + str(n):>8}" for n in first.proposal_nums)
    lines = [f"{'boxes':>10} {'size':>7} {'#gt':>6} {columns}"]
    for source, res in results.items():
        for size, by_n in res.ar.items():
            values = " ".join(f"{by_n[n]:>8.4f}" for n in res.proposal_nums)
            lines.append(f"{source:>10} {size:>7} {res.num_gt[size]:>6} {values}")
    return "\n".join(lines)
