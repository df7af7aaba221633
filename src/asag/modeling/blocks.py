"""Building blocks shared by the proposal stage and the decoder heads (spec section 5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asag.ops.boxes import intersection_over_foreground, xyzr_to_xyxy
from asag.ops.constants import constant

# Classification prior probability for the last classification bias (spec section 5, authors' value).
PRIOR_PROB = 0.01
# Divisors of (x, y, z, r) before the sinusoidal embedding (spec section 5, authors' values).
PE_COORD_SCALE = (1000.0, 1000.0, 1.0, 1.0)
# Temperature of the sinusoidal positional embedding (spec section 5).
PE_TEMPERATURE = 10000.0
# Guard inside the logarithm of the IoF attention bias (spec section 5, authors' value).
IOF_LOG_EPS = 1e-7
# Feature strides of P2..P5 (spec section 1).
FPN_STRIDES = (4, 8, 16, 32)


class MLP(nn.Module):
    """``num_layers`` linears (with bias), exact GELU after all but the last (spec section 5).

    Input ``[..., in_dim]`` -> output ``[..., out_dim]``. State-dict keys ``layers.{i}.*``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims_in = [in_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.gelu(x)
        return x


def branch(dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` x [Linear(dim, dim, no bias), LayerNorm(dim), GELU] (classification/regression).

    Linears sit at indices ``0, 3, 6, ...`` and LayerNorms at ``1, 4, 7, ...`` as in the official
    state dict (``cls_fcs.*``, ``reg_fcs.*``).
    """
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.GELU()]
    return nn.Sequential(*layers)


def init_prior_bias(linear: nn.Linear, prior_prob: float = PRIOR_PROB) -> None:
    """Set the bias of a classification layer to ``-log((1 - p) / p)`` (about -4.595 for p = 0.01)."""
    nn.init.constant_(linear.bias, -math.log((1.0 - prior_prob) / prior_prob))


def init_zero(linear: nn.Linear) -> None:
    """Zero weight and bias (regression layers start as the identity refinement)."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def init_xavier(module: nn.Module) -> None:
    """Xavier-uniform for every parameter with more than one dimension (official init)."""
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)


def xyzr_position_embedding(xyzr: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of ``xyzr`` (spec section 5).

    Args:
        xyzr: ``[B, N, 4]`` boxes in xyzr (stride-4 units).
        dim: embedding width, a multiple of 8; each coordinate gets ``dim / 4`` values.

    Returns:
        ``[B, N, dim]``: blocks x, y, z, r; inside a block element ``2j`` is ``sin(v / f_2j)`` and
        ``2j + 1`` is ``cos(v / f_2j+1)``, ``f_k = 10000^(2 floor(k/2) / (dim/4))``, ``v`` the
        coordinate divided by ``(1000, 1000, 1, 1)``.
    """
    num_feats = dim // 4
    scaled = xyzr / constant(PE_COORD_SCALE, xyzr)  # [B, N, 4]
    k = torch.arange(num_feats, dtype=torch.float32, device=xyzr.device)
    freqs = PE_TEMPERATURE ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)  # [F]
    angles = scaled[..., None] / freqs  # [B, N, 4, F]
    pairs = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1)  # [B, N, 4, F/2, 2]
    return pairs.flatten(2)  # [B, N, 4 * F]


def iof_attention_bias(xyzr: Tensor, tau: Tensor, block_mask: Tensor | None) -> Tensor:
    """Additive attention mask from box overlaps (spec section 5).

    Args:
        xyzr: ``[B, N, 4]`` query boxes in xyzr.
        tau: ``[num_heads]`` learned per-head scale.
        block_mask: ``[B * num_heads, N, N]`` bool, True = the query (row) may not attend to the key
            (column); batch-major (index ``b * num_heads + h``). ``None`` blocks nothing.

    Returns:
        ``[B * num_heads, N, N]`` float ``tau_h * ln(IoF + 1e-7)``, ``-inf`` where blocked.
    """
    with torch.no_grad():
        boxes = xyzr_to_xyxy(xyzr, stride=1.0)  # [B, N, 4] xyxy in stride units
        log_iof = (intersection_over_foreground(boxes, boxes) + IOF_LOG_EPS).log()  # [B, N, N]
    bias = (log_iof[:, None] * tau.view(1, -1, 1, 1)).flatten(0, 1)  # [B * H, N, N]
    if block_mask is not None:
        bias = bias.masked_fill(block_mask, float("-inf"))
    return bias


def iof_self_attention(
    attn: nn.MultiheadAttention,
    norm: nn.LayerNorm,
    content: Tensor,
    xyzr: Tensor,
    tau: Tensor,
    block_mask: Tensor | None,
) -> Tensor:
    """Self-attention with the IoF bias and the xyzr positional embedding (spec section 5).

    ``x = content + PE(xyzr)``; ``out = norm(MHA(x, x, x, bias) + x)`` (the residual includes PE).

    Args:
        attn: sequence-first ``nn.MultiheadAttention(d, num_heads)``.
        norm: ``LayerNorm(d)`` applied after the residual.
        content: ``[B, N, d]`` query content.
        xyzr: ``[B, N, 4]`` query boxes (no gradient flows into the bias or the embedding).
        tau: ``[num_heads]`` IoF scales.
        block_mask: ``[B * num_heads, N, N]`` bool or ``None`` (see :func:`iof_attention_bias`).

    Returns:
        ``[B, N, d]`` updated content.
    """
    with torch.no_grad():
        pe = xyzr_position_embedding(xyzr, content.shape[-1])  # [B, N, d]
    bias = iof_attention_bias(xyzr, tau, block_mask)  # [B * H, N, N]
    x = (content + pe).transpose(0, 1)  # [N, B, d]
    out = attn(x, x, x, attn_mask=bias, need_weights=False)[0] + x  # [N, B, d]
    return norm(out).transpose(0, 1)  # [B, N, d]
