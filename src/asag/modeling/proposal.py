"""The dynamic proposal stage (the authors' "RPN" ``RelationBlock``, spec section 6).

Each query box pools a RoI feature from P2..P5, becomes a content vector, exchanges information with
the other queries through IoF-biased self-attention, passes an FFN and predicts class logits and an
xyzr refinement. The refined boxes are the proposals handed to the decoder heads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from asag.modeling.blocks import (
    FPN_STRIDES,
    MLP,
    branch,
    init_prior_bias,
    init_xavier,
    init_zero,
    iof_self_attention,
)
from asag.modeling.roi_pooling import LevelTable, RoIPooling
from asag.ops.boxes import normalized_cxcywh_from_xyzr, refine_xyzr, xyxy_to_xyzr
from asag.structures import HeadOutput, ProposalOutput, QuerySet

# Depth of the classification / regression branches (spec section 5).
NUM_CLS_LAYERS = 1
NUM_REG_LAYERS = 3
# Number of MLP layers of the FFN (spec section 6: d -> ffn_dim -> d).
NUM_FFN_LAYERS = 2
# tau of the IoF bias is initialised U(0, 4) (spec section 6, authors' init).
IOF_TAU_INIT_MAX = 4.0


class ProposalStage(nn.Module):
    """RoIAlign -> Linear -> IoF self-attention -> FFN -> class logits and refined boxes.

    Submodule names follow the authors' state dict (``rpn.*``).

    Args:
        hidden_dim: content width ``d`` (256).
        num_classes: ``C`` (80 for COCO).
        num_heads: self-attention heads (8).
        ffn_dim: FFN hidden width (2048, hard-coded by the authors).
        roi_size: RoIAlign output side (7).
        sampling_ratio: RoIAlign sampling ratio (2).
        strides: strides of the input feature levels P2..P5.
        roi_pooling: RoI pooling kind (:class:`~asag.modeling.roi_pooling.RoIPooling`).
    """

    def __init__(
        self,
        hidden_dim: int,
        num_classes: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        roi_size: int = 7,
        sampling_ratio: int = 2,
        strides: tuple[int, ...] = FPN_STRIDES,
        roi_pooling: str = "torchvision",
    ):
        super().__init__()
        self.xyzr_stride = float(strides[0])
        self.roi_align = RoIPooling(strides, roi_size, sampling_ratio, roi_pooling)
        self.roi = nn.Linear(hidden_dim * roi_size * roi_size, hidden_dim)
        self.tokens_norm1 = nn.LayerNorm(hidden_dim)
        self.tokens_proj = MLP(hidden_dim, ffn_dim, hidden_dim, NUM_FFN_LAYERS)
        self.tokens_norm2 = nn.LayerNorm(hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads)
        self.iof_tau = nn.Parameter(torch.ones(num_heads))
        self.tokens_norm3 = nn.LayerNorm(hidden_dim)
        self.cls_fcs = branch(hidden_dim, NUM_CLS_LAYERS)
        self.fc_cls = nn.Linear(hidden_dim, num_classes)
        self.reg_fcs = branch(hidden_dim, NUM_REG_LAYERS)
        self.fc_reg = nn.Linear(hidden_dim, 4)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Authors' init: Xavier for >1-D parameters, prior bias, zero regression, tau ~ U(0, 4)."""
        init_xavier(self)
        init_prior_bias(self.fc_cls)
        init_zero(self.fc_reg)
        nn.init.uniform_(self.iof_tau, 0.0, IOF_TAU_INIT_MAX)

    def forward(self, queries: QuerySet, features: list[Tensor], image_sizes: Tensor,
                level_table: LevelTable | None = None) -> ProposalOutput:
        """Run the proposal stage.

        Args:
            queries: ``boxes`` ``[B, L, 4]`` pixel cxcywh and ``attn_mask`` ``[B * num_heads, L, L]``.
            features: P2..P5, ``[B, d, H_l, W_l]`` each.
            image_sizes: ``[B, 2]`` ``(h, w)`` of the resized, unpadded images.
            level_table: the levels as one table (fixed budgets; see :class:`RoIPooling`).

        Returns:
            :class:`ProposalOutput`: logits ``[B, L, C]``, proposals ``[B, L, 4]`` normalised cxcywh
            (with gradient), content ``[B, L, d]``, detached refined xyzr ``[B, L, 4]``.
        """
        batch, length = queries.boxes.shape[:2]
        boxes_xyxy_px = box_convert(queries.boxes.detach(), "cxcywh", "xyxy")  # [B, L, 4]
        pooled = self.roi_align(features, boxes_xyxy_px, image_sizes, level_table)  # [B * L, d, S, S]
        content = self.tokens_norm1(self.roi(pooled.reshape(batch, length, -1)))  # [B, L, d]
        xyzr = xyxy_to_xyzr(boxes_xyxy_px, self.xyzr_stride)  # [B, L, 4]
        content = iof_self_attention(
            self.attn, self.tokens_norm3, content, xyzr, self.iof_tau, queries.attn_mask
        )
        content = self.tokens_norm2(content + self.tokens_proj(content))
        logits = self.fc_cls(self.cls_fcs(content))  # [B, L, C]
        xyzr = refine_xyzr(xyzr, self.fc_reg(self.reg_fcs(content)))  # [B, L, 4]
        boxes = normalized_cxcywh_from_xyzr(xyzr, image_sizes, self.xyzr_stride)  # [B, L, 4]
        return ProposalOutput(prediction=HeadOutput(logits, boxes), content=content, xyzr=xyzr.detach())
