"""Post-processing: head predictions -> per-image detections in original-image pixels (spec section 10).

Differs from the release in one respect (spec section 15, quirk 18): padded (invalid) and denoising
queries never produce detections. With a batch of one image, where no query is padded, the result is
identical to the release.

One implementation with fixed shapes and no host reads (:func:`postprocess_fixed`, a
:class:`DetectionBatch` with a validity mask); :func:`postprocess` splits it per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

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
    """:func:`postprocess_fixed` split per image (one host read for the whole batch).

    Returns one :class:`Detections` per image: xyxy boxes in original pixels, sigmoid scores
    (descending) and contiguous labels ``0..C-1`` (query index = flat index // C, label = flat index % C).
    """
    return postprocess_fixed(logits, boxes, orig_sizes, valid_mask, top_k, nms_iou).to_list()


def postprocess_fixed(
    logits: Tensor,
    boxes: Tensor,
    orig_sizes: Tensor,
    valid_mask: Tensor | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    nms_iou: float | None = None,
) -> DetectionBatch:
    """Top-k over queries x classes, optional class-wise NMS, boxes to original pixels; fixed shapes, no
    host reads.

    Args:
        logits: ``[B, Q, C]`` class logits of the chosen head (matching queries only, no DN part).
        boxes: ``[B, Q, 4]`` cxcywh in the normalised frame.
        orig_sizes: ``[B, 2]`` ``(h, w)`` of the original images.
        valid_mask: ``[B, Q]`` bool, True for real queries; invalid queries never produce detections.
            ``None`` treats every query as valid (the release's behaviour).
        top_k: detections kept per image before NMS (capped by the available entries); ``None`` keeps
            all ``Q * C`` entries.
        nms_iou: IoU of the class-wise NMS applied to the top-k detections; ``None`` disables it. The NMS
            is :func:`asag.ops.nms.sorted_nms_keep`: torchvision's greedy NMS per image and class.
    Returns:
        A :class:`DetectionBatch` of ``K = min(top_k, Q * C)`` entries per image, the detections first
        (descending score; ``valid`` marks them).
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


def contiguous_to_category_ids(labels: Tensor, category_ids: Tensor) -> Tensor:
    """Map contiguous labels ``[K]`` to data-set category ids through ``category_ids`` ``[C]``."""
    return category_ids.to(labels.device)[labels]


class PostProcessor(nn.Module):
    """Module holding the post-processing settings (no parameters).

    Args:
        topk: detections per image (100 for COCO; ``None`` = all queries x classes, as for CrowdHuman).
        nms: apply class-wise NMS to the top-k detections (on with the 300-query and CrowdHuman presets).
        nms_threshold: IoU of that NMS (0.7 COCO, 0.8 CrowdHuman).
    """

    def __init__(
        self, topk: int | None = DEFAULT_TOP_K, nms: bool = False, nms_threshold: float = DEFAULT_NMS_IOU,
    ):
        super().__init__()
        self.topk = topk
        self.nms_iou = nms_threshold if nms else None

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
        return self.fixed(head, valid_mask, orig_sizes, num_dn).to_list()
