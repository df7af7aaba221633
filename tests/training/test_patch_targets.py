"""Per-patch anchor targets (spec 8.6.1-8.6.3): hand cases, properties, and the official targets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import official
from asag.training.matcher import GroupedTargets
from asag.training.patch_targets import (
    crop_targets,
    flip_cxcywh,
    p6_targets,
    probed_patch_targets,
    release_flip,
)

CRITERION_CASES = ["nodn_epoch1", "nodn_epoch0", "dn_epoch1"]
SIZE_320x480 = torch.tensor([[320, 480]])  # (h, w)
CROP_POS = torch.tensor([[0, 0], [0, 15], [15, 0], [15, 15]])  # (row, col) on the 30x30 grid


def _images(*images: list[tuple[float, float, float, float]]) -> GroupedTargets:
    boxes = [torch.tensor(img, dtype=torch.float32).reshape(-1, 4) for img in images]
    labels = [torch.arange(len(b)) for b in boxes]
    return GroupedTargets.from_lists(boxes, labels)


def _xyxy(t: GroupedTargets) -> torch.Tensor:
    return torch.cat([t.boxes[:, :2] - t.boxes[:, 2:] / 2, t.boxes[:, :2] + t.boxes[:, 2:] / 2], dim=1)


def _gt_of(d: dict) -> GroupedTargets:
    n = d["targets.num"]
    boxes = [d[f"targets.{b}.boxes"] for b in range(n)]
    return GroupedTargets.from_lists(boxes, [d[f"targets.{b}.labels"] for b in range(n)])


def _per_group(t: GroupedTargets) -> list[list[list[float]]]:
    return [t.boxes[t.group == g].tolist() for g in range(t.num_groups)]


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=0, atol=atol)


# ------------------------------------------------------------------------------------ P4 / P3 patches


def test_object_on_a_patch_border_belongs_to_both_patches():
    # Image 480 x 320 (w x h), stride 16: a patch spans 240 px = 0.5 of the width and 0.75 of the height.
    gt = _images([(0.5, 0.25, 0.1, 0.1)])
    crop_pos = torch.tensor([[0, 0], [15, 0]])  # (x, y) cells: left and right half
    out = probed_patch_targets(gt, crop_pos, torch.tensor([0, 0]), torch.tensor([16, 16]), SIZE_320x480)
    left, right = _per_group(out)
    # Left patch: x clipped to [0.45, 0.5] -> *2 -> [0.9, 1.0]; y [0.2, 0.3] -> *4/3 -> [0.2667, 0.4].
    _close(left, [[0.95, (0.2 + 0.3) / 2 * 4 / 3, 0.1, 0.1 * 4 / 3]])
    # Right patch: x [0.5, 0.55] -> [0, 0.1].
    _close(right, [[0.05, (0.2 + 0.3) / 2 * 4 / 3, 0.1, 0.1 * 4 / 3]])
    assert out.source.tolist() == [0, 0]


def test_too_large_objects_are_excluded():
    # Patch width 0.5 of the image, height 0.75: boxes up to exactly that size are kept.
    # widths 0.5 (= limit), 0.51 (too wide); heights 0.76 (too tall), 0.75 (= limit)
    gt = _images(
        [(0.25, 0.3, 0.5, 0.2), (0.25, 0.3, 0.51, 0.2), (0.25, 0.3, 0.1, 0.76), (0.25, 0.3, 0.1, 0.75)]
    )
    first = torch.tensor([0])
    out = probed_patch_targets(gt, torch.tensor([[0, 0]]), first, torch.tensor([16]), SIZE_320x480)
    assert out.source.tolist() == [0, 3]
    _close(out.boxes[0].tolist(), [0.5, 0.4, 1.0, 0.2 * 4 / 3])


def test_centre_outside_patch_excluded_and_patch_order_kept():
    gt = _images([(0.1, 0.1, 0.05, 0.05)], [(0.9, 0.9, 0.05, 0.05), (0.1, 0.1, 0.05, 0.05)])
    crop_pos = torch.tensor([[0, 0], [15, 10], [0, 0]])  # image 1, image 1, image 0
    sizes = torch.tensor([[320, 480], [320, 480]])
    out = probed_patch_targets(gt, crop_pos, torch.tensor([1, 1, 0]), torch.tensor([16, 16, 8]), sizes)
    assert out.group.tolist() == [0, 1, 2]
    assert out.source.tolist() == [2, 1, 0]  # flat ground-truth index: image 1 box 1, image 1 box 0, image 0
    # Third patch is at stride 8: 120 px wide -> 0.25 of the width, 0.375 of the height.
    _close(out.boxes[2].tolist(), [0.4, 0.1 / 0.375, 0.2, 0.05 / 0.375])


def test_no_patches_and_empty_images():
    gt = _images([], [(0.5, 0.5, 0.1, 0.1)])
    sizes = torch.tensor([[64, 64]] * 2)
    no_index = torch.zeros(0, dtype=torch.int64)
    none = probed_patch_targets(gt, torch.zeros(0, 2, dtype=torch.int64), no_index, no_index, sizes)
    assert len(none) == 0 and none.num_groups == 0
    origin = torch.tensor([[0, 0], [0, 0]])
    out = probed_patch_targets(gt, origin, torch.tensor([0, 1]), torch.tensor([8, 8]), sizes)
    assert out.group.tolist() == [1]


# ------------------------------------------------------------------------------------------ P5 crops


def test_crop_targets_centre_on_the_grid_lines():
    gt = _images([(0.5, 0.5, 0.2, 0.2), (0.25, 0.5, 0.1, 0.1), (0.75, 0.2, 1.0, 1.0)])
    out = crop_targets(gt, CROP_POS)
    assert out.num_groups == 4
    assert [out.source[out.group == g].tolist() for g in range(4)] == [[0, 1], [0, 2], [0, 1], [0]]
    crop0, crop1, crop2, crop3 = _per_group(out)
    _close(crop0[0], [0.9, 0.9, 0.2, 0.2])  # (0.4, 0.4, 0.5, 0.5) -> *2
    _close(crop3[0], [0.1, 0.1, 0.2, 0.2])  # (0.5, 0.5, 0.6, 0.6) -> -0.5, *2
    _close(crop2[1], [0.5, 0.05, 0.2, 0.1])  # xyxy (0.2, 0.45, 0.3, 0.55) clipped -> (0.4, 0, 0.6, 0.1)
    _close(crop1[1], [0.5, 0.5, 1.0, 1.0])  # huge object: no size filter, clipped to the whole crop


# ------------------------------------------------------------------------------------------------- P6


def test_release_and_correct_flips():
    box = torch.tensor([[0.2, 0.3, 0.1, 0.4]])
    _close(release_flip(box, True, False).tolist(), [[0.9, 0.3, 0.8, 0.4]])
    _close(release_flip(box, False, True).tolist(), [[0.2, 0.6, 0.1, 0.7]])
    _close(release_flip(box, True, True).tolist(), [[0.9, 0.6, 0.8, 0.7]])
    _close(flip_cxcywh(box, True, False).tolist(), [[0.8, 0.3, 0.1, 0.4]])
    _close(flip_cxcywh(box, False, True).tolist(), [[0.2, 0.7, 0.1, 0.4]])
    _close(flip_cxcywh(box, True, True).tolist(), [[0.8, 0.7, 0.1, 0.4]])


def test_p6_targets_group_order_and_options():
    gt = _images([(0.2, 0.3, 0.1, 0.4), (0.6, 0.6, 0.2, 0.2)], [], [(0.5, 0.5, 1.0, 1.0)])
    out = p6_targets(gt, 4)
    assert out.num_groups == 12
    assert out.counts().tolist() == [2, 2, 2, 2, 0, 0, 0, 0, 1, 1, 1, 1]
    _close(_per_group(out)[1][0], [0.9, 0.3, 0.8, 0.4])  # image 0, h-flip (release formula)
    fixed = p6_targets(gt, 4, fix_flip=True)
    _close(_per_group(fixed)[3][1], [0.4, 0.4, 0.2, 0.2])  # image 0 box 1, hv-flip
    single = p6_targets(gt, 1)  # evaluation: one unflipped copy per image
    assert single.num_groups == 3
    torch.testing.assert_close(single.boxes, gt.boxes)
    with pytest.raises(ValueError, match="P6 has 1"):
        p6_targets(gt, 2)


# ------------------------------------------------------------------------------------------ properties


box_strategy = st.tuples(
    st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0)
).map(lambda b: (b[0], b[1], b[2] * 0.8 + 1e-3, b[3] * 0.8 + 1e-3))


@settings(max_examples=60, deadline=None)
@given(
    boxes=st.lists(box_strategy, min_size=0, max_size=12),
    patches=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 30), st.sampled_from([8, 16])), min_size=1, max_size=6
    ),
)
def test_patch_targets_match_a_brute_force_reference(boxes, patches):
    h, w = 400, 640
    gt = _images(boxes)
    crop_pos = torch.tensor([[x, y] for x, y, _ in patches])
    strides = torch.tensor([s for _, _, s in patches])
    image = torch.zeros(len(patches), dtype=torch.int64)
    out = probed_patch_targets(gt, crop_pos, image, strides, torch.tensor([[h, w]]))
    expected = []
    for g, (x0, y0, s) in enumerate(patches):
        lo_x, lo_y = x0 * s / w, y0 * s / h
        hi_x, hi_y = (x0 + 15) * s / w, (y0 + 15) * s / h
        for i, (cx, cy, bw, bh) in enumerate(gt.boxes.double().tolist()):
            if lo_x <= cx <= hi_x and lo_y <= cy <= hi_y and bw <= 15 * s / w and bh <= 15 * s / h:
                expected.append((g, i))
    assert list(zip(out.group.tolist(), out.source.tolist())) == expected
    xyxy = _xyxy(out)
    assert bool(((xyxy >= -1e-5) & (xyxy <= 1 + 1e-5)).all())
    assert bool((out.boxes[:, 2:] >= 0).all())


@settings(max_examples=60, deadline=None)
@given(boxes=st.lists(box_strategy, min_size=0, max_size=10))
def test_crop_targets_inside_the_unit_square_and_every_object_in_a_crop(boxes):
    gt = _images(boxes)
    out = crop_targets(gt, CROP_POS)
    xyxy = _xyxy(out)
    assert bool(((xyxy >= -1e-6) & (xyxy <= 1 + 1e-6)).all())
    assert set(out.source.tolist()) == set(range(len(boxes)))  # the four quadrants cover the image


# ------------------------------------------------------------------------------------ official targets


def _official_parts(fixtures_dir, case):
    d = official.load(fixtures_dir, f"criterion_asag_a_{case}.pt")
    return d, _gt_of(d)


def _compare(ours: GroupedTargets, debug: dict) -> None:
    assert ours.counts().tolist() == debug["target_counts"]
    torch.testing.assert_close(ours.boxes, debug["target_boxes"], rtol=0, atol=1e-6)
    assert ours.labels.tolist() == debug["target_labels"].tolist()


@pytest.mark.parametrize("case", CRITERION_CASES)
def test_official_p6_targets_with_release_flips(fixtures_dir, case):
    d, gt = _official_parts(fixtures_dir, case)
    copies = d["outputs.anchors.anchors_for_loss.0.raw"].shape[1]
    _compare(p6_targets(gt, copies), official.group(d, "debug.get_weight.anchor_P6"))


@pytest.mark.parametrize("case", CRITERION_CASES)
def test_official_crop_targets(fixtures_dir, case):
    d, gt = _official_parts(fixtures_dir, case)
    crop_pos = d["outputs.anchors.anchors_for_loss.1.crop_pos"]
    _compare(crop_targets(gt, crop_pos), official.group(d, "debug.get_weight.anchor_P5crops"))


@pytest.mark.parametrize("case", CRITERION_CASES)
def test_official_probed_patch_targets(fixtures_dir, case):
    d, gt = _official_parts(fixtures_dir, case)
    entries = [f"outputs.anchors.anchors_for_loss.{i}" for i in (2, 3)]
    crop_pos = torch.cat([d[f"{e}.crop_pos"] for e in entries])
    batch_idx = torch.cat([d[f"{e}.batch_idx"] for e in entries])
    strides = torch.cat([torch.full((len(d[f"{e}.batch_idx"]),), s) for e, s in zip(entries, (16, 8))])
    image_sizes = torch.tensor(d["hw"])
    ours = probed_patch_targets(gt, crop_pos, batch_idx, strides, image_sizes)
    _compare(ours, official.group(d, "debug.get_weight.anchor_P4P3patches"))
    # The fixture's batch_idx is the debug index with the loss-only offset (100) removed.
    with_offset = torch.cat([d[f"debug.ag.{lv}.batch_idx_with_offset"] for lv in ("P4", "P3")])
    assert (with_offset % 100).tolist() == batch_idx.tolist()
