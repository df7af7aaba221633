"""Process-group set-up from torchrun's environment, collective helpers, DDP wrapping and samplers.

Everything works unchanged in a single process: the helpers fall back to the identity / rank 0 when
no process group is initialised.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from asag.data.seeding import SeededDataset, SeededIndex, sample_seed
from asag.errors import ConfigError

# Environment variables set by torchrun (torch.distributed.run).
ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"
ENV_MASTER_ADDR, ENV_MASTER_PORT = "MASTER_ADDR", "MASTER_PORT"
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``device`` is the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cuda", *, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Initialise the default process group from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and a single-process
    :class:`DistInfo` is returned. The backend is NCCL when ``device`` is ``"cuda"`` (and CUDA is
    available), gloo otherwise; on CUDA each process uses GPU ``LOCAL_RANK``.
    """
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    world_size = int(os.environ.get(ENV_WORLD_SIZE, "1"))
    local_rank = int(os.environ.get(ENV_LOCAL_RANK, "0"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, None, _process_device(device, use_cuda, local_rank))
    missing = [k for k in (ENV_RANK, ENV_MASTER_ADDR, ENV_MASTER_PORT) if k not in os.environ]
    if missing:
        raise ConfigError(f"distributed run (WORLD_SIZE={world_size}) but {', '.join(missing)} not set")
    rank = int(os.environ[ENV_RANK])
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout
        )
    return DistInfo(rank, world_size, local_rank, backend, _process_device(device, use_cuda, local_rank))


def _process_device(device: str, use_cuda: bool, local_rank: int) -> torch.device:
    if use_cuda:
        return torch.device("cuda", local_rank)
    if device.startswith("cuda"):
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over all ranks (every rank must pass the same keys)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(packed)
    packed /= get_world_size()
    return dict(zip(keys, packed.tolist()))


def all_reduce_sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a copy; the input is unchanged)."""
    out = tensor.detach().clone().to(_collective_device())
    if is_distributed():
        dist.all_reduce(out)
    return out.to(tensor.device)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = True) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when a process group exists (identity otherwise).

    ``find_unused_parameters=True`` as in the release (spec section 9): which anchor-generator levels
    run depends on the data, so some parameters get no gradient in some iterations. DDP broadcasts
    rank 0's parameters and buffers when wrapping.
    """
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


# ------------------------------------------------------------------------------------------ samplers


class SeededDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose items are :class:`~asag.data.seeding.SeededIndex` pairs: each index
    with the seed of its augmentation, ``sample_seed(seed, epoch, rank + i * world_size)`` for this rank's
    ``i``-th sample, i.e. a function of its position in the epoch's whole (padded) order. Read through a
    :class:`~asag.data.seeding.SeededDataset`."""

    def __iter__(self) -> Iterator[SeededIndex]:  # type: ignore[override]
        for i, index in enumerate(super().__iter__()):
            position = self.rank + i * self.num_replicas
            yield SeededIndex(index, sample_seed(self.seed, self.epoch, position))


def build_train_sampler(dataset: Sized, *, seed: int = 0, shuffle: bool = True) -> SeededDistributedSampler:
    """Shuffling sampler over this rank's share of ``dataset``, yielding ``SeededIndex(index, seed)``
    (:class:`SeededDistributedSampler`); order and seeds depend only on ``seed`` and the epoch set with
    ``set_epoch`` (so a resumed run sees the same samples, augmented alike). Works without a process
    group (one replica). Ranks get equally many samples (the release pads by repeating samples)."""
    return SeededDistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle, seed=seed, drop_last=False
    )


def build_train_batch_sampler(dataset: Sized, *, batch_size: int, seed: int = 0) -> BatchSampler:
    """Batches of :func:`build_train_sampler`, dropping the incomplete last batch (spec section 9)."""
    return BatchSampler(build_train_sampler(dataset, seed=seed), batch_size, drop_last=True)


def loader_options(*, num_workers: int, seed: int, collate_fn: Callable[[list], Any]) -> dict[str, Any]:
    """DataLoader keywords shared by training and evaluation loaders: ``num_workers`` persistent
    workers, and a private generator seeded with ``seed`` for the workers' base seed, so that starting
    an epoch never draws from the global torch RNG (which checkpoints capture for the model's draws)."""
    return dict(collate_fn=collate_fn, num_workers=num_workers, persistent_workers=num_workers > 0,
                generator=torch.Generator().manual_seed(seed))


def build_train_loader(dataset: Dataset, *, batch_size: int, seed: int = 0, num_workers: int = 0,
                       collate_fn: Callable[[list], Any]) -> DataLoader:
    """The training loader: :func:`build_train_batch_sampler` batches of ``dataset`` read through a
    :class:`~asag.data.seeding.SeededDataset`. Every sample's order and random augmentation are functions
    of (``seed``, epoch set with :func:`set_sampler_epoch`, position in the epoch) only: the batches are
    the same with any ``num_workers`` and after a resume, and reading them leaves the global RNGs alone."""
    batches = build_train_batch_sampler(dataset, batch_size=batch_size, seed=seed)  # type: ignore[arg-type]
    return DataLoader(SeededDataset(dataset), batch_sampler=batches,
                      **loader_options(num_workers=num_workers, seed=seed, collate_fn=collate_fn))


class InferenceShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` gets indices ``r, r + n, r + 2n, ...`` in order: no padding, no repeats, so
    gathered evaluation results cover every image exactly once."""

    def __init__(self, dataset: Sized, *, rank: int | None = None, world_size: int | None = None):
        self.num_samples_total = len(dataset)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples_total, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples_total, self.world_size))


def build_eval_sampler(dataset: Sized) -> InferenceShardSampler:
    """Sampler giving this rank its share of ``dataset`` for evaluation (all of it in one process)."""
    return InferenceShardSampler(dataset)


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler or batch sampler's sampler, where it exists."""
    for candidate in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
