"""Small constant tensors built on the device without a host-to-device copy.

``torch.tensor(values, device="cuda")`` copies from pageable host memory: a blocking copy (a host-device
synchronisation under ``torch.cuda.set_sync_debug_mode``) that is also forbidden while a CUDA graph is
being captured. :func:`constant` writes the values with fill kernels instead; the result is the same
tensor, so replacing one by the other changes no output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _flatten(values) -> tuple[list[float], tuple[int, ...]]:
    if not isinstance(values, Sequence):
        return [values], ()
    parts = [_flatten(v) for v in values]
    shapes = {shape for _, shape in parts}
    if len(shapes) > 1:
        raise ValueError("constant: nested sequences must have equal lengths")
    inner = shapes.pop() if shapes else ()
    return [x for flat, _ in parts for x in flat], (len(values), *inner)


def constant(values, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.tensor(values)`` on ``like``'s device (dtype: ``dtype`` or ``like``'s), without a host copy.

    Args:
        values: a number or (nested) sequence of numbers, e.g. ``[1000.0, 1000.0, 1.0, 1.0]``.
        like: a tensor giving the device (and the default dtype).
    """
    flat, shape = _flatten(values)
    dtype = dtype or like.dtype
    if not flat:
        return torch.zeros(shape, dtype=dtype, device=like.device)
    return torch.stack([torch.full((), v, dtype=dtype, device=like.device) for v in flat]).view(shape)
