"""Per-sample seeds for random augmentation, so that a training sample's augmentation never depends on
which process reads it.

The training sampler (:func:`asag.engine.distributed.build_train_sampler`) yields
:class:`SeededIndex` pairs: the data-set item and :func:`sample_seed` of (run seed, epoch, position in
the epoch's order). :class:`SeededDataset` reads the item with torch's CPU RNG, numpy's global RNG and
``random`` seeded from that seed (:func:`seeded_rng`) and puts the three back afterwards. The
augmentation of every sample is therefore the same whether it is read in the main process or in any
DataLoader worker, with any number of workers, persistent or not, and before or after a resume; and
reading data never moves the main process's RNGs (which checkpoints capture for the model's own draws).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

# Seeds are drawn in [0, 2**63): valid for torch.Generator.manual_seed, numpy (mod 2**32) and random.
SEED_BITS = 63
NUMPY_SEED_MODULUS = 2**32


class SeededIndex(NamedTuple):
    """A training sample: the data-set item ``index`` and the ``seed`` of its random augmentation."""

    index: int
    seed: int


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` (0-based) of epoch ``epoch``'s order in a run
    seeded ``seed`` (all three >= 0): a pure function of the three, hashed by numpy's ``SeedSequence`` so
    that neighbouring triples give unrelated seeds. Returns an int in ``[0, 2**63)``."""
    (word,) = np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint64)
    return int(word) >> (64 - SEED_BITS)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Inside the block torch's CPU RNG, numpy's global RNG and ``random`` start from ``seed``; when it
    ends (also on an error) all three are back in their state from before. CUDA RNGs are not touched
    (``torch.manual_seed`` would reseed them)."""
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % NUMPY_SEED_MODULUS)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class SeededDataset(Dataset):
    """``dataset`` read by :class:`SeededIndex`: item ``key.index`` under :func:`seeded_rng` of
    ``key.seed``, so its random augmentation depends on that seed alone. Same length and items as
    ``dataset``; ``dataset`` is the wrapped data set."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SeededIndex) -> Any:
        with seeded_rng(key.seed):
            return self.dataset[key.index]
