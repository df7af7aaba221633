"""ASAG-D decoder stage: shapes, box refinement, masks, padding, gradients, embeddings."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.modeling.decoders.deformable import (
    DeformableStage,
    box_sine_embedding,
    inverse_sigmoid,
    level_reference_boxes,
    refine_boxes,
)
from asag.modeling.decoders.parallel import ParallelHeads
from asag.structures import HeadOutput, ProposalOutput

STRIDES = (8, 16, 32, 64)
HEADS = 4


def small_stage(dim=32, seed=0, **kwargs) -> DeformableStage:
    torch.manual_seed(seed)
    args = dict(hidden_dim=dim, num_classes=3, num_heads=HEADS, ffn_dim=64, num_points=2, strides=STRIDES)
    return DeformableStage(**{**args, **kwargs})


def perturb_zeros_(module, std=0.05):
    """Give zero-initialised tensors small values, as one optimizer step would."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, std)


def random_inputs(batch=2, num=5, dim=32, canvas=(128, 192), seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch, num, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(batch, num, 2, generator=g) * 0.4 + 0.05
    boxes = torch.cat([centre, size], dim=-1)
    content = torch.randn(batch, num, dim, generator=g)
    xyzr = torch.zeros_like(boxes)  # unused by the stage
    proposals = ProposalOutput(HeadOutput(torch.zeros(batch, num, 3), boxes), content, xyzr)
    h, w = canvas
    features = [torch.randn(batch, dim, math.ceil(h / s), math.ceil(w / s), generator=g) for s in STRIDES]
    sizes = torch.tensor([[h, w], [h - 40, w - 70]])[:batch]
    return proposals, features, sizes


def padding_mask(valid_counts, num, heads=HEADS):
    """Valid queries (a prefix) may not attend to padded ones; padded queries see everything."""
    rows = []
    for v in valid_counts:
        m = torch.zeros(num, num, dtype=torch.bool)
        m[:v, v:] = True
        rows.append(m[None].expand(heads, -1, -1))
    return torch.cat(rows)


def test_output_shapes_and_identity_refinement_at_init():
    stage = small_stage()
    proposals, features, sizes = random_inputs()
    out = stage(proposals, features, sizes)
    assert out.logits.shape == (2, 5, 3) and out.boxes.shape == (2, 5, 4)
    # zero regression layer: boxes come back unchanged; prior bias -4.595 dominates the logits' mean
    torch.testing.assert_close(out.boxes, proposals.prediction.boxes, atol=1e-6, rtol=1e-5)
    assert abs(out.logits.mean().item() + 4.595) < 1.0


def test_refinement_hand_computed():
    boxes = torch.tensor([[0.5, 0.25, 0.1, 0.8]])
    deltas = torch.tensor([[math.log(3.0), 0.0, -math.log(9.0), 0.0]])
    # logit(0.5) + log 3 -> 0.75; logit(0.1) - log 9 = log(1/81) -> 1/82
    torch.testing.assert_close(refine_boxes(boxes, deltas), torch.tensor([[0.75, 0.25, 1 / 82, 0.8]]))
    torch.testing.assert_close(inverse_sigmoid(torch.tensor([0.0, 1.0])),
                               torch.tensor([math.log(1e-5), -math.log(1e-5)]))


@settings(max_examples=40, deadline=None)
@given(st.floats(0.001, 0.999), st.floats(-5, 5))
def test_refinement_stays_in_the_unit_interval_and_is_monotone(v, d):
    box = torch.tensor([v, v, v, v], dtype=torch.float64)
    delta = torch.tensor([d, 0.0, d + 0.5, -d], dtype=torch.float64)
    out = refine_boxes(box, delta)
    assert torch.all((out > 0) & (out < 1))
    assert out[2] > out[0] and abs(out[1] - v) < 1e-9
    assert abs(out[0] - v) <= abs(d) / 4 + 1e-12  # the sigmoid is 1/4-Lipschitz
    if abs(d) > 1e-9:  # a positive delta moves the coordinate up, a negative one down
        assert (out[0] - v) * d > 0


def test_level_reference_boxes_hand_computed():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    sizes = torch.tensor([[96, 128]])  # padded P3 16 x 20 cells = 128 x 160 px; P6 2 x 3 = 128 x 192 px
    ref = level_reference_boxes(boxes, sizes, [(16, 20), (2, 3)], [8, 64])
    assert ref.shape == (1, 1, 2, 4)
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 * 0.8, 0.5 * 0.75, 0.2 * 0.8, 0.4 * 0.75]))
    torch.testing.assert_close(ref[0, 0, 1], torch.tensor([0.5 * 2 / 3, 0.5 * 0.75, 0.2 * 2 / 3, 0.4 * 0.75]))


def test_box_sine_embedding_hand_computed():
    emb = box_sine_embedding(torch.tensor([0.25, 0.5, 0.0, 1.0]), dim=16)
    assert emb.shape == (16,)
    # cx block: angle 2 pi * 0.25 = pi/2 at frequency 1, then pi/200 at frequency 100
    torch.testing.assert_close(emb[:4], torch.tensor(
        [1.0, 0.0, math.sin(math.pi / 200), math.cos(math.pi / 200)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[8:12], torch.tensor([0.0, 1.0, 0.0, 1.0]))  # w = 0


def test_masked_queries_do_not_influence_valid_ones():
    stage = small_stage(seed=1)
    perturb_zeros_(stage)
    proposals, features, sizes = random_inputs(seed=2)
    mask = padding_mask([3, 4], 5)
    out = stage(proposals, features, sizes, mask)
    changed = ProposalOutput(
        HeadOutput(proposals.prediction.logits, proposals.prediction.boxes.clone()),
        proposals.content.clone(), proposals.xyzr,
    )
    changed.content[0, 3:] += 10.0
    changed.content[1, 4:] -= 10.0
    changed.prediction.boxes[0, 3:, :2] = 0.9
    out2 = stage(changed, features, sizes, mask)
    torch.testing.assert_close(out.logits[0, :3], out2.logits[0, :3])
    torch.testing.assert_close(out.boxes[1, :4], out2.boxes[1, :4])
    assert not torch.allclose(out.logits[0, 3:], out2.logits[0, 3:])


def test_padded_feature_cells_are_not_attended():
    stage = small_stage(seed=3)
    perturb_zeros_(stage)
    proposals, features, sizes = random_inputs(seed=4)
    garbage = []
    for f, s in zip(features, STRIDES):
        g = f.clone()
        rows, cols = math.ceil(int(sizes[1, 0]) / s), math.ceil(int(sizes[1, 1]) / s)
        g[1, :, rows:] = 1e3
        g[1, :, :, cols:] = -1e3
        garbage.append(g)
    clean, dirty = stage(proposals, features, sizes), stage(proposals, garbage, sizes)
    torch.testing.assert_close(clean.logits, dirty.logits)


def test_permuting_queries_permutes_outputs():
    stage = small_stage(seed=5)
    perturb_zeros_(stage)
    proposals, features, sizes = random_inputs(seed=6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    prediction = HeadOutput(proposals.prediction.logits[:, perm], proposals.prediction.boxes[:, perm])
    permuted = ProposalOutput(prediction, proposals.content[:, perm], proposals.xyzr[:, perm])
    out, out_p = stage(proposals, features, sizes), stage(permuted, features, sizes)
    torch.testing.assert_close(out.logits[:, perm], out_p.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.boxes[:, perm], out_p.boxes, atol=1e-6, rtol=1e-5)


def test_gradients_reach_every_parameter_and_content_but_not_boxes():
    stage = small_stage(seed=7)
    perturb_zeros_(stage)
    proposals, features, sizes = random_inputs(seed=8)
    content = proposals.content.requires_grad_()
    boxes = proposals.prediction.boxes.requires_grad_()
    features = [f.requires_grad_() for f in features]
    out = stage(proposals, features, sizes, padding_mask([5, 4], 5))
    (out.logits.sum() + (out.boxes * torch.randn_like(out.boxes)).sum()).backward()
    missing = [n for n, p in stage.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing
    assert content.grad.abs().sum() > 0 and boxes.grad is None
    assert all(f.grad.abs().sum() > 0 for f in features)


def test_parallel_heads_run_deformable_stages():
    heads = ParallelHeads([small_stage(seed=9), small_stage(seed=10)], hidden_dim=32)
    proposals, features, sizes = random_inputs(seed=11)
    outs = heads(proposals, features, sizes, padding_mask([5, 3], 5))
    assert len(outs) == 2 and all(o.logits.shape == (2, 5, 3) for o in outs)
    assert not torch.allclose(outs[0].logits, outs[1].logits)


def test_rejects_a_wrong_number_of_levels():
    stage = small_stage()
    proposals, features, sizes = random_inputs()
    with pytest.raises(ValueError, match="feature levels"):
        stage(proposals, features[:3], sizes)


# ------------------------------------------------------------------------ the ASAG-D detector (tiny)


def tiny_asag_d(*overrides: str):
    from asag.build import build_criterion, build_model
    from asag.config import load_config

    cfg = load_config("tiny_cpu", ["model.decoder.type=deformable", "model.decoder.encoder_layers=1",
                                   "model.decoder.encoder_ffn_dim=64", *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg), build_criterion(cfg)


def tiny_targets(sizes: torch.Tensor):
    from asag.structures import ImageTargets

    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.1, 0.1], [0.5, 0.5, 0.8, 0.7]])
    return [ImageTargets(boxes[: 3 - i], torch.tensor([1, 3, 0])[: 3 - i], i, tuple(s), tuple(s))
            for i, s in enumerate(sizes.tolist())]


def test_asag_d_detector_trains_one_step_and_evaluates():
    from asag.build import build_optimizer_and_schedule
    from asag.modeling.deformable_encoder import DeformableEncoder

    cfg, model, criterion = tiny_asag_d("denoising.enabled=true", "denoising.num_queries=12")
    assert isinstance(model.neck, DeformableEncoder) and model.anchor_levels == (0, 1, 2)
    assert all(isinstance(h, DeformableStage) for h in model.decoder.heads)
    sizes = torch.tensor([[128, 160], [96, 128]])
    images = torch.randn(2, 3, 128, 160)
    targets = tiny_targets(sizes)
    features = model.extract_features(images, sizes)
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 20), (8, 10), (4, 5), (2, 3)]  # strides 8..64
    optimizer, _ = build_optimizer_and_schedule(model, cfg.schedule)
    model.train()
    out = model(images, sizes, targets, epoch=1)
    loss = criterion(out, targets, sizes)
    assert torch.isfinite(loss.total) and out.num_dn == 12
    before = model.decoder.heads[0].fc_reg.weight.detach().clone()
    optimizer.zero_grad()
    loss.total.backward()
    optimizer.step()
    assert not torch.equal(before, model.decoder.heads[0].fc_reg.weight)
    detections = model.predict(images, sizes, sizes)
    assert len(detections) == 2
    for d in detections:
        assert 0 < len(d) <= cfg.model.postprocess.topk and torch.isfinite(d.boxes).all()


def test_asag_d_gradients_reach_every_trainable_parameter():
    _, model, criterion = tiny_asag_d("denoising.enabled=true", "denoising.num_queries=12")
    perturb_zeros_(model, std=0.01)
    model.train()
    sizes = torch.tensor([[128, 160], [96, 128]])
    images = torch.randn(2, 3, 128, 160)
    targets = tiny_targets(sizes)
    missing = set()
    for epoch in (0, 1):  # epoch 0: GT-derived patches; epoch 1: predicted patches
        model.zero_grad()
        loss = criterion(model(images, sizes, targets, epoch=epoch), targets, sizes)
        loss.total.backward()
        missing |= {n for n, p in model.named_parameters()
                    if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))}
    assert not missing, sorted(missing)[:10]


@pytest.mark.slow
def test_asag_d_r50_multiply_adds_at_800x1216_near_table_a2():
    """Table A-2: ASAG-D R50, one decoder layer, 182 "GFLOPs" (= GMACs); 300 queries, probing on."""
    from asag.build import build_model
    from asag.config import load_config
    from asag.engine.benchmark import count_flops, craft_probing_biases, random_inputs

    torch.manual_seed(0)
    model = build_model(load_config("asag_d_r50_speed")).eval()
    craft_probing_biases(model.anchor_generator)
    with torch.no_grad():
        report, _ = count_flops(model, random_inputs(1, (800, 1216)), num_queries=300)
    assert report.total.gmacs == pytest.approx(182, rel=0.10)
