"""Query preparation: anchors (+ optional denoising queries) and the attention mask (spec section 4).

Layout of the ``L = num_dn + Q`` queries of image ``b`` with ``n`` ground-truth boxes,
``r = num_dn // n`` repeats and ``q = num_dn % n`` padding-DN queries::

    [ r groups of n noised GT boxes | q full-image boxes | Q anchors (v valid, then p padded) ]

The boolean mask (True = blocked, row = query, column = key) is batch-major over heads
(``b * num_heads + h``) and is shared by the proposal stage and every decoder head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from asag.ops.boxes import full_image_boxes_cxcywh_px, whwh
from asag.structures import AnchorOutput, ImageTargets, QuerySet


def query_attention_mask(
    num_gt: Tensor, num_valid: Tensor, num_dn: int, num_anchors: int, num_heads: int
) -> Tensor:
    """Boolean self-attention mask of the query set (spec section 4).

    Args:
        num_gt: ``[B]`` int number of ground-truth boxes per image (ignored when ``num_dn == 0``).
        num_valid: ``[B]`` int number of valid (non-padded) anchors per image.
        num_dn: denoising queries at the front (0 without denoising).
        num_anchors: ``Q``, anchors per image including padding.
        num_heads: attention heads; the mask is repeated per head.

    Returns:
        ``[B * num_heads, L, L]`` bool, ``L = num_dn + Q``, True = row may not attend to column.
    """
    length = num_dn + num_anchors
    idx = torch.arange(length, device=num_valid.device)  # [L]
    n = num_gt.to(num_valid.device)[:, None]  # [B, 1]
    empty = (n == 0) & (num_dn > 0)  # images whose DN part is all padding
    repeats = torch.full_like(n, num_dn) // n.clamp(min=1)  # [B, 1] r (tensor // tensor: exportable)
    group_end = torch.where(n > 0, repeats * n, 0)  # [B, 1] = r * n
    is_dn = (idx < num_dn)[None].expand(n.shape[0], -1)  # [B, L]
    is_group = idx[None] < group_end  # [B, L]
    is_pad_dn = is_dn & ~is_group  # [B, L]
    is_padded = idx[None] >= (num_dn + num_valid[:, None])  # [B, L] padded anchors
    group_id = idx[None] // n.clamp(min=1)  # [B, L]

    def rows(x: Tensor) -> Tensor:
        return x[:, :, None]  # [B, L, 1]

    def cols(x: Tensor) -> Tensor:
        return x[:, None, :]  # [B, 1, L]

    same_group = rows(group_id) == cols(group_id)  # [B, L, L]
    blocked = rows(~is_dn) & cols(is_dn)  # matching rows never see DN columns
    blocked |= rows(is_group) & cols(is_dn) & ~(cols(is_group) & same_group)
    blocked |= rows(is_pad_dn) & cols(is_group)
    # padded-anchor columns: hidden from all rows but the padded ones (authors' layout); for an image
    # without GT the authors hide them from every matching row instead and let DN rows see them
    sees_padded = rows(empty & is_dn | ~empty & is_padded)  # [B, L, 1] (bool where, without Where)
    blocked |= ~sees_padded & cols(is_padded)
    batch = blocked.shape[0]
    return blocked[:, None].expand(batch, num_heads, length, length).reshape(-1, length, length)


@dataclass
class DenoisingSlots:
    """Ground truth tiled into the ``D = num_dn`` denoising slots of each image.

    boxes: ``[B, D, 4]`` clean normalised cxcywh (zeros outside the groups).
    labels: ``[B, D]`` int64 (-1 outside the groups).
    in_group: ``[B, D]`` bool, True for the ``r * n`` slots holding a GT copy (the rest are padding).
    """

    boxes: Tensor
    labels: Tensor
    in_group: Tensor


def _padded(rows: list[Tensor], value: float) -> Tensor:
    """Stack ragged ``[n_b, *]`` tensors into ``[B, max(n_max, 1), *]`` filled with ``value``."""
    out = pad_sequence(rows, batch_first=True, padding_value=value)  # [B, n_max, *]
    if out.shape[1] == 0:
        out = out.new_full((out.shape[0], 1, *out.shape[2:]), value)
    return out


def tile_targets(targets: list[ImageTargets], num_dn: int, device: torch.device) -> DenoisingSlots:
    """Tile each image's GT ``num_dn // n`` times into the denoising slots (spec section 4.2)."""
    counts = torch.tensor([len(t) for t in targets], device=device)  # [B]
    gt_boxes = _padded([t.boxes.to(device) for t in targets], 0.0)  # [B, n_max, 4]
    gt_labels = _padded([t.labels.to(device) for t in targets], -1)  # [B, n_max]
    n = counts[:, None].clamp(min=1)  # [B, 1]
    slot = torch.arange(num_dn, device=device)[None]  # [1, D]
    in_group = (counts[:, None] > 0) & (slot < (num_dn // n) * n)  # [B, D]
    src = (slot % n).expand(len(targets), -1)  # [B, D] index into the image's GT list
    boxes = torch.gather(gt_boxes, 1, src[..., None].expand(-1, -1, 4)) * in_group[..., None]
    labels = torch.where(in_group, torch.gather(gt_labels, 1, src), -1)
    return DenoisingSlots(boxes, labels, in_group)


def noise_boxes(boxes: Tensor, noise_scale: float, generator: torch.Generator | None = None) -> Tensor:
    """DN box noise (spec section 4.2), ``[..., 4]`` normalised cxcywh -> same, clamped to [0, 1].

    ``cx += u (w/2) lambda``, ``cy += u (h/2) lambda``, ``w += u w lambda``, ``h += u h lambda`` with an
    independent ``u ~ U(-1, 1)`` per coordinate; sizes in the offsets are the clean ones.
    """
    if noise_scale <= 0:
        return boxes
    wh = boxes[..., 2:]
    spread = torch.cat([wh / 2, wh], dim=-1)  # [..., 4]
    u = torch.rand(boxes.shape, generator=generator, device=boxes.device) * 2 - 1.0
    return (boxes + u * spread * noise_scale).clamp(min=0.0, max=1.0)


def build_queries(
    anchors: AnchorOutput,
    image_sizes: Tensor,
    targets: list[ImageTargets] | None,
    num_dn: int,
    noise_scale: float,
    num_heads: int,
    generator: torch.Generator | None = None,
) -> QuerySet:
    """Assemble the query boxes and the attention mask (spec section 4).

    Args:
        anchors: anchor-generator output; ``boxes`` ``[B, Q, 4]`` pixel cxcywh, ``valid_mask`` ``[B, Q]``.
        image_sizes: ``[B, 2]`` ``(h, w)`` of the resized, unpadded images.
        targets: ground truth per image (normalised cxcywh); ``None`` disables denoising.
        num_dn: denoising queries per image (authors' default 200); 0 disables denoising.
        noise_scale: box-noise scale ``lambda`` (0.4 with ``fix_noise_scale``).
        num_heads: attention heads of the mask (8).
        generator: optional RNG for the box noise.

    Returns:
        :class:`QuerySet` with ``boxes`` ``[B, num_dn + Q, 4]`` pixel cxcywh (DN queries first),
        ``attn_mask`` ``[B * num_heads, L, L]``, the anchors' valid mask and the per-image DN targets
        (the clean GT tiled ``num_dn // n`` times; empty for images without GT or with ``n > num_dn``).
    """
    num_valid = anchors.valid_mask.sum(dim=1)  # [B]
    num_anchors = anchors.num_queries
    if num_dn == 0 or targets is None:
        mask = query_attention_mask(torch.zeros_like(num_valid), num_valid, 0, num_anchors, num_heads)
        return QuerySet(boxes=anchors.boxes, attn_mask=mask, valid_mask=anchors.valid_mask)
    device = anchors.boxes.device
    slots = tile_targets(targets, num_dn, device)
    clean, labels, in_group = slots.boxes, slots.labels, slots.in_group  # [B, D, 4], [B, D], [B, D]
    noised_px = noise_boxes(clean, noise_scale, generator) * whwh(image_sizes).to(clean)  # [B, D, 4]
    full_px = full_image_boxes_cxcywh_px(image_sizes, num_dn).to(clean)  # [B, D, 4]
    dn_px = torch.where(in_group[..., None], noised_px, full_px)
    num_gt = torch.tensor([len(t) for t in targets], device=device)
    mask = query_attention_mask(num_gt, num_valid, num_dn, num_anchors, num_heads)
    counts = in_group.sum(dim=1).tolist()
    return QuerySet(
        boxes=torch.cat([dn_px.to(anchors.boxes), anchors.boxes], dim=1),  # [B, D + Q, 4]
        attn_mask=mask,
        valid_mask=anchors.valid_mask,
        num_dn=num_dn,
        dn_boxes=[clean[b, :c] for b, c in enumerate(counts)],
        dn_labels=[labels[b, :c] for b, c in enumerate(counts)],
    )
