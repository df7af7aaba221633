"""Parallel decoder heads and single-head selection (spec 7.1, section 15 item 25)."""

import pytest
import torch
from tests.official import FIXTURE_MODEL, fpn_features, load, load_weights, padding_attn_mask
from torch import nn

from asag.modeling.decoders.adamixer import AdaMixerStage
from asag.modeling.decoders.parallel import ParallelHeads, select_head
from asag.modeling.decoders.sparse_rcnn import SparseRCNNStage
from asag.ops.boxes import normalized_cxcywh_from_xyzr, xyxy_to_xyzr
from asag.structures import HeadOutput, ProposalOutput

DIM = 32
STRIDES = (4, 8, 16, 32)


class EchoStage(nn.Module):
    """Returns its input content as logits, to observe what each head receives."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, proposals, features, image_sizes, attn_mask=None, level_table=None):
        return HeadOutput(proposals.content * self.scale, proposals.prediction.boxes)


def random_inputs(batch=2, num=5, image_hw=(96, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    xy = torch.rand(batch, num, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = 8 + torch.rand(batch, num, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
    xyzr = xyxy_to_xyzr(torch.cat([xy, xy + wh], dim=-1))  # [B, N, 4]
    sizes = torch.tensor([[h, w]] * batch)
    boxes = normalized_cxcywh_from_xyzr(xyzr, sizes)
    content = torch.randn(batch, num, DIM, generator=g)
    proposals = ProposalOutput(HeadOutput(torch.zeros(batch, num, 3), boxes), content, xyzr)
    features = [torch.randn(batch, DIM, h // s, w // s, generator=g) for s in STRIDES]
    return proposals, features, sizes


def small_stage(kind: str) -> nn.Module:
    if kind == "adamixer":
        return AdaMixerStage(DIM, 3, num_heads=4, ffn_dim=64, in_points=4, out_points=6, n_groups=4)
    return SparseRCNNStage(DIM, 3, num_heads=4, ffn_dim=64, dim_dynamic=8)


def perturb_(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_each_head_adds_its_embedding_row_and_main_is_last():
    heads = ParallelHeads([EchoStage() for _ in range(3)], DIM)
    with torch.no_grad():
        heads.heads[2].scale.fill_(2.0)  # mark the last (main) head
    proposals, features, sizes = random_inputs()
    outputs = heads(proposals, features, sizes)
    assert len(outputs) == len(heads) == 3
    for k, out in enumerate(outputs):
        expected = (proposals.content + heads.head_embedding[k]) * (2.0 if k == 2 else 1.0)
        torch.testing.assert_close(out.logits, expected)
    assert heads.head_embedding.shape == (3, DIM)


def test_head_embedding_is_standard_normal():
    torch.manual_seed(0)
    emb = ParallelHeads([EchoStage() for _ in range(8)], 256).head_embedding
    assert abs(emb.mean().item()) < 0.05 and abs(emb.std().item() - 1.0) < 0.05


@pytest.mark.parametrize("kind", ["adamixer", "sparse_rcnn"])
def test_heads_are_independent_and_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    heads = ParallelHeads([small_stage(kind) for _ in range(2)], DIM)
    perturb_(heads)
    proposals, features, sizes = random_inputs()
    outputs = heads(proposals, features, sizes)
    assert not torch.allclose(outputs[0].logits, outputs[1].logits)
    outputs[0].logits.sum().backward(retain_graph=True)  # head 0 only: head 1 and row 1 get nothing
    assert heads.head_embedding.grad[1].abs().sum() == 0
    assert all(p.grad is None for p in heads.heads[1].parameters())
    heads.zero_grad()
    sum(o.logits.sum() + o.boxes.sum() for o in outputs).backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["adamixer", "sparse_rcnn"])
@pytest.mark.parametrize("k", [0, 1])
def test_select_head_gives_the_same_predictions(kind, k):
    torch.manual_seed(0)
    two = ParallelHeads([small_stage(kind) for _ in range(2)], DIM)
    perturb_(two)
    one = ParallelHeads([small_stage(kind)], DIM)
    one.load_state_dict(select_head(two.state_dict(), k, num_heads=2))  # strict
    proposals, features, sizes = random_inputs()
    mask = padding_attn_mask(torch.tensor([[True] * 5, [True] * 3 + [False] * 2]), num_heads=4)
    expected = two(proposals, features, sizes, mask)[k]
    got = one(proposals, features, sizes, mask)[0]
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.boxes, expected.boxes)


def test_select_head_on_official_names_with_a_prefix():
    sd = {
        "decoder.decoder_embedding.weight": torch.arange(6.0).view(3, 2),
        "decoder.bbox_head.0.fc_reg.weight": torch.zeros(1),
        "decoder.bbox_head.2.fc_reg.weight": torch.ones(1),
        "decoder.bbox_head.12.fc_reg.weight": torch.full((1,), 12.0),
        "rpn.fc_reg.weight": torch.full((1,), 5.0),
    }
    out = select_head(sd, 2, num_heads=3)
    kept = {"decoder.decoder_embedding.weight", "decoder.bbox_head.0.fc_reg.weight", "rpn.fc_reg.weight"}
    assert set(out) == kept
    torch.testing.assert_close(out["decoder.decoder_embedding.weight"], torch.tensor([[4.0, 5.0]]))
    torch.testing.assert_close(out["decoder.bbox_head.0.fc_reg.weight"], torch.ones(1))
    torch.testing.assert_close(out["rpn.fc_reg.weight"], torch.full((1,), 5.0))
    ours = {"decoder.heads.1.x": torch.ones(1), "decoder.head_embedding": torch.zeros(2, 4)}
    ours = select_head(ours, 1, num_heads=2)
    assert set(ours) == {"decoder.heads.0.x", "decoder.head_embedding"}
    assert ours["decoder.head_embedding"].shape == (1, 4)


def test_select_head_rejects_bad_arguments():
    with pytest.raises(ValueError):
        select_head({"head_embedding": torch.zeros(2, 4)}, 2, num_heads=2)
    with pytest.raises(ValueError):
        select_head({"head_embedding": torch.zeros(4, 4)}, 1, num_heads=2)


# ---------------------------------------------------------------------------------- official weights


def official_heads(fixtures_dir, variant: str, num_heads: int, head: int | None) -> ParallelHeads:
    m = FIXTURE_MODEL
    if variant == "asag_a":
        args = (m["hidden_dim"], m["num_classes"], 8, m["ffn_dim"], m["in_points"], m["out_points"], 4)
        stages = [AdaMixerStage(*args) for _ in range(num_heads)]
    else:
        args = (m["hidden_dim"], m["num_classes"], 8, m["ffn_dim"], m["dim_dynamic"])
        stages = [SparseRCNNStage(*args) for _ in range(num_heads)]
    sd = load_weights(fixtures_dir, variant, "decoder.")
    if head is not None:
        sd = select_head(sd, head, num_heads=m["num_decoder_heads"])  # on the authors' names
    renamed = {k.replace("bbox_head.", "heads.").replace("head_series.", "heads."): v for k, v in sd.items()}
    renamed["head_embedding"] = renamed.pop("decoder_embedding.weight")
    heads = ParallelHeads(stages, m["hidden_dim"])
    heads.load_state_dict(renamed)
    return heads.eval()


@pytest.mark.parametrize("variant", ["asag_a", "asag_s"])
def test_select_head_on_official_weights(fixtures_dir, variant):
    ref = load(fixtures_dir, f"eval_{variant}_case_a_P4P6.pt")
    boxes = ref["rpn.pred_boxes"]
    xyzr = ref["rpn.xyzr"] if "rpn.xyzr" in ref else torch.zeros_like(boxes)
    proposals = ProposalOutput(HeadOutput(ref["rpn.pred_logits"], boxes), ref["rpn.query_content"], xyzr)
    args = (fpn_features(fixtures_dir, "a"), torch.tensor(ref["hw"]), padding_attn_mask(ref["ag.valid_mask"]))
    with torch.no_grad():
        both = official_heads(fixtures_dir, variant, 2, None)(proposals, *args)
        for k, name in enumerate(["aux_0", "main"]):
            single = official_heads(fixtures_dir, variant, 1, k)(proposals, *args)
            assert len(single) == 1
            torch.testing.assert_close(single[0].logits, both[k].logits, atol=0, rtol=0)
            torch.testing.assert_close(single[0].boxes, both[k].boxes, atol=0, rtol=0)
            torch.testing.assert_close(single[0].logits, ref[f"heads.{name}.pred_logits"], atol=2e-4, rtol=0)
