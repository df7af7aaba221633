"""FLOP counting: ``torch.utils.flop_counter.FlopCounterMode`` plus hand formulas for the ops it misses.

``FlopCounterMode`` counts matrix products and convolutions (2 FLOPs per multiply-accumulate) and
nothing else: normalisations, activations, soft-max and element-wise arithmetic count zero, which is
the usual convention of detection papers. Three ops of ASAG are sampling or attention kernels it has
no formula for; we add them here so that every multiply-add that scales with the feature width is
counted:

* ``aten.grid_sampler_2d`` (AdaMixer's 3D sampling): bilinear interpolation blends the 4 neighbouring
  values of every channel with 4 weights, i.e. **4 multiply-adds per output element and channel**
  (:data:`MACS_PER_BILINEAR_SAMPLE`). The weights themselves are computed once per sampling point and
  shared by all channels; that per-point work does not scale with the channels and is not counted.
  Nearest sampling counts 0, bicubic 16 (the 4x4 taps).
* ``torchvision::roi_align`` (proposal stage and Sparse R-CNN): per output bin, per sampling point
  (``sampling_ratio^2`` per bin; adaptive ``ceil(roi_side / bins)`` per side when the ratio is <= 0) and
  per channel, one bilinear interpolation = 4 multiply-adds. The average over the points of a bin
  (additions only) is not counted.
* ``aten._embedding_bag`` with per-sample weights (the gathered RoIAlign,
  :class:`~asag.modeling.roi_pooling.RoIPooling` of kind ``gather``): one multiply-add per gathered row
  and channel. Each output cell gathers the 4 bilinear taps of every sampling point, so the count equals
  ``torchvision::roi_align``'s above and FLOPs do not depend on the RoI pooling option. Unweighted bags
  (additions only) count zero.
* ``aten._scaled_dot_product_flash_attention_for_cpu`` (``nn.MultiheadAttention`` on the CPU): the two
  batched products ``Q K^T`` and ``softmax(.) V``, exactly like torch's own formula for the CUDA kernels.

Papers quote "GFLOPs" that are really giga multiply-accumulates (the fvcore / mmcv convention); every
count here is therefore available as FLOPs and as MACs (= FLOPs / 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torchvision  # noqa: F401 - registers torch.ops.torchvision.*
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")

# One multiply-accumulate = one multiplication + one addition (FlopCounterMode's convention).
FLOPS_PER_MAC = 2
# Bilinear interpolation: 4 taps, each a weight times a value accumulated into the output.
MACS_PER_BILINEAR_SAMPLE = 4
# grid_sampler_2d interpolation_mode codes (ATen): taps per output element and channel.
GRID_SAMPLE_TAPS = {0: MACS_PER_BILINEAR_SAMPLE, 1: 0, 2: 16}  # bilinear, nearest, bicubic (4x4)
GIGA = 1e9

# Names under which the hand-counted ops appear in :attr:`FlopCount.by_op`.
GRID_SAMPLE = "grid_sample"
ROI_ALIGN = "roi_align"
CPU_ATTENTION = "sdpa_cpu"
WEIGHTED_GATHER = "weighted_gather"


# ------------------------------------------------------------------------------- pure formulas


def grid_sample_macs(input_shape: tuple[int, ...], grid_shape: tuple[int, ...], taps: int = 4) -> int:
    """Multiply-adds of ``F.grid_sample(input [N, C, H, W], grid [N, Ho, Wo, 2])``.

    ``N * C * Ho * Wo * taps`` (``taps`` = 4 for bilinear): one weighted tap per neighbour, output element
    and channel. The input's spatial size does not matter.
    """
    n, c = input_shape[0], input_shape[1]
    return n * c * math.prod(grid_shape[1:-1]) * taps


def roi_align_macs(num_rois: int, channels: int, pooled_h: int, pooled_w: int, points_per_bin: int) -> int:
    """Multiply-adds of RoIAlign: ``rois * C * pooled_h * pooled_w * points_per_bin * 4``.

    ``points_per_bin`` = ``sampling_ratio ** 2`` (e.g. 4 for the authors' ratio 2); every point is one
    bilinear interpolation (4 multiply-adds) per channel.
    """
    return num_rois * channels * pooled_h * pooled_w * points_per_bin * MACS_PER_BILINEAR_SAMPLE


def attention_macs(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> int:
    """Multiply-adds of ``softmax(Q K^T) V`` for ``[..., Lq, E]``, ``[..., Lk, E]``, ``[..., Lk, Ev]``."""
    batch = math.prod(q_shape[:-2])
    lq, e = q_shape[-2:]
    lk, ev = k_shape[-2], v_shape[-1]
    return batch * lq * lk * (e + ev)


def _roi_points_per_bin(rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                        sampling_ratio: int, aligned: bool) -> int:
    """Total sampling points per bin summed over all RoIs (``rois`` ``[K, 5]``: image, x1, y1, x2, y2)."""
    if sampling_ratio > 0:
        return len(rois) * sampling_ratio * sampling_ratio
    # torchvision's adaptive rule: ceil(roi side / bins) per side; unaligned RoIs are at least 1 px.
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].double() * spatial_scale - offset
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    grid_h, grid_w = (h / pooled_h).ceil(), (w / pooled_w).ceil()
    return int((grid_h * grid_w).sum())


# ------------------------------------------------------------------- FlopCounterMode formulas


def _grid_sample_flops(input_shape, grid_shape, interpolation_mode, *args, out_shape=None, **kwargs) -> int:
    taps = GRID_SAMPLE_TAPS[int(interpolation_mode)]
    return FLOPS_PER_MAC * grid_sample_macs(tuple(input_shape), tuple(grid_shape), taps)


def _roi_align_flops(features: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                     sampling_ratio: int, aligned: bool, *args, out_val=None, **kwargs) -> int:
    points = _roi_points_per_bin(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
    return FLOPS_PER_MAC * roi_align_macs(1, features.shape[1], pooled_h, pooled_w, points)


_roi_align_flops._get_raw = True  # type: ignore[attr-defined]  # needs the RoI values (adaptive ratio)


def _embedding_bag_flops(weight_shape, indices_shape, offsets_shape=None, scale_grad_by_freq=False, mode=0,
                         sparse=False, per_sample_weights_shape=None, *args, out_shape=None, **kwargs) -> int:
    if per_sample_weights_shape is None:
        return 0
    return FLOPS_PER_MAC * math.prod(indices_shape) * weight_shape[1]


def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return FLOPS_PER_MAC * attention_macs(tuple(q_shape), tuple(k_shape), tuple(v_shape))


def hand_counted_ops() -> dict[Any, Callable[..., int]]:
    """The ``custom_mapping`` given to ``FlopCounterMode``: op packet -> FLOP formula."""
    return {
        torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
        torch.ops.torchvision.roi_align: _roi_align_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
        torch.ops.aten._embedding_bag: _embedding_bag_flops,
        torch.ops.aten._embedding_bag_forward_only: _embedding_bag_flops,
    }


_OP_NAMES = {
    torch.ops.aten.grid_sampler_2d: GRID_SAMPLE,
    torch.ops.torchvision.roi_align: ROI_ALIGN,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: CPU_ATTENTION,
    torch.ops.aten._embedding_bag: WEIGHTED_GATHER,
    torch.ops.aten._embedding_bag_forward_only: WEIGHTED_GATHER,
}


# ------------------------------------------------------------------------------------ counting


@dataclass
class FlopCount:
    """FLOPs of one measured call.

    flops: total FLOPs (2 per multiply-accumulate).
    by_op: op name (e.g. ``convolution``, ``addmm``, ``grid_sample``, ``roi_align``) -> FLOPs.
    """

    flops: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        """Multiply-accumulates, the papers' "FLOPs"."""
        return self.flops // FLOPS_PER_MAC

    @property
    def gflops(self) -> float:
        return self.flops / GIGA

    @property
    def gmacs(self) -> float:
        return self.macs / GIGA

    def __add__(self, other: FlopCount) -> FlopCount:
        by_op = dict(self.by_op)
        for name, value in other.by_op.items():
            by_op[name] = by_op.get(name, 0) + value
        return FlopCount(self.flops + other.flops, by_op)

    def to_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "macs": self.macs, "gflops": self.gflops, "gmacs": self.gmacs,
                "by_op": dict(self.by_op)}


def _op_name(packet: Any) -> str:
    return _OP_NAMES.get(packet, getattr(packet, "__name__", str(packet)).split(".")[-1])


class FlopCounter:
    """``with FlopCounter() as counter:`` counts the FLOPs of the block (``FlopCounterMode`` with
    :func:`hand_counted_ops`); :attr:`count` is the :class:`FlopCount` once the block has ended."""

    def __init__(self) -> None:
        self._mode = FlopCounterMode(display=False, custom_mapping=hand_counted_ops())
        self.count = FlopCount()

    def __enter__(self) -> FlopCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        by_op: dict[str, int] = {}
        for packet, value in self._mode.get_flop_counts().get("Global", {}).items():
            name = _op_name(packet)
            by_op[name] = by_op.get(name, 0) + int(value)
        self.count = FlopCount(sum(by_op.values()), by_op)


def measure_flops(fn: Callable[[], T]) -> tuple[T, FlopCount]:
    """Run ``fn()`` under a :class:`FlopCounter`; return its result and count."""
    with FlopCounter() as counter:
        result = fn()
    return result, counter.count
