"""Hungarian matching (spec section 8.3) on ``scipy.optimize.linear_sum_assignment``.

Two matchers share one cost function:

* :class:`HungarianMatcher` (class-aware): the proposal stage ("rpn") and every decoder head. Only valid,
  non-denoising queries take part; the returned query indices are real row indices even when the valid
  queries are not a prefix (the release assumed a prefix, spec 13.10).
* :class:`AnchorMatcher` (class-agnostic): each anchor-generator patch (P6 copy, P5 crop, P4/P3 patch) is
  matched independently against the targets assigned to it (``asag.training.patch_targets``).

The cost of prediction ``i`` for target ``j`` is ``(5 L1 + 2 focal_cls + 2 (-GIoU)) * a_j`` with ``a_j``
the target's area weight (spec 8.2, 8.3). Costs are computed without gradient, in float32 and outside
autocast, for all groups of a batch at once (``[G, N, T]`` with targets padded per group); only the scipy
call loops over groups. A non-finite cost raises :class:`NonFiniteCostError` naming the stage.

A *group* is an image (decoder heads) or a patch (anchor generator). Targets of all groups travel
concatenated in a :class:`GroupedTargets`; a :class:`Matching` lists the matched pairs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from asag.errors import NonFiniteError
from asag.structures import ImageTargets

# Cost weights of all three matchers (spec 8.3; --set_cost_class 2, --set_cost_bbox 5, --set_cost_giou 2).
DEFAULT_COST_CLASS = 2.0
DEFAULT_COST_BBOX = 5.0
DEFAULT_COST_GIOU = 2.0
# Focal-style classification cost (spec 8.3; authors' alpha 0.25, gamma 2).
DEFAULT_FOCAL_ALPHA = 0.25
DEFAULT_FOCAL_GAMMA = 2.0
# Guard inside the logarithms of the focal cost (spec 8.3, authors' value).
FOCAL_LOG_EPS = 1e-8
# Box given to padded target slots so that their (discarded) costs stay finite: the unit square, cxcywh
# (centre 0.5, 0.5; sides 1, 1).
_PAD_CENTRE, _PAD_SIDE = 0.5, 1.0


class NonFiniteCostError(NonFiniteError, ValueError):
    """A matching cost matrix holds NaN or infinity (usually diverged predictions)."""


# ------------------------------------------------------------------------------------------- targets


@dataclass
class PaddedTargets:
    """Targets of ``G`` groups padded to the largest group.

    boxes: ``[G, T, 4]`` cxcywh in each group's frame (padding slots hold the unit square).
    labels: ``[G, T]`` int64 (0 in padding slots).
    mask: ``[G, T]`` bool, True for real targets.
    index: ``[G, T]`` int64 position in the flat :class:`GroupedTargets` arrays (-1 in padding slots).
    """

    boxes: Tensor
    labels: Tensor
    mask: Tensor
    index: Tensor


@dataclass
class GroupedTargets:
    """Targets of ``G`` groups (images or patches), concatenated group after group.

    boxes: ``[T, 4]`` cxcywh, normalised to the frame of the group (image, crop or patch).
    labels: ``[T]`` int64 contiguous class indices.
    group: ``[T]`` int64 group of each target, non-decreasing.
    num_groups: ``G`` (groups may be empty).
    source: ``[T]`` int64 index of the ground-truth box each target derives from, in the flat arrays of
        the per-image targets it was built from (identity for per-image targets).
    """

    boxes: Tensor
    labels: Tensor
    group: Tensor
    num_groups: int
    source: Tensor

    def __len__(self) -> int:
        return int(self.group.numel())

    @classmethod
    def from_lists(cls, boxes: list[Tensor], labels: list[Tensor]) -> GroupedTargets:
        """One group per list entry: ``boxes[g]`` ``[n_g, 4]`` cxcywh, ``labels[g]`` ``[n_g]``."""
        if not boxes:
            raise ValueError("GroupedTargets.from_lists needs at least one group")
        counts = torch.tensor([len(b) for b in boxes], device=boxes[0].device)
        group = torch.repeat_interleave(torch.arange(len(boxes), device=counts.device), counts)
        flat = torch.cat([b.reshape(-1, 4) for b in boxes]).float()
        source = torch.arange(len(group), device=flat.device)
        return cls(flat, torch.cat(labels).long(), group, len(boxes), source)

    @classmethod
    def from_images(cls, targets: list[ImageTargets]) -> GroupedTargets:
        """One group per image; boxes stay in the normalised image frame."""
        return cls.from_lists([t.boxes for t in targets], [t.labels for t in targets])

    def counts(self) -> Tensor:
        """``[G]`` number of targets per group (a scatter-add: no host sync, unlike ``bincount``)."""
        counts = torch.zeros(self.num_groups, dtype=torch.int64, device=self.group.device)
        return counts.index_add_(0, self.group, torch.ones_like(self.group))

    def offsets(self) -> Tensor:
        """``[G]`` flat index of the first target of each group."""
        counts = self.counts()
        return torch.cumsum(counts, 0) - counts

    def padded(self) -> PaddedTargets:
        """Scatter the flat targets into ``[G, T_max, *]`` tensors (vectorised, no per-group loop)."""
        g, device = self.num_groups, self.boxes.device
        counts = self.counts()
        width = int(counts.max()) if len(self) else 0  # the one host sync: the padded width
        slot = torch.arange(len(self), device=device) - (torch.cumsum(counts, 0) - counts)[self.group]
        boxes = self.boxes.new_full((g, width, 4), _PAD_CENTRE)
        boxes[..., 2:] = _PAD_SIDE
        labels = torch.zeros(g, width, dtype=torch.int64, device=device)
        mask = torch.zeros(g, width, dtype=torch.bool, device=device)
        index = torch.full((g, width), -1, dtype=torch.int64, device=device)
        boxes[self.group, slot] = self.boxes
        labels[self.group, slot] = self.labels
        mask[self.group, slot] = True
        index[self.group, slot] = torch.arange(len(self), device=device)
        return PaddedTargets(boxes, labels, mask, index)


@dataclass
class Matching:
    """Matched (prediction, target) pairs of ``G`` groups, concatenated group after group.

    group: ``[M]`` int64 group of each pair.
    query: ``[M]`` int64 row of the prediction inside its group (a real query index: never an index
        into the subset of valid queries).
    target: ``[M]`` int64 index into the flat arrays of the :class:`GroupedTargets` that was matched.
    num_groups: ``G``.
    """

    group: Tensor
    query: Tensor
    target: Tensor
    num_groups: int

    def __len__(self) -> int:
        return int(self.group.numel())

    @classmethod
    def identity(cls, targets: GroupedTargets) -> Matching:
        """Target ``k`` of group ``g`` paired with query ``k`` of group ``g`` (denoising, spec 8.7)."""
        slot = torch.arange(len(targets), device=targets.group.device) - targets.offsets()[targets.group]
        target = torch.arange(len(targets), device=targets.group.device)
        return cls(targets.group.clone(), slot, target, targets.num_groups)


# --------------------------------------------------------------------------------------------- costs


def focal_class_cost(
    prob: Tensor, alpha: float = DEFAULT_FOCAL_ALPHA, gamma: float = DEFAULT_FOCAL_GAMMA
) -> Tensor:
    """Focal classification cost of spec 8.3, element-wise on sigmoid scores ``p`` of the target class.

    ``alpha (1 - p)^gamma (-ln(p + 1e-8)) - (1 - alpha) p^gamma (-ln(1 - p + 1e-8))``.
    """
    positive = alpha * (1.0 - prob).pow(gamma) * -(prob + FOCAL_LOG_EPS).log()
    negative = (1.0 - alpha) * prob.pow(gamma) * -(1.0 - prob + FOCAL_LOG_EPS).log()
    return positive - negative


def matching_cost(
    prob: Tensor,
    boxes: Tensor,
    targets: PaddedTargets,
    target_weight: Tensor,
    cost_class: float = DEFAULT_COST_CLASS,
    cost_bbox: float = DEFAULT_COST_BBOX,
    cost_giou: float = DEFAULT_COST_GIOU,
    focal_alpha: float = DEFAULT_FOCAL_ALPHA,
    focal_gamma: float = DEFAULT_FOCAL_GAMMA,
) -> Tensor:
    """Batched matching cost (spec 8.3).

    Args:
        prob: ``[G, N, C]`` sigmoid class scores (``C = 1`` and all labels 0 for class-agnostic anchors).
        boxes: ``[G, N, 4]`` predicted boxes, cxcywh, same frame as the targets of the group.
        targets: padded targets, ``[G, T, *]``.
        target_weight: ``[G, T]`` area weight of each target (multiplies the target's column).

    Returns:
        ``[G, N, T]`` cost; padded target columns hold finite garbage.
    """
    g, n, _ = prob.shape
    t = targets.labels.shape[1]
    class_cost = focal_class_cost(prob, focal_alpha, focal_gamma)  # (G, N, C), cheaper than (G, N, T)
    cls = class_cost.gather(2, targets.labels[:, None, :].expand(g, n, t))  # (G, N, T)
    l1 = torch.cdist(boxes, targets.boxes, p=1)  # (G, N, T)
    pred_xyxy = box_convert(boxes, "cxcywh", "xyxy")
    giou = generalized_box_iou(pred_xyxy, box_convert(targets.boxes, "cxcywh", "xyxy"))  # (G, N, T)
    return (cost_bbox * l1 + cost_class * cls - cost_giou * giou) * target_weight[:, None, :]


def _check_finite(cost: np.ndarray, rows: np.ndarray, columns: np.ndarray, stage: str) -> None:
    """Raise :class:`NonFiniteCostError` if a cost entry between a valid row and a real target is bad
    (host arrays: ``cost`` ``[G, N, T]``, ``rows`` ``[G, N]`` and ``columns`` ``[G, T]`` bool)."""
    relevant = rows[:, :, None] & columns[:, None, :]  # (G, N, T)
    bad = int((~np.isfinite(cost) & relevant).sum())
    if bad:
        raise NonFiniteCostError(
            f"matching cost of stage '{stage}' has {bad} non-finite entries (NaN or inf) out of "
            f"{int(relevant.sum())}; the predictions or targets of this stage contain NaN/inf "
            "(training diverged, or a degenerate box)"
        )


def _to_host(cost: Tensor, rows: Tensor, mask: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One device-to-host copy of a stage's ``[G, N, T]`` costs, ``[G, N]`` valid rows and ``[G, T]``
    real-target mask (packed into one float32 vector; 0/1 flags are exact in float32)."""
    g, n, t = cost.shape
    parts = [cost.detach().float(), rows.float(), mask.float()]
    packed = torch.cat([part.reshape(-1) for part in parts])
    flat = packed.cpu().numpy()
    cost_np = flat[: g * n * t].reshape(g, n, t)
    rows_np = flat[g * n * t : g * n * (t + 1)].reshape(g, n) > 0.5
    mask_np = flat[g * n * (t + 1) :].reshape(g, t) > 0.5
    return cost_np, rows_np, mask_np


def solve_assignment(cost: Tensor, rows: Tensor, targets: PaddedTargets, stage: str) -> Matching:
    """Run ``linear_sum_assignment`` per group over the valid rows and real targets.

    The costs, rows and target masks of all groups cross to the host in one copy and the matched pairs
    come back in one copy, whatever the number of groups.

    Args:
        cost: ``[G, N, T]`` cost (any device).
        rows: ``[G, N]`` bool, rows that may be matched.
        targets: the padded targets the cost was computed for (real targets first in every group).
        stage: name used in error messages.
    """
    cost_np, rows_np, mask_np = _to_host(cost, rows, targets.mask)
    _check_finite(cost_np, rows_np, mask_np, stage)
    counts = mask_np.sum(1)  # (G,) real targets per group
    offsets = np.cumsum(counts) - counts  # flat index of each group's first target
    pairs = [np.zeros((3, 0), dtype=np.int64)]  # rows: group, query, flat target
    for g in range(cost_np.shape[0]):
        valid_rows = np.flatnonzero(rows_np[g])
        if len(valid_rows) == 0 or counts[g] == 0:
            continue
        i, j = linear_sum_assignment(cost_np[g][valid_rows][:, : counts[g]])
        pairs.append(np.stack([np.full(len(i), g), valid_rows[i], offsets[g] + j]).astype(np.int64))
    group, query, target = torch.as_tensor(np.concatenate(pairs, axis=1), device=cost.device).unbind(0)
    return Matching(group, query, target, cost.shape[0])


# ------------------------------------------------------------------------------------------ matchers


class HungarianMatcher(nn.Module):
    """Class-aware one-to-one matching of head predictions to ground truth (proposal stage, decoder heads).

    Args:
        cost_class, cost_bbox, cost_giou: weights of the focal class cost, the L1 cost (normalised cxcywh)
            and the negative GIoU (spec 8.3: 2, 5, 2).
        focal_alpha, focal_gamma: parameters of the focal class cost (0.25, 2).
    """

    def __init__(
        self,
        cost_class: float = DEFAULT_COST_CLASS,
        cost_bbox: float = DEFAULT_COST_BBOX,
        cost_giou: float = DEFAULT_COST_GIOU,
        focal_alpha: float = DEFAULT_FOCAL_ALPHA,
        focal_gamma: float = DEFAULT_FOCAL_GAMMA,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: GroupedTargets,
        target_weight: Tensor,
        valid_mask: Tensor | None = None,
        stage: str = "decoder",
    ) -> Matching:
        """Match each group's valid predictions to its targets.

        Args:
            logits: ``[G, N, C]`` class logits (the matching, non-denoising queries only).
            boxes: ``[G, N, 4]`` predicted boxes, cxcywh in the targets' frame (normalised image frame).
            targets: targets of the ``G`` groups.
            target_weight: ``[T]`` area weight of each target (flat order of ``targets``).
            valid_mask: ``[G, N]`` bool, queries allowed to match (``None``: all).
            stage: name of the stage for error messages (``"main"``, ``"aux_0"``, ``"rpn"``, ...).

        Returns:
            The matched pairs; ``query`` indexes the ``N`` rows given here.
        """
        device = logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            padded = targets.padded()
            weight = _pad_weight(target_weight.float(), padded)
            cost = matching_cost(
                logits.float().sigmoid(), boxes.float(), _float_boxes(padded), weight,
                self.cost_class, self.cost_bbox, self.cost_giou, self.focal_alpha, self.focal_gamma,
            )  # fmt: skip
        if valid_mask is None:
            valid_mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=device)
        return solve_assignment(cost, valid_mask.bool(), padded, stage)


class AnchorMatcher(HungarianMatcher):
    """Class-agnostic matching of each anchor-generator patch to the targets assigned to it (spec 8.3).

    The class cost uses the anchor's confidence ``sigmoid(logit)``; costs and weights as
    :class:`HungarianMatcher`. Every patch is an independent group.
    """

    @torch.no_grad()
    def forward(  # type: ignore[override]
        self, anchors: Tensor, targets: GroupedTargets, target_weight: Tensor, stage: str = "anchor"
    ) -> Matching:
        """Match the anchors of every patch.

        Args:
            anchors: ``[G, K, 5]`` per patch: ``cx, cy, w, h`` in the patch frame (sigmoid applied) and the
                raw confidence logit.
            targets: per-patch targets in the patch frame (``G`` groups).
            target_weight: ``[T]`` area weight of each target (standard, or inverse for P6).
            stage: name of the part for error messages (``"anchor_P6"``, ...).
        """
        agnostic = GroupedTargets(
            targets.boxes, torch.zeros_like(targets.labels), targets.group, targets.num_groups, targets.source
        )
        return super().forward(anchors[..., 4:5], anchors[..., :4], agnostic, target_weight, None, stage)


def _pad_weight(weight: Tensor, padded: PaddedTargets) -> Tensor:
    """Flat ``[T]`` per-target values -> ``[G, T_max]`` (1 in padding slots)."""
    if weight.numel() == 0:
        return torch.ones(padded.mask.shape, dtype=weight.dtype, device=weight.device)
    return torch.where(padded.mask, weight[padded.index.clamp(min=0)], torch.ones_like(weight[:1]))


def _float_boxes(padded: PaddedTargets) -> PaddedTargets:
    return PaddedTargets(padded.boxes.float(), padded.labels, padded.mask, padded.index)
