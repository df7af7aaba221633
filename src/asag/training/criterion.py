"""The training objective of ASAG (spec section 8; denoising part of section 4, options of section 15).

Terms (raw, unweighted; the release's names):

* proposal stage ``loss_{ce,bbox,giou}_rpn``, main head ``loss_{ce,bbox,giou}`` (the last decoder head),
  auxiliary heads ``loss_{ce,bbox,giou}_k`` (head ``k``): Hungarian matching per image, Query-Weighted DW
  focal classification, L1 and GIoU box losses, all times the target's area weight (spec 8.5);
* anchor generator ``loss_{ce,bbox,giou}_anchor``: per-patch class-agnostic matching, quality focal loss
  with the IoU >= 0.5 ignore rule, Query-Weighted L1 and GIoU in the patch frame; P6 + P5 crops + the
  P4/P3 patches scaled by ``4 / n_patches`` (spec 8.6);
* denoising ``dn_loss_{ce,bbox,giou}_i`` (``i = 0`` proposal stage, ``1..L-1`` auxiliary heads, ``L``
  main head): identity matching to the tiled ground truth, normalised by ``num_dn * B`` (spec 8.7).

Everything else is normalised by ``num_boxes`` (spec 8.1). The weighted total uses the weights of spec 8.8.
The criterion reads the model output and never modifies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from asag.structures import HeadOutput, ImageTargets, ModelOutput, PatchPredictions
from asag.training import query_weighting as qw
from asag.training.matcher import (
    DEFAULT_COST_BBOX,
    DEFAULT_COST_CLASS,
    DEFAULT_COST_GIOU,
    DEFAULT_FOCAL_ALPHA,
    DEFAULT_FOCAL_GAMMA,
    AnchorMatcher,
    GroupedTargets,
    HungarianMatcher,
    Matching,
)
from asag.training.patch_targets import PATCH_SIZE, crop_targets, p6_targets, probed_patch_targets

# Loss weights of spec 8.8 (authors' ce_loss_coef 2, bbox_loss_coef 5, giou_loss_coef 2, other_loss_coef 1,
# anchor_loss_coef 4 with internal anchor weights 2 / 1 / 0.5).
DEFAULT_CE_COEF = 2.0
DEFAULT_BBOX_COEF = 5.0
DEFAULT_GIOU_COEF = 2.0
DEFAULT_OTHER_COEF = 1.0
DEFAULT_ANCHOR_COEF = 4.0
DEFAULT_ANCHOR_CE_COEF = 2.0
DEFAULT_ANCHOR_BBOX_COEF = 1.0
DEFAULT_ANCHOR_GIOU_COEF = 0.5
# Exponent of the focal negative term p^gamma BCE(x, 0) of the DW focal loss (spec 8.5; no alpha there).
DEFAULT_NEGATIVE_GAMMA = 2.0
# Exponent beta of the anchors' quality focal loss |u - p|^beta BCE(x, u) (spec 8.6.4).
DEFAULT_QUALITY_BETA = 2.0
# Unmatched anchors whose best IoU with a target of their patch reaches this get no loss (spec 8.6.4).
DEFAULT_ANCHOR_IGNORE_IOU = 0.5
# The P4/P3 anchor terms are scaled by REFERENCE / n_patches (spec 8.6.4: 4 / n_patches).
PATCH_LOSS_REFERENCE_COUNT = 4.0
# Anchor-generator levels in the order of the avg_patch_level_j statistics (spec 3.8, 8.8).
PATCH_LEVELS = ("P6", "P5", "P4", "P3")


@dataclass
class LossResult:
    """Output of :class:`SetCriterion`.

    total: 0-d weighted sum of the terms (carries gradient).
    terms: raw, unweighted 0-d loss terms keyed by the release's names.
    weights: the weight of every key of ``terms``.
    stats: logged-only values: ``class_error(_rpn)``, ``avg_pos_weight(_rpn)``, ``avg_neg_weight(_rpn)``,
        ``iou_anchor``, ``avg_anchor``, ``avg_patch``, ``avg_patch_level_j``, ``num_boxes``.
    """

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]
    stats: dict[str, float]


@dataclass
class PairWeights:
    """Detached Query-Weighting quantities of ``M`` matched pairs (spec 8.4), each ``[M]``.

    score: sigmoid score of the target class (anchor confidence for anchors); iou: IoU with the target;
    w_pos, w_neg: Query Weighting; area: area weight of the target.
    """

    score: Tensor
    iou: Tensor
    w_pos: Tensor
    w_neg: Tensor
    area: Tensor


@dataclass
class StageLoss:
    """Unnormalised loss sums of one head or anchor part, with the matching they came from.

    ce, bbox, giou: 0-d sums (divide by the normaliser). weights: per-pair weights of ``matching``.
    """

    ce: Tensor
    bbox: Tensor
    giou: Tensor
    matching: Matching
    weights: PairWeights


@dataclass
class AnchorPart:
    """One anchor-generator part: P6, the P5 crops, or all P4/P3 patches (spec 8.6).

    name: ``"P6"``, ``"P5crops"`` or ``"P4P3patches"``. anchors: ``[G, K, 5]`` patch-frame cxcywh + logit,
    one row per patch. targets: per-patch targets (patch frame). area: ``[T]`` area weight of each
    target. scale: factor applied to the part's terms.
    """

    name: str
    anchors: Tensor
    targets: GroupedTargets
    area: Tensor
    scale: float


# ------------------------------------------------------------------------------------- pure helpers


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of corresponding boxes: ``[M, 4]`` x ``[M, 4]`` cxcywh -> ``[M]``."""
    return box_iou(boxes1[:, None], boxes2[:, None], fmt="cxcywh")[:, 0, 0]


def pairwise_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of corresponding boxes: ``[M, 4]`` x ``[M, 4]`` cxcywh -> ``[M]``."""
    a = box_convert(boxes1, "cxcywh", "xyxy")[:, None]  # (M, 1, 4)
    b = box_convert(boxes2, "cxcywh", "xyxy")[:, None]
    return generalized_box_iou(a, b)[:, 0, 0]


@dataclass
class BoxLoss:
    """0-d sums of the weighted L1 and GIoU box losses over matched pairs."""

    l1: Tensor
    giou: Tensor


def weighted_box_losses(pred: Tensor, target: Tensor, weight: Tensor) -> BoxLoss:
    """Sums of ``weight * ||pred - target||_1`` and ``weight * (1 - GIoU)`` over ``M`` pairs (spec 8.5).

    Args:
        pred, target: ``[M, 4]`` cxcywh in the same frame. weight: ``[M]`` (detached).
    """
    l1 = (F.l1_loss(pred, target, reduction="none") * weight[:, None]).sum()
    giou = ((1.0 - pairwise_giou(pred, target)) * weight).sum()
    return BoxLoss(l1, giou)


def dw_focal_loss(
    logits: Tensor,
    matching: Matching,
    labels: Tensor,
    weights: PairWeights,
    valid: Tensor,
    negative_gamma: float = DEFAULT_NEGATIVE_GAMMA,
) -> Tensor:
    """Sum of the Query-Weighted classification loss (spec 8.5, supplement Eq. A-2).

    Every entry gets ``p^gamma BCE(x, 0)``; the matched ``(query, class)`` entries get
    ``a (w_pos BCE(x, 1) + w_neg BCE(x, 0))`` instead; rows with ``valid = False`` contribute nothing.

    Args:
        logits: ``[G, N, C]``. matching: matched pairs (``query`` indexes ``N``). labels: ``[M]`` class of
            each pair. weights: Query Weighting of the pairs. valid: ``[G, N]`` bool.
    """
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = negative * logits.sigmoid().pow(negative_gamma)
    x = logits[matching.group, matching.query, labels]
    to_one = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    to_zero = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    positive = to_one * weights.w_pos + to_zero * weights.w_neg
    loss = loss.index_put((matching.group, matching.query, labels), positive * weights.area)
    return torch.where(valid[..., None], loss, torch.zeros_like(loss)).sum()


def quality_focal_loss(
    logits: Tensor,
    matching: Matching,
    weights: PairWeights,
    ignore: Tensor,
    beta: float = DEFAULT_QUALITY_BETA,
) -> Tensor:
    """Sum of the anchors' quality focal loss with ignore rule (spec 8.6.4).

    Every anchor gets ``p^beta BCE(x, 0)``; a matched anchor gets ``a |u - p|^beta BCE(x, u)`` (soft target
    = IoU ``u``); anchors with ``ignore = True`` contribute nothing.

    Args:
        logits: ``[G, K]`` confidence logits. matching: matched pairs. weights: their IoU and area weight.
        ignore: ``[G, K]`` bool.
    """
    prob = logits.sigmoid()
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = negative * prob.pow(beta)
    x = logits[matching.group, matching.query]
    quality = (weights.iou - prob[matching.group, matching.query]).abs().pow(beta)
    positive = F.binary_cross_entropy_with_logits(x, weights.iou, reduction="none") * quality * weights.area
    loss = loss.index_put((matching.group, matching.query), positive)
    return torch.where(ignore, torch.zeros_like(loss), loss).sum()


@torch.no_grad()
def anchor_ignore_mask(
    boxes: Tensor, targets: GroupedTargets, matching: Matching, threshold: float = DEFAULT_ANCHOR_IGNORE_IOU
) -> Tensor:
    """``[G, K]`` bool: unmatched anchors whose best IoU with a target of their own patch is ``>= threshold``.

    Args:
        boxes: ``[G, K, 4]`` anchors, cxcywh in the patch frame.
        targets: per-patch targets (``G`` groups, same frame).
    """
    padded = targets.padded()
    if padded.mask.shape[1] == 0:
        return torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    iou = box_iou(boxes.float(), padded.boxes.float(), fmt="cxcywh")  # (G, K, T)
    best = torch.where(padded.mask[:, None, :], iou, torch.zeros_like(iou)).amax(dim=-1)
    ignore = best >= threshold
    ignore[matching.group, matching.query] = False
    return ignore


def class_error(logits: Tensor, matching: Matching, labels: Tensor) -> float:
    """``100 - top-1 accuracy (%)`` of the matched queries (DETR's logged value; 100 with no match)."""
    if len(matching) == 0:
        return 100.0
    predicted = logits[matching.group, matching.query].argmax(-1)
    return 100.0 - 100.0 * float((predicted == labels).float().mean())


@dataclass(frozen=True)
class BatchShare:
    """A batch that is one of ``parts`` micro-batches of an accumulated batch (gradient accumulation).

    ``num_boxes``: the normaliser of the whole accumulated batch (:func:`num_boxes_normaliser` of all its
    targets), used instead of this batch's own. The terms normalised per batch (denoising: ``num_dn * B``;
    P4/P3 patches: ``4 / n_patches``) are divided by ``parts`` as well, so that the micro-batches' terms
    add up to the accumulated batch's (exactly when the micro-batches hold equal counts).
    """

    num_boxes: float
    parts: int


def num_boxes_normaliser(targets: list[ImageTargets], device: torch.device) -> float:
    """Spec 8.1: ground-truth boxes in the batch, averaged over ranks when distributed, at least 1."""
    count = torch.tensor([float(sum(len(t) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count), 1.0)


@torch.no_grad()
def decoder_pair_weights(
    logits: Tensor, boxes: Tensor, targets: GroupedTargets, area: Tensor, matching: Matching,
    gamma1: float = qw.DEFAULT_GAMMA1, gamma2: float = qw.DEFAULT_GAMMA2,
) -> PairWeights:  # fmt: skip
    """Query Weighting of matched head predictions (spec 8.4).

    Args:
        logits: ``[G, N, C]``. boxes: ``[G, N, 4]`` normalised cxcywh. targets: per-image targets.
        area: ``[T]`` area weight of every target. matching: matched pairs.
    """
    labels = targets.labels[matching.target]
    score = logits[matching.group, matching.query, labels].sigmoid()
    iou = pairwise_iou(boxes[matching.group, matching.query], targets.boxes[matching.target])
    positive = qw.w_pos(score, iou, gamma1, gamma2)
    return PairWeights(score, iou, positive, qw.w_neg(score, iou, gamma1, gamma2), area[matching.target])


@torch.no_grad()
def anchor_pair_weights(
    anchors: Tensor, targets: GroupedTargets, area: Tensor, matching: Matching,
    gamma1: float = qw.DEFAULT_GAMMA1, gamma2: float = qw.DEFAULT_GAMMA2,
) -> PairWeights:  # fmt: skip
    """Weights of matched anchors (spec 8.6.4, 8.9): ``w_pos`` is the box weight ``Norm(p^g1 u^g2)``.

    The soft classification target is ``iou``; ``w_neg`` is unused for anchors and left at 0.

    Args:
        anchors: ``[G, K, 5]`` patch-frame cxcywh + confidence logit. targets: per-patch targets.
        area: ``[T]`` area weight of every target. matching: matched pairs.
    """
    pred = anchors[matching.group, matching.query]  # (M, 5)
    score = pred[:, 4].sigmoid()
    iou = pairwise_iou(pred[:, :4], targets.boxes[matching.target])
    return PairWeights(
        score, iou, qw.w_pos(score, iou, gamma1, gamma2), torch.zeros_like(score), area[matching.target]
    )


# ----------------------------------------------------------------------------------------- criterion


class SetCriterion(nn.Module):
    """ASAG's losses for one batch (spec section 8).

    Args:
        num_classes: number of object classes ``C`` (logits are ``[B, L, C]``, no background column).
        cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma: matching costs (spec 8.3: 2, 5, 2,
            0.25, 2).
        ce_coef, bbox_coef, giou_coef: weights of the head / proposal / denoising terms (2, 5, 2).
        other_coef: extra factor on those terms (``other_loss_coef``, 1).
        anchor_coef: ``anchor_loss_coef`` (4), times ``anchor_ce_coef`` (2), ``anchor_bbox_coef`` (1),
            ``anchor_giou_coef`` (0.5) for the anchor terms (spec 8.8).
        area_weight: maximum area weight ``A`` (4; 1 disables it, spec 8.2).
        gamma1, gamma2: Query-Weighting exponents (0.4, 0.6).
        negative_gamma: focal exponent of the classification negatives (2).
        quality_beta: exponent of the anchors' quality focal loss (2).
        anchor_ignore_iou: IoU from which unmatched anchors are ignored (0.5).
        patch_size: P4/P3 patch side in feature cells (15).
        fix_p6_flip_targets: correct flipped P6 targets instead of the release's (spec 15, quirk 1).
    """

    def __init__(
        self,
        num_classes: int,
        cost_class: float = DEFAULT_COST_CLASS,
        cost_bbox: float = DEFAULT_COST_BBOX,
        cost_giou: float = DEFAULT_COST_GIOU,
        focal_alpha: float = DEFAULT_FOCAL_ALPHA,
        focal_gamma: float = DEFAULT_FOCAL_GAMMA,
        ce_coef: float = DEFAULT_CE_COEF,
        bbox_coef: float = DEFAULT_BBOX_COEF,
        giou_coef: float = DEFAULT_GIOU_COEF,
        other_coef: float = DEFAULT_OTHER_COEF,
        anchor_coef: float = DEFAULT_ANCHOR_COEF,
        anchor_ce_coef: float = DEFAULT_ANCHOR_CE_COEF,
        anchor_bbox_coef: float = DEFAULT_ANCHOR_BBOX_COEF,
        anchor_giou_coef: float = DEFAULT_ANCHOR_GIOU_COEF,
        area_weight: float = qw.DEFAULT_AREA_WEIGHT,
        gamma1: float = qw.DEFAULT_GAMMA1,
        gamma2: float = qw.DEFAULT_GAMMA2,
        negative_gamma: float = DEFAULT_NEGATIVE_GAMMA,
        quality_beta: float = DEFAULT_QUALITY_BETA,
        anchor_ignore_iou: float = DEFAULT_ANCHOR_IGNORE_IOU,
        patch_size: int = PATCH_SIZE,
        fix_p6_flip_targets: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma)
        self.anchor_matcher = AnchorMatcher(cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma)
        self.head_coefs = {
            "ce": ce_coef * other_coef,
            "bbox": bbox_coef * other_coef,
            "giou": giou_coef * other_coef,
        }
        self.anchor_coefs = {
            "ce": anchor_ce_coef * anchor_coef,
            "bbox": anchor_bbox_coef * anchor_coef,
            "giou": anchor_giou_coef * anchor_coef,
        }
        self.area_weight, self.gamma1, self.gamma2 = area_weight, gamma1, gamma2
        self.negative_gamma, self.quality_beta = negative_gamma, quality_beta
        self.anchor_ignore_iou = anchor_ignore_iou
        self.patch_size = patch_size
        self.fix_p6_flip_targets = fix_p6_flip_targets

    def loss_weight(self, key: str) -> float:
        """Weight of a term in the total (spec 8.8), e.g. ``loss_ce_rpn`` -> 2, ``loss_ce_anchor`` -> 8."""
        kind = key.removeprefix("dn_").split("_")[1]  # loss_<kind>[_suffix]
        return (self.anchor_coefs if key.endswith("_anchor") else self.head_coefs)[kind]

    def forward(self, output: ModelOutput, targets: list[ImageTargets], image_sizes: Tensor,
                share: BatchShare | None = None) -> LossResult:
        """Compute every loss term of a batch.

        Args:
            output: the detector's output (training mode: flipped P6 copies, loss-only patches,
                denoising queries first when enabled). Not modified.
            targets: one per image; boxes ``[n, 4]`` normalised cxcywh, labels ``[n]``.
            image_sizes: ``[B, 2]`` int ``(h, w)`` of the resized, unpadded images.
            share: this batch as a micro-batch of an accumulated one (:class:`BatchShare`); None: a
                batch of its own.
        """
        device = output.heads[-1].logits.device
        if len(targets) != output.valid_mask.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {output.valid_mask.shape[0]} images")
        classes = output.heads[-1].logits.shape[-1]
        if classes != self.num_classes:
            raise ValueError(f"logits have {classes} classes, the criterion expects {self.num_classes}")
        num_boxes = num_boxes_normaliser(targets, device) if share is None else share.num_boxes
        parts = 1 if share is None else share.parts
        gt = GroupedTargets.from_images([t.to(device) for t in targets])
        terms: dict[str, Tensor] = {}
        stats: dict[str, float] = {"num_boxes": num_boxes}
        terms.update(self.denoising_terms(output, parts))
        terms.update(self.head_terms(output, gt, num_boxes, stats))
        terms.update(self.anchor_terms(output.anchors.patch_predictions, gt, image_sizes, num_boxes, stats,
                                       parts))
        stats["avg_anchor"] = float(output.valid_mask.sum()) / len(targets)
        weights = {key: self.loss_weight(key) for key in terms}
        total = torch.stack([weights[key] * value for key, value in terms.items()]).sum()
        return LossResult(total, terms, weights, stats)

    # ------------------------------------------------------------------------------ heads and proposals

    def stage_loss(
        self, head: HeadOutput, targets: GroupedTargets, area: Tensor, matching: Matching, valid: Tensor
    ) -> StageLoss:
        """Unnormalised DW focal, L1 and GIoU sums of one head (spec 8.5) for a given matching."""
        logits, boxes = head.logits.float(), head.boxes.float()
        weights = decoder_pair_weights(logits, boxes, targets, area, matching, self.gamma1, self.gamma2)
        labels = targets.labels[matching.target]
        ce = dw_focal_loss(logits, matching, labels, weights, valid, self.negative_gamma)
        pred = boxes[matching.group, matching.query]
        box = weighted_box_losses(pred, targets.boxes[matching.target], weights.w_pos * weights.area)
        return StageLoss(ce, box.l1, box.giou, matching, weights)

    def head_terms(
        self, output: ModelOutput, gt: GroupedTargets, num_boxes: float, stats: dict[str, float]
    ) -> dict[str, Tensor]:
        """``loss_*_rpn``, ``loss_*_k`` (auxiliary head k), ``loss_*`` (main head) on the matching queries."""
        num_dn, valid = output.num_dn, output.valid_mask
        area = qw.area_weight(gt.boxes, self.area_weight)
        named = [("rpn", "_rpn", output.proposals)]
        named += [(f"aux_{k}", f"_{k}", head) for k, head in enumerate(output.heads[:-1])]
        named += [("main", "", output.heads[-1])]
        terms = {}
        for stage, suffix, head in named:
            matching_part = HeadOutput(head.logits[:, num_dn:], head.boxes[:, num_dn:])  # (B, Q, *)
            matching = self.matcher(matching_part.logits, matching_part.boxes, gt, area, valid, stage)
            loss = self.stage_loss(matching_part, gt, area, matching, valid)
            terms.update(self._named_terms(loss, "", suffix, num_boxes))
            if stage in ("main", "rpn"):
                stats.update(self._head_stats(matching_part.logits, gt, loss, suffix))
        return terms

    def denoising_terms(self, output: ModelOutput, parts: int = 1) -> dict[str, Tensor]:
        """``dn_loss_*_i`` (spec 8.7): identity matching on the leading ``num_dn`` queries of every stage,
        normalised by ``num_dn * B`` (times ``parts``, see :class:`BatchShare`)."""
        queries = output.queries
        if queries.num_dn == 0 or queries.dn_boxes is None or queries.dn_labels is None:
            return {}
        device = output.heads[-1].logits.device
        dn_gt = GroupedTargets.from_lists(
            [b.to(device) for b in queries.dn_boxes], [lab.to(device) for lab in queries.dn_labels]
        )
        area = qw.area_weight(dn_gt.boxes, self.area_weight)
        matching = Matching.identity(dn_gt)
        slots = torch.arange(queries.num_dn, device=device)
        valid = slots[None, :] < dn_gt.counts()[:, None]  # (B, num_dn): padding DN queries are ignored
        normaliser = float(queries.num_dn * dn_gt.num_groups * parts)
        terms = {}
        for i, head in enumerate([output.proposals, *output.heads]):
            dn_part = HeadOutput(head.logits[:, : queries.num_dn], head.boxes[:, : queries.num_dn])
            loss = self.stage_loss(dn_part, dn_gt, area, matching, valid)
            terms.update(self._named_terms(loss, "dn_", f"_{i}", normaliser))
        return terms

    @staticmethod
    def _named_terms(loss: StageLoss, prefix: str, suffix: str, normaliser: float) -> dict[str, Tensor]:
        return {
            f"{prefix}loss_ce{suffix}": loss.ce / normaliser,
            f"{prefix}loss_bbox{suffix}": loss.bbox / normaliser,
            f"{prefix}loss_giou{suffix}": loss.giou / normaliser,
        }

    @staticmethod
    def _head_stats(logits: Tensor, gt: GroupedTargets, loss: StageLoss, suffix: str) -> dict[str, float]:
        matched = len(loss.matching) > 0
        return {
            f"class_error{suffix}": class_error(logits, loss.matching, gt.labels[loss.matching.target]),
            f"avg_pos_weight{suffix}": float(loss.weights.w_pos.mean()) if matched else 0.0,
            f"avg_neg_weight{suffix}": float(loss.weights.w_neg.mean()) if matched else 0.0,
        }

    # ---------------------------------------------------------------------------------- anchor generator

    def anchor_parts(
        self, predictions: list[PatchPredictions], gt: GroupedTargets, image_sizes: Tensor
    ) -> list[AnchorPart]:
        """P6, P5 crops and (if any) P4+P3 patches with their patch-frame targets and area weights."""
        by_level = {p.level: p for p in predictions}
        p6, p5 = by_level["P6"], by_level["P5"]
        if p6.raw.shape[0] != gt.num_groups or p5.raw.shape[0] != gt.num_groups:
            raise ValueError("P6 / P5 anchor predictions must have one row per image")
        p6_tgt = p6_targets(gt, p6.raw.shape[1], self.fix_p6_flip_targets)
        p5_tgt = crop_targets(gt, p5.crop_pos)
        p6_area = qw.inverse_area_weight(p6_tgt.boxes, self.area_weight)
        p5_area = qw.area_weight(p5_tgt.boxes, self.area_weight)
        parts = [
            AnchorPart("P6", p6.raw.flatten(0, 1), p6_tgt, p6_area, 1.0),  # (B * n6, K1, 5)
            AnchorPart("P5crops", p5.raw.flatten(0, 1), p5_tgt, p5_area, 1.0),  # (B * 4, K1, 5)
        ]
        probed = [by_level[level] for level in ("P4", "P3") if level in by_level and len(by_level[level].raw)]
        if probed:
            parts.append(self._probed_part(probed, gt, image_sizes))
        return parts

    def _probed_part(
        self, probed: list[PatchPredictions], gt: GroupedTargets, image_sizes: Tensor
    ) -> AnchorPart:
        raw = torch.cat([p.raw for p in probed])  # (P, K2, 5), P4 patches then P3 patches
        strides = torch.cat([torch.full((len(p.raw),), p.stride, dtype=torch.int64) for p in probed])
        targets = probed_patch_targets(
            gt,
            torch.cat([p.crop_pos for p in probed]),
            torch.cat([p.batch_idx for p in probed]),
            strides,
            image_sizes,
            self.patch_size,
        )
        area = qw.area_weight(targets.boxes, self.area_weight)
        return AnchorPart("P4P3patches", raw, targets, area, PATCH_LOSS_REFERENCE_COUNT / len(raw))

    def anchor_part_loss(self, part: AnchorPart) -> StageLoss:
        """Unnormalised quality focal, L1 and GIoU sums of one part (spec 8.6.4), before its scale."""
        anchors = part.anchors.float()
        matching = self.anchor_matcher(anchors, part.targets, part.area, f"anchor_{part.name}")
        weights = anchor_pair_weights(anchors, part.targets, part.area, matching, self.gamma1, self.gamma2)
        ignore = anchor_ignore_mask(anchors[..., :4], part.targets, matching, self.anchor_ignore_iou)
        ce = quality_focal_loss(anchors[..., 4], matching, weights, ignore, self.quality_beta)
        pred = anchors[matching.group, matching.query, :4]
        box = weighted_box_losses(pred, part.targets.boxes[matching.target], weights.w_pos * weights.area)
        return StageLoss(ce, box.l1, box.giou, matching, weights)

    def anchor_terms(
        self,
        predictions: list[PatchPredictions],
        gt: GroupedTargets,
        image_sizes: Tensor,
        num_boxes: float,
        stats: dict[str, float],
        share_parts: int = 1,
    ) -> dict[str, Tensor]:
        """``loss_{ce,bbox,giou}_anchor``: the parts summed, P4/P3 times ``4 / n_patches`` (spec 8.6.4;
        divided by ``share_parts`` as well, see :class:`BatchShare`)."""
        parts = self.anchor_parts(predictions, gt, image_sizes)
        losses = [self.anchor_part_loss(part) for part in parts]
        scales = [part.scale / share_parts if part.name == "P4P3patches" else part.scale for part in parts]
        terms = {}
        for kind in ("ce", "bbox", "giou"):
            scaled = [getattr(loss, kind) * scale for scale, loss in zip(scales, losses)]
            terms[f"loss_{kind}_anchor"] = torch.stack(scaled).sum() / num_boxes
        stats.update(self._anchor_stats(predictions, parts, losses, gt.num_groups))
        return terms

    @staticmethod
    def _anchor_stats(
        predictions: list[PatchPredictions], parts: list[AnchorPart], losses: list[StageLoss], batch_size: int
    ) -> dict[str, float]:
        """``iou_anchor`` (mean over parts of the matched IoU, 1 for a part without match), patch counts."""
        ious = [float(loss.weights.iou.mean()) if len(loss.matching) else 1.0 for loss in losses]
        rows = {p.level: len(p.batch_idx) for p in predictions}
        probed = sum(len(part.anchors) for part in parts if part.name == "P4P3patches")
        crops = next(part.targets.num_groups for part in parts if part.name == "P5crops")
        stats = {"iou_anchor": sum(ious) / len(ious), "avg_patch": (crops + probed) / batch_size}
        for j, level in enumerate(PATCH_LEVELS):
            stats[f"avg_patch_level_{j}"] = rows.get(level, 0) / batch_size
        return stats
