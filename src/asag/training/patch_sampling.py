"""Training patches of the anchor generator (spec 3.7 items 2-3).

In training every probed level (P4, P3) cuts, per image, at least ``min_training_patches`` patches: the
predicted ones (none while the epoch-0 teacher forcing lasts), topped up with patches around ground-truth
objects (chosen by a centrality-scored NMS, placed with random jitter) and, where an image is still
short, uniformly random ones. Patches added to reach the minimum only feed the loss (``loss_only``).
The geometry shared with inference (frames, ``shift_inside``) is in :mod:`asag.modeling.patches`; the
per-patch loss targets are in :mod:`asag.training.patch_targets`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_convert

from asag.modeling.patches import ceil_cells, count_per_group, rank_in_group, shift_inside
from asag.structures import ImageTargets, PatchSet

# ------------------------------------------------------------------------------ patch geometry


def gt_patch_positions(
    boxes_xyxy_px: Tensor, image_wh: Tensor, stride: int, patch_size: int, jitter: Tensor
) -> Tensor:
    """Top-left cell of a training patch around each ground-truth box (spec 3.7 item 3).

    The patch starts at the box's top-left cell, is shifted inside the image, then moved left/up by
    ``jitter * slack`` where ``slack`` is the room between the box's bottom-right and the patch end, so
    the object lands at a random place inside the patch.

    Args:
        boxes_xyxy_px: ``[N, 4]`` boxes in pixels.
        image_wh: ``[N, 2]`` ``(w, h)`` of each box's image.
        jitter: ``[N, 2]`` uniform samples in ``[0, 1)``.
    Returns:
        ``[N, 2]`` int64 ``(x, y)`` top-left in cells.
    """
    cells = boxes_xyxy_px / stride  # [N, 4] xyxy in cells
    top_left = shift_inside(torch.floor(cells[:, :2]), ceil_cells(image_wh, stride), patch_size)
    slack = (top_left + patch_size - cells[:, 2:]).clamp(min=0.0)
    return torch.floor(top_left - jitter * slack).clamp(min=0.0).long()


def random_patch_positions(image_wh: Tensor, stride: int, patch_size: int, uniform: Tensor) -> Tensor:
    """Random loss-only patch positions: integer ``x`` in ``[0, max(ceil(w/s) - P, 1))``, ``y`` alike.

    Args:
        image_wh: ``[N, 2]`` ``(w, h)`` of each patch's image.
        uniform: ``[N, 2]`` uniform samples in ``[0, 1)``.
    Returns:
        ``[N, 2]`` int64 ``(x, y)`` top-left in cells.
    """
    high = (ceil_cells(image_wh, stride) - patch_size).clamp(min=1.0)
    return torch.floor(uniform * high).long()


def centrality_scores(centres: Tensor, group: Tensor) -> Tensor:
    """Negative sum of squared distances to every centre of the same group (spec 3.7 item 3).

    Args:
        centres: ``[N, 2]`` box centres (pixels).
        group: ``[N]`` int64 image index of each box.
    Returns:
        ``[N]`` scores; more central boxes of an image score higher.
    """
    sq_dist = (centres[:, None, :] - centres[None, :, :]).pow(2).sum(-1)  # [N, N]
    same = group[:, None] == group[None, :]
    return -(sq_dist * same).sum(1)


# ------------------------------------------------------------------------------ patch lists


def ground_truth_boxes(
    targets: list[ImageTargets], image_wh: Tensor, stride: int, patch_size: int, nms_threshold: float
) -> tuple[Tensor, Tensor]:
    """The ground-truth objects that get a training patch at one level (spec 3.7 item 3).

    Boxes with both sides below ``s * P / 2`` px take part; an NMS (IoU ``nms_threshold``) scored by
    centrality (:func:`centrality_scores`) thins them.

    Args:
        targets: per image, ``boxes [n, 4]`` normalised cxcywh.
        image_wh: ``[B, 2]`` ``(w, h)``.
    Returns:
        ``[G, 4]`` xyxy boxes in pixels and ``[G]`` int64 images, grouped by image, each image in NMS
        (descending score) order.
    """
    device = image_wh.device
    boxes = torch.cat([t.boxes.to(device=device, dtype=image_wh.dtype).reshape(-1, 4) for t in targets])
    counts = torch.tensor([len(t.boxes) for t in targets], device=device)
    images = torch.repeat_interleave(torch.arange(len(targets), device=device), counts)  # [n]
    px = boxes * image_wh[images].repeat(1, 2)  # [n, 4] cxcywh px
    limit = stride * patch_size / 2
    small = (px[:, 2] < limit) & (px[:, 3] < limit)
    px, images = px[small], images[small]
    xyxy = box_convert(px, "cxcywh", "xyxy")
    keep = batched_nms(xyxy, centrality_scores(px[:, :2], images), images, nms_threshold)
    keep = keep[torch.argsort(images[keep], stable=True)]
    return xyxy[keep], images[keep]


def ground_truth_patches(
    targets: list[ImageTargets], image_wh: Tensor, stride: int, patch_size: int, nms_threshold: float
) -> PatchSet:
    """One patch per :func:`ground_truth_boxes` object, holding it at a random place (``loss_only``
    False; grouped by image, NMS order)."""
    boxes, images = ground_truth_boxes(targets, image_wh, stride, patch_size, nms_threshold)
    jitter = torch.rand(len(images), 2, device=image_wh.device)
    positions = gt_patch_positions(boxes, image_wh[images], stride, patch_size, jitter)
    return PatchSet(images, positions, torch.zeros_like(images, dtype=torch.bool))


def sample_per_image(patches: PatchSet, needed: Tensor, num_images: int) -> PatchSet:
    """At most ``needed[b]`` patches of each image, drawn by a random permutation, marked loss-only."""
    order = torch.randperm(len(patches), device=needed.device)
    order = order[torch.argsort(patches.batch_idx[order], stable=True)]  # random order within each image
    images = patches.batch_idx[order]
    order = order[rank_in_group(images, num_images) < needed[images]]
    loss_only = torch.ones_like(order, dtype=torch.bool)
    return PatchSet(patches.batch_idx[order], patches.crop_pos[order], loss_only)


def random_patches(needed: Tensor, image_wh: Tensor, stride: int, patch_size: int) -> PatchSet:
    """``needed[b]`` uniformly placed loss-only patches for image ``b`` (spec 3.7 item 3)."""
    images = torch.repeat_interleave(torch.arange(len(needed), device=needed.device), needed)
    uniform = torch.rand(len(images), 2, device=needed.device)
    positions = random_patch_positions(image_wh[images], stride, patch_size, uniform)
    return PatchSet(images, positions, torch.ones_like(images, dtype=torch.bool))


def merge_per_image(parts: list[PatchSet]) -> PatchSet:
    """Concatenate patch sets per image: images ascending, within an image the parts in list order."""
    images = torch.cat([p.batch_idx for p in parts])
    part = torch.cat([torch.full_like(p.batch_idx, i) for i, p in enumerate(parts)])
    order = torch.argsort(images * len(parts) + part, stable=True)
    return PatchSet(
        images[order],
        torch.cat([p.crop_pos for p in parts])[order],
        torch.cat([p.loss_only for p in parts])[order],
    )


def training_patches(
    predicted: PatchSet | None,
    targets: list[ImageTargets],
    image_wh: Tensor,
    stride: int,
    patch_size: int,
    nms_threshold: float,
    min_patches: int,
) -> PatchSet:
    """The training patch list of one level (spec 3.7 items 2-3).

    ``predicted is None`` (teacher forcing): every GT patch, as a real patch. Otherwise the predicted
    patches, topped up to ``min_patches`` per image with randomly chosen GT patches (loss-only). Images
    still short get random loss-only patches. Per image: primary patches first, then the added ones.
    """
    num_images = len(targets)
    gt = ground_truth_patches(targets, image_wh, stride, patch_size, nms_threshold)
    if predicted is None:
        parts = [gt]
    else:
        primary = merge_per_image([predicted])
        have = count_per_group(primary.batch_idx, num_images)
        parts = [primary, sample_per_image(gt, (min_patches - have).clamp(min=0), num_images)]
    have = sum(count_per_group(p.batch_idx, num_images) for p in parts)
    parts.append(random_patches((min_patches - have).clamp(min=0), image_wh, stride, patch_size))
    return merge_per_image(parts)
