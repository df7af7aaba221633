"""AdaMixer stage (ASAG-A head, spec 7.2): sampling geometry, adaptive mixing, init, official fixtures."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tests.official import (
    CASES,
    FIXTURE_MODEL,
    LEVELS,
    fpn_features,
    load,
    load_weights,
    padding_attn_mask,
)

from asag.modeling.decoders.adamixer import (
    AdaMixerStage,
    AdaptiveMixing,
    level_weights,
    make_sample_points,
    sample_features_3d,
    xyzr_box_size,
)
from asag.modeling.decoders.parallel import ParallelHeads
from asag.ops.boxes import normalized_cxcywh_from_xyzr, xyxy_to_xyzr, xyzr_to_xyxy
from asag.structures import HeadOutput, ProposalOutput

STRIDES = (4, 8, 16, 32)


def random_inputs(batch=2, num=5, dim=32, image_hw=(96, 128), seed=0):
    """Proposals with boxes inside the image, features P2..P5 of a padded batch, image sizes."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    xy = torch.rand(batch, num, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = 8 + torch.rand(batch, num, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
    xyzr = xyxy_to_xyzr(torch.cat([xy, xy + wh], dim=-1))  # [B, N, 4]
    content = torch.randn(batch, num, dim, generator=g)
    boxes = normalized_cxcywh_from_xyzr(xyzr, torch.tensor([[h, w]] * batch))
    proposals = ProposalOutput(HeadOutput(torch.zeros(batch, num, 3), boxes), content, xyzr)
    features = [torch.randn(batch, dim, h // s, w // s, generator=g) for s in STRIDES]
    return proposals, features, torch.tensor([[h, w]] * batch)


def small_stage(dim=32, **kwargs):
    args = dict(hidden_dim=dim, num_classes=3, num_heads=4, ffn_dim=64, in_points=4, out_points=6, n_groups=4)
    return AdaMixerStage(**{**args, **kwargs})


def perturb_(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------------------------------ geometry


def test_xyzr_box_size_hand_computed():
    # z = 1, r = 0.5: w = 2 * 2^-0.5 = sqrt(2), h = 2 * 2^0.5 = 2 sqrt(2) (stride-4 units)
    size = xyzr_box_size(torch.tensor([3.0, 4.0, 1.0, 0.5]))
    torch.testing.assert_close(size, torch.tensor([math.sqrt(2), 2 * math.sqrt(2)]))


def test_make_sample_points_hand_computed():
    xyzr = torch.tensor([[[10.0, 20.0, 1.0, 0.0]]])  # 2 x 2 box centred at (10, 20)
    # G = 2 groups, P = 1 point, group-major (dx, dy, dz)
    offsets = torch.tensor([[[0.5, -0.5, 0.25, 0.0, 0.0, -1.0]]])
    points = make_sample_points(offsets, xyzr, n_groups=2, n_points=1)
    assert points.shape == (1, 1, 2, 1, 3)
    torch.testing.assert_close(points[0, 0, :, 0], torch.tensor([[11.0, 19.0, 1.25], [10.0, 20.0, 0.0]]))


@settings(max_examples=60, deadline=None)
@given(
    x=st.floats(0, 300), y=st.floats(0, 300), z=st.floats(-1, 6), r=st.floats(-2, 2),
    sx=st.sampled_from([-0.5, 0.5]), sy=st.sampled_from([-0.5, 0.5]),
)
def test_half_offsets_land_on_box_corners(x, y, z, r, sx, sy):
    xyzr = torch.tensor([[[x, y, z, r]]], dtype=torch.float64)
    offsets = torch.tensor([[[0.0, 0.0, 0.0, sx, sy, 0.7]]], dtype=torch.float64)
    points = make_sample_points(offsets, xyzr, n_groups=1, n_points=2)[0, 0, 0]  # [P, 3]
    corners = xyzr_to_xyxy(xyzr, stride=1.0)[0, 0]  # xyxy in stride-4 units
    expected_x = corners[2] if sx > 0 else corners[0]
    expected_y = corners[3] if sy > 0 else corners[1]
    torch.testing.assert_close(points[0], xyzr[0, 0, :3])  # zero offset: the centre, the box level
    torch.testing.assert_close(points[1], torch.stack([expected_x, expected_y, xyzr[0, 0, 2] + 0.7]))


def test_level_weights_hand_computed():
    weights = level_weights(torch.tensor([0.0, 1.5]), num_levels=4)
    expected0 = torch.tensor([0.0, -0.5, -2.0, -4.5]).softmax(0)  # -(z - l)^2 / 2
    expected1 = torch.tensor([-1.125, -0.125, -0.125, -1.125]).softmax(0)
    torch.testing.assert_close(weights, torch.stack([expected0, expected1]))


@settings(max_examples=100, deadline=None)
@given(z=st.floats(-3, 7))
def test_level_weights_sum_to_one_and_peak_at_nearest_level(z):
    assume(abs(z - math.floor(z) - 0.5) > 1e-3)
    weights = level_weights(torch.tensor([z], dtype=torch.float64), num_levels=4)[0]
    assert abs(weights.sum().item() - 1.0) < 1e-9
    assert weights.argmax().item() == min(max(round(z), 0), 3)


def test_sampling_reads_each_groups_channels_at_its_own_points():
    # one level at stride 4, value = column index + 100 * channel: bilinear sampling (align_corners
    # False) at x cells gives x - 0.5 + 100 c
    batch, channels, groups, height, width = 1, 4, 2, 10, 12
    cols = torch.arange(width, dtype=torch.float32).expand(height, width)
    feature = torch.stack([cols + 100 * c for c in range(channels)])[None]  # [1, 4, 10, 12]
    points = torch.tensor([[[[[3.0, 2.0, 0.0]], [[7.25, 5.0, 0.0]]]]])  # [B, N, G=2, P=1, 3]
    sampled = sample_features_3d([feature], points, strides=(4,))
    assert sampled.shape == (batch, 1, groups, 1, channels // groups)
    torch.testing.assert_close(sampled[0, 0, :, 0], torch.tensor([[2.5, 102.5], [206.75, 306.75]]))


def test_sampling_blends_levels_and_is_zero_outside():
    # P2 holds 0, P3 holds 1 -> the sample equals the P3 level weight; outside the padded image: 0
    p2 = torch.zeros(1, 2, 8, 8)
    p3 = torch.ones(1, 2, 4, 4)
    points = torch.tensor([[[[[4.0, 4.0, 0.3], [100.0, 4.0, 0.3]]]]])  # [1, 1, G=1, P=2, 3]
    sampled = sample_features_3d([p2, p3], points, strides=(4, 8))[0, 0, 0]  # [P, C]
    w = level_weights(torch.tensor(0.3), 2)[1]
    torch.testing.assert_close(sampled[0], torch.stack([w, w]))
    torch.testing.assert_close(sampled[1], torch.zeros(2))


# ------------------------------------------------------------------------------------ adaptive mixing


def test_adaptive_mixing_matches_per_query_reference():
    torch.manual_seed(0)
    dim, groups, p_in, p_out = 16, 2, 3, 5
    mixing = AdaptiveMixing(dim, groups, p_in, p_out)
    torch.nn.init.normal_(mixing.parameter_generator[0].weight, std=0.3)
    sampled = torch.randn(2, 3, groups, p_in, dim // groups)
    query = torch.randn(2, 3, dim)
    out = mixing(sampled, query)
    c = dim // groups
    for b in range(2):
        for n in range(3):
            params = mixing.parameter_generator(query[b, n])
            mixed = []
            for g in range(groups):
                chunk = params[g * (c * c + p_out * p_in) : (g + 1) * (c * c + p_out * p_in)]
                mc = chunk[: c * c].view(c, c)  # in-channel x out-channel, row-major
                ms = chunk[c * c :].view(p_out, p_in)  # out-point x in-point
                x = F.gelu(F.layer_norm(sampled[b, n, g] @ mc, (p_in, c)))
                mixed.append(F.gelu(F.layer_norm(ms @ x, (p_out, c))).flatten())
            expected = query[b, n] + mixing.out_proj(torch.cat(mixed))
            torch.testing.assert_close(out[b, n], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ stage


def test_official_initialisation():
    torch.manual_seed(0)
    stage = small_stage(in_points=5)
    sm = stage.sampling_n_mixing
    offset = sm.sampling_offset_generator[0]
    assert torch.all(offset.weight == 0)
    bias = offset.bias.view(4, 5, 3)
    assert torch.all(bias[..., 2] == -1.0)
    assert bias[..., :2].abs().max() <= 0.5 and bias[..., :2].std() > 0.1
    assert torch.all(sm.adaptive_mixing.parameter_generator[0].weight == 0)
    assert sm.adaptive_mixing.parameter_generator[0].bias.abs().max() > 0  # PyTorch default kept
    torch.testing.assert_close(stage.fc_cls.bias, torch.full((3,), -math.log(99.0)))
    assert torch.all(stage.fc_reg.weight == 0) and torch.all(stage.fc_reg.bias == 0)
    assert stage.iof_tau.min() >= 0.0 and stage.iof_tau.max() <= 4.0
    assert torch.all(stage.attention.in_proj_bias == 0)
    assert stage.ffn.layers[0].weight.abs().max() <= math.sqrt(6 / (32 + 64))  # Xavier bound
    assert stage.cls_fcs[0].bias is None and len(stage.reg_fcs) == 9


def test_channel_groups_must_divide_the_width():
    with pytest.raises(ValueError):
        small_stage(n_groups=5)


def test_official_parameter_names_and_counts():
    stage = AdaMixerStage(hidden_dim=256, num_classes=80)
    count = sum(p.numel() for p in stage.parameters())
    sampling = sum(p.numel() for p in stage.sampling_n_mixing.parameters())
    assert (count, sampling) == (18_510_300, 16_909_440)  # spec Appendix A
    names = set(stage.state_dict())
    assert "sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight" in names
    assert {"reg_fcs.6.weight", "reg_fcs.7.bias", "cls_fcs.1.weight", "ffn.layers.1.bias"} <= names


def test_zero_regression_keeps_the_input_boxes():
    proposals, features, sizes = random_inputs()
    out = small_stage()(proposals, features, sizes)
    assert out.logits.shape == (2, 5, 3) and out.boxes.shape == (2, 5, 4)
    torch.testing.assert_close(out.boxes, normalized_cxcywh_from_xyzr(proposals.xyzr, sizes))


def test_gradients_reach_every_parameter_but_not_the_boxes():
    torch.manual_seed(0)
    stage = small_stage()
    perturb_(stage)
    proposals, features, sizes = random_inputs()
    proposals.content.requires_grad_(True)
    proposals.xyzr.requires_grad_(True)
    out = stage(proposals, features, sizes)
    (out.logits.sum() + out.boxes.sum()).backward()
    for name, p in stage.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert proposals.content.grad.abs().sum() > 0
    assert proposals.xyzr.grad is None


def test_batch_invariance():
    torch.manual_seed(0)
    stage = small_stage()
    perturb_(stage)
    proposals, features, sizes = random_inputs()
    batched = stage(proposals, features, sizes)
    for b in range(2):
        single = ProposalOutput(
            HeadOutput(proposals.prediction.logits[b : b + 1], proposals.prediction.boxes[b : b + 1]),
            proposals.content[b : b + 1],
            proposals.xyzr[b : b + 1],
        )
        out = stage(single, [f[b : b + 1] for f in features], sizes[b : b + 1])
        torch.testing.assert_close(out.logits[0], batched.logits[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.boxes[0], batched.boxes[b], atol=1e-6, rtol=1e-6)


def test_padded_queries_do_not_change_valid_queries():
    torch.manual_seed(0)
    stage = small_stage()
    perturb_(stage)
    proposals, features, sizes = random_inputs(batch=1, num=6)
    valid = torch.tensor([[True, True, True, True, False, False]])
    mask = padding_attn_mask(valid, num_heads=4)
    out = stage(proposals, features, sizes, mask)
    changed = ProposalOutput(proposals.prediction, proposals.content.clone(), proposals.xyzr.clone())
    changed.content[0, 4:] = torch.randn(2, 32)
    changed.xyzr[0, 4:, 2] += 1.0
    again = stage(changed, features, sizes, mask)
    torch.testing.assert_close(again.logits[0, :4], out.logits[0, :4])
    assert not torch.allclose(again.logits[0, 4:], out.logits[0, 4:])


# ------------------------------------------------------------------------- official fixtures (spec 7.2)


def official_adamixer_heads(fixtures_dir) -> ParallelHeads:
    m = FIXTURE_MODEL
    stages = [
        AdaMixerStage(
            m["hidden_dim"], m["num_classes"], 8, m["ffn_dim"], m["in_points"], m["out_points"], 4
        )
        for _ in range(m["num_decoder_heads"])
    ]
    heads = ParallelHeads(stages, m["hidden_dim"])
    official = load_weights(fixtures_dir, "asag_a", "decoder.")
    renamed = {k.replace("bbox_head.", "heads."): v for k, v in official.items()}
    renamed["head_embedding"] = renamed.pop("decoder_embedding.weight")
    heads.load_state_dict(renamed)
    return heads.eval()


@pytest.fixture(scope="module")
def features_by_case(fixtures_dir):
    return {case: fpn_features(fixtures_dir, case) for case in CASES}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("level", LEVELS)
def test_heads_match_official(fixtures_dir, features_by_case, case, level):
    ref = load(fixtures_dir, f"eval_asag_a_case_{case}_{level}.pt")
    proposals = ProposalOutput(
        HeadOutput(ref["rpn.pred_logits"], ref["rpn.pred_boxes"]), ref["rpn.query_content"], ref["rpn.xyzr"]
    )
    sizes = torch.tensor(ref["hw"])
    mask = padding_attn_mask(ref["ag.valid_mask"])
    with torch.no_grad():
        outputs = official_adamixer_heads(fixtures_dir)(proposals, features_by_case[case], sizes, mask)
    for name, out in zip(["aux_0", "main"], outputs):
        torch.testing.assert_close(out.logits, ref[f"heads.{name}.pred_logits"], atol=2e-4, rtol=0)
        torch.testing.assert_close(out.boxes, ref[f"heads.{name}.pred_boxes"], atol=1e-5, rtol=0)
