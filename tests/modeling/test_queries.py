"""Query preparation and denoising masks (spec section 4), against hand-built masks and the spec's rules."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asag.modeling.queries import build_queries, noise_boxes, query_attention_mask
from asag.structures import AnchorOutput, ImageTargets
from official import listed, load


def _mask(rows: list[str]) -> torch.Tensor:
    """Hand-written mask: one string per row, '1' = blocked."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def _anchors(num_valid: list[int], num_anchors: int, sizes: torch.Tensor) -> AnchorOutput:
    batch = len(num_valid)
    valid = torch.arange(num_anchors)[None] < torch.tensor(num_valid)[:, None]
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(batch, num_anchors, 4, generator=g) * 50 + 10
    return AnchorOutput([], boxes, valid)


def _targets(counts: list[int]) -> list[ImageTargets]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in counts:
        centres = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        boxes = torch.cat([centres, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
        out.append(ImageTargets(boxes=boxes, labels=torch.arange(n) + 10))
    return out


def test_mask_without_dn_hand_built():
    sizes = torch.tensor([[100, 200], [80, 120]])
    q = build_queries(_anchors([4, 2], 4, sizes), sizes, None, num_dn=0, noise_scale=0.4, num_heads=2)
    img0 = _mask(["0000"] * 4)
    img1 = _mask(["0011", "0011", "0000", "0000"])  # valid rows cannot see padded columns
    expected = torch.stack([img0, img0, img1, img1])  # batch-major: index b * num_heads + h
    assert torch.equal(q.attn_mask, expected)
    assert q.num_dn == 0 and q.dn_boxes is None and q.dn_labels is None
    assert torch.equal(q.boxes, _anchors([4, 2], 4, sizes).boxes)


def test_mask_with_dn_hand_built():
    # num_dn = 5; image 0: n = 2 GT -> r = 2 groups, q = 1 padding-DN query; image 1: n = 0 GT.
    # Q = 3 anchors, 2 valid (p = 1 padded) in both images. L = 8.
    mask = query_attention_mask(torch.tensor([2, 0]), torch.tensor([2, 2]), 5, 3, 1)
    img0 = _mask([
        "00111001",  # group 0: own group, valid anchors
        "00111001",
        "11001001",  # group 1
        "11001001",
        "11110001",  # padding-DN row: no group columns
        "11111001",  # matching rows: no DN columns, no padded anchor
        "11111001",
        "11111000",  # the padded anchor sees the matching part, itself included
    ])
    img1 = _mask([
        "00000000",  # without GT the DN rows see everything (authors' layout)
        "00000000",
        "00000000",
        "00000000",
        "00000000",
        "11111001",
        "11111001",
        "11111001",  # ... and every matching row, the padded one included, is blocked from padded columns
    ])
    assert torch.equal(mask, torch.stack([img0, img1]))


def test_mask_partial_group_and_too_many_gt():
    # image 0: n = 3, num_dn = 5 -> r = 1, q = 2; image 1: n = 7 > num_dn -> r = 0, q = 5 (all padding)
    mask = query_attention_mask(torch.tensor([3, 7]), torch.tensor([2, 1]), 5, 2, 1)
    img0 = _mask([
        "0001100", "0001100", "0001100",
        "1110000", "1110000",
        "1111100", "1111100",
    ])
    img1 = _mask([
        "0000001", "0000001", "0000001", "0000001", "0000001",
        "1111101",
        "1111100",
    ])
    assert torch.equal(mask, torch.stack([img0, img1]))


def _reference_mask(n: int, v: int, num_dn: int, num_anchors: int) -> torch.Tensor:
    """Spec section 4 written as per-entry rules (slow, independent of the vectorised version)."""
    length = num_dn + num_anchors
    p = num_anchors - v
    r = num_dn // n if n > 0 else 0
    m = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            row_dn, col_dn = i < num_dn, j < num_dn
            col_padded = j >= length - p
            blocked = not row_dn and col_dn
            if n > 0 and i < r * n and col_dn:
                blocked |= not (j < r * n and j // n == i // n)
            if n > 0 and r * n <= i < num_dn:
                blocked |= j < r * n
            if n == 0 and num_dn > 0:
                blocked |= (not row_dn) and col_padded
            else:
                blocked |= i < length - p and col_padded
            m[i, j] = blocked
    return m


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 6)), min_size=1, max_size=3),
    num_dn=st.integers(0, 9),
    heads=st.integers(1, 3),
)
def test_mask_matches_rules(data, num_dn, heads):
    num_anchors = 6
    counts = torch.tensor([n for n, _ in data])
    valid = torch.tensor([v for _, v in data])
    mask = query_attention_mask(counts, valid, num_dn, num_anchors, heads)
    for b, (n, v) in enumerate(data):
        ref = _reference_mask(n, v, num_dn, num_anchors)
        for h in range(heads):
            assert torch.equal(mask[b * heads + h], ref)


def test_dn_boxes_without_noise():
    sizes = torch.tensor([[100, 200], [80, 120], [50, 60]])
    anchors = _anchors([3, 2, 1], 3, sizes)
    targets = _targets([2, 0, 7])
    q = build_queries(anchors, sizes, targets, num_dn=5, noise_scale=0.0, num_heads=8)
    assert q.boxes.shape == (3, 8, 4) and q.attn_mask.shape == (24, 8, 8) and q.num_dn == 5
    whwh0 = torch.tensor([200.0, 100.0, 200.0, 100.0])
    tiled = targets[0].boxes.repeat(2, 1)  # r = 2 groups of the clean GT
    torch.testing.assert_close(q.boxes[0, :4], tiled * whwh0)
    torch.testing.assert_close(q.boxes[0, 4], torch.tensor([100.0, 50.0, 200.0, 100.0]))  # padding-DN box
    torch.testing.assert_close(q.boxes[1, :5], torch.tensor([60.0, 40.0, 120.0, 80.0]).expand(5, 4))
    torch.testing.assert_close(q.boxes[2, :5], torch.tensor([30.0, 25.0, 60.0, 50.0]).expand(5, 4))
    torch.testing.assert_close(q.boxes[:, 5:], anchors.boxes)
    torch.testing.assert_close(q.dn_boxes[0], tiled)
    assert q.dn_labels[0].tolist() == [10, 11, 10, 11]
    assert q.dn_boxes[1].shape == (0, 4) and q.dn_labels[1].numel() == 0  # no GT
    assert q.dn_boxes[2].shape == (0, 4) and q.dn_labels[2].numel() == 0  # n > num_dn: no targets
    assert torch.equal(q.valid_mask, anchors.valid_mask)


def test_dn_noise_bounds_and_clamp():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.05, 0.95, 0.1, 0.1]]).repeat(500, 1)
    g = torch.Generator().manual_seed(3)
    noised = noise_boxes(boxes, 0.4, g)
    limit = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1) * 0.4
    assert ((noised - boxes).abs() <= limit + 1e-6).all()
    assert (noised >= 0).all() and (noised <= 1).all()
    # the noise really covers its range (u ~ U(-1, 1) per coordinate, independently)
    rel = (noised[0::2] - boxes[0::2]) / limit[0::2]
    assert rel.min() < -0.95 and rel.max() > 0.95
    assert abs(torch.corrcoef(rel.T)[0, 1]) < 0.2
    torch.testing.assert_close(noise_boxes(boxes, 0.0), boxes)


def test_noised_queries_stay_near_targets():
    sizes = torch.tensor([[100, 200]])
    targets = _targets([3])
    q = build_queries(_anchors([2], 2, sizes), sizes, targets, 200, 0.4, 8, torch.Generator().manual_seed(0))
    assert q.boxes.shape == (1, 202, 4)
    whwh = torch.tensor([200.0, 100.0, 200.0, 100.0])
    clean = targets[0].boxes.repeat(66, 1)
    spread = torch.cat([clean[:, 2:] / 2, clean[:, 2:]], 1) * 0.4
    assert ((q.boxes[0, :198] / whwh - clean).abs() <= spread + 1e-6).all()
    assert not torch.allclose(q.boxes[0, :198] / whwh, clean)
    torch.testing.assert_close(q.boxes[0, 198:200], torch.tensor([100.0, 50.0, 200.0, 100.0]).expand(2, 4))


def test_dn_targets_match_official_criterion_fixture(fixtures_dir):
    ref = load(fixtures_dir, "criterion_asag_a_dn_epoch1.pt")
    targets = [ImageTargets(boxes=t["boxes"], labels=t["labels"]) for t in listed(ref, "targets")]
    valid = ref["outputs.anchors.valid_mask"]
    anchors = AnchorOutput([], torch.zeros(*valid.shape, 4), valid)
    sizes = torch.tensor(ref["hw"])
    q = build_queries(anchors, sizes, targets, ref["num_dn"], ref["box_noise_scale"], 8)
    assert [q.num_dn, anchors.num_queries] == list(ref["outputs.dn.dn_param"])
    assert q.boxes.shape[1] == ref["outputs.pred_logits"].shape[1]
    for b in range(len(targets)):
        assert torch.equal(q.dn_boxes[b], ref[f"outputs.dn.dn_targets_boxes.{b}"])
        assert torch.equal(q.dn_labels[b], ref[f"outputs.dn.dn_targets_labels.{b}"])


def test_batch_without_any_gt():
    sizes = torch.tensor([[40, 60], [50, 70]])
    anchors = _anchors([2, 1], 2, sizes)
    q = build_queries(anchors, sizes, _targets([0, 0]), num_dn=3, noise_scale=0.4, num_heads=1)
    torch.testing.assert_close(q.boxes[0, :3], torch.tensor([30.0, 20.0, 60.0, 40.0]).expand(3, 4))
    torch.testing.assert_close(q.boxes[1, :3], torch.tensor([35.0, 25.0, 70.0, 50.0]).expand(3, 4))
    assert [b.shape[0] for b in q.dn_boxes] == [0, 0] and [lab.numel() for lab in q.dn_labels] == [0, 0]
    assert torch.equal(q.attn_mask[1], _mask(["00000", "00000", "00000", "11101", "11101"]))
