"""Pure box geometry: the AdaMixer ``xyzr`` parameterisation, refinement and overlap measures.

Frames (spec section 0):

* ``*_px``: pixels of the resized, unpadded image;
* normalised: pixels divided by ``(w, h, w, h)``;
* ``xyzr``: box centre ``(x, y)`` in units of a stride-``s`` feature cell (``s = 4``, P2, by default),
  ``z = 1/2 log2(area)`` and ``r = 1/2 log2(h / w)`` in the same units (spec section 5).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert

# Stride of P2, the unit of the xyzr parameterisation (spec section 5).
XYZR_STRIDE = 4.0
# Additive guards inside the logarithms of the xyzr encoding (spec section 5, authors' values).
XYZR_LOG_EPS = 1e-7
# Lower bound of the foreground area in the IoF denominator (spec section 5, authors' value).
IOF_AREA_EPS = 1e-6


def xyxy_to_xyzr(boxes_xyxy_px: Tensor, stride: float = XYZR_STRIDE) -> Tensor:
    """Encode boxes as ``xyzr``.

    Args:
        boxes_xyxy_px: ``[..., 4]`` xyxy boxes in pixels.
        stride: size of one xyzr unit in pixels.

    Returns:
        ``[..., 4]`` ``(x, y, z, r)``: centre in stride units, ``z = 1/2 log2(w h + 1e-7)``,
        ``r = 1/2 log2(h / (w + 1e-7) + 1e-7)`` (w, h in stride units).
    """
    cells = boxes_xyxy_px / stride
    xy = 0.5 * (cells[..., 0:2] + cells[..., 2:4])
    wh = cells[..., 2:4] - cells[..., 0:2]
    z = (wh.prod(-1, keepdim=True) + XYZR_LOG_EPS).log2() / 2
    r = (wh[..., 1:2] / (wh[..., 0:1] + XYZR_LOG_EPS) + XYZR_LOG_EPS).log2() / 2
    return torch.cat([xy, z, r], dim=-1)


def xyzr_to_xyxy(xyzr: Tensor, stride: float = XYZR_STRIDE) -> Tensor:
    """Decode ``xyzr`` (``[..., 4]``) into xyxy boxes ``[..., 4]`` in pixels (``stride=1`` keeps cells).

    ``w = 2^z 2^-r``, ``h = 2^z 2^r``; the corners are the centre minus / plus half the size.
    """
    scale = 2.0 ** xyzr[..., 2:3]
    ratio = 2.0 ** torch.cat([-xyzr[..., 3:4], xyzr[..., 3:4]], dim=-1)
    wh = scale * ratio
    xy = xyzr[..., 0:2]
    cells = torch.cat([xy - 0.5 * wh, xy + 0.5 * wh], dim=-1)
    return cells * stride


def refine_xyzr(xyzr: Tensor, deltas: Tensor) -> Tensor:
    """Apply regression deltas ``(dx, dy, dz, dr)`` (``[..., 4]``) to ``xyzr`` (``[..., 4]``).

    ``x += dx 2^z``, ``y += dy 2^z``, ``z += dz``, ``r += dr`` (spec section 5).
    """
    z = xyzr[..., 2:3]
    xy = xyzr[..., 0:2] + deltas[..., 0:2] * (2.0**z)
    zr = xyzr[..., 2:4] + deltas[..., 2:4]
    return torch.cat([xy, zr], dim=-1)


def intersection_over_foreground(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over the area of the first box (IoF).

    Args:
        boxes1: ``[B, N, 4]`` xyxy (the "foreground" boxes, rows).
        boxes2: ``[B, M, 4]`` xyxy, same frame.

    Returns:
        ``[B, N, M]`` with ``area(b1_i & b2_j) / max(area(b1_i), 1e-6)``.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # [B, N]
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [B, N, M, 2]
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # [B, N, M, 2]
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]  # [B, N, M]
    return overlap / area1[..., None].clamp(min=IOF_AREA_EPS)


def whwh(image_sizes: Tensor) -> Tensor:
    """``[B, 2]`` ``(h, w)`` image sizes -> ``[B, 1, 4]`` float ``(w, h, w, h)`` for broadcasting."""
    wh = image_sizes.flip(-1).to(torch.get_default_dtype())  # [B, 2] (w, h)
    return wh.repeat(1, 2)[:, None, :]  # [B, 1, 4]


def normalized_cxcywh_from_xyzr(
    xyzr: Tensor, image_sizes: Tensor, stride: float = XYZR_STRIDE
) -> Tensor:
    """Decode ``xyzr`` ``[B, N, 4]`` into cxcywh ``[B, N, 4]`` in the normalised frame.

    Args:
        xyzr: ``[B, N, 4]`` boxes in xyzr (stride units).
        image_sizes: ``[B, 2]`` ``(h, w)`` of each resized, unpadded image.
        stride: size of one xyzr unit in pixels.
    """
    boxes_xyxy_norm = xyzr_to_xyxy(xyzr, stride) / whwh(image_sizes).to(xyzr)
    return box_convert(boxes_xyxy_norm, "xyxy", "cxcywh")


def full_image_boxes_cxcywh_px(image_sizes: Tensor, count: int) -> Tensor:
    """``[B, count, 4]`` copies of the full-image box ``(w/2, h/2, w, h)`` in pixels."""
    size = whwh(image_sizes)  # [B, 1, 4] (w, h, w, h)
    box = torch.cat([size[..., :2] * 0.5, size[..., 2:]], dim=-1)  # no constant from the host
    return box.expand(-1, count, -1)  # [B, count, 4]
