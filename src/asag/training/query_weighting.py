"""Query Weighting: per-pair loss weights from the score and the IoU of a matched prediction.

The supplement (``shared/seed/ASAG-supplementary.txt``, section A) weights the box losses (Eq. A-1) and the
positive classification loss (Eq. A-2) of every matched query by ``w_pos`` and ``w_neg``; the main paper's
Eqs. (2) and (3) define them. The formulas below are the released implementation's, which agree with the
supplement's Figure A-1 (spec sections 8.4 and 8.9):

* ``Norm(x) = sigmoid(4.5 (x - 1/3)) / sigmoid(3)``: monotone, maps ``[0, 1]`` onto ``[0.1915, 1]``;
* ``w_pos = Norm(p^gamma1 * u^gamma2)`` (Eq. 2; the supplement's ``x = x1 * x2``);
* ``w_neg = Norm(p^gamma1 * g(u^gamma2)) - Norm(0)`` with ``g(v) = 1`` below ``v = 0.5`` and
  ``(4/3)(1 - v^2)`` above (Eq. 3);
* the area weight ``A - (A - 1) sqrt(w h)`` (the release multiplies every matching cost and loss term
  by it; the P6 patch of the anchor generator uses the inverse ``1 + (A - 1) sqrt(w h)``, spec 8.2).

All functions are pure and element-wise; ``p`` is a sigmoid score in ``[0, 1]`` and ``u`` an IoU in
``[0, 1]``. Callers detach their inputs: the weights never carry gradient (spec 8.4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Slope and centre of the Norm sigmoid (spec 8.4; authors' values). Norm(1) = sigmoid(3) / sigmoid(3) = 1.
NORM_SLOPE = 4.5
NORM_CENTRE = 1.0 / 3.0
# sigmoid(NORM_SLOPE * (1 - NORM_CENTRE)) = sigmoid(3): the divisor that makes Norm(1) = 1.
NORM_DIVISOR = 1.0 / (1.0 + math.exp(-NORM_SLOPE * (1.0 - NORM_CENTRE)))
# Exponents of the score and of the IoU (spec 8.4 / section 11: --gamma1 0.4, --gamma2 0.6).
DEFAULT_GAMMA1 = 0.4
DEFAULT_GAMMA2 = 0.6
# Where the negative weight starts to decay, in terms of v = IoU^gamma2 (spec 8.4: g(v) = 1 for v < 0.5).
NEG_DECAY_START = 0.5
# Maximum area weight A (spec 8.2; --area_weight 4). A = 1 disables the area weight.
DEFAULT_AREA_WEIGHT = 4.0


def norm(x: Tensor) -> Tensor:
    """Supplement Fig. A-1 ``Norm``: ``sigmoid(4.5 (x - 1/3)) / sigmoid(3)``, element-wise.

    Raises small values (``Norm(0) = 0.1915``) and keeps ``Norm(x) <= 1`` on ``[0, 1]``.
    """
    return torch.sigmoid((x - NORM_CENTRE) * NORM_SLOPE) / NORM_DIVISOR


def negative_decay(v: Tensor) -> Tensor:
    """``g(v)`` of Eq. 3: 1 for ``v < 0.5``, else ``(1 - v^2) / (1 - 0.5^2)`` (continuous, 0 at ``v = 1``)."""
    decay = (1.0 - v * v) / (1.0 - NEG_DECAY_START**2)
    return torch.where(v < NEG_DECAY_START, torch.ones_like(v), decay)


def w_pos(
    score: Tensor, iou: Tensor, gamma1: float = DEFAULT_GAMMA1, gamma2: float = DEFAULT_GAMMA2
) -> Tensor:
    """Eq. (2) / (A-1): positive weight ``Norm(p^gamma1 * u^gamma2)`` in ``[0.1915, 1]``.

    Args:
        score: sigmoid score ``p`` of the target class (or the anchor confidence), any shape.
        iou: IoU ``u`` between the prediction and its matched target, same shape.
    """
    return norm(score.pow(gamma1) * iou.pow(gamma2))


def w_neg(
    score: Tensor, iou: Tensor, gamma1: float = DEFAULT_GAMMA1, gamma2: float = DEFAULT_GAMMA2
) -> Tensor:
    """Eq. (3) / (A-2): negative weight ``Norm(p^gamma1 * g(u^gamma2)) - Norm(0)`` in ``[0, 0.8085]``.

    High-IoU matched queries are pushed less towards background; at ``u = 1`` the weight is 0.
    """
    return norm(score.pow(gamma1) * negative_decay(iou.pow(gamma2))) - norm(torch.zeros_like(score))


def area_weight(boxes_cxcywh: Tensor, max_weight: float = DEFAULT_AREA_WEIGHT) -> Tensor:
    """Standard area weight ``A - (A - 1) sqrt(w h)`` in ``[1, A]``: small objects weigh more (spec 8.2).

    Args:
        boxes_cxcywh: ``[..., 4]`` target boxes, cxcywh, normalised to the frame they live in (image,
            crop or patch).

    Returns:
        ``[...]`` weights.
    """
    return max_weight - torch.sqrt(boxes_cxcywh[..., 2] * boxes_cxcywh[..., 3]) * (max_weight - 1.0)


def inverse_area_weight(boxes_cxcywh: Tensor, max_weight: float = DEFAULT_AREA_WEIGHT) -> Tensor:
    """Inverse area weight ``1 + (A - 1) sqrt(w h)`` in ``[1, A]``: large objects weigh more.

    Used only for the anchor generator's whole-image P6 patch (spec 8.2, 8.6.1).

    Args:
        boxes_cxcywh: ``[..., 4]`` target boxes, cxcywh, normalised frame.

    Returns:
        ``[...]`` weights.
    """
    return (max_weight - 1.0) * torch.sqrt(boxes_cxcywh[..., 2] * boxes_cxcywh[..., 3]) + 1.0
