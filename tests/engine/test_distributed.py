import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from engine_fakes import (
    FakeCriterion,
    FakeLabelMap,
    OracleDetector,
    SyntheticDataset,
    TinyDetector,
    coco_gt_dict,
    collate,
    make_coco,
    oracle_table,
)
from torch.utils.data import DataLoader

from asag.data.seeding import sample_seed
from asag.engine.distributed import (
    SeededDistributedSampler,
    all_gather_object,
    all_reduce_mean,
    barrier,
    broadcast_object,
    build_eval_sampler,
    build_train_batch_sampler,
    build_train_loader,
    build_train_sampler,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    set_sampler_epoch,
    wrap_ddp,
)
from asag.engine.evaluator import evaluate
from asag.engine.optim import build_optimizer
from asag.engine.schedule import WarmupMultiStepLR
from asag.engine.trainer import train_one_epoch
from asag.errors import ConfigError

GT = coco_gt_dict(12)
EVAL_GT = coco_gt_dict(7)  # odd count: the shards differ in size
TIMING_FIELDS = ("images_per_second", "results_path")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eval_table():
    return oracle_table(EVAL_GT, shift=2.0, score_fn=lambda a: 1.0 / a["id"])


def eval_loader() -> DataLoader:
    dataset = SyntheticDataset(EVAL_GT)
    return DataLoader(dataset, batch_size=2, sampler=build_eval_sampler(dataset), collate_fn=collate)


def run_eval(results_json=None):
    return evaluate(OracleDetector(eval_table()), eval_loader(), coco_gt=make_coco(EVAL_GT),
                    label_map=FakeLabelMap(), device="cpu", results_json=results_json)


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        torch.manual_seed(42 + rank)  # the release seeds 42 + rank: initial weights differ per rank
        model = TinyDetector()
        initial = all_gather_object(model.head.weight.detach().clone())
        ddp = wrap_ddp(model, info.device)
        opt = build_optimizer(ddp, lr=1e-2, backbone_lr=1e-3)
        sched = WarmupMultiStepLR(opt, milestones=[1], warmup_iters=2)
        dataset = SyntheticDataset(GT, augment=True)
        loader = build_train_loader(dataset, batch_size=2, seed=0, collate_fn=collate)
        set_sampler_epoch(loader, 0)
        metrics = train_one_epoch(ddp, FakeCriterion(), loader, opt, sched, epoch=0, device=info.device)
        states = all_gather_object({k: v.detach().clone() for k, v in model.state_dict().items()})
        shards = all_gather_object([tuple(item) for item in loader.batch_sampler.sampler])  # (index, seed)
        result = run_eval(results_json=Path(out_dir) / "results.json")
        where = (info.rank, info.world_size, info.backend, get_rank(), get_world_size(), is_main_process())
        torch.save(
            {
                "info": where,
                "initial_differ": not torch.equal(initial[0], initial[1]),
                "identical": all(torch.equal(states[0][k], states[1][k]) for k in states[0]),
                "trained": not torch.equal(states[0]["head.weight"], initial[0]),
                "shards": shards,
                "iterations": metrics.iterations,
                "loss": metrics.loss,
                "mean": all_reduce_mean({"x": float(rank)}),
                "broadcast": broadcast_object(f"from {rank}"),
                "eval": dataclasses.asdict(result),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
        barrier()
    finally:
        cleanup_distributed()


def test_two_process_gloo_training_and_evaluation(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))

    assert r0["info"] == (0, 2, "gloo", 0, 2, True) and r1["info"] == (1, 2, "gloo", 1, 2, False)
    assert r0["initial_differ"]  # DDP broadcast rank 0's weights ...
    assert r0["identical"] and r0["trained"]  # ... and the ranks stay identical while training
    samples = r0["shards"][0] + r0["shards"][1]
    assert sorted(index for index, _ in samples) == list(range(12))  # disjoint halves
    assert len({seed for _, seed in samples}) == 12  # every sample of the epoch augmented differently
    assert r0["iterations"] == r1["iterations"] == 3
    assert r0["loss"] == r1["loss"]  # epoch means are averaged over ranks
    assert r0["mean"] == r1["mean"] == {"x": 0.5}
    assert r0["broadcast"] == r1["broadcast"] == "from 0"

    single = dataclasses.asdict(run_eval())
    for result in (r0["eval"], r1["eval"]):
        for key, value in single.items():
            if key not in TIMING_FIELDS:
                assert result[key] == value, key
    assert 0.0 < single["ap"] < 1.0 and single["num_images"] == 7
    assert (tmp_path / "results.json").exists()


def test_single_process_fallbacks(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert info.device == torch.device("cpu") and info.backend is None
    assert get_world_size() == 1 and get_rank() == 0 and is_main_process()
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert all_reduce_mean({"x": 2.0}) == {"x": 2.0}
    assert broadcast_object(5) == 5
    model = TinyDetector()
    assert wrap_ddp(model, torch.device("cpu")) is model


def test_missing_master_address_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT"):
        init_distributed("cpu")


def test_augmentation_seeds_follow_the_position_in_the_epoch_whatever_the_world_size():
    dataset = list(range(10))
    single = SeededDistributedSampler(dataset, num_replicas=1, rank=0, seed=5)
    ranks = [SeededDistributedSampler(dataset, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    interleaved = [item for pair in zip(*ranks) for item in pair]
    assert interleaved == list(single)
    assert [seed for _, seed in single] == [sample_seed(5, 2, position) for position in range(10)]


def test_train_sampler_order_depends_on_seed_and_epoch_only():
    dataset = list(range(10))
    a, b = build_train_sampler(dataset, seed=1), build_train_sampler(dataset, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(index for index, _ in a) == dataset
    b.set_epoch(4)
    assert [i for i, _ in a] != [i for i, _ in b] and not {s for _, s in a} & {s for _, s in b}
    batches = list(build_train_batch_sampler(list(range(7)), batch_size=2, seed=0))
    assert len(batches) == 3 and all(len(batch) == 2 for batch in batches)  # incomplete batch dropped
