"""Multi-scale deformable attention: a slow loop reference, gradcheck, padding helpers, hand cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.modeling.deformable_attention import (
    MultiScaleDeformableAttention,
    deformable_sampling,
    flat_valid_mask,
    flatten_levels,
    level_valid_mask,
    level_valid_sizes,
    locations_from_boxes,
    locations_from_points,
    split_levels,
    valid_ratios,
)

SHAPES = [(5, 7), (3, 4), (2, 2)]


# ----------------------------------------------------------------------------- the slow reference


def bilinear_by_hand(feature: torch.Tensor, u: float, v: float) -> torch.Tensor:
    """Bilinear sample of ``feature`` ``[D, H, W]`` at level-normalised ``(u, v)``, zeros outside.

    Cell ``i`` spans ``[i, i + 1]`` with its centre at ``i + 0.5`` (grid_sample, align_corners=False).
    """
    _, height, width = feature.shape
    x, y = u * width - 0.5, v * height - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    out = torch.zeros(feature.shape[0], dtype=feature.dtype)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            row, col = y0 + dy, x0 + dx
            if 0 <= row < height and 0 <= col < width:
                out += wy * wx * feature[:, row, col]
    return out


def reference_attention(module, query, reference, value, shapes, valid):
    """Deformable attention with explicit loops over images, queries, heads, levels and points."""
    batch, num_queries, dim = query.shape
    heads, levels, points = module.num_heads, module.num_levels, module.num_points
    head_dim = dim // heads
    projected = module.value_proj(value)
    projected = torch.where(valid[..., None], projected, torch.zeros_like(projected))
    offsets = module.sampling_offsets(query)  # [B, Q, M*L*P*2], (m, l, p, xy)-major
    logits = module.attention_weights(query)  # [B, Q, M*L*P]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, num_queries, dim, dtype=query.dtype)
    for b in range(batch):
        for q in range(num_queries):
            for m in range(heads):
                head_logits = [float(logits[b, q, m * levels * points + k]) for k in range(levels * points)]
                top = max(head_logits)
                exps = [math.exp(x - top) for x in head_logits]
                acc = torch.zeros(head_dim, dtype=query.dtype)
                for lv, (h, w) in enumerate(shapes):
                    tokens = projected[b, starts[lv]:starts[lv + 1], m * head_dim:(m + 1) * head_dim]
                    feature = tokens.T.reshape(head_dim, h, w)
                    for p in range(points):
                        k = (m * levels + lv) * points + p
                        dx, dy = float(offsets[b, q, 2 * k]), float(offsets[b, q, 2 * k + 1])
                        ref = reference[b, q, lv].tolist()
                        if len(ref) == 2:
                            u, v = ref[0] + dx / w, ref[1] + dy / h
                        else:
                            u = ref[0] + dx / points * ref[2] * 0.5
                            v = ref[1] + dy / points * ref[3] * 0.5
                        weight = exps[lv * points + p] / sum(exps)
                        acc += weight * bilinear_by_hand(feature, u, v)
                out[b, q, m * head_dim:(m + 1) * head_dim] = acc
    return module.output_proj(out)


def random_case(kind: str, dtype=torch.float32, seed=0, shapes=SHAPES, batch=2, num_queries=3, dim=8):
    g = torch.Generator().manual_seed(seed)
    heads, points = 2, 3
    module = MultiScaleDeformableAttention(dim, heads, len(shapes), points).to(dtype)
    with torch.no_grad():  # non-trivial offsets and weights (the init zeroes their weights)
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    total = sum(h * w for h, w in shapes)
    query = torch.randn(batch, num_queries, dim, generator=g, dtype=dtype)
    value = torch.randn(batch, total, dim, generator=g, dtype=dtype)
    valid = torch.rand(batch, total, generator=g) > 0.2
    if kind == "points":  # some references near or beyond the borders
        reference = torch.rand(batch, num_queries, len(shapes), 2, generator=g, dtype=dtype) * 1.2 - 0.1
    else:
        centre = torch.rand(batch, num_queries, len(shapes), 2, generator=g, dtype=dtype)
        size = torch.rand(batch, num_queries, len(shapes), 2, generator=g, dtype=dtype) * 0.6 + 0.05
        reference = torch.cat([centre, size], dim=-1)
    return module, query, reference, value, valid


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_module_matches_the_slow_loop_reference(kind):
    module, query, reference, value, valid = random_case(kind)
    with torch.no_grad():
        fast = module(query, reference, value, SHAPES, valid)
        slow = reference_attention(module, query, reference, value, SHAPES, valid)
    assert fast.shape == query.shape
    assert slow.abs().max() > 0.1  # the case is not trivially zero
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_sampling_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (2, 2)]
    total = sum(h * w for h, w in shapes)
    value = torch.randn(1, total, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    # interior locations away from cell centres, where bilinear interpolation is differentiable
    locations = (torch.rand(1, 2, 2, 2, 2, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    weights = torch.rand(1, 2, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: deformable_sampling(v, shapes, loc, w), (value, locations, weights)
    )


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_module_gradcheck_float64(kind):
    shapes = [(3, 4), (2, 2)]
    module, query, reference, value, valid = random_case(kind, torch.float64, 2, shapes, 1, 2, 4)
    query = query.requires_grad_()
    value = value.requires_grad_()
    reference = reference.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, r, v: module(q, r, v, shapes, valid), (query, reference, value)
    )


def test_sample_at_a_cell_centre_between_cells_and_outside():
    feature = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # one level 2 x 2, one head, D = 1
    value = feature.reshape(1, 4, 1, 1)
    locations = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.5, 0.5], [0.5, 1.0], [1.5, 0.5]])
    locations = locations.view(1, 5, 1, 1, 1, 2)
    weights = torch.ones(1, 5, 1, 1, 1)
    out = deformable_sampling(value, [(2, 2)], locations, weights).flatten()
    # centres of cells (0, 0) and (0, 1); the middle averages all four; the bottom edge between
    # cells (1, 0) and (1, 1) is half of their mean (zero padding); outside is zero.
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 2.5, 1.75, 0.0]))


def test_attention_weights_sum_over_levels_and_points():
    # a constant value map returns the constant wherever all samples land inside the maps
    module = MultiScaleDeformableAttention(8, 2, 2, 2)
    with torch.no_grad():
        module.value_proj.weight.zero_()
        module.value_proj.bias.fill_(3.0)
        module.output_proj.weight.copy_(torch.eye(8))
        module.output_proj.bias.zero_()
        module.attention_weights.weight.normal_()
        module.sampling_offsets.bias.mul_(0.1)
    shapes = [(8, 8), (4, 4)]
    value = torch.randn(1, 80, 8)
    reference = torch.full((1, 3, 2, 2), 0.5)
    out = module(torch.randn(1, 3, 8), reference, value, shapes)
    torch.testing.assert_close(out, torch.full((1, 3, 8), 3.0))


def test_init_offsets_and_uniform_weights():
    module = MultiScaleDeformableAttention(16, num_heads=4, num_levels=2, num_points=3)
    bias = module.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y, head 2 along -x; point p at distance p + 1
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[2, 0, 0], torch.tensor([-1.0, 0.0]), atol=1e-6, rtol=0)
    assert not module.attention_weights.weight.any() and not module.attention_weights.bias.any()


def test_padded_values_are_never_attended():
    module, query, reference, value, valid = random_case("points", seed=3)
    garbage = torch.where(valid[..., None], value, value + 100.0 * torch.randn_like(value))
    with torch.no_grad():
        torch.testing.assert_close(module(query, reference, value, SHAPES, valid),
                                   module(query, reference, garbage, SHAPES, valid))


def test_point_and_box_locations_hand_computed():
    offsets = torch.tensor([2.0, -1.0]).view(1, 1, 1, 1, 1, 2)
    ref_point = torch.tensor([0.5, 0.25]).view(1, 1, 1, 2)
    loc = locations_from_points(ref_point, offsets, [(4, 8)])  # one cell = (1/8, 1/4)
    torch.testing.assert_close(loc.flatten(), torch.tensor([0.75, 0.0]))
    offsets = offsets.expand(1, 1, 1, 1, 2, 2)  # P = 2 points
    ref_box = torch.tensor([0.5, 0.5, 0.2, 0.4]).view(1, 1, 1, 4)
    loc = locations_from_boxes(ref_box, offsets)  # centre + off / 2 * wh / 2
    torch.testing.assert_close(loc[0, 0, 0, 0, 0], torch.tensor([0.6, 0.4]))


def test_valid_sizes_masks_and_ratios_hand_computed():
    sizes = torch.tensor([[100, 70], [64, 128]])  # (h, w); padded batch 128 x 128
    torch.testing.assert_close(level_valid_sizes(sizes, 32, (4, 4)), torch.tensor([[4, 3], [2, 4]]))
    torch.testing.assert_close(level_valid_sizes(sizes, 64, (2, 2)), torch.tensor([[2, 2], [1, 2]]))
    mask = level_valid_mask(sizes, 32, (4, 4))
    assert mask[0].sum() == 12 and mask[0, 3, 2] and not mask[0, 0, 3]
    assert mask[1].sum() == 8 and not mask[1, 2, 0]
    flat = flat_valid_mask(sizes, [(4, 4), (2, 2)], [32, 64])
    assert flat.shape == (2, 20) and flat[0].sum() == 12 + 4 and flat[1].sum() == 8 + 2
    ratios = valid_ratios(sizes, [(4, 4), (2, 2)], [32, 64], torch.float32)
    torch.testing.assert_close(ratios[0, 0], torch.tensor([70 / 128, 100 / 128]))
    torch.testing.assert_close(ratios[1, 1], torch.tensor([1.0, 0.5]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
       st.integers(1, 3), st.integers(1, 5))
def test_flatten_split_round_trip(shapes, batch, channels):
    maps = [torch.randn(batch, channels, h, w) for h, w in shapes]
    tokens = flatten_levels(maps)
    assert tokens.shape == (batch, sum(h * w for h, w in shapes), channels)
    for a, b in zip(split_levels(tokens, shapes), maps):
        torch.testing.assert_close(a, b)


def test_rejects_inconsistent_shapes():
    module = MultiScaleDeformableAttention(8, 2, 2, 2)
    with pytest.raises(ValueError, match="do not describe"):
        module(torch.randn(1, 3, 8), torch.rand(1, 3, 2, 2), torch.randn(1, 10, 8), [(2, 2), (2, 2)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_cuda_matches_cpu(kind):
    module, query, reference, value, valid = random_case(kind, seed=4)
    with torch.no_grad():
        cpu = module(query, reference, value, SHAPES, valid)
        gpu = module.cuda()(query.cuda(), reference.cuda(), value.cuda(), SHAPES, valid.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
