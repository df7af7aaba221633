"""RoIAlign as one weighted gather of channel vectors: the same sampling as torchvision's
``roi_align(aligned=False)``, equal up to float rounding.

Each output bin averages ``sampling_ratio ** 2`` bilinear samples, i.e. a weighted sum of
``4 * sampling_ratio ** 2`` feature vectors; ``F.embedding_bag`` computes all of them at once and its
backward (an index-add) runs on every intra-op thread, where torchvision's CPU kernels run on one core.
Used by the inference fast path (channels-last levels need no copy) and, with
``model.roi_pooling=gather`` or ``auto`` (the default), in training on the CPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_area

from asag.modeling.blocks import RoIFeatureExtractor
from asag.modeling.patches import count_per_group, finite_or_zero
from asag.ops.constants import constant

__all__ = ["DeviceRoIPooling", "GatherRoIPooling", "LevelRows", "device_roi_pooling", "gather_roi_pooling",
           "roi_align_gather"]


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
    """torchvision's ``roi_align(aligned=False)`` as one weighted gather (``F.embedding_bag``).

    Every output cell averages ``sampling_ratio ** 2`` bilinear samples, i.e. a weighted sum of
    ``4 * sampling_ratio ** 2`` feature vectors; the gather reads whole channel vectors, so on a
    channels-last map it needs no copy and runs on all intra-op threads (torchvision's CPU kernel uses
    one core and reads channel planes). Equal to ``roi_align`` up to float rounding.

    Args:
        feature: ``[B, C, H, W]`` (channels-last avoids a copy).
        boxes_xyxy_px: ``[R, 4]`` xyxy boxes in input pixels; image_idx: ``[R]`` int64 image of each.
        spatial_scale: feature cells per pixel (1 / stride).
    Returns:
        ``[R, C, S, S]``.
    """
    batch, channels, height, width = feature.shape
    table = feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view if channels-last
    return _pool_rows(table, boxes_xyxy_px * spatial_scale, image_idx * (height * width), height, width,
                      output_size, sampling_ratio)


def _pool_rows(table: Tensor, cells: Tensor, base: Tensor, height: int | Tensor, width: int | Tensor,
               output_size: int, sampling_ratio: int, weighted_sum: str = "embedding_bag") -> Tensor:
    """RoIAlign of ``[R, 4]`` xyxy boxes in feature cells from the rows of a ``[rows, C]`` table.

    Row of cell ``(y, x)`` of a RoI: ``base + y * width + x``. ``height`` / ``width`` are the map's
    sides, or ``[R]`` int64 sides (one map per RoI, the static mode's concatenated levels).
    ``weighted_sum``: ``"embedding_bag"`` (fast in PyTorch) or ``"index"``, one gather per tap (ONNX has
    no weighted ``embedding_bag``: its exporter writes a slow loop); equal up to float rounding.
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


class LevelRows(list):
    """The neck's levels (a plain list of ``[B, C, H_l, W_l]`` maps to every reader) that also holds,
    built on first use and then kept, their channel vectors as the rows of one table.

    The static RoI pooling reads every RoI from that table in one gather; wrapping the levels once per
    forward (the detector does so in static mode) lets the proposal stage and the decoder share one
    concatenation instead of building one per call.

    Attributes:
        table: ``[sum_l B * H_l * W_l, C]``: row ``starts[l] + (b * H_l + y) * W_l + x`` is the vector of
            cell ``(y, x)`` of image ``b`` on level ``l``.
        starts: first row of each level (Python ints, fixed by the shapes).
    """

    @functools.cached_property
    def table(self) -> Tensor:
        return torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in self])

    @property
    def starts(self) -> list[int]:
        starts, total = [], 0
        for f in self:
            starts.append(total)
            total += f.shape[0] * f.shape[2] * f.shape[3]
        return starts


class GatherRoIPooling(nn.Module):
    """Drop-in for :class:`~asag.modeling.blocks.RoIFeatureExtractor` built on :func:`roi_align_gather`.

    Same levels (torchvision's level mapper of the wrapped extractor), scales, output size and sampling
    ratio; the boxes are sorted by level once (one host sync, instead of one per level). Call:
    ``(features, boxes_xyxy_px [B, N, 4], image_sizes)`` -> ``[B * N, d, S, S]`` (batch-major).

    ``static`` (the detector's static mode): no host reads and fixed shapes; every RoI is pooled in one
    gather from the levels concatenated into one table (each RoI reads its own level's rows; a
    :class:`LevelRows` argument brings a table built once per forward).
    ``weighted_sum = "index"`` writes that gather as one gather per sample tap, for ONNX export.
    """

    def __init__(self, extractor: RoIFeatureExtractor, static: bool = False) -> None:
        super().__init__()
        self.static = static
        self.weighted_sum = "embedding_bag"  # static mode's formulation: "index" for ONNX (see _pool_rows)
        pooler = extractor.pooler
        self.map_levels = pooler.map_levels
        self.scales = list(pooler.scales)
        self.output_size = int(pooler.output_size[0])
        self.sampling_ratio = int(pooler.sampling_ratio)

    def forward(self, features: list[Tensor], boxes_xyxy_px: Tensor, image_sizes: Tensor) -> Tensor:
        batch, num = boxes_xyxy_px.shape[:2]
        # No gradient reaches the boxes, as with torchvision's RoIAlign.
        boxes = boxes_xyxy_px.detach().reshape(-1, 4)  # [R, 4], R = B * N, image-major
        if torch.is_autocast_enabled(boxes.device.type):  # torchvision's RoIAlign runs in fp32 under autocast
            features = [f.float() for f in features]
        images = torch.arange(batch, device=boxes.device).repeat_interleave(num)  # [R]
        if self.static:
            return self._pool_static(features, boxes, images)
        boxes = finite_or_zero(boxes)  # a diverged model's NaN box must not index out of range
        levels = self.map_levels([boxes])  # [R] int64 in 0..L-1
        order = torch.argsort(levels, stable=True)
        counts = count_per_group(levels, len(self.scales)).tolist()  # one host sync
        s = self.output_size
        out = boxes.new_empty(len(boxes), features[0].shape[1], s, s)  # [R, d, S, S]
        for level, rows in enumerate(torch.split(order, counts)):
            if len(rows):
                pooled = roi_align_gather(features[level], boxes[rows], images[rows], self.scales[level], s,
                                          self.sampling_ratio)
                out[rows] = pooled.to(out.dtype)
        return out


    def levels(self, boxes: Tensor) -> Tensor:
        """``[R]`` int64 level of each ``[R, 4]`` xyxy box: torchvision's ``LevelMapper`` formula, written
        without its constant from the host."""
        m = self.map_levels
        side = torch.sqrt(box_area(boxes))
        target = torch.floor(m.lvl0 + torch.log2(side / m.s0) + m.eps)
        return target.clamp(min=m.k_min, max=m.k_max).to(torch.int64) - m.k_min

    def _pool_static(self, features: list[Tensor], boxes: Tensor, images: Tensor) -> Tensor:
        """Static mode: ``[R, 4]`` boxes, ``[R]`` images -> ``[R, d, S, S]`` in one gather, no host reads."""
        levels = self.levels(boxes)  # [R]
        if not isinstance(features, LevelRows):
            features = LevelRows(features[:len(self.scales)])
        table, starts = features.table, features.starts  # [sum B H W, d], first row of each level
        features = features[:len(self.scales)]
        heights = constant([f.shape[2] for f in features], images)[levels]  # [R] int64
        widths = constant([f.shape[3] for f in features], images)[levels]
        base = constant(starts, images)[levels] + images * heights * widths  # [R] first row of the RoI's map
        cells = boxes * constant(self.scales, boxes)[levels][:, None]  # [R, 4] xyxy in the level's cells
        return _pool_rows(table, cells, base, heights, widths, self.output_size, self.sampling_ratio,
                          self.weighted_sum)


def _replace_extractors(module: nn.Module, replace) -> int:
    """Replace, in place, every child below ``module`` for which ``replace(child)`` returns a module;
    return how many were replaced (children that are replaced are not descended into)."""
    replaced = 0
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not None:
            setattr(module, name, new)
            replaced += 1
        else:
            replaced += _replace_extractors(child, replace)
    return replaced


def _is_fixed_ratio_extractor(module: nn.Module) -> bool:
    return isinstance(module, RoIFeatureExtractor) and module.pooler.sampling_ratio > 0


def gather_roi_pooling(module: nn.Module) -> int:
    """Replace, in place, every RoI feature extractor below ``module`` by :class:`GatherRoIPooling`."""

    def replace(child: nn.Module) -> nn.Module | None:
        if _is_fixed_ratio_extractor(child):
            return GatherRoIPooling(child)
        return child.gather if isinstance(child, DeviceRoIPooling) else None

    return _replace_extractors(module, replace)


class DeviceRoIPooling(nn.Module):
    """RoI pooling chosen per call by the features' device (``model.roi_pooling=auto``): the gather of
    :class:`GatherRoIPooling` on the CPU (where torchvision's RoIAlign backward runs on one core; about
    3x faster forward + backward), torchvision's kernels on any other device (CUDA kernels that already
    run in parallel). Both compute the same sampling; outputs agree up to float rounding. Same call and
    output as :class:`~asag.modeling.blocks.RoIFeatureExtractor`; no parameters or buffers."""

    def __init__(self, extractor: RoIFeatureExtractor) -> None:
        super().__init__()
        self.torchvision = extractor
        self.gather = GatherRoIPooling(extractor)

    def forward(self, features: list[Tensor], boxes_xyxy_px: Tensor, image_sizes: Tensor) -> Tensor:
        pooling = self.gather if features[0].device.type == "cpu" else self.torchvision
        return pooling(features, boxes_xyxy_px, image_sizes)


def device_roi_pooling(module: nn.Module) -> int:
    """Replace, in place, every RoI feature extractor below ``module`` by :class:`DeviceRoIPooling`."""
    return _replace_extractors(
        module, lambda child: DeviceRoIPooling(child) if _is_fixed_ratio_extractor(child) else None)
