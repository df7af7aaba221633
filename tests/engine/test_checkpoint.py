import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import asag.engine.checkpoint as ckpt_mod
from asag.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
    to_plain_data,
)
from asag.engine.schedule import WarmupMultiStepLR
from asag.errors import CheckpointError


def training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = WarmupMultiStepLR(opt, milestones=[2], warmup_iters=10)
    return model, opt, sched


def train_steps(model, opt, sched, n=3):
    for _ in range(n):
        loss = model(torch.randn(5, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step_iteration()


def save(path, model, opt, sched, **kw):
    args = dict(model=model, optimizer=opt, scheduler=sched, scaler=None, epoch=1, iteration=3,
                config={"model": {"dims": (1, 2)}, "path": Path("/x")}, label_map={"category_ids": [1, 3]},
                extra={"best_ap": 0.25})
    args.update(kw)
    return save_checkpoint(path, **args)


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = training_objects(0)
    train_steps(model, opt, sched)
    path = save(tmp_path / "sub" / "last.pth", model, opt, sched)

    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["config"] == {"model": {"dims": [1, 2]}, "path": "/x"}
    assert raw["epoch"] == 1 and raw["iteration"] == 3 and raw["extra"] == {"best_ap": 0.25}

    data = load_checkpoint(path)
    model2, opt2, sched2 = training_objects(1)
    restore_training_state(data, model=model2, optimizer=opt2, scheduler=sched2, restore_rng=False)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.warmup_done == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    torch.manual_seed(5)
    train_steps(model, opt, sched)
    torch.manual_seed(5)
    train_steps(model2, opt2, sched2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2] and first[3] == second[3]


def test_rng_state_saved_and_restored_through_file(tmp_path):
    model, opt, sched = training_objects()
    path = save(tmp_path / "c.pth", model, opt, sched)
    expected = torch.rand(4), np.random.rand(2), random.random()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_training_state(load_checkpoint(path), model=model)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    model, opt, sched = training_objects()
    path = save(tmp_path / "last.pth", model, opt, sched, epoch=4)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the temporary file ...
        raise OSError("disk full")  # ... then the write fails

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save(path, model, opt, sched, epoch=5)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary file left
    assert load_checkpoint(path)["epoch"] == 4  # the previous checkpoint is intact


def test_atomic_write_leaves_nothing_when_first_write_fails(tmp_path, monkeypatch):
    model, opt, sched = training_objects()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "last.pth", model, opt, sched)
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path):
    model, opt, sched = training_objects()
    path = save(tmp_path / "last.pth", model, opt, sched)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as err:
        load_checkpoint(tmp_path / "nope.pth")
    assert "nope.pth" in str(err.value)


def test_foreign_files(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, plain)
    with pytest.raises(CheckpointError, match="not an asag training checkpoint") as err:
        load_checkpoint(plain)
    assert str(plain) in str(err.value)

    pickled = tmp_path / "official.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(pickled)

    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_checkpoint(text)


def test_newer_format_rejected(tmp_path):
    model, opt, sched = training_objects()
    path = save(tmp_path / "c.pth", model, opt, sched)
    data = torch.load(path, weights_only=True)
    data["format_version"] = 99
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_model_mismatch_raises_checkpoint_error(tmp_path):
    model, opt, sched = training_objects()
    path = save(tmp_path / "c.pth", model, opt, sched)
    with pytest.raises(CheckpointError, match="does not fit"):
        restore_training_state(load_checkpoint(path), model=nn.Linear(3, 3))


def test_non_plain_config_rejected():
    assert to_plain_data({"a": (1, Path("p"))}) == {"a": [1, "p"]}
    with pytest.raises(TypeError, match=r"config\['ns'\]"):
        to_plain_data({"ns": argparse.Namespace()}, where="config")
