"""Host syncs of one training step: counted by stage; the matching's do not grow with the batch."""

import pytest
import torch
from tests.targets import random_targets

from asag.build import build_trainer
from asag.config import load_config
from asag.engine.step_syncs import SYNC_STAGES, count_step_syncs, stage_of

# Matching syncs of one tiny_cpu step, whatever the batch (measured 33; 207 at batch 1 and 482 at batch 4
# before the costs of a stage crossed in one copy): per matched stage (proposal stage, 2 heads, P6, P5
# crops, P4/P3 patches) the padded width of its targets, one copy of all its costs to the host (counted
# twice: ``cpu`` + ``numpy``) and one copy of the pairs back (6 x 4); the padded widths of the three
# anchor ignore masks and of two more paddings; grouping the per-image and denoising targets (2 x 2).
MAX_MATCHING_SYNCS = 33


def step_syncs(batch: int, device: str = "cpu"):
    cfg = load_config("tiny_cpu", ["denoising.enabled=true", "denoising.num_queries=12",
                                   f"runtime.device={device}"])
    torch.manual_seed(0)
    trainer = build_trainer(cfg, device=device)
    sizes = torch.tensor([[64, 96]] * batch)
    images = torch.randn(batch, 3, 64, 96)
    return trainer, images, sizes, random_targets(sizes, 3, seed=2)


def test_stage_of_sorts_sites():
    assert stage_of("forward", "modeling/anchor_generator.py:12") == "anchor generator"
    assert stage_of("forward", "modeling/decoders/adamixer.py:1") == "proposal/decoder"
    assert stage_of("loss", "training/matcher.py:3") == "matching"
    assert stage_of("loss", "training/criterion.py:3") == "loss"
    assert stage_of("backward", "<outside asag>") == "backward"


@pytest.mark.slow
def test_matching_syncs_do_not_grow_with_the_batch():
    counts = {}
    for batch in (1, 4):
        counts[batch], _ = count_step_syncs(*step_syncs(batch))
        assert set(counts[batch]) == set(SYNC_STAGES)
    assert counts[1] == counts[4]
    assert counts[4]["matching"] <= MAX_MATCHING_SYNCS
    assert counts[4]["backward"] == 0 and counts[4]["backbone/FPN"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sync_debug_mode_counts_the_same_order():
    """On CUDA, torch's own sync detector warns once per real sync; the count must not grow with the batch."""
    from asag.engine.syncs import CudaSyncCount

    totals = {}
    for batch in (1, 4):
        trainer, images, sizes, targets = step_syncs(batch, "cuda")
        trainer.train_step(images, sizes, targets)  # warm-up (first-call syncs, allocator)
        torch.cuda.synchronize()
        with CudaSyncCount() as syncs:
            trainer.train_step(images, sizes, targets)
        totals[batch] = syncs.total
    assert totals[4] <= totals[1] + 4, totals
