"""Sparse R-CNN stage (ASAG-S head, spec 7.3): box deltas, DynamicConv, RoI tokens, init, fixtures."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.official import CASES, FIXTURE_MODEL, LEVELS, fpn_features, load, load_weights, padding_attn_mask

from asag.modeling.decoders.parallel import ParallelHeads
from asag.modeling.decoders.sparse_rcnn import (
    BOX_DELTA_SCALE_CLAMP,
    DynamicConv,
    SparseRCNNStage,
    apply_box_deltas,
)
from asag.structures import HeadOutput, ProposalOutput

STRIDES = (4, 8, 16, 32)


def random_inputs(batch=2, num=5, dim=32, image_hw=(96, 128), seed=0):
    """Normalised cxcywh proposals inside the image, features P2..P5 of the padded batch, sizes."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    wh = 0.05 + 0.4 * torch.rand(batch, num, 2, generator=g)
    cxcy = wh / 2 + (1 - wh) * torch.rand(batch, num, 2, generator=g)
    boxes = torch.cat([cxcy, wh], dim=-1)  # [B, N, 4] normalised cxcywh
    content = torch.randn(batch, num, dim, generator=g)
    prediction = HeadOutput(torch.zeros(batch, num, 3), boxes)
    proposals = ProposalOutput(prediction, content, torch.zeros_like(boxes))
    features = [torch.randn(batch, dim, h // s, w // s, generator=g) for s in STRIDES]
    return proposals, features, torch.tensor([[h, w]] * batch)


def small_stage(dim=32):
    return SparseRCNNStage(hidden_dim=dim, num_classes=3, num_heads=4, ffn_dim=64, dim_dynamic=8)


def perturb_(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------- box deltas


def test_box_deltas_hand_computed():
    box = torch.tensor([0.5, 0.5, 0.2, 0.4])
    deltas = torch.tensor([0.2, -0.4, math.log(2.0), 0.0])
    # cx + 0.2 / 2 * 0.2, cy - 0.4 / 2 * 0.4, w * 2, h
    torch.testing.assert_close(apply_box_deltas(deltas, box), torch.tensor([0.52, 0.42, 0.4, 0.4]))


def test_box_deltas_clamp_the_size_change():
    out = apply_box_deltas(torch.tensor([0.0, 0.0, 100.0, -1.0]), torch.tensor([0.5, 0.5, 1e-4, 0.5]))
    assert abs(out[2].item() - 1e-4 * 100000 / 16) < 1e-6  # exp(min(dw, ln(100000/16)))
    assert abs(out[3].item() - 0.5 * math.exp(-1.0)) < 1e-7
    assert abs(BOX_DELTA_SCALE_CLAMP - math.log(6250.0)) < 1e-12


@settings(max_examples=100, deadline=None)
@given(
    cx=st.floats(0, 1), cy=st.floats(0, 1), w=st.floats(0.01, 1), h=st.floats(0.01, 1),
    dx=st.floats(-2, 2), dy=st.floats(-2, 2), dw=st.floats(-3, 3), dh=st.floats(-3, 3),
)
def test_box_deltas_match_the_xyxy_formulation(cx, cy, w, h, dx, dy, dw, dh):
    # Sparse R-CNN's original form: corners -> (centre, size) -> delta -> corners
    box = torch.tensor([cx, cy, w, h], dtype=torch.float64)
    deltas = torch.tensor([dx, dy, dw, dh], dtype=torch.float64)
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    width, height = x1 - x0, y1 - y0
    pcx = x0 + 0.5 * width + dx / 2 * width
    pcy = y0 + 0.5 * height + dy / 2 * height
    expected = torch.tensor([pcx, pcy, width * math.exp(dw), height * math.exp(dh)], dtype=torch.float64)
    torch.testing.assert_close(apply_box_deltas(deltas, box), expected, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(apply_box_deltas(torch.zeros_like(deltas), box), box)


# -------------------------------------------------------------------------------------- DynamicConv


def test_dynamic_conv_matches_per_query_reference():
    torch.manual_seed(0)
    dim, dd, tokens = 8, 4, 9
    conv = DynamicConv(dim, dd, tokens)
    with torch.no_grad():
        for norm in (conv.norm1, conv.norm2, conv.norm3):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    content = torch.randn(3, dim)
    roi = torch.randn(3, tokens, dim)
    out = conv(content, roi)
    for m in range(3):
        params = conv.dynamic_layer(content[m])
        w1 = params[: dim * dd].view(dim, dd)  # first d * dd values: [d, dd] row-major
        w2 = params[dim * dd :].view(dd, dim)
        x = F.relu(conv.norm1(roi[m] @ w1))
        x = F.relu(conv.norm2(x @ w2))  # [tokens, d]
        expected = F.relu(conv.norm3(conv.out_layer(x.flatten())))  # token-major flattening
        torch.testing.assert_close(out[m], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- stage


def test_roi_tokens_hold_each_channel():
    # features constant per channel (value = channel index) on every level -> every token equals that
    stage = small_stage(dim=8)
    proposals, _, sizes = random_inputs(batch=1, num=3, dim=8)
    features = [torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 96 // s, 128 // s) for s in STRIDES]
    tokens = stage.pool_roi_tokens(proposals.prediction.boxes, features, sizes)
    assert tokens.shape == (3, 49, 8)
    torch.testing.assert_close(tokens, torch.arange(8.0).expand(3, 49, 8))


def test_official_initialisation_and_names():
    torch.manual_seed(0)
    stage = small_stage()
    torch.testing.assert_close(stage.class_logits.bias, torch.full((3,), -math.log(99.0)))
    assert torch.all(stage.bboxes_delta.weight == 0) and torch.all(stage.bboxes_delta.bias == 0)
    bound = math.sqrt(6 / (32 + 2 * 32 * 8))  # Xavier bound of the dynamic layer
    w = stage.inst_interact.dynamic_layer.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(stage.self_attn.in_proj_bias == 0)
    names = set(stage.state_dict())
    assert {"inst_interact.out_layer.weight", "reg_module.7.bias", "cls_module.1.weight"} <= names
    full = SparseRCNNStage(hidden_dim=256, num_classes=80)
    total = sum(p.numel() for p in full.parameters())
    dynamic = sum(p.numel() for p in full.inst_interact.parameters())
    assert (total, dynamic) == (13_235_412, 11_634_048)  # spec Appendix A


def test_zero_deltas_keep_the_input_boxes():
    proposals, features, sizes = random_inputs()
    out = small_stage()(proposals, features, sizes)
    assert out.logits.shape == (2, 5, 3)
    torch.testing.assert_close(out.boxes, proposals.prediction.boxes)


def test_gradients_reach_every_parameter_but_not_the_boxes():
    torch.manual_seed(0)
    stage = small_stage()
    perturb_(stage)
    proposals, features, sizes = random_inputs()
    proposals.content.requires_grad_(True)
    proposals.prediction.boxes.requires_grad_(True)
    out = stage(proposals, features, sizes)
    (out.logits.sum() + out.boxes.sum()).backward()
    for name, p in stage.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert proposals.content.grad.abs().sum() > 0
    assert proposals.prediction.boxes.grad is None


def test_padded_queries_do_not_change_valid_queries():
    torch.manual_seed(0)
    stage = small_stage()
    perturb_(stage)
    proposals, features, sizes = random_inputs(batch=1, num=6)
    valid = torch.tensor([[True, True, True, True, False, False]])
    mask = padding_attn_mask(valid, num_heads=4)
    out = stage(proposals, features, sizes, mask)
    content = proposals.content.clone()
    content[0, 4:] = torch.randn(2, 32)
    again = stage(ProposalOutput(proposals.prediction, content, proposals.xyzr), features, sizes, mask)
    torch.testing.assert_close(again.logits[0, :4], out.logits[0, :4])
    assert not torch.allclose(again.logits[0, 4:], out.logits[0, 4:])
    unmasked = stage(ProposalOutput(proposals.prediction, content, proposals.xyzr), features, sizes)
    assert not torch.allclose(unmasked.logits[0, :4], out.logits[0, :4])


# ------------------------------------------------------------------------- official fixtures (spec 7.3)


def official_sparse_heads(fixtures_dir) -> ParallelHeads:
    m = FIXTURE_MODEL
    stages = [
        SparseRCNNStage(m["hidden_dim"], m["num_classes"], 8, m["ffn_dim"], m["dim_dynamic"])
        for _ in range(m["num_decoder_heads"])
    ]
    heads = ParallelHeads(stages, m["hidden_dim"])
    official = load_weights(fixtures_dir, "asag_s", "decoder.")
    renamed = {k.replace("head_series.", "heads."): v for k, v in official.items()}
    renamed["head_embedding"] = renamed.pop("decoder_embedding.weight")
    heads.load_state_dict(renamed)
    return heads.eval()


@pytest.fixture(scope="module")
def features_by_case(fixtures_dir):
    return {case: fpn_features(fixtures_dir, case) for case in CASES}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("level", LEVELS)
def test_heads_match_official(fixtures_dir, features_by_case, case, level):
    ref = load(fixtures_dir, f"eval_asag_s_case_{case}_{level}.pt")
    boxes = ref["rpn.pred_boxes"]
    proposals = ProposalOutput(
        HeadOutput(ref["rpn.pred_logits"], boxes), ref["rpn.query_content"], torch.zeros_like(boxes)
    )
    sizes = torch.tensor(ref["hw"])
    mask = padding_attn_mask(ref["ag.valid_mask"])
    with torch.no_grad():
        outputs = official_sparse_heads(fixtures_dir)(proposals, features_by_case[case], sizes, mask)
    for name, out in zip(["aux_0", "main"], outputs):
        torch.testing.assert_close(out.logits, ref[f"heads.{name}.pred_logits"], atol=2e-4, rtol=0)
        torch.testing.assert_close(out.boxes, ref[f"heads.{name}.pred_boxes"], atol=1e-5, rtol=0)
