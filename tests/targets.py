"""Random ground truth for model tests."""

from collections.abc import Sequence

import torch

from asag.structures import ImageTargets


def random_targets(sizes: torch.Tensor, counts: int | Sequence[int] = 3, num_classes: int = 5,
                   min_side: float = 0.02, seed: int = 0) -> list[ImageTargets]:
    """One :class:`ImageTargets` per ``(h, w)`` row of ``sizes`` ``[B, 2]``: ``counts`` objects (one number
    for every image, or one per image) with normalised cxcywh boxes, centres in [0.2, 0.8], sides in
    ``[min_side, min_side + 0.3]``, and labels in ``[0, num_classes)``."""
    g = torch.Generator().manual_seed(seed)
    per_image = [counts] * len(sizes) if isinstance(counts, int) else list(counts)
    out = []
    for i, ((h, w), n) in enumerate(zip(sizes.tolist(), per_image, strict=True)):
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sides = torch.rand(n, 2, generator=g) * 0.3 + min_side
        labels = torch.randint(0, num_classes, (n,), generator=g)
        out.append(ImageTargets(torch.cat([centres, sides], 1), labels, i, (h, w), (h, w)))
    return out
