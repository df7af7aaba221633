"""Pure patch geometry of the anchor generator (spec sections 3.3-3.5; the training patches of spec 3.7 are
placed by :mod:`asag.training.patch_sampling`).

Frames and units used here:

* *pixels*: pixels of the resized, unpadded image (``0..w``, ``0..h``);
* *normalised*: pixels divided by ``(w, h)``;
* *cells*: pixels of a stride-``s`` feature map (``pixels / s``);
* *patch frame*: the unit square of one ``patch_size x patch_size`` patch (or of a P5 crop / the P6 map).

Positions and sizes are ``(x, y)`` / ``(w, h)`` ordered unless a docstring says ``(row, col)``.
Every function is free of module state so it can be tested on hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def valid_region_cells(image_sizes: Tensor, stride: int, limit: tuple[int, int]) -> Tensor:
    """Rows and columns of a feature map covered by each image, ``round(h / s)``, ``round(w / s)``.

    The rounding is half-to-even, as the release's Python ``round`` (spec 3.3 step 2). The result is
    clamped to ``[1, limit]`` so a degenerate image never produces an empty region.

    Args:
        image_sizes: ``[B, 2]`` int64 ``(h, w)`` of the unpadded images (pixels).
        stride: feature stride of the map.
        limit: ``(H, W)`` of the (padded) feature map.
    Returns:
        ``[B, 2]`` int64 ``(rows, cols)``.
    """
    cells = torch.round(image_sizes.to(torch.float64) / stride).long()  # [B, 2]
    return torch.stack([cells[:, 0].clamp(1, limit[0]), cells[:, 1].clamp(1, limit[1])], dim=1)


def ceil_cells(image_wh: Tensor, stride: int) -> Tensor:
    """``[N, 2]`` float ``(ceil(w / s), ceil(h / s))``: cells touched by each image (spec 3.4 step 5)."""
    return torch.ceil(image_wh / stride)


def bilinear_resize_weights(valid: Tensor, total: int, out_size: int) -> Tensor:
    """Interpolation matrices that resize the first ``valid[b]`` entries of an axis to ``out_size``.

    Reproduces ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` along one
    axis of the cropped region ``[0, valid[b])``: source index ``max((i + 0.5) * n / out - 0.5, 0)``,
    neighbours ``floor`` and ``floor + 1`` (clamped to ``n - 1``). Columns ``>= valid[b]`` are zero, so
    ``R_y @ F @ R_x^T`` resizes the valid region of a padded map without slicing it per image.

    Args:
        valid: ``[B]`` int64 valid length per image (``1 <= valid <= total``).
        total: length of the axis in the padded map.
        out_size: output length (``interpolate_size``, 30).
    Returns:
        ``[B, out_size, total]`` float32 weights.
    """
    n = valid.to(torch.float32)[:, None]  # [B, 1]
    dst = torch.arange(out_size, device=valid.device, dtype=torch.float32)[None, :]  # [1, out]
    src = ((dst + 0.5) * (n / out_size) - 0.5).clamp(min=0.0)  # [B, out]
    i0 = torch.minimum(src.floor(), n - 1)
    lam1 = (src - i0).clamp(0.0, 1.0)
    i1 = torch.minimum(i0 + 1, n - 1)
    weights = torch.zeros(valid.shape[0], out_size, total, device=valid.device)
    weights.scatter_add_(2, i0.long()[..., None], (1.0 - lam1)[..., None])
    weights.scatter_add_(2, i1.long()[..., None], lam1[..., None])
    return weights


def square_boxes_xyxy(centres_px: Tensor, side: float) -> Tensor:
    """``[N, 2]`` centres (pixels) -> ``[N, 4]`` xyxy squares of side ``side`` (patch-selection NMS)."""
    half = side / 2
    return torch.cat([centres_px - half, centres_px + half], dim=-1)


def shift_inside(top_left: Tensor, limit: Tensor, patch_size: int) -> Tensor:
    """Move patches left/up so they end inside the image, then clamp negatives to 0 (spec 3.4 step 5).

    Only the right/bottom side is checked against ``limit`` (= ``ceil((w, h) / s)`` cells); a region
    narrower than the patch leaves the patch at 0, reaching into the padding.

    Args:
        top_left: ``[N, 2]`` float top-left corners in cells ``(x, y)``.
        limit: ``[N, 2]`` float ``ceil((w, h) / s)``.
    Returns:
        ``[N, 2]`` float top-left corners.
    """
    excess = limit - (top_left + patch_size)
    return (top_left + excess.clamp(max=0.0)).clamp(min=0.0)


def anchor_patch_positions(centres_px: Tensor, image_wh: Tensor, stride: int, patch_size: int) -> Tensor:
    """Top-left cell of the patch centred on each kept anchor (spec 3.4 step 5).

    Args:
        centres_px: ``[N, 2]`` anchor centres ``(cx, cy)`` in pixels.
        image_wh: ``[N, 2]`` ``(w, h)`` of each anchor's image.
    Returns:
        ``[N, 2]`` int64 ``(x, y)`` top-left in cells.
    """
    top_left = torch.floor(centres_px / stride - patch_size / 2)
    return shift_inside(top_left, ceil_cells(image_wh, stride), patch_size).long()


def finite_or_zero(values: Tensor) -> Tensor:
    """``values`` with every NaN or infinite entry replaced by 0 (finite entries unchanged).

    For predicted coordinates about to become indices: a diverged model's NaN would turn into an
    out-of-range index (an IndexError on the CPU, a device-side assert on CUDA) before its loss could be
    checked; with the guard the step runs on, and the trainer's non-finite-loss check stops training.
    """
    return torch.where(torch.isfinite(values), values, 0.0)


def count_per_group(group: Tensor, num_groups: int, weights: Tensor | None = None) -> Tensor:
    """``[G]`` int64 number of elements (or sum of bool/int ``weights``) of each group; ``bincount``
    without its host sync on CUDA."""
    counts = torch.zeros(num_groups, dtype=torch.int64, device=group.device)
    ones = torch.ones_like(group, dtype=torch.int64) if weights is None else weights.to(torch.int64)
    return counts.index_add_(0, group, ones)


def rank_in_group(group: Tensor, num_groups: int) -> Tensor:
    """``[N]`` position of each element among the earlier elements of its group (0-based)."""
    if group.numel() == 0:
        return group.clone()
    onehot = F.one_hot(group, num_groups)  # [N, G]
    return (onehot.cumsum(0) - 1).gather(1, group[:, None]).squeeze(1)


def pad_to_patch(features: Tensor, patch_size: int) -> Tensor:
    """Zero-pad ``[B, C, H, W]`` at the bottom/right to at least ``patch_size`` cells per side.

    Fix of spec 13 item 14: a feature map smaller than a patch no longer makes slicing fail; maps that
    are already large enough are returned unchanged.
    """
    pad_h = max(patch_size - features.shape[-2], 0)
    pad_w = max(patch_size - features.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return features
    return F.pad(features, (0, pad_w, 0, pad_h))


def extract_patch_tokens(features: Tensor, batch_idx: Tensor, crop_pos: Tensor, patch_size: int) -> Tensor:
    """Cut ``patch_size x patch_size`` windows and lay them out as tokens (spec 3.2 token layout).

    Args:
        features: ``[B, C, H, W]`` compressed map, ``H, W >= crop_pos + patch_size``.
        batch_idx: ``[N]`` int64 image of each patch.
        crop_pos: ``[N, 2]`` int64 ``(x, y)`` top-left in cells.
    Returns:
        ``[N, P * P, C]`` tokens, position index ``y * P + x`` (row-major), channels last.
    """
    offsets = torch.arange(patch_size, device=features.device)
    rows = crop_pos[:, 1, None] + offsets  # [N, P]
    cols = crop_pos[:, 0, None] + offsets  # [N, P]
    patches = features[batch_idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [N, P, P, C]
    return patches.reshape(patches.shape[0], patch_size * patch_size, features.shape[1])  # [N, P*P, C]


def maps_to_tokens(maps: Tensor) -> Tensor:
    """``[..., C, P, P]`` feature maps -> ``[..., P * P, C]`` tokens (row-major positions, channels last)."""
    return maps.flatten(-2).transpose(-1, -2)  # [..., P*P, C]


def split_into_crops(grid: Tensor, patch_size: int) -> Tensor:
    """``[B, C, 2P, 2P]`` -> ``[B, 4, C, P, P]`` crops ordered top-left, top-right, bottom-left,
    bottom-right, i.e. offsets ``(row, col)`` = (0,0), (0,P), (P,0), (P,P) (spec 3.3 step 5)."""
    b, c = grid.shape[:2]
    blocks = grid.view(b, c, 2, patch_size, 2, patch_size)  # [B, C, row, P, col, P]
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(b, 4, c, patch_size, patch_size)  # [B, 4, C, P, P]


def crop_offsets(patch_size: int, device: torch.device | None = None) -> Tensor:
    """``[4, 2]`` int64 ``(row, col)`` offsets of the four crops on the resized P5 grid."""
    starts = torch.arange(2, device=device) * patch_size  # [0, P], built on the device (no host copy)
    return torch.stack([starts.repeat_interleave(2), starts.repeat(2)], dim=1)


def crops_to_image_frame(boxes: Tensor, offsets_rc: Tensor, grid_size: int, patch_size: int) -> Tensor:
    """Crop-frame cxcywh -> normalised image frame (spec 3.3 step 8).

    Args:
        boxes: ``[B, 4, K, 4]`` cxcywh, each crop's unit square.
        offsets_rc: ``[4, 2]`` ``(row, col)`` crop offsets on the ``grid_size`` grid.
    Returns:
        ``[B, 4, K, 4]`` normalised cxcywh: coordinates times ``P / grid``, plus ``col / grid`` on cx and
        ``row / grid`` on cy.
    """
    shift = torch.zeros(4, 4, device=boxes.device, dtype=boxes.dtype)
    shift[:, :2] = offsets_rc.flip(-1).to(boxes.dtype) / grid_size  # (x, y) = (col, row)
    return boxes * (patch_size / grid_size) + shift[None, :, None, :]


def patches_to_image_frame(
    boxes: Tensor, crop_pos: Tensor, image_wh: Tensor, stride: int, patch_size: int
) -> Tensor:
    """Patch-frame cxcywh -> normalised image frame (spec 3.4 step 9).

    ``cx = (cx_p * P + x0) * s / w``, ``w = w_p * P * s / w`` (and alike for y, h).

    Args:
        boxes: ``[N, K, 4]`` cxcywh in each patch's unit square.
        crop_pos: ``[N, 2]`` int64 ``(x0, y0)`` patch top-left in cells.
        image_wh: ``[N, 2]`` ``(w, h)`` of each patch's image.
    Returns:
        ``[N, K, 4]`` normalised cxcywh.
    """
    wh = image_wh[:, None, :]  # [N, 1, 2]
    centre = (boxes[..., :2] * patch_size + crop_pos[:, None, :].to(boxes.dtype)) * stride / wh
    size = boxes[..., 2:] * patch_size * stride / wh
    return torch.cat([centre, size], dim=-1)


def anchors_to_pixels(
    boxes: Tensor, logits: Tensor, image_wh: Tensor, min_size: float, check_boundary: bool
) -> Tensor:
    """Normalised anchors + confidence logits -> pixel anchors with zeroed confidences.

    Confidence ``c = sigmoid(logit)`` is set to 0 when ``check_boundary`` and the centre lies at or
    beyond the right/bottom border (``cx >= 1`` or ``cy >= 1``; the left/top side is not checked,
    spec 13 item 13), and when the pixel width or height is below ``min_size`` (spec 3.3 step 10).

    Args:
        boxes: ``[N, K, 4]`` normalised cxcywh.
        logits: ``[N, K]`` confidence logits.
        image_wh: ``[N, 2]`` ``(w, h)`` of each row's image.
    Returns:
        ``[N, K, 5]``: pixel cxcywh and the confidence.
    """
    conf = logits.sigmoid()
    if check_boundary:
        conf = conf.masked_fill((boxes[..., 0] >= 1) | (boxes[..., 1] >= 1), 0.0)
    px = boxes * image_wh.repeat(1, 2)[:, None, :]  # [N, K, 4] * (w, h, w, h)
    conf = conf.masked_fill((px[..., 2] < min_size) | (px[..., 3] < min_size), 0.0)
    return torch.cat([px, conf[..., None]], dim=-1)
