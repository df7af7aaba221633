"""One AdaMixer decoder stage, the "ASAG-A" head (spec section 7.2).

The stage refines every query with four steps: IoF-biased self-attention, adaptive 3D sampling of the
P2..P5 features around the query's box, adaptive (query-conditioned) channel and point mixing of the
sampled features, and an FFN; then the shared classification / regression branches predict class
logits and ``xyzr`` deltas.

Parameter names follow the authors' implementation (``attention``, ``sampling_n_mixing.*``, ``cls_fcs``,
``fc_reg``, ...), so an official ``decoder.bbox_head.k.*`` state dict loads by prefix.

Frames: ``xyzr`` is in stride-4 units (spec section 5); sampled positions are turned into pixels of the
padded batch by multiplying by 4; the boxes the stage returns are cxcywh in the normalised frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asag.modeling.blocks import MLP, branch, init_prior_bias, init_xavier, init_zero, iof_self_attention
from asag.modeling.roi_pooling import LevelTable
from asag.ops.boxes import XYZR_STRIDE, normalized_cxcywh_from_xyzr, refine_xyzr
from asag.ops.constants import constant
from asag.structures import HeadOutput, ProposalOutput

# Temperature of the level weights softmax(-(z - l)^2 / tau) over P2..P5 (spec 7.2, authors' tau = 2).
LEVEL_WEIGHT_TAU = 2.0
# Initial sampling-offset bias: dx, dy ~ U(-0.5, 0.5) box sizes, dz = -1 level (spec 7.2 init).
OFFSET_XY_INIT_BOUND = 0.5
OFFSET_Z_INIT = -1.0
# Per-head IoF temperatures are initialised U(0, 4) (spec section 5).
IOF_TAU_INIT_MAX = 4.0
# Each sampling point has three offsets (dx, dy, dz) (spec 7.2).
OFFSETS_PER_POINT = 3
# Defaults of the official model (spec 7.2).
DEFAULT_FEATMAP_STRIDES = (4, 8, 16, 32)


# ------------------------------------------------------------------------------------ pure geometry


def xyzr_box_size(xyzr: Tensor) -> Tensor:
    """Box ``(w, h)`` ``[..., 2]`` = ``(2^z 2^-r, 2^z 2^r)`` in stride-4 units from ``xyzr`` ``[..., 4]``."""
    scale = 2.0 ** xyzr[..., 2:3]
    ratio = 2.0 ** torch.cat([-xyzr[..., 3:4], xyzr[..., 3:4]], dim=-1)
    return scale * ratio


def make_sample_points(offsets: Tensor, xyzr: Tensor, n_groups: int, n_points: int) -> Tensor:
    """Turn predicted offsets into 3D sampling points around each query box (spec 7.2, step 2).

    Args:
        offsets: ``[B, N, G * P * 3]`` group-major ``(dx, dy, dz)``: dx, dy in box widths / heights,
            dz in levels.
        xyzr: ``[B, N, 4]`` query boxes, stride-4 units.
        n_groups: ``G``, channel groups.
        n_points: ``P``, sampling points per group.

    Returns:
        ``[B, N, G, P, 3]``: ``x, y`` in stride-4 units and the level coordinate ``z``.
    """
    batch, num = offsets.shape[:2]
    offsets = offsets.view(batch, num, n_groups, n_points, OFFSETS_PER_POINT)  # [B, N, G, P, 3]
    size = xyzr_box_size(xyzr)[:, :, None, None, :]  # [B, N, 1, 1, 2]
    xy = xyzr[:, :, None, None, 0:2] + offsets[..., 0:2] * size  # [B, N, G, P, 2]
    z = xyzr[:, :, None, None, 2:3] + offsets[..., 2:3]  # [B, N, G, P, 1]
    return torch.cat([xy, z], dim=-1)


def level_weights(z: Tensor, num_levels: int, tau: float = LEVEL_WEIGHT_TAU) -> Tensor:
    """Soft level assignment ``softmax_l(-(z - l)^2 / tau)``, l = 0 .. num_levels - 1 (P2 = 0).

    Args:
        z: ``[...]`` level coordinate (log2 of the box scale in stride-4 units).

    Returns:
        ``[..., num_levels]`` weights summing to one.
    """
    grid = torch.arange(num_levels, dtype=z.dtype, device=z.device)
    logits = -((z[..., None] - grid) ** 2) / tau
    return logits.softmax(dim=-1)


def sample_features_3d(
    features: Sequence[Tensor], points: Tensor, strides: Sequence[int], tau: float = LEVEL_WEIGHT_TAU
) -> Tensor:
    """Bilinear sampling of each channel group at its own points, blended over levels (spec 7.2).

    Args:
        features: ``[B, C, H_l, W_l]`` per level (P2..P5 of the padded batch); group g reads channels
            ``g C/G .. (g+1) C/G - 1``.
        points: ``[B, N, G, P, 3]`` from :func:`make_sample_points` (stride-4 units).
        strides: pixel stride of every level.
        tau: level-weight temperature.

    Returns:
        ``[B, N, G, P, C / G]`` sampled features (zeros outside the padded image).
    """
    batch, num, groups, n_points, _ = points.shape
    weights = level_weights(points[..., 2], len(features), tau)  # [B, N, G, P, L]
    weights = weights.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*G, N, P, L]
    xy_px = (points[..., 0:2] * XYZR_STRIDE).permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*G, N, P, 2]
    out = None
    for level, (feature, stride) in enumerate(zip(features, strides)):
        _, channels, height, width = feature.shape
        padded_size = constant([width * stride, height * stride], xy_px)
        grid = xy_px / padded_size * 2.0 - 1.0  # [-1, 1] over the padded image
        grouped = feature.reshape(batch * groups, channels // groups, height, width)  # [B*G, C/G, H, W]
        sampled = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled * weights[..., level].unsqueeze(1)  # [B*G, C/G, N, P]
        out = sampled if out is None else out + sampled
    out = out.view(batch, groups, -1, num, n_points)  # [B, G, C/G, N, P]
    return out.permute(0, 3, 1, 4, 2)  # [B, N, G, P, C/G]


# ------------------------------------------------------------------------------------------ modules


class AdaptiveMixing(nn.Module):
    """Query-conditioned channel mixing then point mixing of sampled features (spec 7.2, step 3).

    For every query and group, ``parameter_generator`` produces ``Mc`` ``[C/G, C/G]`` (in x out
    channels) and ``Ms`` ``[P_out, P_in]``; ``X -> GELU(LN(X Mc)) -> GELU(LN(Ms X))`` with LayerNorms over
    the whole per-group slice (no affine); the groups are flattened (group, point, channel order) and
    projected back to ``query_dim`` by ``out_proj``; the result is added to the query.

    Args:
        query_dim: content width ``d``.
        n_groups: channel groups ``G``.
        in_points: sampled points per group ``P_in``.
        out_points: mixed points per group ``P_out``.
    """

    def __init__(self, query_dim: int, n_groups: int, in_points: int, out_points: int) -> None:
        super().__init__()
        self.n_groups = n_groups
        self.in_points = in_points
        self.out_points = out_points
        self.channels = query_dim // n_groups
        self.channel_params = self.channels * self.channels
        self.point_params = out_points * in_points
        total = n_groups * (self.channel_params + self.point_params)
        self.parameter_generator = nn.Sequential(nn.Linear(query_dim, total))
        self.out_proj = nn.Linear(n_groups * out_points * self.channels, query_dim)

    def reset_parameters(self) -> None:
        """Zero generator weight (spec 7.2; its bias keeps PyTorch's default), Xavier ``out_proj``."""
        nn.init.zeros_(self.parameter_generator[0].weight)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def forward(self, sampled: Tensor, query: Tensor) -> Tensor:
        """``sampled`` ``[B, N, G, P_in, C/G]``, ``query`` ``[B, N, d]`` -> ``[B, N, d]`` (query + mixed)."""
        batch, num = query.shape[:2]
        x = sampled.reshape(batch * num, self.n_groups, self.in_points, self.channels)  # [BN, G, P, c]
        params = self.parameter_generator(query).reshape(batch * num, self.n_groups, -1)  # [BN, G, *]
        mc, ms = params.split([self.channel_params, self.point_params], dim=-1)
        mc = mc.reshape(batch * num, self.n_groups, self.channels, self.channels)  # [BN, G, c, c]
        ms = ms.reshape(batch * num, self.n_groups, self.out_points, self.in_points)  # [BN, G, Po, P]
        x = torch.matmul(x, mc)  # [BN, G, P, c]
        x = F.gelu(F.layer_norm(x, x.shape[-2:]))
        x = torch.matmul(ms, x)  # [BN, G, Po, c]
        x = F.gelu(F.layer_norm(x, x.shape[-2:]))
        x = x.reshape(batch, num, -1)  # [B, N, G*Po*c]
        return query + self.out_proj(x)


class SamplingMixing(nn.Module):
    """Adaptive 3D sampling followed by adaptive mixing and a LayerNorm (spec 7.2, steps 2-3).

    Args:
        query_dim: content width ``d``.
        n_groups: channel groups ``G`` (``d`` must be divisible by ``G``).
        in_points: sampling points per group.
        out_points: mixed points per group.
        strides: pixel strides of the sampled levels (P2..P5).
    """

    def __init__(
        self,
        query_dim: int,
        n_groups: int,
        in_points: int,
        out_points: int,
        strides: Sequence[int] = DEFAULT_FEATMAP_STRIDES,
    ) -> None:
        super().__init__()
        if query_dim % n_groups:
            raise ValueError(f"query_dim {query_dim} is not divisible by n_groups {n_groups}")
        self.n_groups = n_groups
        self.in_points = in_points
        self.strides = tuple(strides)
        num_offsets = n_groups * in_points * OFFSETS_PER_POINT
        self.sampling_offset_generator = nn.Sequential(nn.Linear(query_dim, num_offsets))
        self.norm = nn.LayerNorm(query_dim)
        self.adaptive_mixing = AdaptiveMixing(query_dim, n_groups, in_points, out_points)

    def reset_parameters(self) -> None:
        """Zero offset weight; bias dx, dy ~ U(-0.5, 0.5), dz = -1 (spec 7.2); mixing init."""
        linear = self.sampling_offset_generator[0]
        nn.init.zeros_(linear.weight)
        with torch.no_grad():
            bias = linear.bias.view(self.n_groups, self.in_points, OFFSETS_PER_POINT)
            bias[..., 0:2].uniform_(-OFFSET_XY_INIT_BOUND, OFFSET_XY_INIT_BOUND)
            bias[..., 2].fill_(OFFSET_Z_INIT)
        self.adaptive_mixing.reset_parameters()

    def forward(self, query: Tensor, xyzr: Tensor, features: Sequence[Tensor]) -> Tensor:
        """``query`` ``[B, N, d]``, ``xyzr`` ``[B, N, 4]`` (stride-4 units), P2..P5 -> ``[B, N, d]``."""
        offsets = self.sampling_offset_generator(query)  # [B, N, G*P*3]
        points = make_sample_points(offsets, xyzr, self.n_groups, self.in_points)  # [B, N, G, P, 3]
        sampled = sample_features_3d(features, points, self.strides)  # [B, N, G, P, C/G]
        return self.norm(self.adaptive_mixing(sampled, query))


class AdaMixerStage(nn.Module):
    """A single AdaMixer decoder stage (one ASAG-A head).

    Args:
        hidden_dim: content width ``d`` (256 in the official model).
        num_classes: number of classes ``C``.
        num_heads: attention heads (8, spec 7.2; the IoF bias has one temperature per head).
        ffn_dim: FFN hidden width (2048, hard-coded by the authors).
        in_points: sampling points per group (32, spec 7.2).
        out_points: mixed points per group (128, spec 7.2).
        n_groups: channel groups (4, spec 7.2).
        strides: pixel strides of the feature levels P2..P5.
        num_reg_layers: depth of the regression branch (3, spec section 5).
        num_cls_layers: depth of the classification branch (1, spec section 5).

    ``forward(proposals, features, image_sizes, attn_mask, level_table) -> HeadOutput``: see :meth:`forward`.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_classes: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        in_points: int = 32,
        out_points: int = 128,
        n_groups: int = 4,
        strides: Sequence[int] = DEFAULT_FEATMAP_STRIDES,
        num_reg_layers: int = 3,
        num_cls_layers: int = 1,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0)
        self.attention_norm = nn.LayerNorm(hidden_dim)
        self.sampling_n_mixing = SamplingMixing(hidden_dim, n_groups, in_points, out_points, strides)
        self.ffn = MLP(hidden_dim, ffn_dim, hidden_dim, 2)
        self.ffn_norm = nn.LayerNorm(hidden_dim)
        self.cls_fcs = branch(hidden_dim, num_cls_layers)
        self.fc_cls = nn.Linear(hidden_dim, num_classes)
        self.reg_fcs = branch(hidden_dim, num_reg_layers)
        self.fc_reg = nn.Linear(hidden_dim, 4)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Xavier for every >1-D parameter, prior bias, zero regression, tau ~ U(0, 4)."""
        init_xavier(self)
        init_prior_bias(self.fc_cls)
        init_zero(self.fc_reg)
        nn.init.uniform_(self.iof_tau, 0.0, IOF_TAU_INIT_MAX)
        self.sampling_n_mixing.reset_parameters()

    def forward(
        self,
        proposals: ProposalOutput,
        features: Sequence[Tensor],
        image_sizes: Tensor,
        attn_mask: Tensor | None = None,
        level_table: LevelTable | None = None,
    ) -> HeadOutput:
        """Refine the proposals once.

        Args:
            proposals: ``content`` ``[B, N, d]`` (with the head embedding already added) and ``xyzr``
                ``[B, N, 4]`` stride-4 units (detached here); ``prediction`` is not used.
            features: P2..P5, ``[B, d, H_l, W_l]`` of the padded batch.
            image_sizes: ``[B, 2]`` ``(h, w)`` of the unpadded images.
            attn_mask: ``[B*heads, N, N]`` bool, True = row may not attend to column, batch-major
                (``b * heads + h``); None = no mask.
            level_table: unused (this head samples the levels directly; RoI-pooling heads read it).

        Returns:
            :class:`HeadOutput`: logits ``[B, N, C]`` and boxes ``[B, N, 4]`` normalised cxcywh.
        """
        xyzr = proposals.xyzr.detach()
        content = iof_self_attention(
            self.attention, self.attention_norm, proposals.content, xyzr, self.iof_tau, attn_mask
        )
        content = self.sampling_n_mixing(content, xyzr, features)
        content = self.ffn_norm(content + self.ffn(content))
        logits = self.fc_cls(self.cls_fcs(content))  # [B, N, C]
        deltas = self.fc_reg(self.reg_fcs(content))  # [B, N, 4]
        boxes = normalized_cxcywh_from_xyzr(refine_xyzr(xyzr, deltas), image_sizes)
        return HeadOutput(logits=logits, boxes=boxes)
