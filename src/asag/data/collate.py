"""Batching: zero-pad images bottom/right to the batch maximum rounded up to 32 px (spec 0, 9.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from asag.data.transforms import Sample
from asag.structures import Batch, ImageTargets

# Spec 0 / 9.1: the padded batch is a multiple of the coarsest backbone stride (32) in both dimensions.
SIZE_DIVISIBILITY = 32


def padded_size(sizes_hw: Tensor, size_divisibility: int = SIZE_DIVISIBILITY) -> tuple[int, int]:
    """``(Hp, Wp)``: the maximum of ``sizes_hw`` ``[B, 2]`` (h, w), rounded up to ``size_divisibility``."""
    max_hw = sizes_hw.max(dim=0).values  # [2]
    padded = (max_hw + size_divisibility - 1) // size_divisibility * size_divisibility
    return int(padded[0]), int(padded[1])


def pad_images(images: Sequence[Tensor], size_divisibility: int = SIZE_DIVISIBILITY) -> Tensor:
    """Stack ``[C, h_i, w_i]`` images into ``[B, C, Hp, Wp]``, zeros bottom/right.

    Ragged images need one copy each (torch has no stable ragged-to-padded op besides prototype nested
    tensors); B is the batch size, small.
    """
    sizes = torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.int64)  # [B, 2]
    hp, wp = padded_size(sizes, size_divisibility)
    first = images[0]
    out = first.new_zeros((len(images), first.shape[0], hp, wp))  # [B, C, Hp, Wp]
    for dst, img in zip(out, images):
        dst[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    return out


def collate(
    samples: Sequence[Sample | tuple[Tensor, ImageTargets]], size_divisibility: int = SIZE_DIVISIBILITY
) -> Batch:
    """Collate ``(image [3, h, w], ImageTargets)`` samples into a :class:`Batch`.

    ``image_sizes`` ``[B, 2]`` int64 are the unpadded resized ``(h, w)``; ``orig_sizes`` ``[B, 2]`` int64
    the ``(h, w)`` as read from disk (``ImageTargets.orig_size``).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    images = [image for image, _ in samples]
    targets = [target for _, target in samples]
    image_sizes = torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.int64)  # [B, 2]
    orig_sizes = torch.tensor([list(t.orig_size) for t in targets], dtype=torch.int64)  # [B, 2]
    return Batch(
        images=pad_images(images, size_divisibility),
        image_sizes=image_sizes,
        orig_sizes=orig_sizes,
        targets=targets,
        image_ids=[t.image_id for t in targets],
    )
