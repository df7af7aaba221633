"""Shared blocks (spec section 5): hand-computed embedding and IoF bias values, layouts."""

from __future__ import annotations

import math

import torch
from torch import nn

from asag.modeling.blocks import (
    MLP,
    PRIOR_PROB,
    branch,
    init_prior_bias,
    init_zero,
    iof_attention_bias,
    iof_self_attention,
    xyzr_position_embedding,
)


def test_mlp_layers_and_gelu():
    mlp = MLP(3, 5, 2, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(5, 3), (5, 5), (2, 5)]
    x = torch.randn(4, 3)
    h = torch.nn.functional.gelu(mlp.layers[0](x))
    h = torch.nn.functional.gelu(mlp.layers[1](h))
    torch.testing.assert_close(mlp(x), mlp.layers[2](h))


def test_branch_indices():
    seq = branch(6, 3)
    assert list(seq.state_dict()) == [
        "0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "6.weight", "7.weight", "7.bias",
    ]  # fmt: skip
    assert seq[0].bias is None and isinstance(seq[2], nn.GELU) and seq[2].approximate == "none"


def test_inits():
    lin = nn.Linear(4, 3)
    init_prior_bias(lin)
    assert torch.allclose(lin.bias, torch.full((3,), -math.log((1 - PRIOR_PROB) / PRIOR_PROB)))
    assert abs(lin.bias[0].item() + 4.59512) < 1e-5
    init_zero(lin)
    assert (lin.weight == 0).all() and (lin.bias == 0).all()


def test_position_embedding_hand_computed():
    xyzr = torch.tensor([[[500.0, 1000.0, 0.5, -1.0]]])
    # dim 16 -> 4 values per coordinate, frequencies (1, 1, 100, 100); x, y divided by 1000
    expected = []
    for v in (0.5, 1.0, 0.5, -1.0):
        expected += [math.sin(v), math.cos(v), math.sin(v / 100), math.cos(v / 100)]
    pe = xyzr_position_embedding(xyzr, 16)
    assert pe.shape == (1, 1, 16)
    torch.testing.assert_close(pe[0, 0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_position_embedding_d256_frequencies():
    xyzr = torch.tensor([[[0.0, 0.0, 3.0, 0.0]]])
    pe = xyzr_position_embedding(xyzr, 256)
    z_block = pe[0, 0, 128:192]  # z block, 64 values
    k = torch.arange(64)
    freq = 10000.0 ** (2 * (k // 2) / 64)
    expected = torch.where(k % 2 == 0, torch.sin(3.0 / freq), torch.cos(3.0 / freq))
    torch.testing.assert_close(z_block, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pe[0, 0, :64:2], torch.zeros(32))  # sin(0)
    torch.testing.assert_close(pe[0, 0, 1:64:2], torch.ones(32))  # cos(0)


def test_iof_bias_hand_computed():
    # cells: A = (0, 0, 2, 2) -> xyzr (1, 1, 1, 0); B = (1, 1, 3, 3) -> (2, 2, 1, 0); IoF = 1/4 both ways
    xyzr = torch.tensor([[[1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0]],
                         [[1.0, 1.0, 1.0, 0.0], [11.0, 1.0, 1.0, 0.0]]])  # image 1: disjoint boxes
    tau = torch.tensor([1.0, 2.0])
    bias = iof_attention_bias(xyzr, tau, None)
    same, quarter, none = math.log(1 + 1e-7), math.log(0.25 + 1e-7), math.log(1e-7)
    img0 = torch.tensor([[same, quarter], [quarter, same]])
    img1 = torch.tensor([[same, none], [none, same]])
    expected = torch.stack([img0, 2 * img0, img1, 2 * img1])  # index b * num_heads + h
    torch.testing.assert_close(bias, expected)
    block = torch.zeros(4, 2, 2, dtype=torch.bool)
    block[2, 0, 1] = True
    masked = iof_attention_bias(xyzr, tau, block)
    assert masked[2, 0, 1] == float("-inf") and torch.isfinite(masked[3]).all()


def test_iof_self_attention_respects_mask_and_gradients():
    torch.manual_seed(0)
    attn, norm = nn.MultiheadAttention(16, 2), nn.LayerNorm(16)
    tau = nn.Parameter(torch.tensor([0.5, 1.5]))
    content = torch.randn(1, 3, 16)
    xyzr = torch.tensor([[[5.0, 5.0, 2.0, 0.0], [6.0, 5.0, 2.0, 0.3], [20.0, 9.0, 1.0, -0.2]]])
    block = torch.zeros(2, 3, 3, dtype=torch.bool)
    block[:, :2, 2] = True  # rows 0, 1 cannot see query 2
    out = iof_self_attention(attn, norm, content, xyzr, tau, block)
    changed = content.clone()
    changed[0, 2] += 5.0
    out2 = iof_self_attention(attn, norm, changed, xyzr, tau, block)
    torch.testing.assert_close(out[0, :2], out2[0, :2])
    assert not torch.allclose(out[0, 2], out2[0, 2])
    out.sum().backward()
    assert tau.grad is not None and tau.grad.abs().sum() > 0


def test_iof_self_attention_formula():
    """out = LN(MHA(x, x, x, bias) + x), x = content + PE, sequence-first."""
    torch.manual_seed(1)
    attn, norm = nn.MultiheadAttention(8, 2), nn.LayerNorm(8)
    tau = torch.tensor([1.0, 3.0])
    content = torch.randn(2, 4, 8)
    xyzr = torch.rand(2, 4, 4) * torch.tensor([50, 50, 4, 1]) + torch.tensor([0, 0, 1, -0.5])
    x = content + xyzr_position_embedding(xyzr, 8)
    bias = iof_attention_bias(xyzr, tau, None)
    ref = []
    for b in range(2):  # per image, MultiheadAttention with a per-head [H, N, N] mask
        xb = x[b : b + 1].transpose(0, 1)
        ref.append(norm(attn(xb, xb, xb, attn_mask=bias[2 * b : 2 * b + 2])[0] + xb).transpose(0, 1))
    torch.testing.assert_close(iof_self_attention(attn, norm, content, xyzr, tau, None), torch.cat(ref))
