"""Selection of the anchor generator: which anchors are refined, which patches are probed, which anchors
are output and how they are packed into the query boxes (spec 3.4 steps 1-5, 3.5).

One implementation for both budget sources (:mod:`asag.modeling.budgets`), written with fixed shapes and
validity masks. Each stage is a set of rows of ``K`` anchors (:class:`StageAnchors`) with a row mask; the
patch NMS and the packing take a budget that is either a number (fixed shapes, no host read) or ``None``
(sized by one host read to what the data needs, so that nothing binds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asag.modeling.patches import anchor_patch_positions, count_per_group, finite_or_zero, square_boxes_xyxy
from asag.ops.boxes import full_image_boxes_cxcywh_px
from asag.ops.nms import fixed_budget_nms
from asag.structures import OutputAnchors, PatchSet

# Each anchor is (cx, cy, w, h, confidence logit) (spec 3.2).
ANCHOR_FIELDS = 5


@dataclass
class StageAnchors:
    """Decoded anchors of one stage, the input of the next probing step.

    anchors: ``[N, K, 5]`` pixel cxcywh + confidence (after the zeroing rules), detached.
    image_idx: ``[N]`` int64 image of each row (rows are images at the coarse stage, patches after).
    coarse: True for the P5-crops/P6 stage (the ``min_anchors`` fallback applies only there).
    row_valid: ``[N]`` bool, False for rows whose anchors are ignored: the empty slots of a fixed patch
        budget and, in training, the loss-only patches.
    """

    anchors: Tensor
    image_idx: Tensor
    coarse: bool
    row_valid: Tensor


@dataclass
class StageSelection:
    """Anchors of one stage chosen for output, as a mask (packed for all stages at once).

    anchors: ``[N, K, 5]`` the stage's pixel cxcywh + confidence.
    chosen: ``[N, K]`` bool, the output anchors.
    position: ``[N, K]`` int64 output order inside a row (ascending).
    image_idx: ``[N]`` int64 image of each row.
    reached: ``[B]`` bool, images that own rows at this stage (their group exists even when empty).
    """

    anchors: Tensor
    chosen: Tensor
    position: Tensor
    image_idx: Tensor
    reached: Tensor


@dataclass
class PackedQueries:
    """The padded query boxes of :func:`pack_queries`.

    boxes: ``[B, Q, 4]`` pixel cxcywh (padding: the full-image box); valid: ``[B, Q]`` bool, a prefix.
    output: every stage's output anchors (:class:`~asag.structures.OutputAnchors`).
    bound: ``[B]`` bool, images with more output anchors than ``Q`` query slots.
    """

    boxes: Tensor
    valid: Tensor
    output: OutputAnchors
    bound: Tensor


# ------------------------------------------------------------------------------------- probing


def refinement_candidates(stage: StageAnchors, stride: int, patch_size: int, low: float, high: float
                          ) -> Tensor:
    """``[N, K]`` bool refinement candidates (spec 3.4 steps 2-3): ``low < c < high`` and both sides
    ``< s * P / 2`` px, in valid rows."""
    a = stage.anchors
    limit = stride * patch_size / 2
    conf = a[..., 4]
    confident = (conf > low) & (conf < high)
    return confident & (a[..., 3] < limit) & (a[..., 2] < limit) & stage.row_valid[:, None]


@torch.no_grad()
def choose_patches(
    stage: StageAnchors, candidates: Tensor, image_wh: Tensor, stride: int, patch_size: int,
    nms_threshold: float, slots: int | None, cap: int | None,
) -> tuple[PatchSet, Tensor]:
    """The patches of one probed level (spec 3.4 steps 4-5): a per-image greedy NMS on ``s * P`` px
    squares around the candidates, each kept square becoming a patch centred on its anchor.

    Args:
        stage: the previous stage; candidates: its ``[N, K]`` bool refinement candidates.
        image_wh: ``[B, 2]`` ``(w, h)``.
        slots: patch slots per image (a fixed budget: ``B * slots`` patches, empty ones masked); None:
            from the data, exactly the kept patches (one host read up to 16 patches per image, two up to
            48, ...).
        cap: the most patches of an image (``max_patches_per_image`` / ``_per_level``; None: no cap).
    Returns:
        The patches in the release's order (descending confidence over the batch, ties in anchor order;
        empty slots last) with ``valid`` for a fixed budget, and the ``[B]`` bool budget bound (the NMS
        would have kept more than the slots, or than ``cap``).
    """
    num_images, num_anchors = len(image_wh), stage.anchors.shape[1]
    anchors = stage.anchors.reshape(-1, ANCHOR_FIELDS)  # [M, 5], M = N * K, rows then columns
    images = stage.image_idx[:, None].expand(-1, num_anchors).reshape(-1)  # [M]
    squares = square_boxes_xyxy(anchors[:, :2], stride * patch_size)  # [M, 4] xyxy px
    owners = torch.arange(num_images, device=images.device)[:, None]  # [B, 1]
    per_image = candidates.reshape(1, -1) & (images[None] == owners)  # [B, M]
    steps = slots if slots is None or cap is None else min(slots, cap)
    scores = anchors[:, 4].expand(num_images, -1)  # [B, M]
    nms = fixed_budget_nms(squares.expand(num_images, -1, -1), scores, per_image, nms_threshold, steps,
                           limit=cap)  # [B, T]
    # the release's order: descending confidence over the batch, ties by anchor (the batched NMS's)
    columns, kept = nms.index.reshape(-1), nms.kept.reshape(-1)  # [B * T]
    order = torch.argsort(columns, stable=True)
    score = anchors[columns[order], 4].masked_fill(~kept[order], float("-inf"))
    order = order[torch.argsort(score, descending=True, stable=True)]
    if nms.counts is not None:  # sized by the data: exactly the kept patches, all real
        order, valid = order[:sum(nms.counts)], None
    else:
        valid = kept[order]
    rows = columns[order]  # [n] kept anchor of each patch
    patch_images = torch.div(order, max(nms.index.shape[1], 1), rounding_mode="floor")  # [n] image of a slot
    centres = finite_or_zero(anchors[rows, :2])  # a diverged model's NaN centre: no index out of range
    positions = anchor_patch_positions(centres, image_wh[patch_images], stride, patch_size)  # [n, 2]
    loss_only = torch.zeros_like(patch_images, dtype=torch.bool)
    return PatchSet(patch_images, positions, loss_only, valid), nms.overflow


# -------------------------------------------------------------------------------------- output


def select_output(stage: StageAnchors, candidates: Tensor | None, score_threshold: float, min_anchors: int,
                  num_images: int) -> StageSelection:
    """Output anchors of one stage (spec 3.5): confident and, if ``candidates`` is given, not refined.

    At the coarse stage, rows where fewer than ``min_anchors`` pass take their ``min_anchors`` most
    confident anchors instead, in descending order (spec 3.5 A; may duplicate refined anchors).
    """
    conf = stage.anchors[..., 4]  # [N, K]
    keep = (conf > score_threshold) & stage.row_valid[:, None]
    if candidates is not None:
        keep &= ~candidates
    columns = torch.arange(conf.shape[1], device=conf.device).expand_as(conf)  # [N, K]
    chosen, position = keep, columns
    if stage.coarse:
        num = conf.shape[1]
        k = min(min_anchors, num)
        fallback = (keep.sum(1) < k)[:, None]  # [N, 1]
        top = conf.topk(k, dim=1).indices  # [N, k]
        top_rank = torch.full_like(columns, num).scatter_(1, top, columns[:, :k])  # [N, K]; K = not top
        chosen = torch.where(fallback, top_rank < k, keep)
        position = torch.where(fallback, top_rank, columns)
    reached = count_per_group(stage.image_idx, num_images, stage.row_valid) > 0
    return StageSelection(stage.anchors, chosen, position, stage.image_idx, reached)


def flatten_selections(selections: list[StageSelection]) -> OutputAnchors:
    """Every stage's anchors as one flat list with the output order as a key (no host read)."""
    max_rows = max(s.anchors.shape[0] for s in selections)
    max_cols = max(s.anchors.shape[1] for s in selections)
    parts = []
    for stage, sel in enumerate(selections):
        rows, cols = sel.chosen.shape
        row_idx = torch.arange(rows, device=sel.chosen.device)[:, None].expand(rows, cols)  # [N, K]
        images = sel.image_idx[:, None].expand(rows, cols)  # [N, K]
        key = ((images * len(selections) + stage) * max_rows + row_idx) * max_cols + sel.position
        parts.append((sel.anchors.reshape(-1, ANCHOR_FIELDS), sel.chosen.reshape(-1), images.reshape(-1),
                      torch.full_like(images, stage).reshape(-1), key.reshape(-1)))
    anchors, chosen, images, stages, keys = (torch.cat(column) for column in zip(*parts))
    return OutputAnchors(anchors, chosen, images, stages, keys, torch.stack([s.reached for s in selections]))


def output_slots(flat: OutputAnchors, counts: Tensor, max_anchors: int) -> Tensor:
    """Column of every chosen anchor in the padded output (spec 3.5 C), without host reads.

    Per image the chosen anchors keep the output order (stages, rows, positions); an image with more than
    ``max_anchors`` takes them by descending confidence instead (ties in output order).

    Args:
        flat: every stage's anchors; counts: ``[B]`` chosen anchors per image.
    Returns:
        ``[M]`` int64 column (meaningless for the unchosen entries; ``>= max_anchors``: over the cap).
    """
    num = len(flat.chosen)
    order = torch.argsort(flat.order_key)  # [M] output order; the keys are distinct
    chosen, images = flat.chosen[order], flat.image_idx[order]
    before = torch.cumsum(counts, 0) - counts  # [B] chosen anchors of the earlier images
    in_order = torch.cumsum(chosen.long(), 0) - chosen.long() - before[images]  # [M] rank among chosen
    conf = flat.anchors[order, 4].masked_fill(~chosen, float("-inf"))
    by_conf = torch.argsort(conf, descending=True, stable=True)  # ties keep the output order
    by_conf = by_conf[torch.argsort(images[by_conf], stable=True)]  # per image, chosen first by confidence
    block = torch.cumsum(count_per_group(images, len(counts)), 0)  # [B] end of each image's entries
    starts = block - count_per_group(images, len(counts))
    conf_rank = torch.empty_like(order).scatter_(
        0, by_conf, torch.arange(num, device=order.device) - starts[images[by_conf]])
    slots = torch.where(counts[images] > max_anchors, conf_rank, in_order)
    return torch.empty_like(slots).scatter_(0, order, slots)  # back to the entries' own order


def pack_queries(selections: list[StageSelection], image_sizes: Tensor, max_anchors: int,
                 queries: int | None) -> PackedQueries:
    """Concatenate the stages' output anchors per image, cap at ``max_anchors``, pad to ``[B, Q, 4]``
    (spec 3.5 C-D).

    ``queries``: ``Q`` (a fixed budget; an image with more keeps its most confident ones); None: from the
    data, the longest image's count capped at ``max_anchors`` (one host read).
    """
    num_images = len(image_sizes)
    flat = flatten_selections(selections)
    counts = count_per_group(flat.image_idx, num_images, flat.chosen)  # [B]
    q = queries if queries is not None else int(counts.clamp(max=max_anchors).max())  # the data's budget
    slots = output_slots(flat, counts, max_anchors)
    kept = flat.chosen & (slots < min(q, max_anchors))
    # Row of every entry in a table of the B * Q query slots followed by one spare row per entry: the kept
    # entries fill their slots, each other entry its own spare row. The rows are distinct, so that the
    # copy is defined in every runtime (an ONNX ScatterND with duplicate indices is not).
    num_slots = num_images * q
    spare = num_slots + torch.arange(len(kept), device=kept.device)  # [M]
    row = torch.where(kept, flat.image_idx * q + slots, spare)  # [M]
    padding = full_image_boxes_cxcywh_px(image_sizes, q).reshape(num_slots, 4)
    boxes = torch.cat([padding, padding.new_zeros(len(kept), 4)])  # [B * Q + M, 4]
    boxes.index_copy_(0, row, flat.anchors[:, :4].to(boxes.dtype))
    valid = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)  # [B * Q + M]
    valid.index_copy_(0, row, kept)
    return PackedQueries(boxes[:num_slots].view(num_images, q, 4), valid[:num_slots].view(num_images, q),
                         flat, counts > q)
