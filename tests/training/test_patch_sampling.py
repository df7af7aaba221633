"""Training patches of the anchor generator (spec 3.7): ground-truth patches against the official
epoch-0 fixture, the top-up rules of the training patch list."""

import pytest
import torch

import official
from asag.modeling.patches import gt_patch_positions
from asag.structures import ImageTargets, PatchSet
from asag.training.patch_sampling import ground_truth_boxes, merge_per_image, training_patches

P = 15


@pytest.mark.parametrize("level,stride", [("P4", 16), ("P3", 8)])
def test_gt_patches_consistent_with_the_epoch0_criterion_fixture(fixtures_dir, level, stride):
    """The official epoch-0 patches are GT patches: same objects, same order, positions inside the
    range that the jitter can reach (the fixture's random draws cannot be replayed)."""
    ref = official.load(fixtures_dir, "criterion_asag_a_nodn_epoch0.pt")
    targets = [
        ImageTargets(boxes=ref[f"targets.{b}.boxes"], labels=ref[f"targets.{b}.labels"]) for b in range(2)
    ]
    image_wh = torch.tensor([[w, h] for h, w in ref["hw"]], dtype=torch.float32)
    boxes, images = ground_truth_boxes(targets, image_wh, stride, P, 0.25)
    high = gt_patch_positions(boxes, image_wh[images], stride, P, torch.zeros(len(images), 2))
    low = gt_patch_positions(boxes, image_wh[images], stride, P, torch.full((len(images), 2), 1 - 1e-6))
    with_offset = ref[f"debug.ag.{level}.batch_idx_with_offset"]
    real = with_offset < 100  # the rest are random loss-only patches
    assert torch.equal(with_offset[real], images)
    got = ref[f"debug.ag.{level}.crop_pos"][real]
    assert ((got >= low) & (got <= high)).all(), (got.tolist(), low.tolist(), high.tolist())


def test_training_patches_top_up_predicted_patches_to_the_minimum():
    """Predicted patches stay real and first; images short of ``min_patches`` get GT patches, then random
    ones (both loss-only)."""
    image_wh = torch.tensor([[320.0, 256.0], [208.0, 176.0]])
    targets = [ImageTargets(torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]), torch.tensor([1, 2])),
               ImageTargets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))]
    predicted = PatchSet(torch.tensor([1, 0, 1, 1, 1]), torch.zeros(5, 2, dtype=torch.int64),
                         torch.zeros(5, dtype=torch.bool))
    torch.manual_seed(0)
    out = training_patches(predicted, targets, image_wh, 16, P, 0.25, 4)
    assert out.batch_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # image 0: its predicted patch, both GT patches, one random; image 1: its four predicted patches
    assert out.loss_only.tolist() == [False, True, True, True] + [False] * 4


def test_merge_per_image_keeps_the_part_order_inside_each_image():
    parts = [PatchSet(torch.tensor([1, 0]), torch.tensor([[1, 1], [2, 2]]), torch.tensor([False, False])),
             PatchSet(torch.tensor([0, 1]), torch.tensor([[3, 3], [4, 4]]), torch.tensor([True, True]))]
    merged = merge_per_image(parts)
    assert merged.batch_idx.tolist() == [0, 0, 1, 1]
    assert merged.crop_pos[:, 0].tolist() == [2, 3, 1, 4]
    assert merged.loss_only.tolist() == [False, True, False, True]
