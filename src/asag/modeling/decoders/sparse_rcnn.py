"""One Sparse R-CNN decoder stage, the "ASAG-S" head (spec section 7.3).

The stage pools 7x7 RoI features for every proposal, lets the queries attend to each other (plain
self-attention, no positional embedding, no IoF bias), mixes the RoI features with query-conditioned
dynamic convolutions (``DynamicConv``), applies an FFN, and predicts class logits and Sparse R-CNN box
deltas applied to the normalised cxcywh proposals.

Parameter names follow the authors' implementation (``self_attn``, ``inst_interact.*``, ``linear1``,
``cls_module``, ``bboxes_delta``, ...), so an official ``decoder.head_series.k.*`` state dict loads by
prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from asag.modeling.blocks import branch, init_prior_bias, init_xavier, init_zero
from asag.modeling.roi_pooling import LevelTable, RoIPooling
from asag.ops.boxes import whwh
from asag.ops.constants import constant
from asag.structures import HeadOutput, ProposalOutput

# Sparse R-CNN box-delta weights (wx, wy, ww, wh) (spec 7.3, authors' values).
BOX_DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
# Upper clamp of the log-size deltas, ln(100000 / 16) (spec 7.3, authors' value).
BOX_DELTA_SCALE_CLAMP = math.log(100000.0 / 16)
# DynamicConv produces two parameter matrices per query (spec 7.3).
NUM_DYNAMIC_PARAMS = 2
# Defaults of the official model (spec 7.3).
DEFAULT_FEATMAP_STRIDES = (4, 8, 16, 32)


# ------------------------------------------------------------------------------------ pure geometry


def apply_box_deltas(
    deltas: Tensor,
    boxes_cxcywh: Tensor,
    weights: Sequence[float] = BOX_DELTA_WEIGHTS,
    scale_clamp: float = BOX_DELTA_SCALE_CLAMP,
) -> Tensor:
    """Sparse R-CNN box update on cxcywh boxes (spec 7.3, step 6).

    ``cx' = cx + dx / wx * bw``, ``cy' = cy + dy / wy * bh``, ``bw' = bw exp(min(dw / ww, clamp))``,
    ``bh' = bh exp(min(dh / wh, clamp))``.

    Args:
        deltas: ``[..., 4]`` ``(dx, dy, dw, dh)``.
        boxes_cxcywh: ``[..., 4]`` cxcywh boxes in any frame (the normalised frame in ASAG-S).
        weights: ``(wx, wy, ww, wh)`` divisors of the deltas.
        scale_clamp: upper bound of the log-size deltas.

    Returns:
        ``[..., 4]`` refined cxcywh boxes in the same frame.
    """
    scaled = deltas / constant(list(weights), deltas)
    size = boxes_cxcywh[..., 2:4]
    centre = boxes_cxcywh[..., 0:2] + scaled[..., 0:2] * size
    new_size = size * scaled[..., 2:4].clamp(max=scale_clamp).exp()
    return torch.cat([centre, new_size], dim=-1)


# ------------------------------------------------------------------------------------------ modules


class DynamicConv(nn.Module):
    """Query-conditioned mixing of RoI features (``inst_interact``, spec 7.3, step 3).

    Per query, ``dynamic_layer`` yields ``W1`` ``[d, dim_dynamic]`` and ``W2`` ``[dim_dynamic, d]``;
    RoI tokens ``[S*S, d] -> ReLU(LN(. W1)) -> ReLU(LN(. W2))``, flattened (token-major) and projected by
    ``out_layer`` to ``d``, then ``ReLU(norm3(.))``. ReLU is hard-coded by the authors here.

    Args:
        hidden_dim: content width ``d``.
        dim_dynamic: inner width of the dynamic convolution (64).
        num_tokens: RoI tokens per query, ``roi_size ** 2`` (49).
    """

    def __init__(self, hidden_dim: int, dim_dynamic: int, num_tokens: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, NUM_DYNAMIC_PARAMS * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * num_tokens, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, content: Tensor, roi_tokens: Tensor) -> Tensor:
        """``content`` ``[M, d]``, ``roi_tokens`` ``[M, S*S, d]`` -> ``[M, d]`` (M = B * N queries)."""
        params = self.dynamic_layer(content)  # [M, 2 * d * dd]
        w1 = params[:, : self.num_params].view(-1, self.hidden_dim, self.dim_dynamic)  # [M, d, dd]
        w2 = params[:, self.num_params :].view(-1, self.dim_dynamic, self.hidden_dim)  # [M, dd, d]
        x = F.relu(self.norm1(torch.bmm(roi_tokens, w1)))  # [M, S*S, dd]
        x = F.relu(self.norm2(torch.bmm(x, w2)))  # [M, S*S, d]
        x = self.out_layer(x.flatten(1))  # [M, d]
        return F.relu(self.norm3(x))


class SparseRCNNStage(nn.Module):
    """A single Sparse R-CNN decoder stage (one ASAG-S head).

    Args:
        hidden_dim: content width ``d`` (256 in the official model).
        num_classes: number of classes ``C``.
        num_heads: self-attention heads (8).
        ffn_dim: FFN hidden width (2048, hard-coded by the authors).
        dim_dynamic: DynamicConv inner width (64, hard-coded by the authors).
        roi_size: RoIAlign output side (7).
        sampling_ratio: RoIAlign samples per bin side (2).
        strides: pixel strides of the pooled levels P2..P5.
        roi_pooling: RoI pooling kind (:class:`~asag.modeling.roi_pooling.RoIPooling`).
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
        dim_dynamic: int = 64,
        roi_size: int = 7,
        sampling_ratio: int = 2,
        strides: Sequence[int] = DEFAULT_FEATMAP_STRIDES,
        num_reg_layers: int = 3,
        num_cls_layers: int = 1,
        roi_pooling: str = "torchvision",
    ) -> None:
        super().__init__()
        self.roi_extractor = RoIPooling(tuple(strides), roi_size, sampling_ratio, roi_pooling)
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0)
        self.inst_interact = DynamicConv(hidden_dim, dim_dynamic, roi_size * roi_size)
        self.linear1 = nn.Linear(hidden_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.cls_module = branch(hidden_dim, num_cls_layers)
        self.class_logits = nn.Linear(hidden_dim, num_classes)
        self.reg_module = branch(hidden_dim, num_reg_layers)
        self.bboxes_delta = nn.Linear(hidden_dim, 4)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Xavier for every >1-D parameter, prior bias, zero delta layer (spec 7.3)."""
        init_xavier(self)
        init_prior_bias(self.class_logits)
        init_zero(self.bboxes_delta)

    def pool_roi_tokens(
        self, boxes_cxcywh: Tensor, features: Sequence[Tensor], image_sizes: Tensor,
        level_table: LevelTable | None = None,
    ) -> Tensor:
        """RoI tokens ``[B*N, S*S, d]`` (row-major bins) for normalised cxcywh boxes ``[B, N, 4]``."""
        boxes_xyxy_px = box_convert(boxes_cxcywh, "cxcywh", "xyxy") * whwh(image_sizes).to(boxes_cxcywh)
        rois = self.roi_extractor(list(features), boxes_xyxy_px, image_sizes, level_table)  # [B*N, d, S, S]
        return rois.flatten(2).transpose(1, 2)  # [B*N, S*S, d]

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
            proposals: ``content`` ``[B, N, d]`` (with the head embedding already added) and
                ``prediction.boxes`` ``[B, N, 4]`` normalised cxcywh (detached here); ``xyzr`` unused.
            features: P2..P5, ``[B, d, H_l, W_l]`` of the padded batch.
            image_sizes: ``[B, 2]`` ``(h, w)`` of the unpadded images.
            attn_mask: ``[B*heads, N, N]`` bool, True = row may not attend to column, batch-major
                (``b * heads + h``); None = no mask.
            level_table: the levels as one table (fixed budgets; see :class:`RoIPooling`).

        Returns:
            :class:`HeadOutput`: logits ``[B, N, C]`` and boxes ``[B, N, 4]`` normalised cxcywh.
        """
        boxes = proposals.prediction.boxes.detach()
        batch, num, dim = proposals.content.shape
        roi_tokens = self.pool_roi_tokens(boxes, features, image_sizes, level_table)  # [B*N, S*S, d]
        x = proposals.content.transpose(0, 1)  # [N, B, d]
        x = self.norm1(x + self.self_attn(x, x, x, attn_mask=attn_mask, need_weights=False)[0])
        content = x.transpose(0, 1).reshape(batch * num, dim)  # [B*N, d]
        content = self.norm2(content + self.inst_interact(content, roi_tokens))
        content = self.norm3(content + self.linear2(F.gelu(self.linear1(content))))
        content = content.view(batch, num, dim)  # [B, N, d]
        logits = self.class_logits(self.cls_module(content))  # [B, N, C]
        deltas = self.bboxes_delta(self.reg_module(content))  # [B, N, 4]
        return HeadOutput(logits=logits, boxes=apply_box_deltas(deltas, boxes))
