"""Per-sample augmentation seeds: a training sample's augmentation depends on (seed, epoch, position)
only, never on the process that reads it, and reading data leaves the global RNGs alone."""

import random

import numpy as np
import PIL.Image
import pytest
import torch

from asag.build import build_dataset, build_loader
from asag.config import load_config
from asag.data.seeding import SeededDataset, SeededIndex, sample_seed, seeded_rng
from asag.data.synthetic import generate_synthetic
from asag.data.transforms import build_eval_transforms
from asag.engine.distributed import set_sampler_epoch


def draws() -> tuple[float, float, float]:
    """One draw from each global RNG: torch (CPU), numpy, random."""
    return float(torch.rand(())), float(np.random.rand()), random.random()


def test_seeded_rng_repeats_draws_and_restores_every_global_rng():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected_after = draws()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with seeded_rng(7):
        first = draws()
    with seeded_rng(7):
        assert draws() == first
    with seeded_rng(8):
        assert draws() != first
    assert draws() == expected_after  # as if the blocks had not run


def test_seeded_rng_restores_the_rngs_after_an_error():
    state = torch.get_rng_state()
    with pytest.raises(ValueError), seeded_rng(3):
        torch.rand(5)
        raise ValueError
    assert torch.equal(torch.get_rng_state(), state)


def test_sample_seeds_are_a_pure_function_of_seed_epoch_and_position():
    seeds = {sample_seed(s, e, p) for s in range(3) for e in range(3) for p in range(50)}
    assert len(seeds) == 3 * 3 * 50 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(42, 3, 17) == sample_seed(42, 3, 17)
    assert sample_seed(0, 1, 0) != sample_seed(1, 0, 0)  # seed + epoch would collide here


class NoisyItems:
    """Item ``i`` is ``i`` plus one draw of the torch RNG (a random augmentation)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        return index + float(torch.rand(()))


def test_seeded_dataset_reads_items_with_their_seed():
    seeded = SeededDataset(NoisyItems())
    assert len(seeded) == 4
    state = torch.get_rng_state()
    assert seeded[SeededIndex(2, 11)] == seeded[SeededIndex(2, 11)] != seeded[SeededIndex(2, 12)]
    assert 2 <= seeded[SeededIndex(2, 11)] < 3
    assert torch.equal(torch.get_rng_state(), state)


def test_evaluation_transform_draws_no_random_number():
    """A single resize choice used to draw from the torch RNG: evaluation in the main process moved the
    RNG that checkpoints restore, so 0 and N loader workers trained differently after an evaluation."""
    state = torch.get_rng_state()
    build_eval_transforms(64, 96)(PIL.Image.new("RGB", (40, 30)), torch.tensor([[1.0, 2.0, 20.0, 25.0]]),
                                  torch.tensor([0]))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 6, seed=4, val_images=2)
    return root


def epoch_batches(loader, epochs: int) -> list[tuple[torch.Tensor, list]]:
    out = []
    for epoch in range(epochs):
        set_sampler_epoch(loader, epoch)
        out += [(batch.images, [t.boxes for t in batch.targets]) for batch in loader]
    return out


def test_training_batches_do_not_depend_on_the_number_of_workers(tiny_data):
    """The real augmentations (random flip, 3x crop branch) give the same batches in the main process and
    in two persistent workers, every epoch; reading them leaves the main process's torch RNG alone."""
    small_3x = ["data.augmentation=3x", "data.train_scales=[64,96]", "data.train_max_size=128",
                "data.crop_scales=[64,80]", "data.crop_size=[32,64]"]
    cfg = load_config("tiny_cpu", [f"data.root={tiny_data}", *small_3x])
    dataset = build_dataset(cfg.data, "train")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    main = epoch_batches(build_loader(dataset, cfg.data, train=True, seed=5), epochs=2)
    assert torch.equal(torch.get_rng_state(), state)
    cfg.data.num_workers = 2
    workers = epoch_batches(build_loader(dataset, cfg.data, train=True, seed=5), epochs=2)
    assert len(main) == len(workers) == 6
    for (images, boxes), (w_images, w_boxes) in zip(main, workers):
        assert torch.equal(images, w_images) and all(map(torch.equal, boxes, w_boxes))
    assert not torch.equal(main[0][0], main[3][0])  # epochs differ (order and augmentation)
