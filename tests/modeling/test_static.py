"""Fixed budgets (the static mode): fixed shapes, no host reads, the data-sized budgets' outputs where no
budget binds.

The equivalence tests compare the same anchor generator under both budget sources: on crafted probing
inputs (every stage reached), budgets that bind against the data-sized mode's own caps, and (in
``test_static_end_to_end``) the whole detector on the official fixtures.
"""

import pytest
import torch
from tests.helpers import crafted_generator, probing_inputs

from asag.engine.syncs import SyncAudit
from asag.errors import ConfigError
from asag.modeling.anchor_generator import BUDGET_KEYS, AnchorGenerator
from asag.modeling.budgets import STATIC_PATCHES_PER_LEVEL, Budgets
from asag.structures import ImageTargets


def fixed(generator: AnchorGenerator, patches_per_level: int = STATIC_PATCHES_PER_LEVEL) -> Budgets:
    """The static mode's budgets for ``generator``: patch slots and ``max_anchors`` query slots."""
    return Budgets(patches_per_level, generator.max_anchors)


def mixed_inputs(batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`probing_inputs` with the last image smaller than the padded batch."""
    levels, sizes = probing_inputs(batch)
    sizes[-1] = torch.tensor([224, 320])
    return levels, sizes


def assert_same_anchors(dynamic, static) -> None:
    """Static output = dynamic output in its first ``Q`` columns, padding after."""
    q = dynamic.boxes.shape[1]
    assert static.boxes.shape[1] >= q
    assert torch.equal(static.valid_mask[:, :q], dynamic.valid_mask)
    assert not static.valid_mask[:, q:].any()
    assert torch.allclose(static.boxes[:, :q], dynamic.boxes, atol=1e-3)
    static_patches = {p.level: int(p.valid.sum()) if p.valid is not None else len(p.batch_idx)
                      for p in static.patch_predictions}
    assert static_patches == {p.level: len(p.batch_idx) for p in dynamic.patch_predictions}
    for ours, theirs in zip(static.selected, dynamic.selected, strict=True):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
def test_static_anchor_generator_matches_the_dynamic_one(batch):
    generator = crafted_generator()
    levels, sizes = mixed_inputs(batch)
    with torch.inference_mode():
        dynamic = generator(levels, sizes)
        with SyncAudit() as audit:
            out = generator(levels, sizes, budgets=fixed(generator))
    assert audit.total == 0, audit.sites
    assert [p.level for p in out.patch_predictions] == ["P6", "P5", "P4", "P3"]
    assert out.boxes.shape == (batch, generator.max_anchors, 4)  # Q = the query budget
    assert out.patch_predictions[2].raw.shape[0] == batch * STATIC_PATCHES_PER_LEVEL
    assert_same_anchors(dynamic, out)
    assert set(out.budget_bound) == set(BUDGET_KEYS)
    assert not any(bound.any() for bound in out.budget_bound.values())


@pytest.mark.parametrize("level", ["P4P6", "P5P6"])
def test_static_anchor_generator_stops_at_the_inference_level(level):
    generator = crafted_generator()
    levels, sizes = mixed_inputs(2)
    with torch.inference_mode():
        dynamic = generator(levels, sizes, inference_level=level)
        out = generator(levels, sizes, inference_level=level, budgets=fixed(generator))
    assert len(out.patch_predictions) == {"P4P6": 3, "P5P6": 2}[level]
    assert_same_anchors(dynamic, out)


@pytest.mark.parametrize("slots", [1, 2])
def test_a_binding_patch_budget_keeps_the_best_nms_patches(slots):
    """The static budget keeps what the dynamic mode keeps under the same cap: the first patches of
    the patch NMS, i.e. the highest confidence after suppression."""
    generator = crafted_generator()
    generator.patch_cap = slots
    budgets = fixed(generator, patches_per_level=8)
    assert generator.patch_slots(budgets) == slots  # the cap of the data-sized patches caps the budget too
    levels, sizes = mixed_inputs(3)
    with torch.inference_mode():
        dynamic, out = generator(levels, sizes), generator(levels, sizes, budgets=budgets)
    assert_same_anchors(dynamic, out)
    assert out.budget_bound["P4"].all() and out.budget_bound["P3"].all()  # crafted inputs probe more


def test_a_binding_query_budget_keeps_the_most_confident_anchors():
    generator = crafted_generator()
    generator.max_anchors = 40
    levels, sizes = mixed_inputs(2)
    with torch.inference_mode():
        dynamic, out = generator(levels, sizes), generator(levels, sizes, budgets=fixed(generator))
    assert out.boxes.shape[1] == 40 and out.valid_mask.all()
    assert_same_anchors(dynamic, out)
    assert out.budget_bound["queries"].all()


def test_static_anchor_generator_refuses_training():
    generator = crafted_generator().train()
    levels, sizes = mixed_inputs(1)
    targets = [ImageTargets(torch.tensor([[0.5, 0.5, 0.1, 0.1]]), torch.tensor([0]))]
    with pytest.raises(ConfigError, match="static mode is for inference only"):
        generator(levels, sizes, targets=targets, budgets=fixed(generator))
