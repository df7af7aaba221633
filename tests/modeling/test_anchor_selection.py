"""Selection of the anchor generator: output slots under the cap, packing with a fixed or data-sized
query budget, patch choice in the release's order (hand-computed cases)."""

import torch

from asag.modeling.anchor_selection import (
    StageAnchors,
    choose_patches,
    output_slots,
    pack_queries,
    select_output,
)
from asag.structures import OutputAnchors

ANCHORS = torch.tensor([[0, 0, 1, 1, 0.2], [1, 1, 1, 1, 0.9], [2, 2, 1, 1, 0.5], [3, 3, 1, 1, 0.4],
                        [4, 4, 1, 1, 0.3]])
IMAGES = torch.tensor([0, 0, 0, 1, 1])


def test_the_cap_takes_the_most_confident_and_leaves_small_images_in_order():
    flat = OutputAnchors(ANCHORS, torch.ones(5, dtype=torch.bool), IMAGES, torch.zeros(5, dtype=torch.long),
                         torch.arange(5), torch.ones(1, 2, dtype=torch.bool))
    # image 0 has 3 > 2 anchors: by confidence (0.9, 0.5, 0.2); image 1 keeps its order
    assert output_slots(flat, torch.tensor([3, 2]), 2).tolist() == [2, 0, 1, 0, 1]


def one_stage(conf: list[list[float]]) -> StageAnchors:
    """A coarse stage of one row per image with the given confidences (unit-size anchors whose centres
    lie 200 px apart on a diagonal)."""
    c = torch.tensor(conf)  # [B, K]
    xy = torch.arange(c.numel(), dtype=torch.float32).view(c.shape)[..., None].expand(-1, -1, 2) * 200
    anchors = torch.cat([xy, torch.ones(*c.shape, 2), c[..., None]], dim=-1)  # [B, K, 5]
    return StageAnchors(anchors, torch.arange(len(c)), True, torch.ones(len(c), dtype=torch.bool))


def test_pack_queries_pads_to_the_budget_or_to_the_longest_image():
    stage = one_stage([[0.9, 0.5, 0.05], [0.8, 0.05, 0.05]])
    sizes = torch.tensor([[100, 200], [100, 200]])
    selection = select_output(stage, None, 0.1, 1, 2)  # image 0: 2 anchors, image 1: 1
    data = pack_queries([selection], sizes, 10, None)
    assert data.valid.tolist() == [[True, True], [True, False]]
    assert data.boxes[1, 1].tolist() == [100.0, 50.0, 200.0, 100.0]  # padding: the full-image box
    fixed = pack_queries([selection], sizes, 10, 4)
    assert fixed.valid.shape == (2, 4) and torch.equal(fixed.boxes[:, :2], data.boxes)
    assert not fixed.bound.any()
    assert pack_queries([selection], sizes, 10, 1).bound.tolist() == [True, False]
    assert torch.equal(fixed.output.per_image()[0][0][:, 4], torch.tensor([0.9, 0.5]))


def test_choose_patches_orders_patches_by_confidence_over_the_batch():
    """The release's order (batched NMS): descending confidence across images; a fixed budget adds
    empty slots after the kept patches."""
    stage = one_stage([[0.3, 0.5], [0.4, 0.05]])
    candidates = stage.anchors[..., 4] > 0.1
    image_wh = torch.tensor([[800.0, 800.0], [800.0, 800.0]])
    data, bound = choose_patches(stage, candidates, image_wh, 8, 15, 0.25, None, None)
    assert data.batch_idx.tolist() == [0, 1, 0] and data.valid is None and not bound.any()
    fixed, bound = choose_patches(stage, candidates, image_wh, 8, 15, 0.25, 2, None)
    assert fixed.batch_idx[:3].tolist() == [0, 1, 0] and fixed.valid.tolist() == [True, True, True, False]
    assert torch.equal(fixed.crop_pos[:3], data.crop_pos)
    capped, bound = choose_patches(stage, candidates, image_wh, 8, 15, 0.25, None, 1)
    assert capped.batch_idx.tolist() == [0, 1] and bound.tolist() == [True, False]
