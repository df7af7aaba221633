"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) in plain PyTorch.

One module serves the ASAG-D encoder (self-attention over the P3..P6 tokens, reference *points*) and the
ASAG-D decoder (cross-attention from the queries, reference *boxes*). Every query predicts, per head
``m``, level ``l`` and point ``p``, a 2D sampling offset and an attention weight (softmax over the
``L * P`` samples of a head); the head's output is the weighted sum of the bilinearly sampled value
vectors. Sampling uses ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``), so the module
runs on CPU and GPU without a compiled extension; a fused kernel could replace
:func:`deformable_sampling` behind the same interface.

Frames. A *level-normalised* coordinate ``(u, v)`` in ``[0, 1]^2`` covers the whole (padded) feature
map of one level: ``u W_l`` is the continuous cell coordinate, cell ``i`` spanning ``[i, i + 1]`` (its
centre at ``i + 0.5``), i.e. ``u = x_px / (s_l W_l)`` for a pixel coordinate ``x_px`` of the padded
batch and level stride ``s_l``.

Padding. Images are zero-padded bottom/right to the batch size (spec section 0). A feature cell of
level ``l`` is *valid* when it overlaps the image: ``row < ceil(h / s_l)`` and ``col < ceil(w / s_l)``
(:func:`level_valid_mask`; the nearest-neighbour down-sampled pixel mask of Deformable DETR gives the same
cells). Value vectors of invalid cells are set to zero before sampling, exactly like samples that fall
outside the map, so padded regions are never attended and a sample's result does not depend on how much
padding the batch has. Image-relative boxes are mapped to level-normalised coordinates with the
per-level *valid ratio* ``(w / (s_l W_l), h / (s_l H_l))`` computed from the image size
(:func:`valid_ratios`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asag.ops.constants import constant

# Defaults of Deformable DETR (Zhu et al. 2021, section 5 "implementation details"), kept by ASAG-D
# (spec section 16): 8 heads, 4 levels, 4 sampling points per head and level.
DEFAULT_HEADS = 8
DEFAULT_LEVELS = 4
DEFAULT_POINTS = 4
# Box-aware sampling: offsets are measured in half box sizes, ``loc = centre + off / P * wh * 0.5``
# (Deformable DETR with iterative box refinement, appendix A.4).
BOX_OFFSET_SCALE = 0.5


# ---------------------------------------------------------------------------------------- padding


def level_valid_sizes(image_sizes: Tensor, stride: int, map_hw: tuple[int, int]) -> Tensor:
    """Valid cells per image of one level: ``min(ceil((h, w) / stride), (H, W))``.

    Args:
        image_sizes: ``[B, 2]`` int ``(h, w)`` of the unpadded images (pixels).
        stride: pixel stride of the level.
        map_hw: ``(H, W)`` of the padded feature map.

    Returns:
        ``[B, 2]`` int64 ``(rows, cols)`` of valid cells (at least one each for a non-empty image).
    """
    cells = torch.div(image_sizes.long() + stride - 1, stride, rounding_mode="floor")  # [B, 2] ceil
    return torch.minimum(cells, constant(list(map_hw), cells))


def level_valid_mask(image_sizes: Tensor, stride: int, map_hw: tuple[int, int]) -> Tensor:
    """``[B, H, W]`` bool, True for the cells of one level that overlap the unpadded image."""
    valid = level_valid_sizes(image_sizes, stride, map_hw)  # [B, 2]
    rows = torch.arange(map_hw[0], device=image_sizes.device)
    cols = torch.arange(map_hw[1], device=image_sizes.device)
    row_ok = rows[None, :] < valid[:, 0:1]  # [B, H]
    col_ok = cols[None, :] < valid[:, 1:2]  # [B, W]
    return row_ok[:, :, None] & col_ok[:, None, :]


def flat_valid_mask(image_sizes: Tensor, shapes: Sequence[tuple[int, int]], strides: Sequence[int]) -> Tensor:
    """``[B, S]`` bool validity of the flattened tokens of all levels (``S = sum H_l W_l``)."""
    masks = [level_valid_mask(image_sizes, s, hw).flatten(1) for hw, s in zip(shapes, strides)]
    return torch.cat(masks, dim=1)


def valid_ratios(
    image_sizes: Tensor, shapes: Sequence[tuple[int, int]], strides: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """Image extent over padded extent per level: ``[B, L, 2]`` ``(w / (s_l W_l), h / (s_l H_l))``.

    Multiplying an image-normalised ``(x, y)`` (or box size) by row ``l`` gives level-``l``-normalised
    coordinates.
    """
    padded = constant([[w * s, h * s] for (h, w), s in zip(shapes, strides)], image_sizes,
                      dtype=dtype)  # [L, 2] (W_px, H_px)
    image_wh = image_sizes.flip(-1).to(dtype)  # [B, 2] (w, h)
    return image_wh[:, None, :] / padded[None]


# ---------------------------------------------------------------------------------------- layout


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """``[B, C, H_l, W_l]`` per level -> ``[B, S, C]`` tokens, level-major then row-major."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def split_levels(tokens: Tensor, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`flatten_levels`: ``[B, S, C]`` -> ``[B, C, H_l, W_l]`` per level."""
    chunks = tokens.split([h * w for h, w in shapes], dim=1)
    return [c.transpose(1, 2).reshape(tokens.shape[0], -1, h, w) for c, (h, w) in zip(chunks, shapes)]


# --------------------------------------------------------------------------------------- sampling


def deformable_sampling(
    value: Tensor, shapes: Sequence[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Weighted bilinear sampling of multi-scale values (the core of deformable attention).

    Args:
        value: ``[B, S, M, D]`` per-head value vectors of the flattened levels (``S = sum H_l W_l``).
        shapes: ``(H_l, W_l)`` of the ``L`` levels, in the order of ``value``.
        locations: ``[B, Q, M, L, P, 2]`` level-normalised ``(u, v)``; outside ``[0, 1]`` samples zeros.
        weights: ``[B, Q, M, L, P]`` attention weights.

    Returns:
        ``[B, Q, M * D]``: for each query and head ``sum_{l, p} weight * bilinear(value_l, location)``.
    """
    batch, _, heads, dim = value.shape
    num_queries, points = locations.shape[1], locations.shape[4]
    grids = 2.0 * locations - 1.0  # grid_sample's [-1, 1] frame, align_corners=False
    out = value.new_zeros(batch * heads, dim, num_queries)
    for level, (chunk, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        level_value = chunk.permute(0, 2, 3, 1).reshape(batch * heads, dim, h, w)  # [B*M, D, H, W]
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, points, 2)
        sampled = F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [B*M, D, Q, P]
        level_weights = weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, num_queries, points)
        out = out + (sampled * level_weights).sum(-1)  # [B*M, D, Q]
    return out.view(batch, heads, dim, num_queries).permute(0, 3, 1, 2).reshape(batch, num_queries, -1)


def locations_from_points(reference: Tensor, offsets: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
    """Sampling locations around reference points; offsets are in cells of each level.

    Args:
        reference: ``[B, Q, L, 2]`` level-normalised ``(u, v)``.
        offsets: ``[B, Q, M, L, P, 2]`` ``(dx, dy)`` in level-``l`` cells.
        shapes: ``(H_l, W_l)`` per level.

    Returns:
        ``[B, Q, M, L, P, 2]`` level-normalised locations ``reference + offset / (W_l, H_l)``.
    """
    normaliser = constant([[w, h] for h, w in shapes], offsets)  # [L, 2]
    return reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]


def locations_from_boxes(reference: Tensor, offsets: Tensor) -> Tensor:
    """Box-aware sampling locations (Deformable DETR with box refinement).

    Args:
        reference: ``[B, Q, L, 4]`` cxcywh boxes, level-normalised per level.
        offsets: ``[B, Q, M, L, P, 2]`` ``(dx, dy)``.

    Returns:
        ``[B, Q, M, L, P, 2]`` locations ``centre + offset / P * (w, h) * 0.5``.
    """
    points = offsets.shape[4]
    centre = reference[:, :, None, :, None, 0:2]
    size = reference[:, :, None, :, None, 2:4]
    return centre + offsets / points * size * BOX_OFFSET_SCALE


# ----------------------------------------------------------------------------------------- module


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention over ``L`` feature levels.

    Args:
        dim: query and value width ``d`` (divisible by ``num_heads``).
        num_heads: attention heads ``M``.
        num_levels: feature levels ``L``.
        num_points: sampling points ``P`` per head and level.

    Parameters (Deformable DETR's names): ``sampling_offsets`` (``d -> M L P 2``), ``attention_weights``
    (``d -> M L P``), ``value_proj`` and ``output_proj`` (``d -> d``).
    """

    def __init__(self, dim: int, num_heads: int = DEFAULT_HEADS, num_levels: int = DEFAULT_LEVELS,
                 num_points: int = DEFAULT_POINTS) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on ``M`` rays (head ``m`` at angle ``2 pi m / M``, the
        ray scaled so its larger coordinate is 1), point ``p`` at ``p + 1`` times the ray; uniform
        attention weights; Xavier value/output projections with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        rays = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [M, 2]
        rays = rays / rays.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32)  # [P]
        bias = rays[:, None, None, :] * scale[None, None, :, None]  # [M, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.num_levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value: Tensor,
        shapes: Sequence[tuple[int, int]],
        value_valid: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to the multi-scale ``value``.

        Args:
            query: ``[B, Q, d]`` (content plus positional embedding).
            reference: ``[B, Q, L, 2]`` level-normalised points (offsets in level cells) or
                ``[B, Q, L, 4]`` level-normalised cxcywh boxes (offsets in half box sizes).
            value: ``[B, S, d]`` flattened levels (:func:`flatten_levels`).
            shapes: ``(H_l, W_l)`` of the ``L`` levels.
            value_valid: ``[B, S]`` bool, False for padded cells (their values become zero); None =
                everything valid.

        Returns:
            ``[B, Q, d]``.
        """
        batch, num_queries, _ = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        if len(shapes) != lv or sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(f"shapes {list(shapes)} do not describe {lv} levels of {value.shape[1]} tokens")
        projected = self.value_proj(value)  # [B, S, d]
        if value_valid is not None:
            projected = projected.masked_fill(~value_valid[..., None], 0.0)
        projected = projected.view(batch, value.shape[1], m, -1)  # [B, S, M, D]
        offsets = self.sampling_offsets(query).view(batch, num_queries, m, lv, p, 2)
        weights = self.attention_weights(query).view(batch, num_queries, m, lv * p).softmax(-1)
        weights = weights.view(batch, num_queries, m, lv, p)
        if reference.shape[-1] == 2:
            locations = locations_from_points(reference, offsets, shapes)
        elif reference.shape[-1] == 4:
            locations = locations_from_boxes(reference, offsets)
        else:
            raise ValueError(f"reference must end in 2 (points) or 4 (boxes), got {tuple(reference.shape)}")
        return self.output_proj(deformable_sampling(projected, shapes, locations, weights))
