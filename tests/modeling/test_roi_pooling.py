"""RoI pooling (spec section 5): level assignment, torchvision equivalence of every kind and of the
one-table gather of the fixed budgets, host reads, non-finite boxes, ONNX formulation."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import random_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align

from asag.engine.syncs import SyncAudit
from asag.modeling.roi_pooling import LevelTable, RoIPooling, pool_rows, roi_align_gather


def _constant_levels(batch: int = 1, channels: int = 2) -> list[torch.Tensor]:
    """P2..P5 for a 256 x 256 image, level k filled with the value k (+ 10 * image index)."""
    feats = []
    for k, s in zip(range(2, 6), (4, 8, 16, 32)):
        base = torch.full((batch, channels, 256 // s, 256 // s), float(k))
        feats.append(base + 10 * torch.arange(batch).view(-1, 1, 1, 1))
    return feats


def level_features(batch: int = 2, channels: int = 8, height: int = 256, width: int = 384,
                   channels_last: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    levels = [torch.randn(batch, channels, height // s, width // s, generator=g) for s in (4, 8, 16, 32)]
    return [f.contiguous(memory_format=layout) for f in levels]


@pytest.mark.parametrize("kind", ["torchvision", "gather"])
def test_roi_level_assignment(kind):
    feats = _constant_levels()
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 224, 224],
                           [0, 0, 250, 250]]], dtype=torch.float32)
    out = RoIPooling(kind=kind)(feats, boxes, torch.tensor([[256, 256]]))
    assert out.shape == (5, 2, 7, 7)
    # floor(4 + log2(side / 224) + 1e-6) clamped to [2, 5]: 10 -> 2, 112 -> 3, 111 -> 2, 224 -> 4, 250 -> 4
    expected = torch.tensor([2.0, 3.0, 2.0, 4.0, 4.0])
    atol = 0.0 if kind == "torchvision" else 1e-6  # the gather sums its taps in another order
    assert torch.allclose(out[:, 0, 3, 3], expected, rtol=0, atol=atol)


def test_roi_batch_major_and_equals_torchvision_inferred_scales():
    feats = [f + torch.randn_like(f) for f in _constant_levels(batch=2)]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 3, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + 20 + torch.rand(2, 3, 2, generator=g) * 120], dim=-1)
    sizes = torch.tensor([[256, 256], [200, 240]])
    ours = RoIPooling()(feats, boxes, sizes)
    reference = MultiScaleRoIAlign(["a", "b", "c", "d"], 7, 2)
    theirs = reference(dict(zip("abcd", feats)), list(boxes.unbind(0)), [(256, 256), (200, 240)])
    assert reference.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours[:3, 0].mean() < 8 < ours[3:, 0].mean()  # image 1 rows (+10) come after image 0 rows


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_gather_equals_torchvision(channels_last):
    feature = torch.randn(2, 16, 20, 30)
    boxes = random_boxes(40, 120.0, 80.0)
    image_idx = torch.arange(40) % 2
    ref = roi_align(feature, torch.cat([image_idx[:, None].float(), boxes], 1), 7, 0.25, 2, aligned=False)
    if channels_last:
        feature = feature.contiguous(memory_format=torch.channels_last)
    out = roi_align_gather(feature, boxes, image_idx, 0.25, 7, 2)
    assert out.shape == (40, 16, 7, 7)
    assert torch.allclose(out, ref, atol=1e-5)


def test_gather_kind_equals_torchvision_with_one_read_of_the_level_counts():
    features = level_features(channels_last=True)
    boxes = random_boxes(2 * 30, 384.0, 256.0, seed=1).view(2, 30, 4)  # boxes of every FPN level
    sizes = torch.tensor([[256, 384], [240, 360]])
    with SyncAudit() as audit:
        out = RoIPooling(kind="gather")(features, boxes, sizes)
    assert torch.allclose(out, RoIPooling(kind="torchvision")(features, boxes, sizes), atol=1e-5)
    assert audit.ops == {"tolist": 1}  # the per-level counts


def test_auto_kind_gathers_on_the_cpu_only():
    pooling = RoIPooling(kind="auto")
    assert not pooling.uses_torchvision(torch.device("cpu"))
    assert pooling.uses_torchvision(torch.device("cuda"))
    assert RoIPooling(kind="torchvision").uses_torchvision(torch.device("cpu"))
    with pytest.raises(ValueError, match="kind"):
        RoIPooling(kind="fast")


@pytest.mark.parametrize("kind", ["torchvision", "gather", "auto"])
def test_the_level_table_pools_in_one_gather_without_host_reads(kind):
    """Every kind reads a given :class:`LevelTable` in one gather: the fixed-shape formulation."""
    features = level_features()
    boxes = random_boxes(2 * 30, 384.0, 256.0, seed=1).view(2, 30, 4)
    sizes = torch.tensor([[256, 384], [240, 360]])
    pooling = RoIPooling(kind=kind)
    table = LevelTable.of(features)
    with SyncAudit() as audit:
        out = pooling(features, boxes, sizes, table)
    assert not audit.ops
    assert torch.allclose(out, RoIPooling()(features, boxes, sizes), atol=1e-5)
    rows = [2 * 64 * 96, 2 * 32 * 48, 2 * 16 * 24]  # B * H * W of P2..P4
    assert table.starts == (0, rows[0], rows[0] + rows[1], sum(rows))


def test_index_formulation_equals_embedding_bag():
    """ONNX's formulation (one gather per tap, chosen while exporting to ONNX) equals embedding_bag."""
    table = torch.randn(500, 8)
    cells = torch.tensor([[1.0, 2.0, 9.5, 7.0], [0.0, 0.0, 3.0, 3.0]])
    base = torch.tensor([0, 100])
    bag = pool_rows(table, cells, base, 10, 10, 7, 2)
    index = pool_rows(table, cells, base, 10, 10, 7, 2, weighted_sum="index")
    assert torch.allclose(index, bag, atol=1e-6)
    with pytest.raises(ValueError, match="weighted_sum"):
        pool_rows(table, cells, base, 10, 10, 7, 2, weighted_sum="loop")


@pytest.mark.parametrize("with_table", [False, True])
def test_gather_survives_non_finite_boxes(with_table):
    """A diverged model's NaN/inf box pools from the origin instead of indexing out of range (it raised
    IndexError in the level count); the finite boxes' features do not change."""
    features = level_features(batch=1)
    boxes = random_boxes(6, 384.0, 256.0, seed=2).view(1, 6, 4)
    bad = boxes.clone()
    bad[0, 1, 0], bad[0, 3, 2:] = float("nan"), float("inf")
    sizes = torch.tensor([[256, 384]])
    pooling = RoIPooling(kind="gather")
    table = LevelTable.of(features) if with_table else None
    out, clean = pooling(features, bad, sizes, table), pooling(features, boxes, sizes, table)
    finite = torch.tensor([True, False, True, False, True, True])
    assert torch.equal(out[finite], clean[finite]) and torch.isfinite(out).all()
