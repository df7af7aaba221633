"""Anchor generator: golden comparison with the official fixtures, training behaviour, edge cases."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork

from asag.modeling.anchor_generator import AnchorGenerator
from asag.structures import AnchorOutput, ImageTargets
from official import CASES, FIXTURE_MODEL, LEVELS, load, load_inputs, load_weights

P = 15
# Every eval fixture of ASAG-A, plus one ASAG-S file (identical anchor generator).
EVAL_FILES = [f"eval_asag_a_case_{c}_{lvl}.pt" for c in CASES for lvl in LEVELS]
EVAL_FILES.append("eval_asag_s_case_b_P3P6.pt")
RAW_ATOL = 1e-5  # fixtures README: ag.anchors_for_loss.*.raw
PX_ATOL = 1e-3  # fixtures README: output / padded anchors in pixels


# ------------------------------------------------------------------------------ fixture plumbing


@pytest.fixture(scope="module")
def official_ag(fixtures_dir):
    ag = AnchorGenerator(in_channels=FIXTURE_MODEL["hidden_dim"], compress_dim=FIXTURE_MODEL["compress_dim"])
    ag.load_state_dict(load_weights(fixtures_dir, "asag_a", prefix="anchor_generator."), strict=True)
    return ag.eval()


def _fpn_levels(fixtures_dir, case: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """P3, P4, P5 of a fixture case and its ``[B, 2]`` (h, w) image sizes."""
    inputs = load_inputs(fixtures_dir, case)
    if case == "a":
        fpn = load(fixtures_dir, "fpn_case_a.pt")
        return [fpn["P3"], fpn["P4"], fpn["P5"]], inputs["image_sizes"]
    neck = FeaturePyramidNetwork([256, 512, 1024, 2048], FIXTURE_MODEL["hidden_dim"])
    neck.load_state_dict(load_weights(fixtures_dir, "asag_a", prefix="neck."), strict=True)
    with torch.no_grad():
        out = neck(OrderedDict((f"C{i}", inputs[f"C{i}"]) for i in range(2, 6)))
    return [out["C3"], out["C4"], out["C5"]], inputs["image_sizes"]


@pytest.fixture(scope="module")
def evaluated(fixtures_dir, official_ag):
    """``name -> (our AnchorOutput, the fixture dict)``, computed once per file."""
    levels: dict[str, tuple] = {}
    cache: dict[str, tuple[AnchorOutput, dict]] = {}

    def run(name: str) -> tuple[AnchorOutput, dict]:
        if name not in cache:
            ref = load(fixtures_dir, name)
            if ref["case"] not in levels:
                levels[ref["case"]] = _fpn_levels(fixtures_dir, ref["case"])
            features, sizes = levels[ref["case"]]
            with torch.no_grad():
                out = official_ag(features, sizes, inference_level=ref["used_inference_level"])
            cache[name] = (out, ref)
        return cache[name]

    return run


def _patch_entries(out: AnchorOutput, ref: dict) -> list[int]:
    assert len(out.patch_predictions) == ref["ag.anchors_for_loss.num"], "number of anchors_for_loss entries"
    return list(range(1, ref["ag.anchors_for_loss.num"]))


# ---------------------------------------------------------------------------- golden comparison


@pytest.mark.parametrize("name", EVAL_FILES)
def test_raw_predictions_match(name, evaluated):
    out, ref = evaluated(name)
    _patch_entries(out, ref)
    for i, pred in enumerate(out.patch_predictions):
        expected = ref[f"ag.anchors_for_loss.{i}.raw"]
        assert pred.raw.shape == expected.shape, f"entry {i} ({pred.level}) shape"
        err = (pred.raw - expected).abs().max().item()
        assert err <= RAW_ATOL, f"entry {i} ({pred.level}) raw: max |diff| {err:.2e}"


@pytest.mark.parametrize("name", EVAL_FILES)
def test_crop_positions_match(name, evaluated):
    out, ref = evaluated(name)
    for i in _patch_entries(out, ref):
        assert torch.equal(out.patch_predictions[i].crop_pos, ref[f"ag.anchors_for_loss.{i}.crop_pos"]), i


@pytest.mark.parametrize("name", EVAL_FILES)
def test_batch_indices_match(name, evaluated):
    out, ref = evaluated(name)
    for i in range(ref["ag.anchors_for_loss.num"]):
        assert torch.equal(out.patch_predictions[i].batch_idx, ref[f"ag.anchors_for_loss.{i}.batch_idx"]), i


@pytest.mark.parametrize("name", EVAL_FILES)
def test_levels_and_loss_only_in_eval(name, evaluated):
    out, ref = evaluated(name)
    levels = [p.level for p in out.patch_predictions]
    assert levels == ["P6", "P5", "P4", "P3"][: ref["ag.anchors_for_loss.num"]]
    assert [p.stride for p in out.patch_predictions[2:]] == [16, 8][: len(levels) - 2]
    for pred in out.patch_predictions[2:]:
        assert pred.loss_only.dtype == torch.bool and not pred.loss_only.any()


@pytest.mark.parametrize("name", EVAL_FILES)
def test_num_patches_match(name, evaluated):
    out, ref = evaluated(name)
    num_images = len(ref["hw"])
    for pred in out.patch_predictions[2:]:
        assert len(pred.batch_idx) == ref["ag.num_patches"][pred.level], pred.level
        per_image = torch.bincount(pred.batch_idx, minlength=num_images).tolist()
        assert per_image == ref["ag.num_patches_per_image"][pred.level], pred.level


@pytest.mark.parametrize("name", EVAL_FILES)
def test_group_counts_match(name, evaluated):
    out, ref = evaluated(name)
    assert [[len(g) for g in groups] for groups in out.selected] == ref["ag.num_output_anchors"]


@pytest.mark.parametrize("name", EVAL_FILES)
def test_output_anchors_match(name, evaluated):
    out, ref = evaluated(name)
    for b, groups in enumerate(out.selected):
        for g, anchors in enumerate(groups):
            expected = ref[f"ag.output_anchors.{b}.{g}"]
            assert anchors.shape == expected.shape, (b, g)
            err = (anchors - expected).abs().max().item() if len(expected) else 0.0
            assert err <= PX_ATOL, f"image {b} group {g}: max |diff| {err:.2e}"


@pytest.mark.parametrize("name", EVAL_FILES)
def test_padded_output_anchors_match(name, evaluated):
    out, ref = evaluated(name)
    expected = ref["ag.padded_output_anchors"]
    assert out.boxes.shape == expected.shape
    err = (out.boxes - expected).abs().max().item()
    assert err <= PX_ATOL, f"max |diff| {err:.2e}"


@pytest.mark.parametrize("name", EVAL_FILES)
def test_valid_mask_matches(name, evaluated):
    out, ref = evaluated(name)
    assert torch.equal(out.valid_mask, ref["ag.valid_mask"])


@pytest.mark.parametrize("name", EVAL_FILES)
def test_max_len_matches(name, evaluated):
    out, ref = evaluated(name)
    assert out.num_queries == ref["ag.max_len"]


def test_state_dict_matches_the_official_manifest(fixtures_dir):
    manifest = {}
    for line in (fixtures_dir / "official-state-dict-asag-a.txt").read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key.startswith("anchor_generator."):
            dims = tuple(int(s) for s in shape.strip("()").split(",") if s)
            manifest[key[len("anchor_generator.") :]] = dims
    ag = AnchorGenerator()
    assert {k: tuple(v.shape) for k, v in ag.state_dict().items()} == manifest
    assert sum(p.numel() for p in ag.parameters()) == 6_097_494  # spec appendix A


def test_official_initialisation():
    torch.manual_seed(0)
    ag = AnchorGenerator()
    for table in ag.pos_embedding:
        assert torch.equal(table.weight, torch.zeros(225, 8))
    bound = (6 / (225 + 8)) ** 0.5  # Xavier-uniform on the (225, 8) LayerNorm affine (spec 13 item 5)
    for norm in ag.layernorm:
        for param in (norm.weight, norm.bias):
            assert param.abs().max() <= bound and param.std() > bound / 4
    last = ag.proj_all.layers[2]
    assert last.weight.abs().max() <= (6 / (1000 + 250)) ** 0.5
    assert last.bias.abs().max() <= 1000**-0.5  # 1-D parameters keep the PyTorch default


# ---------------------------------------------------------------------------- crafted tiny model

# (low, high) logit ranges of (w, h) and of the confidence for each slot role, in the spirit of the
# fixtures' crafted biases: candidates are small and mid-confident, so probing always triggers.
ROLES = {
    "cand": ((-3.0, -1.5), (-1.2, 0.2)),
    "hi": ((-3.0, -1.0), (2.0, 3.0)),
    "low": ((-3.0, -1.0), (-5.0, -3.5)),
    "tiny": ((-8.0, -7.0), (2.0, 3.0)),
    "large": ((0.5, 1.5), (-1.0, 0.0)),
}
ROLE_CYCLE = ["cand", "hi", "low", "cand", "tiny", "low", "hi", "large", "cand", "low"]


def craft_last_layer(mlp: torch.nn.Module, generator: torch.Generator, roles: list[str]) -> None:
    """Shrink the last linear's weights and give every anchor slot a role through its biases."""
    last = mlp.layers[-1]
    with torch.no_grad():
        last.weight.mul_(0.05)
        bias = last.bias.view(-1, 5)  # [K, 5]
        for k in range(bias.shape[0]):
            size, conf = ROLES[roles[k % len(roles)]]
            u = torch.rand(4, generator=generator)
            bias[k, 0:2] = u[:2] * 4 - 2
            bias[k, 2:4] = size[0] + u[2:4] * (size[1] - size[0])
            bias[k, 4] = conf[0] + torch.rand(1, generator=generator).item() * (conf[1] - conf[0])


def tiny_ag(seed: int = 0, roles: list[str] = ROLE_CYCLE, **kwargs) -> AnchorGenerator:
    torch.manual_seed(seed)
    ag = AnchorGenerator(in_channels=16, compress_dim=2, mlp_hidden_dim=32, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    craft_last_layer(ag.proj_all, generator, roles)
    craft_last_layer(ag.proj_patch, generator, roles)
    return ag


def random_features(sizes: list[tuple[int, int]], channels: int = 16, seed: int = 0):
    """P3, P4, P5 of a zero-padded batch (padding: multiple of 32) and ``[B, 2]`` (h, w)."""
    generator = torch.Generator().manual_seed(seed)
    hp = -(-max(h for h, _ in sizes) // 32) * 32
    wp = -(-max(w for _, w in sizes) // 32) * 32
    feats = [torch.randn(len(sizes), channels, hp // s, wp // s, generator=generator) for s in (8, 16, 32)]
    return feats, torch.tensor(sizes, dtype=torch.int64)


TRAIN_SIZES = [(256, 320), (176, 208)]
TRAIN_TARGETS = [
    # image 0: two small, far-apart objects -> two GT patches per level
    ImageTargets(
        boxes=torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]), labels=torch.tensor([1, 2])
    ),
    # image 1: five small separated objects and one large one (too large for any patch)
    ImageTargets(
        boxes=torch.tensor(
            [[0.1, 0.1, 0.05, 0.05], [0.9, 0.1, 0.05, 0.05], [0.1, 0.9, 0.05, 0.05], [0.9, 0.9, 0.05, 0.05],
             [0.5, 0.5, 0.05, 0.05], [0.5, 0.5, 0.9, 0.9]]
        ),
        labels=torch.tensor([0, 1, 2, 3, 4, 5]),
    ),
]


def _train_forward(ag: AnchorGenerator, epoch: int, seed: int = 7) -> AnchorOutput:
    features, sizes = random_features(TRAIN_SIZES)
    ag.train()
    torch.manual_seed(seed)
    return ag(features, sizes, targets=TRAIN_TARGETS, epoch=epoch)


def _eval_forward(ag: AnchorGenerator, sizes=TRAIN_SIZES, **kwargs) -> AnchorOutput:
    features, image_sizes = random_features(sizes)
    ag.eval()
    with torch.no_grad():
        return ag(features, image_sizes, **kwargs)


def _check_output_structure(out: AnchorOutput, num_images: int) -> None:
    assert out.boxes.shape[0] == num_images and torch.isfinite(out.boxes).all()
    counts = out.valid_mask.sum(1)
    positions = torch.arange(out.valid_mask.shape[1])
    assert torch.equal(out.valid_mask, positions[None] < counts[:, None]), "valid anchors form a prefix"
    for pred in out.patch_predictions:
        assert torch.isfinite(pred.raw).all(), pred.level


def _patches_inside(out: AnchorOutput, features: list[torch.Tensor]) -> None:
    for pred, fmap in zip(out.patch_predictions[2:], (features[1], features[0])):
        height, width = max(fmap.shape[-2], P), max(fmap.shape[-1], P)
        assert (pred.crop_pos >= 0).all()
        assert (pred.crop_pos[:, 0] + P <= width).all() and (pred.crop_pos[:, 1] + P <= height).all()


def nan_centres(ag: AnchorGenerator) -> AnchorGenerator:
    """A diverged coarse predictor: NaN anchor centres, finite sizes and confidences (so NaN-centred
    anchors still become refinement candidates)."""
    last = ag.proj_all.layers[-1]
    with torch.no_grad():
        last.weight.view(-1, 5, last.weight.shape[-1])[:, :2] = float("nan")
        last.bias.view(-1, 5)[:, :2] = float("nan")
    return ag


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nan_anchor_centres_do_not_index_out_of_range(mode):
    """NaN centres of candidates used to become patch positions of -2**63 (IndexError on the CPU, a
    device-side assert on CUDA) before the trainer could see the non-finite loss."""
    ag = nan_centres(tiny_ag())
    out = _train_forward(ag, epoch=1) if mode == "train" else _eval_forward(ag)
    assert [p.level for p in out.patch_predictions[2:]] == ["P4", "P3"]  # candidates were probed
    _patches_inside(out, random_features(TRAIN_SIZES)[0])
    assert not torch.isfinite(out.patch_predictions[0].raw).all()  # the NaN still reaches the loss


# ------------------------------------------------------------------------------ training mode


@pytest.mark.parametrize("epoch", [0, 1])
def test_training_outputs_are_finite_and_structured(epoch):
    ag = tiny_ag()
    out = _train_forward(ag, epoch)
    _check_output_structure(out, 2)
    p6, p5 = out.patch_predictions[:2]
    assert p6.level == "P6" and p6.raw.shape == (2, 4, ag.num_anchors_coarse, 5), "P6 has 4 flipped copies"
    assert p5.raw.shape == (2, 4, ag.num_anchors_coarse, 5)
    assert [p.level for p in out.patch_predictions[2:]] == ["P4", "P3"]
    for pred in out.patch_predictions[2:]:
        per_image = torch.bincount(pred.batch_idx, minlength=2)
        assert (per_image >= ag.min_training_patches).all(), pred.level
        assert torch.equal(pred.batch_idx, pred.batch_idx.sort().values), "patches grouped by image"
        for b in range(2):  # per image: real patches first, then the added loss-only ones
            flags = pred.loss_only[pred.batch_idx == b].int()
            assert torch.equal(flags, flags.sort().values), (pred.level, b)
    assert out.boxes.grad_fn is None
    sum(p.raw.sum() for p in out.patch_predictions).backward()
    assert ag.proj_patch.layers[0].weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in ag.parameters() if p.grad is not None)


def test_training_p6_original_copy_equals_eval():
    ag = tiny_ag()
    train = _train_forward(ag, 1)
    evaluation = _eval_forward(ag)
    assert torch.allclose(train.patch_predictions[0].raw[:, 0], evaluation.patch_predictions[0].raw[:, 0],
                          atol=1e-6)
    assert torch.allclose(train.patch_predictions[1].raw, evaluation.patch_predictions[1].raw, atol=1e-6)


def test_epoch0_uses_gt_patches_as_real_and_random_ones_as_loss_only():
    ag = tiny_ag()
    out = _train_forward(ag, 0)
    for pred in out.patch_predictions[2:]:
        # image 0: 2 GT patches + 2 random loss-only; image 1: 5 GT patches (the large box is skipped)
        assert pred.batch_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1], pred.level
        assert pred.loss_only.tolist() == [False, False, True, True] + [False] * 5, pred.level
        # every real patch contains (up to the one-cell floor slack) one of its image's objects
        for b, (x, y), only in zip(pred.batch_idx.tolist(), pred.crop_pos.tolist(), pred.loss_only.tolist()):
            if only:
                continue
            h, w = TRAIN_SIZES[b]
            boxes = TRAIN_TARGETS[b].boxes * torch.tensor([w, h, w, h]) / pred.stride  # cxcywh cells
            x1, y1 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
            x2, y2 = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
            inside = (x1 >= x) & (y1 >= y) & (x2 <= x + P + 1) & (y2 <= y + P + 1)
            assert inside.any(), (pred.level, b, x, y)


def test_epoch1_real_patches_are_the_predicted_ones():
    ag = tiny_ag()
    train = _train_forward(ag, 1)
    evaluation = _eval_forward(ag)
    assert len(evaluation.patch_predictions) == 4, "the crafted model probes both levels"
    for pred, ref in zip(train.patch_predictions[2:], evaluation.patch_predictions[2:]):
        order = torch.argsort(ref.batch_idx, stable=True)  # eval order is batched-NMS order
        real = ~pred.loss_only
        assert torch.equal(pred.batch_idx[real], ref.batch_idx[order]), pred.level
        assert torch.equal(pred.crop_pos[real], ref.crop_pos[order]), pred.level
        n_pred = torch.bincount(ref.batch_idx, minlength=2)
        added = torch.bincount(pred.batch_idx[pred.loss_only], minlength=2)
        assert torch.equal(added, (ag.min_training_patches - n_pred).clamp(min=0)), pred.level


def test_training_is_deterministic_under_a_seed():
    ag = tiny_ag()
    first, second = _train_forward(ag, 0, seed=3), _train_forward(ag, 0, seed=3)
    for a, b in zip(first.patch_predictions, second.patch_predictions):
        assert torch.equal(a.raw, b.raw)
    assert torch.equal(first.boxes, second.boxes)


def test_training_without_targets_behaves_as_evaluation():
    ag = tiny_ag()
    features, sizes = random_features(TRAIN_SIZES)
    ag.train()
    with torch.no_grad():
        out = ag(features, sizes, targets=None, epoch=0)
    ref = _eval_forward(ag)
    assert torch.equal(out.boxes, ref.boxes)
    assert out.patch_predictions[0].raw.shape[1] == 1


# ------------------------------------------------------------------------------- evaluation logic


def test_inference_level_override_and_validation():
    ag = tiny_ag(inference_level="P5P6")
    assert len(_eval_forward(ag).patch_predictions) == 2
    assert len(_eval_forward(ag, inference_level="P4P6").patch_predictions) == 3
    assert len(_eval_forward(ag, inference_level="P3P6").patch_predictions) == 4
    with pytest.raises(ValueError):
        _eval_forward(ag, inference_level="P2P6")
    with pytest.raises(ValueError):
        AnchorGenerator(inference_level="P7")


def test_early_stop_and_min_anchor_fallback():
    ag = tiny_ag(roles=["low"])  # nothing passes the thresholds: no candidates, no confident anchors
    out = _eval_forward(ag)
    assert len(out.patch_predictions) == 2, "no candidates: probing stops"
    assert out.valid_mask.sum(1).tolist() == [ag.min_anchors, ag.min_anchors]
    coarse = out.patch_predictions[:2]
    for b, groups in enumerate(out.selected):
        assert len(groups) == 1
        conf = groups[0][:, 4]
        assert torch.equal(conf, conf.sort(descending=True).values), "fallback in descending confidence"
        # the fallback takes the most confident anchors over all crops and P6 (no anchor is tiny here)
        logits = torch.cat([coarse[1].raw[b, :, :, 4].flatten(), coarse[0].raw[b, 0, :, 4]])
        expected = logits.sigmoid().topk(ag.min_anchors).values
        assert torch.allclose(conf, expected)


def test_max_anchors_keeps_the_most_confident_sorted():
    uncapped = _eval_forward(tiny_ag(), inference_level="P5P6")
    capped = _eval_forward(tiny_ag(max_anchors=10), inference_level="P5P6")
    assert capped.num_queries == 10 and capped.valid_mask.all()
    for b in range(2):
        anchors = uncapped.selected[b][0]
        top = anchors[anchors[:, 4].argsort(descending=True)[:10], :4]
        assert torch.allclose(capped.boxes[b], top)


def test_patch_cap_per_image_keeps_the_best_patches():
    uncapped = _eval_forward(tiny_ag(), inference_level="P4P6")
    capped = _eval_forward(tiny_ag(max_patches_per_image=1), inference_level="P4P6")
    ref, got = uncapped.patch_predictions[2], capped.patch_predictions[2]
    assert torch.bincount(got.batch_idx, minlength=2).max() == 1
    for b in got.batch_idx.tolist():
        first = (ref.batch_idx == b).nonzero()[0, 0]
        assert torch.equal(got.crop_pos[got.batch_idx == b][0], ref.crop_pos[first])
    speed = _eval_forward(tiny_ag(max_patches_per_level=1), inference_level="P4P6").patch_predictions[2]
    assert torch.equal(speed.crop_pos, got.crop_pos)


def test_eval_order_is_batched_nms_order_and_groups_follow_patches():
    out = _eval_forward(tiny_ag())
    p4 = out.patch_predictions[2]
    assert p4.batch_idx.unique().numel() == 2, "both images own P4 patches"
    for groups in out.selected:
        assert len(groups) == 3


# ----------------------------------------------------------------------------- small / elongated


@pytest.mark.parametrize("sizes", [[(64, 64)], [(200, 1600)], [(64, 64), (200, 1600)], [(40, 900)]])
@pytest.mark.parametrize("mode", ["eval", "epoch0", "epoch1"])
def test_small_and_elongated_images_run(sizes, mode):
    ag = tiny_ag()
    features, image_sizes = random_features(sizes)
    targets = [ImageTargets(boxes=torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.2, 0.7, 0.02, 0.3]]),
                            labels=torch.tensor([0, 1])) for _ in sizes]
    if mode == "eval":
        ag.eval()
        with torch.no_grad():
            out = ag(features, image_sizes)
    else:
        ag.train()
        torch.manual_seed(0)
        out = ag(features, image_sizes, targets=targets, epoch=int(mode[-1]))
        assert len(out.patch_predictions) == 4
    _check_output_structure(out, len(sizes))
    _patches_inside(out, features)
    assert (out.valid_mask.sum(1) >= ag.min_anchors).all()


def test_batch_invariance_in_evaluation():
    """With the same padded size, an image gives the same anchors alone and in a batch."""
    ag = tiny_ag().eval()
    features, sizes = random_features(TRAIN_SIZES)
    with torch.no_grad():
        batched = ag(features, sizes)
        for b in range(len(sizes)):
            alone = ag([f[b : b + 1] for f in features], sizes[b : b + 1])
            n = int(alone.valid_mask.sum())
            assert int(batched.valid_mask[b].sum()) == n
            assert torch.allclose(batched.boxes[b, :n], alone.boxes[0, :n], atol=1e-4)
            for level in (2, 3):
                mine, ref = batched.patch_predictions[level], alone.patch_predictions[level]
                assert torch.equal(mine.crop_pos[mine.batch_idx == b], ref.crop_pos)
