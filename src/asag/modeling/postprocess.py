"""Post-processing: head predictions -> per-image detections in original-image pixels (spec section 10).

Differs from the release in one respect (spec section 15, quirk 18): padded (invalid) and denoising
queries never produce detections. With a batch of one image, where no query is padded, the result is
identical to the release.

:func:`postprocess_fixed` is the static mode's version: the same top-k and class-wise NMS with fixed
shapes (a :class:`DetectionBatch` with a validity mask) and no host reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert

from asag.ops.nms import sorted_nms_keep
from asag.structures import DetectionBatch, Detections, HeadOutput

# Detections kept per image (spec section 10, authors' value for COCO).
DEFAULT_TOP_K = 100
# IoU of the optional class-wise NMS (spec section 10: 0.7 for COCO, 0.8 for CrowdHuman).
DEFAULT_NMS_IOU = 0.7


def postprocess(
    logits: Tensor,
    boxes: Tensor,
    orig_sizes: Tensor,
    valid_mask: Tensor | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    nms_iou: float | None = None,
) -> list[Detections]:
    """Top-k over queries x classes, optional class-wise NMS, boxes to original pixels.

    Args:
        logits: ``[B, Q, C]`` class logits of the chosen head (matching queries only, no DN part).
        boxes: ``[B, Q, 4]`` cxcywh in the normalised frame.
        orig_sizes: ``[B, 2]`` ``(h, w)`` of the original images.
        valid_mask: ``[B, Q]`` bool, True for real queries; invalid queries never produce detections.
            ``None`` treats every query as valid (the release's behaviour).
        top_k: detections kept per image before NMS (capped by the available entries); ``None`` keeps
            all ``Q * C`` entries.
        nms_iou: IoU of the class-wise NMS applied to the top-k detections; ``None`` disables it.

    Returns:
        One :class:`Detections` per image: xyxy boxes in original pixels, sigmoid scores (descending)
        and contiguous labels ``0..C-1`` (query index = flat index // C, label = flat index % C).
    """
    num_classes = logits.shape[-1]
    boxes_px, top_scores, labels = _top_k(logits, boxes, orig_sizes, valid_mask, top_k)
    keep = torch.isfinite(top_scores)  # [B, k]
    if nms_iou is not None:
        keep &= _nms_keep(boxes_px, top_scores, labels + num_classes * _image_index(labels), keep, nms_iou)
    return _split_kept(boxes_px, top_scores, labels, keep)


def postprocess_fixed(
    logits: Tensor,
    boxes: Tensor,
    orig_sizes: Tensor,
    valid_mask: Tensor | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    nms_iou: float | None = None,
) -> DetectionBatch:
    """:func:`postprocess` with fixed shapes and no host reads (static mode).

    Same arguments; the same detections in the same order, as a :class:`DetectionBatch` of
    ``K = min(top_k, Q * C)`` entries per image whose ``valid`` mask marks them (a prefix). The
    class-wise NMS is :func:`asag.ops.nms.sorted_nms_keep` (torchvision's greedy NMS per image and class,
    computed on each image's own coordinates).
    """
    boxes_px, top_scores, labels = _top_k(logits, boxes, orig_sizes, valid_mask, top_k)
    keep = torch.isfinite(top_scores)  # [B, k]
    if nms_iou is not None:
        keep = sorted_nms_keep(boxes_px, labels, keep, nms_iou)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # [B, k] kept entries first
    valid = keep.gather(1, order)
    boxes_px = torch.gather(boxes_px, 1, order[..., None].expand(-1, -1, 4))  # [B, k, 4]
    boxes_px = boxes_px.masked_fill(~valid[..., None], 0.0)
    scores = torch.gather(top_scores, 1, order).masked_fill(~valid, 0.0)
    labels = torch.gather(labels, 1, order).masked_fill(~valid, 0)
    return DetectionBatch(boxes_px, scores, labels, valid)


def _top_k(logits: Tensor, boxes: Tensor, orig_sizes: Tensor, valid_mask: Tensor | None, top_k: int | None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k over queries x classes: ``[B, k, 4]`` xyxy original pixels, ``[B, k]`` scores (``-inf`` for
    invalid queries), ``[B, k]`` labels."""
    num_classes = logits.shape[-1]
    scores = logits.sigmoid()  # [B, Q, C]
    if valid_mask is not None:
        scores = scores.masked_fill(~valid_mask[..., None], float("-inf"))
    flat = scores.flatten(1)  # [B, Q * C]
    k = flat.shape[1] if top_k is None else min(top_k, flat.shape[1])
    top_scores, top_idx = flat.topk(k, dim=1)  # [B, k]
    query = torch.div(top_idx, num_classes, rounding_mode="floor")  # [B, k]
    labels = top_idx % num_classes  # [B, k]
    picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))  # [B, k, 4] cxcywh
    scale = orig_sizes.flip(-1).repeat(1, 2)[:, None, :]  # [B, 1, 4] (W, H, W, H)
    return box_convert(picked, "cxcywh", "xyxy") * scale, top_scores, labels


def _split_kept(boxes_px: Tensor, scores: Tensor, labels: Tensor, keep: Tensor) -> list[Detections]:
    """Per image, the kept entries in their order, with a single host sync for the whole batch.

    Args: ``[B, k, 4]`` boxes, ``[B, k]`` scores, ``[B, k]`` labels, ``[B, k]`` bool keep mask.
    """
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # [B, k] kept entries first
    boxes_px = torch.gather(boxes_px, 1, order[..., None].expand(-1, -1, 4))
    scores, labels = torch.gather(scores, 1, order), torch.gather(labels, 1, order)
    counts = keep.sum(dim=1).tolist()
    return [
        Detections(boxes=boxes_px[b, :n], scores=scores[b, :n], labels=labels[b, :n])
        for b, n in enumerate(counts)
    ]


def _image_index(x: Tensor) -> Tensor:
    """``[B, k]`` tensor holding the row (image) index of every entry of ``x`` (``[B, k]``)."""
    return torch.arange(x.shape[0], device=x.device)[:, None].expand_as(x)


def _nms_keep(boxes_px: Tensor, scores: Tensor, groups: Tensor, candidates: Tensor, iou: float) -> Tensor:
    """Grouped NMS of every image at once (one group per image and class).

    Args: ``[B, k, 4]`` xyxy boxes, ``[B, k]`` scores, ``[B, k]`` int group ids, ``[B, k]`` bool candidates.
    Returns: ``[B, k]`` bool, True for kept candidates. Candidates are sorted by score per image, so the
    kept ones stay in descending score order.
    """
    batch, k = scores.shape
    flat_idx = candidates.flatten().nonzero().squeeze(1)  # [n]
    kept = batched_nms(
        boxes_px.flatten(0, 1)[flat_idx], scores.flatten()[flat_idx], groups.flatten()[flat_idx], iou
    )
    keep = torch.zeros(batch * k, dtype=torch.bool, device=scores.device)
    keep[flat_idx[kept]] = True
    return keep.view(batch, k)


def contiguous_to_category_ids(labels: Tensor, category_ids: Tensor) -> Tensor:
    """Map contiguous labels ``[K]`` to data-set category ids through ``category_ids`` ``[C]``."""
    return category_ids.to(labels.device)[labels]


class PostProcessor(nn.Module):
    """Module holding the post-processing settings (no parameters).

    Args:
        topk: detections per image (100 for COCO; ``None`` = all queries x classes, as for CrowdHuman).
        nms: apply class-wise NMS to the top-k detections (on with the 300-query and CrowdHuman presets).
        nms_threshold: IoU of that NMS (0.7 COCO, 0.8 CrowdHuman).
        static: :meth:`forward` computes :meth:`fixed` (no host reads) and splits it per image.
    """

    def __init__(
        self, topk: int | None = DEFAULT_TOP_K, nms: bool = False, nms_threshold: float = DEFAULT_NMS_IOU,
        static: bool = False,
    ):
        super().__init__()
        self.topk = topk
        self.nms_iou = nms_threshold if nms else None
        self.static = static

    def fixed(
        self, head: HeadOutput, valid_mask: Tensor | None, orig_sizes: Tensor, num_dn: int = 0
    ) -> DetectionBatch:
        """:func:`postprocess_fixed` of one head's output (arguments as for :meth:`forward`)."""
        return postprocess_fixed(head.logits[:, num_dn:], head.boxes[:, num_dn:], orig_sizes, valid_mask,
                                 top_k=self.topk, nms_iou=self.nms_iou)

    def forward(
        self, head: HeadOutput, valid_mask: Tensor | None, orig_sizes: Tensor, num_dn: int = 0
    ) -> list[Detections]:
        """Post-process one head's output ``[B, num_dn + Q, *]``; the first ``num_dn`` rows are dropped.

        Args:
            head: logits ``[B, num_dn + Q, C]`` and normalised cxcywh boxes ``[B, num_dn + Q, 4]``.
            valid_mask: ``[B, Q]`` bool over the matching queries (``None``: all valid).
            orig_sizes: ``[B, 2]`` ``(h, w)`` of the original images.
            num_dn: denoising queries at the front of ``head``.
        """
        if self.static:
            return self.fixed(head, valid_mask, orig_sizes, num_dn).to_list()
        return postprocess(
            head.logits[:, num_dn:],
            head.boxes[:, num_dn:],
            orig_sizes,
            valid_mask,
            top_k=self.topk,
            nms_iou=self.nms_iou,
        )
