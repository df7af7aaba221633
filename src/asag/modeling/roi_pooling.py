"""Multi-scale RoIAlign of the proposal stage and the Sparse R-CNN heads (spec section 5).

One module, :class:`RoIPooling`, whose ``kind`` (a constructor argument, ``model.roi_pooling``) picks the
kernel of a forward whose sizes come from the data:

* ``torchvision``: torchvision's ``MultiScaleRoIAlign`` (``aligned=False``), the release's kernels;
* ``gather``: the same sampling written as one weighted gather of channel vectors per level
  (``F.embedding_bag``; equal up to float rounding). Its backward (an index-add) runs on every intra-op
  thread, where torchvision's CPU kernels run on one core, and on a channels-last map it needs no copy;
* ``auto``: ``gather`` for CPU tensors, ``torchvision`` for any other device (CUDA kernels that already
  run in parallel).

Levels: ``clamp(floor(4 + log2(sqrt(area) / 224) + 1e-6))`` over the strides' range (torchvision's level
mapper with the scales fixed by the strides, spec section 15 quirk 17).

With fixed budgets (the static mode) the detector passes a :class:`LevelTable`, all levels as the rows of
one table built once per forward: every RoI is then pooled by one gather from that table, whatever the
kind, with fixed shapes and no host read. Where the sizes come from the data the per-level counts are
read instead (one host read per call) and each level is gathered from its own map, in place: the table
is one copy of all levels (at 800x1216, d = 256: 83 MB, 32 ms on 2 Zen 4 cores), which would double the
``gather`` pooling of a channels-last ``--fast`` forward (500 RoIs: 24 ms reading the maps in place,
54 ms through the table). Both read their rows with :func:`pool_rows`. When exporting to ONNX the
gather is written as one gather per sample tap (ONNX has no weighted ``embedding_bag``; its exporter
would write a slow loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, box_area
from torchvision.ops.poolers import initLevelMapper

from asag.modeling.blocks import FPN_STRIDES
from asag.modeling.patches import count_per_group, finite_or_zero
from asag.ops.constants import constant

# FPN level heuristic of MultiScaleRoIAlign: canonical box side and level (spec section 5).
ROI_CANONICAL_SCALE = 224
ROI_CANONICAL_LEVEL = 4
# ``model.roi_pooling`` choices (module docstring).
ROI_POOLING_KINDS = ("auto", "torchvision", "gather")


def _axis_samples(start: Tensor, length: Tensor, size: int | Tensor, output_size: int, sampling_ratio: int
                  ) -> tuple[Tensor, Tensor]:
    """Bilinear taps of RoIAlign's sample points along one axis (torchvision, ``aligned=False``).

    Args:
        start: ``[R]`` RoI start in feature cells; length: ``[R]`` RoI length (>= 1 cell).
        size: feature length along the axis, or ``[R, 1]`` float lengths (one feature map per RoI).
    Returns:
        ``[R, S, sr, 2]`` int64 cell index of the low / high tap of each sample of each bin, and the
        matching ``[R, S, sr, 2]`` weights (0 for samples outside ``[-1, size]``).
    """
    bin_size = (length / output_size)[:, None]  # [R, 1]
    k = torch.arange(output_size * sampling_ratio, device=start.device, dtype=start.dtype)  # [S * sr]
    bins, sub = torch.div(k, sampling_ratio, rounding_mode="floor"), k % sampling_ratio + 0.5
    # torchvision's order of operations: start + bin * size + (sub * size) / sampling_ratio
    pos = start[:, None] + bins * bin_size + sub * bin_size / sampling_ratio  # [R, S * sr]
    inside = ((pos >= -1.0) & (pos <= size)).to(pos.dtype)
    pos = pos.clamp(min=0.0)
    low = pos.floor().clamp(max=size - 1)
    at_end = low >= size - 1
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low)
    taps = torch.stack([low, high], dim=-1).long()  # [R, S * sr, 2]
    weights = torch.stack([1.0 - frac, frac], dim=-1) * inside[..., None]  # [R, S * sr, 2]
    shape = (-1, output_size, sampling_ratio, 2)
    return taps.view(shape), weights.view(shape)


def roi_align_gather(feature: Tensor, boxes_xyxy_px: Tensor, image_idx: Tensor, spatial_scale: float,
                     output_size: int, sampling_ratio: int) -> Tensor:
    """torchvision's ``roi_align(aligned=False)`` on one map as one weighted gather (``F.embedding_bag``).

    Every output cell averages ``sampling_ratio ** 2`` bilinear samples, i.e. a weighted sum of
    ``4 * sampling_ratio ** 2`` feature vectors; the gather reads whole channel vectors, so on a
    channels-last map it needs no copy and runs on all intra-op threads. Equal to ``roi_align`` up to
    float rounding.

    Args:
        feature: ``[B, C, H, W]`` (channels-last avoids a copy).
        boxes_xyxy_px: ``[R, 4]`` xyxy boxes in input pixels; image_idx: ``[R]`` int64 image of each.
        spatial_scale: feature cells per pixel (1 / stride).
    Returns:
        ``[R, C, S, S]``.
    """
    batch, channels, height, width = feature.shape
    table = feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view if channels-last
    return pool_rows(table, boxes_xyxy_px * spatial_scale, image_idx * (height * width), height, width,
                     output_size, sampling_ratio)


def pool_rows(table: Tensor, cells: Tensor, base: Tensor, height: int | Tensor, width: int | Tensor,
              output_size: int, sampling_ratio: int, weighted_sum: str = "embedding_bag") -> Tensor:
    """RoIAlign of ``[R, 4]`` xyxy boxes in feature cells from the rows of a ``[rows, C]`` table.

    Row of cell ``(y, x)`` of a RoI: ``base + y * width + x``. ``height`` / ``width`` are the map's
    sides, or ``[R]`` int64 sides (one map per RoI: the levels of a :class:`LevelTable`).
    ``weighted_sum``: ``"embedding_bag"`` (fast in PyTorch) or ``"index"``, one gather per tap (ONNX has
    no weighted ``embedding_bag``: its exporter writes a slow loop); equal up to float rounding.
    Returns ``[R, C, S, S]``.
    """
    num, s, sr = cells.shape[0], output_size, sampling_ratio
    per_roi = isinstance(width, Tensor)
    size = (cells[:, 2:] - cells[:, :2]).clamp(min=1.0)  # [R, 2] (w, h), at least one cell
    x_side = width[:, None].to(cells.dtype) if per_roi else width
    y_side = height[:, None].to(cells.dtype) if per_roi else height
    x_taps, x_weights = _axis_samples(cells[:, 0], size[:, 0], x_side, s, sr)  # [R, S, sr, 2]
    y_taps, y_weights = _axis_samples(cells[:, 1], size[:, 1], y_side, s, sr)
    row_stride = width.view(num, 1, 1, 1, 1, 1, 1) if per_roi else width
    # [R, Sy, Sx, sy, sx, ty, tx]: bins, samples per bin, taps per sample
    index = (base.view(num, 1, 1, 1, 1, 1, 1) + y_taps.view(num, s, 1, sr, 1, 2, 1) * row_stride
             + x_taps.view(num, 1, s, 1, sr, 1, 2))
    weight = y_weights.view(num, s, 1, sr, 1, 2, 1) * x_weights.view(num, 1, s, 1, sr, 1, 2) / (sr * sr)
    index, weight = index.reshape(num * s * s, -1), weight.reshape(num * s * s, -1).to(table.dtype)
    if weighted_sum == "index":  # one gather per tap, summed in embedding_bag's order
        pooled = table[index[:, 0]] * weight[:, :1]  # [R * S * S, C]
        for tap in range(1, index.shape[1]):
            pooled = pooled + table[index[:, tap]] * weight[:, tap:tap + 1]
    elif weighted_sum == "embedding_bag":
        pooled = F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)  # [R * S * S, C]
    else:
        raise ValueError(f"weighted_sum must be 'embedding_bag' or 'index', got {weighted_sum!r}")
    return pooled.view(num, s, s, table.shape[1]).permute(0, 3, 1, 2)  # [R, C, S, S]


@dataclass(frozen=True)
class LevelTable:
    """The neck's levels as the rows of one table, for the fixed-shape RoI pooling: every RoI is read from
    it by one gather. Built once per forward (:meth:`of`) and shared by the proposal stage and the heads.

    rows: ``[sum_l B * H_l * W_l, C]``: row ``starts[l] + (b * H_l + y) * W_l + x`` is the vector of cell
        ``(y, x)`` of image ``b`` on level ``l``.
    shapes: ``(H_l, W_l)`` of every level; starts: first row of every level (Python ints, fixed by the
        shapes).
    """

    rows: Tensor
    shapes: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]

    @classmethod
    def of(cls, features: list[Tensor]) -> LevelTable:
        """The table of ``[B, C, H_l, W_l]`` levels (one copy of all of them)."""
        rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features])
        sizes = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
        starts = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        return cls(rows, tuple((f.shape[2], f.shape[3]) for f in features), starts)


class RoIPooling(nn.Module):
    """Multi-scale RoIAlign (module docstring): ``(features, boxes_xyxy_px [B, N, 4], image_sizes)`` ->
    ``[B * N, d, S, S]`` (batch-major, row ``b * N + n``). No parameters or buffers; no gradient reaches
    the boxes.

    Args:
        strides: feature strides of the input levels (P2..P5: 4, 8, 16, 32).
        output_size: RoI grid side (7).
        sampling_ratio: RoIAlign samples per bin side (2).
        kind: ``"torchvision"``, ``"gather"`` or ``"auto"`` (module docstring; ``model.roi_pooling``).
    """

    def __init__(self, strides: tuple[int, ...] = FPN_STRIDES, output_size: int = 7, sampling_ratio: int = 2,
                 kind: str = "torchvision") -> None:
        super().__init__()
        if kind not in ROI_POOLING_KINDS:
            raise ValueError(f"RoI pooling kind must be one of {ROI_POOLING_KINDS}, got {kind!r}")
        self.kind = kind
        self.names = [f"p{i}" for i in range(len(strides))]
        self.pooler = MultiScaleRoIAlign(self.names, output_size, sampling_ratio)
        self.pooler.scales = [1.0 / s for s in strides]
        self.pooler.map_levels = initLevelMapper(
            int(math.log2(strides[0])), int(math.log2(strides[-1])),
            canonical_scale=ROI_CANONICAL_SCALE, canonical_level=ROI_CANONICAL_LEVEL,
        )
        self.scales = list(self.pooler.scales)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features: list[Tensor], boxes_xyxy_px: Tensor, image_sizes: Tensor,
                level_table: LevelTable | None = None) -> Tensor:
        """Pool RoI features.

        Args:
            features: P2..P5, ``[B, d, H_l, W_l]`` each (padded batch).
            boxes_xyxy_px: ``[B, N, 4]`` xyxy boxes in pixels.
            image_sizes: ``[B, 2]`` ``(h, w)`` (the scales are fixed: only torchvision's interface uses it).
            level_table: the levels as one table (fixed budgets): pool every RoI with one gather from it.
        Returns:
            ``[B * N, d, S, S]``, batch-major.
        """
        if level_table is None and self.uses_torchvision(features[0].device):
            feats = dict(zip(self.names, features))
            shapes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
            return self.pooler(feats, list(boxes_xyxy_px.unbind(0)), shapes)
        batch, num = boxes_xyxy_px.shape[:2]
        boxes = finite_or_zero(boxes_xyxy_px.detach().reshape(-1, 4))  # [R, 4]; a diverged model's NaN box
        if torch.is_autocast_enabled(boxes.device.type):  # torchvision's RoIAlign runs in fp32 under autocast
            features = [f.float() for f in features]
        images = torch.arange(batch, device=boxes.device).repeat_interleave(num)  # [R], image-major
        if level_table is None:
            return self._gather_per_level(features, boxes, images)
        return self._gather_from_table(level_table, boxes, images)

    def uses_torchvision(self, device: torch.device) -> bool:
        """Whether a forward whose sizes come from the data runs torchvision's kernels on ``device``."""
        return self.kind == "torchvision" or (self.kind == "auto" and device.type != "cpu")

    def levels(self, boxes: Tensor) -> Tensor:
        """``[R]`` int64 level of each ``[R, 4]`` xyxy box: torchvision's ``LevelMapper`` formula, written
        without its constant from the host."""
        m = self.pooler.map_levels
        side = torch.sqrt(box_area(boxes))
        target = torch.floor(m.lvl0 + torch.log2(side / m.s0) + m.eps)
        return target.clamp(min=m.k_min, max=m.k_max).to(torch.int64) - m.k_min

    def _gather_per_level(self, features: list[Tensor], boxes: Tensor, images: Tensor) -> Tensor:
        """Each level's RoIs from its own map (no copy of the levels): one host read of the per-level
        counts sizes the groups."""
        levels = self.levels(boxes)  # [R] int64 in 0..L-1
        order = torch.argsort(levels, stable=True)
        counts = count_per_group(levels, len(self.scales)).tolist()  # one host read
        s = self.output_size
        out = boxes.new_empty(len(boxes), features[0].shape[1], s, s)  # [R, d, S, S]
        for level, rows in enumerate(torch.split(order, counts)):
            if len(rows):
                pooled = roi_align_gather(features[level], boxes[rows], images[rows], self.scales[level], s,
                                          self.sampling_ratio)
                out[rows] = pooled.to(out.dtype)
        return out

    def _gather_from_table(self, table: LevelTable, boxes: Tensor, images: Tensor) -> Tensor:
        """Every RoI in one gather from ``table`` (each RoI reads its own level's rows): fixed shapes, no
        host read."""
        levels = self.levels(boxes)  # [R]
        heights = constant([h for h, _ in table.shapes[:len(self.scales)]], images)[levels]  # [R] int64
        widths = constant([w for _, w in table.shapes[:len(self.scales)]], images)[levels]
        base = constant(list(table.starts[:len(self.scales)]), images)[levels] + images * heights * widths
        cells = boxes * constant(self.scales, boxes)[levels][:, None]  # [R, 4] xyxy in the level's cells
        weighted_sum = "index" if torch.onnx.is_in_onnx_export() else "embedding_bag"
        return pool_rows(table.rows, cells, base, heights, widths, self.output_size, self.sampling_ratio,
                         weighted_sum)
