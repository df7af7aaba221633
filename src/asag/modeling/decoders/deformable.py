"""One Deformable-DETR-style decoder stage, the "ASAG-D" head (spec section 16).

The stage refines every query once: self-attention among the queries (positional query from the box,
the same block mask as the other stages), multi-scale deformable cross-attention into the encoder's
``P3..P6`` whose sampling points are placed relative to the query's proposal box (offsets scaled by the
box width and height, as in Deformable DETR with box refinement), an FFN, then the shared classification
and regression branches. The box is refined in normalised cxcywh with inverse-sigmoid deltas:
``box' = sigmoid(logit(box) + delta)``; the zero-initialised regression layer starts as the identity.

Frames: proposals and outputs are cxcywh in the normalised frame of each unpadded image; they reach the
padded feature maps through per-level valid ratios (see :mod:`asag.modeling.deformable_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from asag.modeling.blocks import MLP, branch, init_prior_bias, init_xavier, init_zero
from asag.modeling.deformable_attention import (
    DEFAULT_POINTS,
    MultiScaleDeformableAttention,
    flat_valid_mask,
    flatten_levels,
    valid_ratios,
)
from asag.modeling.deformable_encoder import ENCODER_STRIDES
from asag.modeling.roi_pooling import LevelTable
from asag.structures import HeadOutput, ProposalOutput

# Clamp of the inverse sigmoid used by the box refinement (Deformable DETR's inverse_sigmoid eps).
INVERSE_SIGMOID_EPS = 1e-5
# Sine embedding of the reference box (DAB-DETR / DINO style): coordinates in [0, 1] times 2 pi,
# temperature 10000; each of cx, cy, w, h gets a quarter of the width.
BOX_SINE_SCALE = 2.0 * torch.pi
BOX_SINE_TEMPERATURE = 10000.0
BOX_COORDS = 4
# The positional query is an MLP of the box embedding with two layers (d -> d -> d).
NUM_POS_LAYERS = 2
# FFN: d -> ffn_dim -> d (spec section 5 MLP with exact GELU).
NUM_FFN_LAYERS = 2


# ------------------------------------------------------------------------------------------- pure


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[0, 1]`` and both terms to at least ``eps``."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def refine_boxes(boxes_cxcywh: Tensor, deltas: Tensor) -> Tensor:
    """``sigmoid(inverse_sigmoid(boxes) + deltas)``: ``[..., 4]`` normalised cxcywh in and out."""
    return (inverse_sigmoid(boxes_cxcywh) + deltas).sigmoid()


def box_sine_embedding(boxes_cxcywh: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of normalised boxes.

    Args:
        boxes_cxcywh: ``[..., 4]`` normalised cxcywh.
        dim: embedding width, a multiple of 8.

    Returns:
        ``[..., dim]``: blocks cx, cy, w, h of ``dim / 4`` values; inside a block element ``2j`` is
        ``sin(2 pi v / T^(2j / (dim/4)))`` and ``2j + 1`` the cosine of the same angle.
    """
    per_coord = dim // BOX_COORDS
    k = torch.arange(per_coord, dtype=boxes_cxcywh.dtype, device=boxes_cxcywh.device)
    freqs = BOX_SINE_TEMPERATURE ** (2 * torch.div(k, 2, rounding_mode="floor") / per_coord)
    angles = boxes_cxcywh[..., None] * BOX_SINE_SCALE / freqs  # [..., 4, F]
    pairs = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1)  # [..., 4, F/2, 2]
    return pairs.flatten(-3)


def level_reference_boxes(
    boxes_cxcywh: Tensor, image_sizes: Tensor, shapes: Sequence[tuple[int, int]], strides: Sequence[int]
) -> Tensor:
    """Image-normalised boxes ``[B, N, 4]`` -> level-normalised boxes ``[B, N, L, 4]`` (cxcywh).

    Each level's padded map covers ``(s_l W_l, s_l H_l)`` pixels, the image ``(w, h)``; x and width scale
    by ``w / (s_l W_l)``, y and height by ``h / (s_l H_l)``.
    """
    ratios = valid_ratios(image_sizes, shapes, strides, boxes_cxcywh.dtype)  # [B, L, 2]
    return boxes_cxcywh[:, :, None, :] * ratios.repeat(1, 1, 2)[:, None]  # [B, N, L, 4]


# ----------------------------------------------------------------------------------------- module


class DeformableStage(nn.Module):
    """A single Deformable-DETR-style decoder stage (one ASAG-D head).

    Args:
        hidden_dim: content width ``d`` (256).
        num_classes: number of classes ``C``.
        num_heads: heads of the self- and cross-attention (8).
        ffn_dim: FFN hidden width.
        num_points: deformable sampling points per head and level (4).
        strides: pixel strides of the encoder levels P3..P6 (8, 16, 32, 64).
        dropout: dropout of the attention and FFN residuals (0).
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
        num_points: int = DEFAULT_POINTS,
        strides: Sequence[int] = ENCODER_STRIDES,
        dropout: float = 0.0,
        num_reg_layers: int = 3,
        num_cls_layers: int = 1,
    ) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.pos_head = MLP(hidden_dim, hidden_dim, hidden_dim, NUM_POS_LAYERS)
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.cross_attn = MultiScaleDeformableAttention(hidden_dim, num_heads, len(self.strides), num_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.ffn = MLP(hidden_dim, ffn_dim, hidden_dim, NUM_FFN_LAYERS)
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.cls_fcs = branch(hidden_dim, num_cls_layers)
        self.fc_cls = nn.Linear(hidden_dim, num_classes)
        self.reg_fcs = branch(hidden_dim, num_reg_layers)
        self.fc_reg = nn.Linear(hidden_dim, 4)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for >1-D parameters, prior bias, zero regression layer (as the other ASAG stages), then
        Deformable DETR's init of the cross-attention."""
        init_xavier(self)
        init_prior_bias(self.fc_cls)
        init_zero(self.fc_reg)
        self.cross_attn.reset_parameters()

    def attend(self, content: Tensor, pos: Tensor, attn_mask: Tensor | None) -> Tensor:
        """Query self-attention: ``q = k = content + pos``, ``v = content``; ``[B, N, d]`` in and out."""
        qk = (content + pos).transpose(0, 1)  # [N, B, d]
        out = self.self_attn(qk, qk, content.transpose(0, 1), attn_mask=attn_mask, need_weights=False)[0]
        return self.norm1(content + self.dropout1(out.transpose(0, 1)))

    def sample(self, content: Tensor, pos: Tensor, boxes: Tensor, features: Sequence[Tensor],
               image_sizes: Tensor) -> Tensor:
        """Box-aware deformable cross-attention into ``features``; ``[B, N, d]`` in and out."""
        shapes = [(f.shape[-2], f.shape[-1]) for f in features]
        value = flatten_levels(features)  # [B, S, d]
        valid = flat_valid_mask(image_sizes, shapes, self.strides)  # [B, S]
        reference = level_reference_boxes(boxes, image_sizes, shapes, self.strides)  # [B, N, L, 4]
        out = self.cross_attn(content + pos, reference, value, shapes, valid)
        return self.norm2(content + self.dropout2(out))

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
            features: encoder levels P3..P6, ``[B, d, H_l, W_l]`` of the padded batch.
            image_sizes: ``[B, 2]`` ``(h, w)`` of the unpadded images.
            attn_mask: ``[B*heads, N, N]`` bool, True = row may not attend to column, batch-major
                (``b * heads + h``); None = no mask.
            level_table: unused (this head samples the levels directly; RoI-pooling heads read it).

        Returns:
            :class:`HeadOutput`: logits ``[B, N, C]`` and boxes ``[B, N, 4]`` normalised cxcywh.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(features)}")
        boxes = proposals.prediction.boxes.detach()  # [B, N, 4]
        pos = self.pos_head(box_sine_embedding(boxes, proposals.content.shape[-1]))  # [B, N, d]
        content = self.attend(proposals.content, pos, attn_mask)
        content = self.sample(content, pos, boxes, features, image_sizes)
        content = self.norm3(content + self.dropout3(self.ffn(content)))
        logits = self.fc_cls(self.cls_fcs(content))  # [B, N, C]
        deltas = self.fc_reg(self.reg_fcs(content))  # [B, N, 4]
        return HeadOutput(logits=logits, boxes=refine_boxes(boxes, deltas))
