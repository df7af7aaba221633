"""The ASAG-D feature path: a Deformable-DETR-style encoder that replaces the FPN (spec section 16).

``C3, C4, C5`` of the backbone go through 1x1 projections to ``d`` channels with GroupNorm(32); a 3x3,
stride-2 convolution on ``C5`` (also GroupNorm) makes ``P6``. Each level gets a learned level embedding
plus a 2D sine positional encoding, and ``N`` encoder layers refine all tokens of the four levels with
multi-scale deformable self-attention (every token samples ``P`` points per head on every level around
its own position) followed by an FFN. The output is ``[P3, P4, P5, P6]``, ``[B, d, H/s, W/s]`` with
strides 8, 16, 32, 64: the anchor generator reads P3..P5, the proposal stage and the decoder heads all
four.

Padding (see :mod:`asag.modeling.deformable_attention`): every level has an image-size-based valid mask
(cells with ``row < ceil(h / s)``, ``col < ceil(w / s)``). Padded cells are excluded from the GroupNorm
statistics, zeroed in ``C5`` before the strided ``P6`` convolution, never attended (their values are
zeroed), and zero in the output. The sine encoding counts valid cells only and the reference points are
cell centres in pixels, so the outputs on valid cells do not depend on how far the batch is padded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asag.modeling.deformable_attention import (
    DEFAULT_HEADS,
    DEFAULT_POINTS,
    MultiScaleDeformableAttention,
    flatten_levels,
    level_valid_mask,
    level_valid_sizes,
    split_levels,
)
from asag.ops.constants import constant

# Backbone outputs read by the encoder (spec section 16: C3-C5; C2 is not used).
INPUT_NAMES = ("C3", "C4", "C5")
# Strides of the encoder levels P3, P4, P5, P6 (spec section 16).
ENCODER_STRIDES = (8, 16, 32, 64)
# GroupNorm groups of the input projections (Deformable DETR, spec section 16).
NORM_GROUPS = 32
# The extra level: 3x3 convolution with stride 2 and padding 1 on C5 (Deformable DETR).
P6_KERNEL, P6_STRIDE, P6_PADDING = 3, 2, 1
# Sine positional encoding (DETR): temperature 10000, coordinates normalised to (0, 2 pi] over the valid
# cells, measured at the cell centre (Deformable DETR's -0.5 offset).
SINE_TEMPERATURE = 10000.0
SINE_SCALE = 2.0 * torch.pi
CELL_CENTRE = 0.5
# Encoder defaults of spec section 16: 6 layers, FFN 1024, dropout 0.
DEFAULT_LAYERS = 6
DEFAULT_FFN_DIM = 1024


# ------------------------------------------------------------------------------------------ pure


def sine_position_encoding(valid_sizes: Tensor, map_hw: tuple[int, int], dim: int) -> Tensor:
    """2D sine positional encoding normalised by the valid extent of each image (DETR, normalize=True).

    Args:
        valid_sizes: ``[B, 2]`` int ``(rows, cols)`` of valid cells (:func:`level_valid_sizes`).
        map_hw: ``(H, W)`` of the padded map.
        dim: encoding width (even; ``dim / 2`` values per axis).

    Returns:
        ``[B, dim, H, W]``: channels ``0 .. dim/2 - 1`` encode ``y``, the rest ``x``; inside a block
        channel ``2j`` is ``sin(c / T^(2j / (dim/2)))`` and ``2j + 1`` is ``cos`` of the same angle, with
        ``c = (index + 0.5) / valid_count * 2 pi``.
    """
    height, width = map_hw
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=valid_sizes.device)
    freqs = SINE_TEMPERATURE ** (2 * torch.div(k, 2, rounding_mode="floor") / half)  # [half]
    counts = valid_sizes.to(torch.float32)  # [B, 2]
    rows = torch.arange(height, dtype=torch.float32, device=valid_sizes.device) + CELL_CENTRE
    cols = torch.arange(width, dtype=torch.float32, device=valid_sizes.device) + CELL_CENTRE
    y = rows[None, :] / counts[:, 0:1] * SINE_SCALE  # [B, H]
    x = cols[None, :] / counts[:, 1:2] * SINE_SCALE  # [B, W]

    def encode(coord: Tensor) -> Tensor:  # [B, n] -> [B, half, n]
        angles = coord[:, None, :] / freqs[None, :, None]  # [B, half, n]
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=2).flatten(1, 2)

    pos_y = encode(y)[:, :, :, None].expand(-1, -1, -1, width)  # [B, half, H, W]
    pos_x = encode(x)[:, :, None, :].expand(-1, -1, height, -1)  # [B, half, H, W]
    return torch.cat([pos_y, pos_x], dim=1)


def encoder_reference_points(
    shapes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | str = "cpu"
) -> Tensor:
    """Reference point of every token on every level: its cell centre, mapped through pixels.

    Token ``(i, j)`` of level ``q`` sits at pixel ``((j + 0.5) s_q, (i + 0.5) s_q)``; on level ``l`` that
    is the level-normalised ``x_px / (s_l W_l)``, ``y_px / (s_l H_l)``.

    Returns:
        ``[S, L, 2]`` ``(u, v)``, tokens in :func:`flatten_levels` order.
    """
    centres = []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, dtype=torch.float32, device=device) + CELL_CENTRE) * s
        xs = (torch.arange(w, dtype=torch.float32, device=device) + CELL_CENTRE) * s
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))  # [h*w, 2] pixels
    pixels = torch.cat(centres)  # [S, 2]
    extent = constant([[w * s, h * s] for (h, w), s in zip(shapes, strides)], pixels)  # [L, 2]
    return pixels[:, None, :] / extent[None]


# --------------------------------------------------------------------------------------- modules


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics use the valid (non-padded) cells only.

    Same parameters as ``nn.GroupNorm``; with an all-valid mask (or ``None``) the result is the same.
    Input ``[B, C, H, W]`` and mask ``[B, H, W]`` bool (True = valid) -> ``[B, C, H, W]``.
    """

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if valid is None:
            return super().forward(x)
        dtype, x = x.dtype, x.float()  # statistics in float32, also under autocast
        batch, channels, height, width = x.shape
        groups = x.view(batch, self.num_groups, -1, height * width)  # [B, G, C/G, HW]
        weight = valid.view(batch, 1, 1, height * width).to(x.dtype)  # [B, 1, 1, HW]
        count = weight.sum(dim=(2, 3), keepdim=True) * groups.shape[2]  # [B, 1, 1, 1]
        mean = (groups * weight).sum(dim=(2, 3), keepdim=True) / count
        var = ((groups - mean) ** 2 * weight).sum(dim=(2, 3), keepdim=True) / count
        normed = ((groups - mean) * (var + self.eps).rsqrt()).view(batch, channels, height, width)
        return (normed * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(dtype)


class InputProjection(nn.Module):
    """Convolution to ``d`` channels followed by a valid-cell GroupNorm (one encoder input level).

    Input ``[B, C_in, H, W]`` backbone map; output ``[B, d, H', W']`` and its ``[B, H', W']`` valid mask.
    """

    def __init__(self, in_channels: int, dim: int, stride: int, kernel_size: int = 1, conv_stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, dim, kernel_size, stride=conv_stride, padding=padding)
        self.norm = MaskedGroupNorm(NORM_GROUPS, dim)

    def forward(self, x: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv(x)
        valid = level_valid_mask(image_sizes, self.stride, (y.shape[-2], y.shape[-1]))  # [B, H', W']
        return self.norm(y, valid), valid


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all tokens, then an FFN; post-norm residuals (Deformable DETR).

    ``forward(src [B, S, d], pos [B, S, d], reference [B, S, L, 2], shapes, valid [B, S]) -> [B, S, d]``.
    The FFN uses exact GELU, the release's ``--activation`` default (spec section 5).
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: Sequence[tuple[int, int]],
                valid: Tensor) -> Tensor:
        attended = self.self_attn(src + pos, reference, src, shapes, valid)  # [B, S, d]
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.gelu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """C3..C5 -> ``[P3, P4, P5, P6]`` refined by a multi-scale deformable encoder (spec section 16).

    Args:
        in_channels: channels of ``C3, C4, C5`` (e.g. 512, 1024, 2048 for ResNet-50).
        dim: output width ``d`` (256).
        num_layers: encoder layers (6).
        num_heads: attention heads (8).
        num_points: sampling points per head and level (4).
        ffn_dim: FFN hidden width (1024).
        dropout: dropout of the attention and FFN residuals (0).
        strides: pixel strides of the output levels (8, 16, 32, 64; P6 must be the C5 stride times 2).

    ``forward(features, image_sizes)``: ``features`` the backbone's ``OrderedDict`` ``C2..C5``
    (``[B, C_l, Hp/s, Wp/s]``, C2 unused); ``image_sizes`` ``[B, 2]`` ``(h, w)`` of the unpadded images
    (None: the whole padded batch is image). Returns ``[P3, P4, P5, P6]`` of ``[B, d, H_l, W_l]``, zero on
    padded cells.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        dim: int = 256,
        num_layers: int = DEFAULT_LAYERS,
        num_heads: int = DEFAULT_HEADS,
        num_points: int = DEFAULT_POINTS,
        ffn_dim: int = DEFAULT_FFN_DIM,
        dropout: float = 0.0,
        strides: Sequence[int] = ENCODER_STRIDES,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(INPUT_NAMES) or len(strides) != len(INPUT_NAMES) + 1:
            raise ValueError(f"need channels of {INPUT_NAMES} and {len(INPUT_NAMES) + 1} strides")
        self.out_channels = dim
        self.strides = tuple(strides)
        projections = [InputProjection(c, dim, s) for c, s in zip(in_channels, strides)]
        p6 = InputProjection(in_channels[-1], dim, strides[-1], P6_KERNEL, P6_STRIDE, P6_PADDING)
        projections.append(p6)
        self.input_proj = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.empty(len(strides), dim))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, num_heads, len(strides), num_points, ffn_dim, dropout)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: Xavier for >1-D weights, zero conv biases, GroupNorm (1, 0), normal
        level embeddings, then each attention module's own init."""
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for proj in self.input_proj:
            nn.init.zeros_(proj.conv.bias)
            proj.norm.reset_parameters()
        nn.init.normal_(self.level_embed)
        for layer in self.layers:
            layer.self_attn.reset_parameters()

    def project(
        self, features: Mapping[str, Tensor], image_sizes: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Input projections: ``[P3, P4, P5, P6]`` before the encoder and their ``[B, H, W]`` valid masks."""
        inputs = [features[name] for name in INPUT_NAMES]
        maps, masks = [], []
        for proj, x in zip(self.input_proj[:-1], inputs):
            level, valid = proj(x, image_sizes)
            maps.append(level)
            masks.append(valid)
        c5 = inputs[-1]
        c5_valid = level_valid_mask(image_sizes, self.strides[-2], (c5.shape[-2], c5.shape[-1]))  # [B, H, W]
        p6, p6_valid = self.input_proj[-1](c5 * c5_valid[:, None].to(c5), image_sizes)
        return maps + [p6], masks + [p6_valid]

    def positions(self, image_sizes: Tensor, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Sine encoding plus level embedding, ``[B, d, H_l, W_l]`` per level."""
        out = []
        for level, (hw, s) in enumerate(zip(shapes, self.strides)):
            sine = sine_position_encoding(level_valid_sizes(image_sizes, s, hw), hw, self.out_channels)
            out.append(sine + self.level_embed[level][None, :, None, None])
        return out

    def forward(self, features: Mapping[str, Tensor], image_sizes: Tensor | None = None) -> list[Tensor]:
        c3 = features[INPUT_NAMES[0]]
        if image_sizes is None:
            padded = [c3.shape[-2] * self.strides[0], c3.shape[-1] * self.strides[0]]
            image_sizes = torch.tensor([padded] * c3.shape[0], device=c3.device)
        maps, masks = self.project(features, image_sizes)
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        src = flatten_levels(maps)  # [B, S, d]
        pos = flatten_levels(self.positions(image_sizes, shapes)).to(src)  # [B, S, d]
        valid = torch.cat([m.flatten(1) for m in masks], dim=1)  # [B, S]
        # float32 even under fp16 autocast: sampling positions on large maps need the precision
        reference = encoder_reference_points(shapes, self.strides, src.device)  # [S, L, 2]
        reference = reference[None].expand(src.shape[0], -1, -1, -1)  # [B, S, L, 2]
        for layer in self.layers:
            src = layer(src, pos, reference, shapes, valid)
        return split_levels(src.masked_fill(~valid[..., None], 0.0), shapes)
