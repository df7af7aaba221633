"""Proposal stage (spec section 6): golden comparison with the official RPN, init, and mask properties."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork, box_convert

from asag.modeling.blocks import PRIOR_PROB
from asag.modeling.proposal import ProposalStage
from asag.modeling.queries import build_queries
from asag.structures import AnchorOutput
from official import CASES, LEVELS, VARIANTS, load, load_inputs, load_weights

FIXTURE_DIM = 64  # hidden_dim of the fixtures (README "Model configuration used")
NUM_CLASSES = 80

# README "Verification and tolerances"
ATOL_LOGITS = 2e-4
ATOL_CONTENT = 2e-4
ATOL_XYZR = 2e-4
ATOL_BOXES = 1e-5

_FPN_CACHE: dict = {}


def _pyramid(fixtures_dir, case: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """P2..P5 for a fixture case: stored official FPN output for case a, our torchvision FPN for b."""
    if case not in _FPN_CACHE:
        inputs = load_inputs(fixtures_dir, case)
        if case == "a":
            ref = load(fixtures_dir, "fpn_case_a.pt")
            feats = [ref[f"P{i}"] for i in range(2, 6)]
        else:
            fpn = FeaturePyramidNetwork([256, 512, 1024, 2048], FIXTURE_DIM)
            fpn.load_state_dict(load_weights(fixtures_dir, "asag_a", "neck."))
            with torch.no_grad():
                out = fpn(OrderedDict((f"C{i}", inputs[f"C{i}"]) for i in range(2, 6)))
            feats = list(out.values())
        _FPN_CACHE[case] = (feats, inputs["image_sizes"])
    return _FPN_CACHE[case]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("level", LEVELS)
def test_matches_official_rpn(fixtures_dir, variant, case, level):
    ref = load(fixtures_dir, f"eval_{variant}_case_{case}_{level}.pt")
    feats, sizes = _pyramid(fixtures_dir, case)
    stage = ProposalStage(FIXTURE_DIM, NUM_CLASSES).eval()
    stage.load_state_dict(load_weights(fixtures_dir, variant, "rpn."))
    anchors = AnchorOutput([], ref["ag.padded_output_anchors"], ref["ag.valid_mask"])
    queries = build_queries(anchors, sizes, None, num_dn=0, noise_scale=0.0, num_heads=8)
    with torch.no_grad():
        out = stage(queries, feats, sizes)
    stages = [
        ("rpn.query_content", out.content, ATOL_CONTENT),
        ("rpn.pred_logits", out.prediction.logits, ATOL_LOGITS),
        ("rpn.pred_boxes", out.prediction.boxes, ATOL_BOXES),
    ]
    if "rpn.xyzr" in ref:
        stages.append(("rpn.xyzr", out.xyzr, ATOL_XYZR))
    for key, ours, atol in stages:
        diff = (ours - ref[key]).abs().max().item()
        assert diff <= atol, f"{key}: max abs diff {diff:.3e} > {atol}"


def test_state_dict_matches_official_manifest(fixtures_dir):
    """Key names, order and shapes equal the official ``rpn.*`` entries (d = 256, 80 classes)."""
    lines = (fixtures_dir / "official-state-dict-asag-a.txt").read_text().splitlines()
    entries = (line.split("\t") for line in lines)
    expected = [(key[len("rpn.") :], shape) for key, shape, _ in entries if key.startswith("rpn.")]
    stage = ProposalStage(256, NUM_CLASSES)
    ours = [(key, str(tuple(v.shape))) for key, v in stage.state_dict().items()]
    assert ours == expected


def test_parameter_count_matches_appendix_a():
    stage = ProposalStage(256, NUM_CLASSES)
    assert sum(p.numel() for p in stage.parameters()) == 4_812_892


def test_init():
    torch.manual_seed(0)
    stage = ProposalStage(32, 5, num_heads=4, ffn_dim=64)
    expected_bias = -torch.log(torch.tensor((1 - PRIOR_PROB) / PRIOR_PROB))
    torch.testing.assert_close(stage.fc_cls.bias, expected_bias.expand(5))
    assert stage.fc_cls.bias[0].item() == pytest.approx(-4.59512, abs=1e-5)
    assert (stage.fc_reg.weight == 0).all() and (stage.fc_reg.bias == 0).all()
    assert ((stage.iof_tau >= 0) & (stage.iof_tau <= 4)).all() and stage.iof_tau.shape == (4,)
    assert (stage.attn.in_proj_bias == 0).all()


def _toy_inputs(batch=2, num=6, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[128, 160], [96, 128]])[:batch]
    feats = [torch.randn(batch, dim, 128 // s, 160 // s, generator=g) for s in (4, 8, 16, 32)]
    centre = torch.rand(batch, num, 2, generator=g) * 80 + 20
    wh = torch.rand(batch, num, 2, generator=g) * 60 + 8
    boxes = torch.cat([centre, wh], dim=-1)
    valid = torch.ones(batch, num, dtype=torch.bool)
    valid[-1, -2:] = False
    return feats, sizes, boxes, valid


def test_zero_deltas_keep_query_boxes():
    """With the zero-initialised regression layer the proposals are the (normalised) query boxes."""
    feats, sizes, boxes, valid = _toy_inputs()
    stage = ProposalStage(32, 3, num_heads=4, ffn_dim=64).eval()
    queries = build_queries(AnchorOutput([], boxes, valid), sizes, None, 0, 0.0, 4)
    out = stage(queries, feats, sizes)
    whwh = sizes.flip(-1).repeat(1, 2)[:, None].float()
    torch.testing.assert_close(out.prediction.boxes, boxes / whwh, atol=1e-5, rtol=1e-5)
    assert out.prediction.logits.shape == (2, 6, 3) and out.content.shape == (2, 6, 32)
    xyxy = box_convert(boxes, "cxcywh", "xyxy") / 4
    torch.testing.assert_close(out.xyzr[..., :2], (xyxy[..., :2] + xyxy[..., 2:]) / 2)


def test_padded_queries_do_not_affect_valid_ones():
    feats, sizes, boxes, valid = _toy_inputs()
    torch.manual_seed(1)
    stage = ProposalStage(32, 3, num_heads=4, ffn_dim=64).eval()
    for p in stage.fc_reg.parameters():
        torch.nn.init.normal_(p, std=0.1)
    run = lambda b: stage(build_queries(AnchorOutput([], b, valid), sizes, None, 0, 0.0, 4), feats, sizes)  # noqa: E731
    base = run(boxes)
    moved = boxes.clone()
    moved[-1, -2:] = torch.tensor([40.0, 30.0, 20.0, 10.0])
    other = run(moved)
    torch.testing.assert_close(other.content[valid], base.content[valid])
    torch.testing.assert_close(other.prediction.boxes[valid], base.prediction.boxes[valid])
    assert not torch.allclose(other.content[~valid], base.content[~valid])


def test_batch_invariance():
    """An image's outputs do not depend on the other images of the batch (same features)."""
    feats, sizes, boxes, valid = _toy_inputs()
    torch.manual_seed(2)
    stage = ProposalStage(32, 3, num_heads=4, ffn_dim=64).eval()
    full = stage(build_queries(AnchorOutput([], boxes, valid), sizes, None, 0, 0.0, 4), feats, sizes)
    one = stage(
        build_queries(AnchorOutput([], boxes[:1], valid[:1]), sizes[:1], None, 0, 0.0, 4),
        [f[:1] for f in feats],
        sizes[:1],
    )
    torch.testing.assert_close(one.content, full.content[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.prediction.logits, full.prediction.logits[:1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_parameters_but_not_xyzr():
    feats, sizes, boxes, valid = _toy_inputs()
    stage = ProposalStage(32, 3, num_heads=4, ffn_dim=64)
    out = stage(build_queries(AnchorOutput([], boxes, valid), sizes, None, 0, 0.0, 4), feats, sizes)
    assert not out.xyzr.requires_grad
    (out.prediction.logits.sum() + out.prediction.boxes.sum() + out.content.sum()).backward()
    assert stage.fc_reg.weight.grad is not None and stage.fc_reg.weight.grad.abs().sum() > 0
    assert stage.iof_tau.grad is not None and stage.roi.weight.grad.abs().sum() > 0
