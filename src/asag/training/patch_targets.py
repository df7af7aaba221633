"""Per-patch targets of the anchor-generator losses (spec 8.6.1-8.6.3).

Every anchor-generator prediction is supervised in its *patch frame* (the patch is the unit square):

* **P6** (spec 8.6.1): the whole image; targets are all ground-truth boxes. In training the P6 map has four
  copies (original, h-flip, v-flip, hv-flip) and each copy gets flipped targets. The release flips the
  cxcywh boxes with the xyxy formula (spec 13.1), so its "flipped" targets are wrong; we reproduce that by
  default (the paper's training used it) and give correct flips with ``fix_flip=True``.
* **P5 crops** (spec 8.6.2): the four 15x15 quadrants of the 30x30 map; targets are the boxes whose centre
  lies in the quadrant (boundaries inclusive, so an object centred on 0.5 belongs to two or four crops),
  clipped to it and rescaled. No size filter.
* **P4 / P3 patches** (spec 8.6.3): a 15x15-cell window at stride ``s``; targets are the boxes whose centre
  lies in the window (inclusive) and that are no larger than the window, clipped and rescaled.

All windows of a level are handled at once: each window sees its image's padded ground truth
(``[W, N_max, 4]``), a mask picks the members, and ``nonzero`` lists them window by window in ground-truth
order, the order the release uses.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert

from asag.training.matcher import GroupedTargets

# Side of a P4/P3 patch in feature cells, and of a P5 crop on the resized map (spec 3.1: patch_size 15,
# patch_size_interpolate 15).
PATCH_SIZE = 15
# Side of the resized P5 map that the four crops tile (spec 3.1: interpolate_size 30, hard-coded).
CROP_GRID = 30
# (horizontal, vertical) flip of each P6 copy in training: original, h-flip, v-flip, hv-flip (spec 3.7.1).
P6_FLIPS = ((False, False), (True, False), (False, True), (True, True))


def release_flip(boxes_cxcywh: Tensor, horizontal: bool, vertical: bool) -> Tensor:
    """The release's P6 target "flip" (spec 8.6.1, quirk 13.1): the xyxy formula applied to cxcywh boxes.

    h-flip maps ``(cx, cy, w, h)`` to ``(1 - w, cy, 1 - cx, h)``; v-flip to ``(cx, 1 - h, w, 1 - cy)``;
    both apply h then v. Input and output ``[N, 4]``.
    """
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    if horizontal:
        cx, w = 1.0 - w, 1.0 - cx
    if vertical:
        cy, h = 1.0 - h, 1.0 - cy
    return torch.stack([cx, cy, w, h], dim=-1)


def flip_cxcywh(boxes_cxcywh: Tensor, horizontal: bool, vertical: bool) -> Tensor:
    """Correct flip of normalised cxcywh boxes ``[N, 4]``: ``cx -> 1 - cx`` and/or ``cy -> 1 - cy``."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    if horizontal:
        cx = 1.0 - cx
    if vertical:
        cy = 1.0 - cy
    return torch.stack([cx, cy, w, h], dim=-1)


def p6_targets(image_targets: GroupedTargets, num_copies: int, fix_flip: bool = False) -> GroupedTargets:
    """Targets of the P6 outputs, one group per (image, copy), image-major.

    Args:
        image_targets: one group per image, normalised cxcywh.
        num_copies: P6 outputs per image: 4 in training (flipped copies), 1 in evaluation.
        fix_flip: flip correctly instead of reproducing the release's formula.

    Returns:
        ``B * num_copies`` groups (group ``b * num_copies + c``), boxes in the normalised image frame
        (the P6 patch frame), no clipping.
    """
    if num_copies not in (1, len(P6_FLIPS)):
        raise ValueError(f"P6 has 1 (evaluation) or {len(P6_FLIPS)} (training) copies, got {num_copies}")
    flip = flip_cxcywh if fix_flip else release_flip
    copies = torch.stack([flip(image_targets.boxes, h, v) for h, v in P6_FLIPS[:num_copies]])  # (C, T, 4)
    copy_idx = torch.arange(num_copies, device=copies.device)
    group = image_targets.group[None, :] * num_copies + copy_idx[:, None]  # (C, T)
    order = torch.argsort(group.flatten(), stable=True)  # group-major, ground-truth order inside a group
    source = image_targets.source[None, :].expand(num_copies, -1).flatten()[order]
    labels = image_targets.labels[None, :].expand(num_copies, -1).flatten()[order]
    boxes = copies.reshape(-1, 4)[order]  # (C * T, 4)
    num_groups = image_targets.num_groups * num_copies
    return GroupedTargets(boxes, labels, group.flatten()[order], num_groups, source)


def window_targets(
    image_targets: GroupedTargets,
    window_image: Tensor,
    low: Tensor,
    high: Tensor,
    scale: Tensor,
    max_size: Tensor | None = None,
) -> GroupedTargets:
    """Assign, clip and rescale targets for ``W`` rectangular windows of the normalised image frame.

    A target belongs to a window when its centre lies in ``[low, high]`` (inclusive, both axes) and, if
    ``max_size`` is given, its width and height are ``<= max_size``. Members are clipped to the window
    (xyxy) and mapped to the window frame by ``(v - low) * scale``.

    Args:
        image_targets: one group per image, normalised cxcywh.
        window_image: ``[W]`` int64 image of each window.
        low, high: ``[W, 2]`` (x, y) window corners, normalised image frame.
        scale: ``[W, 2]`` (x, y) factor from the normalised image frame to the window frame.
        max_size: ``[W, 2]`` (w, h) largest admitted target size, or ``None``.

    Returns:
        ``W`` groups in window order; boxes cxcywh in the window frame.
    """
    padded = image_targets.padded()
    boxes = padded.boxes[window_image]  # (W, N, 4) ground truth of each window's image
    centre = boxes[..., :2]
    member = padded.mask[window_image] & (centre >= low[:, None]).all(-1) & (centre <= high[:, None]).all(-1)
    if max_size is not None:
        member &= (boxes[..., 2:] <= max_size[:, None]).all(-1)
    window, slot = member.nonzero(as_tuple=True)  # window-major, ground-truth order
    flat = padded.index[window_image][window, slot]
    xyxy = box_convert(image_targets.boxes[flat], "cxcywh", "xyxy")
    lo, hi = low[window].repeat(1, 2), high[window].repeat(1, 2)  # (M, 4) as x, y, x, y
    clipped = torch.minimum(torch.maximum(xyxy, lo), hi)
    in_window = (clipped - lo) * scale[window].repeat(1, 2)
    return GroupedTargets(
        box_convert(in_window, "xyxy", "cxcywh"),
        image_targets.labels[flat],
        window,
        int(window_image.numel()),
        image_targets.source[flat],
    )


def crop_targets(
    image_targets: GroupedTargets, crop_pos: Tensor, grid: int = CROP_GRID, crop: int = PATCH_SIZE
) -> GroupedTargets:
    """Targets of the P5 crops (spec 8.6.2), one group per (image, crop), image-major.

    Args:
        image_targets: one group per image, normalised cxcywh.
        crop_pos: ``[K, 2]`` int crop offsets in **(row, col)** order on the ``grid``-sized map
            (``[[0, 0], [0, 15], [15, 0], [15, 15]]``).
        grid, crop: side of the resized map and of a crop, in cells.

    Returns:
        ``B * K`` groups; boxes cxcywh in the crop frame (the quadrant mapped to the unit square).
    """
    num_images, num_crops = image_targets.num_groups, crop_pos.shape[0]
    device = image_targets.boxes.device
    xy = crop_pos.to(device).flip(-1)  # (K, 2) as (col, row) = (x, y)
    low = (xy / grid).float().repeat(num_images, 1)  # (B*K, 2)
    high = ((xy + crop) / grid).float().repeat(num_images, 1)
    scale = torch.full_like(low, grid / crop)
    window_image = torch.arange(num_images, device=device).repeat_interleave(num_crops)
    return window_targets(image_targets, window_image, low, high, scale)


def probed_patch_targets(
    image_targets: GroupedTargets,
    crop_pos: Tensor,
    batch_idx: Tensor,
    strides: Tensor,
    image_sizes: Tensor,
    patch_size: int = PATCH_SIZE,
) -> GroupedTargets:
    """Targets of P4/P3 patches (spec 8.6.3), one group per patch, in the given patch order.

    Args:
        image_targets: one group per image, normalised cxcywh.
        crop_pos: ``[P, 2]`` int patch top-left in feature cells, **(x, y)** order.
        batch_idx: ``[P]`` int64 image of each patch (no loss-only offset).
        strides: ``[P]`` int feature stride of each patch's level (16 for P4, 8 for P3).
        image_sizes: ``[B, 2]`` int ``(h, w)`` of the resized, unpadded images.
        patch_size: patch side in cells.

    Returns:
        ``P`` groups; boxes cxcywh in the patch frame (the ``patch_size * s`` pixel square -> unit square).
    """
    device = image_targets.boxes.device
    wh = image_sizes.to(device)[batch_idx.to(device)].flip(-1).float()  # (P, 2) image (w, h) in pixels
    step = strides.to(device).float()[:, None]  # (P, 1)
    cells = crop_pos.to(device).float()
    low = cells * step / wh
    high = (cells + patch_size) * step / wh
    max_size = patch_size * step / wh
    scale = (wh / step) / patch_size
    return window_targets(image_targets, batch_idx.to(device), low, high, scale, max_size)
