import argparse
import errno
import os
import random
import re
import signal
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
    with pytest.raises(OSError, match="disk full") as err:
        save(path, model, opt, sched, epoch=5)
    assert err.value.filename == str(path)  # the CLI prints "PATH: disk full"
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


def test_ctrl_c_during_a_write_is_held_back_until_the_write_is_complete(tmp_path, monkeypatch,
                                                                        sigint_handler):
    sigint_handler(signal.default_int_handler)
    model, opt, sched = training_objects()
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while torch.save is writing
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):  # not torch.save's opaque RuntimeError
        save(tmp_path / "last.pth", model, opt, sched, epoch=7)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary file left
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 7  # and the checkpoint is whole
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_an_ignored_ctrl_c_stays_ignored_during_a_write(tmp_path, monkeypatch, sigint_handler):
    sigint_handler(signal.SIG_IGN)
    model, opt, sched = training_objects()
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted_save)
    save(tmp_path / "last.pth", model, opt, sched, epoch=3)  # no KeyboardInterrupt
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_ctrl_c_and_a_failing_write_leave_no_temporary_file(tmp_path, monkeypatch):
    model, opt, sched = training_objects()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        os.kill(os.getpid(), signal.SIGINT)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        save(tmp_path / "last.pth", model, opt, sched)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_names_the_checkpoint(tmp_path):
    model, opt, sched = training_objects()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as err:
        save(tmp_path / "file" / "last.pth", model, opt, sched)
    assert err.value.filename == str(tmp_path / "file" / "last.pth")


def _other_model(model, opt, sched):
    return {"model": nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))}


def _other_groups(model, opt, sched):
    groups = [{"params": [p], "lr": 1e-2} for p in model.parameters()]
    return {"model": model, "optimizer": torch.optim.AdamW(groups)}


def _other_optimizer(model, opt, sched):
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            "drop": "optimizer"}


@pytest.mark.parametrize(
    "make, message",
    [
        (_other_model, r"the weights do not fit the model: Error\(s\) in loading state_dict for Sequential; "
                       r"size mismatch for 0.weight: .*; size mismatch for 0.bias: .*; "
                       r"size mismatch for 2.weight"),
        (_other_groups, re.escape("its optimizer state does not fit this run (loaded state dict has a "
                                  "different number of parameter groups); was it written with other model "
                                  "or schedule settings?")),
        (_other_optimizer, "holds no optimizer state"),
    ],
    ids=["model_shapes", "optimizer_groups", "missing_optimizer"],
)
def test_state_that_does_not_fit_names_the_file_and_the_whole_reason(tmp_path, make, message):
    model, opt, sched = training_objects()
    train_steps(model, opt, sched)
    objects = make(model, opt, sched)
    drop = objects.pop("drop", None)
    path = save(tmp_path / "c.pth", model, opt if drop != "optimizer" else None, sched)
    objects.setdefault("optimizer", None)
    with pytest.raises(CheckpointError) as err:
        restore_training_state(load_checkpoint(path), **objects, source=path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert re.search(message, text), text


def test_non_plain_config_rejected():
    assert to_plain_data({"a": (1, Path("p"))}) == {"a": [1, "p"]}
    with pytest.raises(TypeError, match=r"config\['ns'\]"):
        to_plain_data({"ns": argparse.Namespace()}, where="config")
