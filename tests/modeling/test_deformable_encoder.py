"""ASAG-D deformable encoder: shapes, padding invariance, valid-cell GroupNorm, encodings, gradients."""

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from asag.modeling.deformable_encoder import (
    ENCODER_STRIDES,
    DeformableEncoder,
    MaskedGroupNorm,
    encoder_reference_points,
    sine_position_encoding,
)

CHANNELS = (16, 32, 64)  # C3, C4, C5
BACKBONE_STRIDES = (4, 8, 16, 32)  # C2..C5


def small_encoder(seed=0, **kwargs) -> DeformableEncoder:
    torch.manual_seed(seed)
    args = dict(dim=64, num_layers=2, num_heads=4, num_points=2, ffn_dim=32)
    return DeformableEncoder(CHANNELS, **{**args, **kwargs})


def backbone_maps(batch: int, canvas: tuple[int, int], seed: int = 0) -> OrderedDict:
    """Random C2..C5 for a padded batch of ``canvas`` pixels."""
    g = torch.Generator().manual_seed(seed)
    h, w = canvas
    channels = (8, *CHANNELS)
    return OrderedDict(
        (f"C{i + 2}", torch.randn(batch, c, math.ceil(h / s), math.ceil(w / s), generator=g))
        for i, (c, s) in enumerate(zip(channels, BACKBONE_STRIDES))
    )


def test_output_levels_shapes_and_zero_padding():
    encoder = small_encoder()
    sizes = torch.tensor([[128, 160], [70, 100]])
    out = encoder(backbone_maps(2, (128, 160)), sizes)
    assert [tuple(p.shape) for p in out] == [(2, 64, 16, 20), (2, 64, 8, 10), (2, 64, 4, 5), (2, 64, 2, 3)]
    assert encoder.strides == ENCODER_STRIDES
    # image 1 covers ceil(70/8) = 9 rows and ceil(100/8) = 13 columns of P3, 2 x 2 cells of P6
    assert out[0][1, :, 9:].abs().sum() == 0 and out[0][1, :, :, 13:].abs().sum() == 0
    assert out[0][1, :, 8, 12].abs().sum() > 0
    assert out[3][1, :, :, 2].abs().sum() == 0 and out[3][1, :, 1, 1].abs().sum() > 0
    assert all(torch.isfinite(p).all() for p in out)


def test_padding_does_not_change_valid_outputs():
    """Same image content, two canvases, different garbage in every padded cell."""
    encoder = small_encoder(seed=1)
    encoder.eval()
    sizes = torch.tensor([[96, 128]])
    small = backbone_maps(1, (128, 160), seed=2)
    large = backbone_maps(1, (192, 256), seed=3)  # garbage everywhere ...
    for name, s in zip(small, BACKBONE_STRIDES):
        rows, cols = math.ceil(96 / s), math.ceil(128 / s)
        small[name][..., rows:, :] = 50.0 * torch.randn_like(small[name][..., rows:, :])
        large[name][..., :rows, :cols] = small[name][..., :rows, :cols]  # ... except the image
    with torch.no_grad():
        out_small = encoder(small, sizes)
        out_large = encoder(large, sizes)
    for level, (a, b) in enumerate(zip(out_small, out_large)):
        stride = ENCODER_STRIDES[level]
        rows, cols = math.ceil(96 / stride), math.ceil(128 / stride)
        torch.testing.assert_close(a[..., :rows, :cols], b[..., :rows, :cols], atol=1e-5, rtol=1e-5)
        assert a[..., :rows, :cols].abs().max() > 0.1


def test_batch_invariance_with_a_larger_neighbour():
    encoder = small_encoder(seed=4)
    encoder.eval()
    alone = backbone_maps(1, (96, 128), seed=5)
    neighbour = backbone_maps(1, (160, 192), seed=6)
    batch = OrderedDict()
    for name in alone:
        x = torch.zeros_like(neighbour[name]).repeat(2, 1, 1, 1)
        x[0:1, :, : alone[name].shape[2], : alone[name].shape[3]] = alone[name]
        x[1:2] = neighbour[name]
        batch[name] = x
    with torch.no_grad():
        single = encoder(alone, torch.tensor([[96, 128]]))
        batched = encoder(batch, torch.tensor([[96, 128], [160, 192]]))
    for a, b in zip(single, batched):
        torch.testing.assert_close(b[0:1, :, : a.shape[2], : a.shape[3]], a, atol=1e-5, rtol=1e-5)


def test_no_image_sizes_means_the_whole_canvas():
    encoder = small_encoder()
    feats = backbone_maps(2, (64, 96))
    with torch.no_grad():
        a = encoder(feats)
        b = encoder(feats, torch.tensor([[64, 96], [64, 96]]))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_gradients_reach_every_parameter():
    encoder = small_encoder(seed=7)
    with torch.no_grad():  # zero-initialised offset/weight layers block gradients to pos at step 0
        for p in encoder.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    feats = backbone_maps(2, (128, 160), seed=8)
    out = encoder(feats, torch.tensor([[128, 160], [90, 110]]))
    sum((p * torch.randn_like(p)).sum() for p in out).backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_masked_group_norm_uses_valid_cells_only():
    norm = MaskedGroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 5)
    full = torch.ones(2, 3, 5, dtype=torch.bool)
    torch.testing.assert_close(norm(x, full), nn.GroupNorm(2, 4)(x))
    valid = torch.zeros(2, 3, 5, dtype=torch.bool)
    valid[:, :2, :3] = True
    crop = x[:, :, :2, :3]
    expected = nn.GroupNorm(2, 4)(crop)
    torch.testing.assert_close(norm(x, valid)[:, :, :2, :3], expected)
    changed = x.clone()
    changed[:, :, 2:] = 1e3
    torch.testing.assert_close(norm(changed, valid)[:, :, :2, :3], expected)


def test_sine_position_encoding_hand_computed():
    pos = sine_position_encoding(torch.tensor([[2, 4]]), (3, 4), dim=8)
    assert pos.shape == (1, 8, 3, 4)
    # y block (channels 0..3) at row 0: c = 0.5 / 2 * 2 pi = pi / 2; frequencies 1, 1, 100, 100
    torch.testing.assert_close(pos[0, :4, 0, 0], torch.tensor(
        [1.0, 0.0, math.sin(math.pi / 200), math.cos(math.pi / 200)]), atol=1e-6, rtol=0)
    # x block at column 1: c = 1.5 / 4 * 2 pi = 3 pi / 4, constant along y
    torch.testing.assert_close(pos[0, 4:6, 2, 1], torch.tensor(
        [math.sin(3 * math.pi / 4), math.cos(3 * math.pi / 4)]))
    torch.testing.assert_close(pos[0, 4:, 0], pos[0, 4:, 2])


def test_reference_points_hand_computed():
    ref = encoder_reference_points([(2, 2), (1, 1)], [8, 16])
    assert ref.shape == (5, 2, 2)
    # token (0, 1) of level 0 is at pixel (12, 4): level 0 (16 x 16 px) -> (0.75, 0.25), level 1 same
    torch.testing.assert_close(ref[1], torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    # the single level-1 token is at pixel (8, 8), the centre of both maps
    torch.testing.assert_close(ref[4], torch.full((2, 2), 0.5))


def test_rejects_wrong_input_lists():
    with pytest.raises(ValueError, match="strides"):
        DeformableEncoder((16, 32), dim=64)


def encoder_macs(shapes, c_in, dim, layers, heads, points, ffn) -> int:
    """Multiply-adds of the encoder counted by hand (batch 1)."""
    levels = len(shapes)
    tokens = sum(h * w for h, w in shapes)
    projections = sum(h * w * c * dim for (h, w), c in zip(shapes[:3], c_in))
    projections += shapes[3][0] * shapes[3][1] * c_in[-1] * dim * 9  # 3x3 stride-2 conv for P6
    per_layer = tokens * (
        2 * dim * dim  # value and output projections
        + dim * heads * levels * points * 3  # sampling offsets (x, y) and attention weights
        + dim * levels * points * 4  # bilinear sampling: 4 taps per channel and sample
        + 2 * dim * ffn  # FFN
    )
    return projections + layers * per_layer


def test_encoder_multiply_adds_match_the_hand_count():
    from asag.engine.flops import measure_flops

    encoder = small_encoder()
    feats = backbone_maps(1, (128, 160))
    with torch.no_grad():
        out, count = measure_flops(lambda: encoder(feats, torch.tensor([[128, 160]])))
    shapes = [tuple(p.shape[-2:]) for p in out]
    assert count.macs == encoder_macs(shapes, CHANNELS, 64, layers=2, heads=4, points=2, ffn=32)


def test_runs_under_bf16_autocast_close_to_float32():
    encoder = small_encoder(seed=9).eval()
    feats = backbone_maps(1, (128, 160), seed=10)
    sizes = torch.tensor([[100, 150]])
    with torch.no_grad():
        reference = encoder(feats, sizes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = encoder(feats, sizes)
    for a, b in zip(low, reference):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, atol=0.1, rtol=0.05)
