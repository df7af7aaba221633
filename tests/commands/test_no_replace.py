"""No command replaces a file without being asked, and a run that fails or is interrupted leaves nothing
misleading behind (half-written files, logs of a run that cannot be resumed, temporary files).

The training runs here replace the training step with one that does nothing (:func:`instant_steps`):
what is tested is what the run writes, not what it learns (tests/commands/test_cli.py trains for real).
"""

import errno
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch

import asag.engine.trainer
from asag.cli import main
from asag.data.synthetic import generate_synthetic
from asag.engine.checkpoint import save_checkpoint
from asag.engine.logger import METRICS_FILE, TENSORBOARD_DIR, RunLogger
from asag.errors import OutputError
from asag.outputs import atomic_write_text, prepare_run_dir


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"asag {command}: error: "), err
    return err.strip()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- asag data


def synth(out: Path, *extra: str) -> list[str]:
    return ["data", "synth", "--out", str(out), "--val-images", "1", *extra]


def test_data_synth_refuses_an_existing_data_set_before_generating(tmp_path, monkeypatch, capsys):
    import asag.data.synthetic

    out = tmp_path / "shapes"
    assert main(synth(out, "--images", "2", "--seed", "1")) == 0
    before = snapshot(out)
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(asag.data.synthetic, "generate_synthetic", lambda *a, **k: pytest.fail("generated"))
        assert main(synth(out, "--images", "2", "--seed", "2")) == 2
    err = one_line_error(capsys, "data")
    assert err.endswith(f"--out {out} already holds a data set (train.json, val.json, 3 images); pass "
                        f"--overwrite to replace it or choose another --out")
    assert {k: v for k, v in snapshot(out).items() if k != "notes.txt"} == before

    # --overwrite: the earlier data set goes (no stray image of the bigger one stays), other files stay
    assert main(synth(out, "--images", "1", "--seed", "2", "--overwrite")) == 0
    assert sorted(snapshot(out)) == ["images/train/train_000000.png", "images/val/val_000000.png",
                                     "notes.txt", "train.json", "val.json"]
    assert json.loads((out / "train.json").read_text())["info"]["seed"] == 2


def test_an_interrupted_data_synth_leaves_no_partial_data_set(tmp_path, monkeypatch, capsys):
    import asag.data.synthetic

    render, calls = asag.data.synthetic.render_scene, []

    def interrupted_on_the_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    out = tmp_path / "shapes"
    with monkeypatch.context() as patch:
        patch.setattr(asag.data.synthetic, "render_scene", interrupted_on_the_second_image)
        assert main(synth(out, "--images", "2")) == 130
    assert not out.exists()  # this run made it: gone again with the one image it wrote
    assert main(synth(out, "--images", "2")) == 0  # the retry needs no --overwrite
    assert len(snapshot(out)) == 5


def test_convert_crowdhuman_refuses_an_existing_file_unless_overwrite(tmp_path, capsys):
    (tmp_path / "Images").mkdir()
    PIL.Image.new("RGB", (64, 48)).save(tmp_path / "Images" / "1.jpg")
    odgt = tmp_path / "a.odgt"
    odgt.write_text(json.dumps({"ID": "1", "gtboxes": [{"tag": "person", "fbox": [1, 2, 30, 40]}]}) + "\n")
    out = tmp_path / "val.json"
    out.write_text("earlier conversion")
    argv = ["data", "convert-crowdhuman", "--odgt", str(odgt), "--images", str(tmp_path / "Images"),
            "--out", str(out)]
    assert main(argv) == 2
    err = one_line_error(capsys, "data")
    assert err.endswith(f"--out {out} already exists; pass --overwrite to replace it or choose another --out")
    assert out.read_text() == "earlier conversion"
    assert main([*argv, "--overwrite"]) == 0
    assert len(json.loads(out.read_text())["annotations"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Images", "a.odgt", "val.json"]


def test_demo_reuses_its_existing_data_set(tmp_path, monkeypatch):
    import asag.build
    from asag.config import load_config

    generate_synthetic(tmp_path, 1, seed=0, val_images=1)
    before = snapshot(tmp_path)
    monkeypatch.setattr(asag.build, "generate_synthetic", lambda *a, **k: pytest.fail("regenerated"))
    asag.build.prepare_synthetic(load_config("demo", [f"data.root={tmp_path}"]).data)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- asag convert / benchmark


@pytest.mark.parametrize("command", ["convert", "benchmark"])
def test_convert_and_benchmark_refuse_an_existing_file_before_the_work(command, tiny_checkpoint, tmp_path,
                                                                         monkeypatch, capsys):
    import asag.commands.benchmark
    import asag.commands.convert

    monkeypatch.setattr(asag.commands.convert, "read_official", lambda *a: pytest.fail("the work started"))
    monkeypatch.setattr(asag.commands.benchmark, "load_target", lambda *a: pytest.fail("the work started"))
    existing = tmp_path / "earlier.out"
    existing.write_text("earlier results")
    option = {"convert": "--out", "benchmark": "--json"}[command]
    argv = {"convert": ["convert", str(tiny_checkpoint / "ckpt.pth"), "--out", str(existing)],
            "benchmark": ["benchmark", "tiny_cpu", "--json", str(existing)]}[command]
    assert main(argv) == 2
    err = one_line_error(capsys, command)
    assert err.endswith(f"{option} {existing} already exists; pass --overwrite to replace it or choose "
                        f"another {option}")
    assert existing.read_text() == "earlier results"


def test_benchmark_overwrite_replaces_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("earlier results")
    argv = ["benchmark", "tiny_cpu", "--size", "64x96", "--warmup", "0", "--repeats", "1", "--no-flops",
            "--json", str(out), "--overwrite"]
    assert main(argv) == 0
    assert json.loads(out.read_text())["model"] == "tiny_cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_atomic_write_text_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    import asag.outputs

    path = tmp_path / "results.json"
    path.write_text("old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(asag.outputs.os, "fsync", disk_full)
    with pytest.raises(OSError) as info:
        atomic_write_text(path, "new")
    assert (info.value.filename, info.value.errno) == (str(path), errno.ENOSPC)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ---------------------------------------------------------------------------------- asag train


def no_step(model, criterion, batch, optimizer, **kwargs):
    """A training step that computes nothing (no forward, no backward; the optimizer finds no gradient)."""
    optimizer.step()
    zero = torch.zeros(())
    return asag.engine.trainer.StepResult(SimpleNamespace(total=zero, terms={}, weights={}, stats={}), zero)


@pytest.fixture
def instant_steps(monkeypatch):
    monkeypatch.setattr(asag.engine.trainer, "train_step", no_step)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_synthetic(root, 2, seed=3, val_images=1)
    return root


def train_args(data_root: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["train", "tiny_cpu", f"data.root={data_root}", f"schedule.epochs={epochs}",
            "runtime.eval_every=0", "runtime.checkpoint_every=100", "schedule.max_iters_per_epoch=1", *extra,
            "--output-dir", str(out)]


@pytest.fixture(scope="module")
def run_a(data_root, tmp_path_factory) -> Path:
    """The folder of a finished one-epoch run (``last.pth``, ``metrics.jsonl``, ``tensorboard/``)."""
    out = tmp_path_factory.mktemp("run_a")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asag.engine.trainer, "train_step", no_step)
        assert main(train_args(data_root, out)) == 0
    return out


def fake_run(folder: Path) -> dict[str, bytes]:
    """Files of another run in ``folder`` (and a file of the user's; a refused start touches neither),
    returns the folder's snapshot."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "last.pth").write_bytes(b"another run")
    (folder / METRICS_FILE).write_text('{"kind": "old"}\n')
    (folder / TENSORBOARD_DIR).mkdir()
    (folder / TENSORBOARD_DIR / "events.out").write_bytes(b"old")
    (folder / "notes.txt").write_text("mine")
    (folder / ".last.pth.x7.tmp").write_bytes(b"a write in progress, or killed")
    return snapshot(folder)


def test_resume_into_a_folder_holding_another_run_is_refused(tiny_checkpoint, data_root, tmp_path, capsys):
    resumed = tiny_checkpoint / "ckpt.pth"
    other = tmp_path / "b"
    before = fake_run(other)
    assert main(train_args(data_root, other, "--resume", str(resumed), epochs=2)) == 2
    err = one_line_error(capsys, "train")
    assert err.endswith(f"output folder {other} already holds another run (last.pth, metrics.jsonl, "
                        f"tensorboard) than the one --resume {resumed} continues; pass --output-dir "
                        f"{tiny_checkpoint} to continue it in its own folder, --overwrite to replace the run "
                        f"in {other}, or another --output-dir")
    assert snapshot(other) == before


def test_resume_with_overwrite_replaces_the_other_run_and_keeps_the_resumed_one(run_a, data_root, tmp_path,
                                                                                 instant_steps):
    resumed = run_a / "last.pth"
    kept = resumed.read_bytes()
    other = tmp_path / "b"
    fake_run(other)
    assert main(train_args(data_root, other, "--resume", str(resumed), "--overwrite", epochs=2)) == 0
    assert sorted(p.name for p in other.iterdir()) == [
        "curves.png", "last.pth", METRICS_FILE, "notes.txt", TENSORBOARD_DIR]
    assert torch.load(other / "last.pth", weights_only=True)["epoch"] == 1
    records = [json.loads(line) for line in (other / METRICS_FILE).read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "epoch"]  # the other run's log is gone
    assert not (other / TENSORBOARD_DIR / "events.out").exists()
    assert resumed.read_bytes() == kept


def test_resume_in_its_own_folder_removes_temporaries_of_a_killed_checkpoint_write(run_a, data_root, tmp_path,
                                                                                    instant_steps, capsys):
    own = tmp_path / "a"
    shutil.copytree(run_a, own)
    stale = own / ".last.pth.k2x9_q.tmp"  # what kill -9 during the write of last.pth leaves
    stale.write_bytes(b"\0" * 2_500_000)
    (own / ".notes.txt.tmp").write_text("not a checkpoint write: kept")
    assert main(train_args(data_root, own, "--resume", str(own / "last.pth"), epochs=2)) == 0
    assert not stale.exists() and (own / ".notes.txt.tmp").exists()
    out = capsys.readouterr().out
    line = f"removed the unfinished writes of an interrupted run in {own} (2.5 MB): .last.pth.k2x9_q.tmp"
    assert f"{line}\n" in out
    assert torch.load(own / "last.pth", weights_only=True)["epoch"] == 1
    records = [json.loads(line) for line in (own / METRICS_FILE).read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "epoch", "train", "epoch"]  # continued


@pytest.mark.parametrize("other_run", [False, True], ids=["new_folder", "folder_with_a_run"])
def test_resuming_a_finished_run_says_so_and_writes_nothing(other_run, run_a, data_root, tmp_path, capsys):
    out = tmp_path / "c"
    before = fake_run(out) if other_run else None
    extra = ["--resume", str(run_a / "last.pth"), "--overwrite"]
    assert main(train_args(data_root, out, *extra, epochs=1)) == 2
    err = one_line_error(capsys, "train")
    assert err.endswith(f"--resume {run_a / 'last.pth'}: that run is already complete (1 of 1 epochs); "
                        f"nothing to train. To train longer pass schedule.epochs=N with N > 1")
    assert (snapshot(out) == before) if other_run else not out.exists()


def disk_full_in_torch_save(obj, handle, *args, **kwargs):
    """What torch.save does on a full disk: part of the file written, then the OSError of the write
    turned into ``RuntimeError: ... unexpected pos ...`` (raised while handling it)."""
    handle.write(b"PK\x03\x04 part of a checkpoint")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


def test_a_full_disk_during_training_is_one_line_and_leaves_nothing(data_root, tmp_path, instant_steps,
                                                                     monkeypatch, capsys):
    import asag.engine.checkpoint

    monkeypatch.setattr(asag.engine.checkpoint.torch, "save", disk_full_in_torch_save)
    out = tmp_path / "run"
    assert main(train_args(data_root, out)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"asag train: error: {out / 'last.pth'}: No space left on device"
    assert not out.exists()  # no temporary file, no log of a run without a checkpoint, no empty folder


@pytest.mark.parametrize("message, context, expected", [
    ("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598", None,
     (errno.EIO, "writing failed ([enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598)")),
    ("unexpected pos 704 vs 598", OSError(errno.ENOSPC, "No space left on device"),
     (errno.ENOSPC, "No space left on device")),
    ("something else", None, None),
], ids=["torch_message_only", "with_the_write_error", "another_error"])
def test_torch_save_failures_become_os_errors_naming_the_file(message, context, expected, tmp_path,
                                                              monkeypatch):
    import asag.engine.checkpoint

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"part")
        err = RuntimeError(message)
        err.__context__ = context
        raise err

    monkeypatch.setattr(asag.engine.checkpoint.torch, "save", failing_save)
    path = tmp_path / "last.pth"
    with pytest.raises(OSError if expected else RuntimeError) as info:
        save_checkpoint(path, model=torch.nn.Linear(1, 1), optimizer=None, scheduler=None, scaler=None,
                        epoch=0, iteration=0, config={}, label_map={})
    if expected:
        assert (info.value.errno, info.value.strerror, info.value.filename) == (*expected, str(path))
    assert list(tmp_path.iterdir()) == []


class FullDisk(io.RawIOBase):
    """A raw file that takes ``room`` more bytes of a write, then reports a full disk."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = self.handle.write(bytes(data[:self.room]))
        self.room -= taken
        return taken

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def truncate(self, size=None) -> int:
        return self.handle.truncate(size)

    def close(self) -> None:
        self.handle.close()


def test_a_full_disk_in_the_logs_names_the_file_and_keeps_whole_lines(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    logger = RunLogger(tmp_path, tensorboard=False, enabled=True)
    logger.log("train", 0, {"loss": 1.0})
    logger._jsonl = FullDisk(logger._jsonl, room=10)  # the disk fills up during the next line
    with pytest.raises(OSError) as info:
        logger.log("train", 1, {"loss": 0.5})
    logger.close()
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(tmp_path / METRICS_FILE))
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full)
    with RunLogger(tmp_path / "tb", enabled=True) as logger, pytest.raises(OSError) as info:
        logger.log("train", 0, {"loss": 1.0})
    assert info.value.filename == str(tmp_path / "tb" / TENSORBOARD_DIR)


def test_a_start_that_fails_before_its_first_checkpoint_leaves_no_run(data_root, tmp_path, instant_steps,
                                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    broken = tmp_path / "broken"  # no val.json: found after the output folder and the logger are set up
    shutil.copytree(data_root, broken)
    (broken / "val.json").unlink()
    assert main(train_args(broken, out)) == 2
    assert "val.json: annotation file not found" in one_line_error(capsys, "train")
    assert not out.exists()
    out.mkdir()  # given by the user: stays

    calls = []

    def interrupted_in_the_second_step(*args, **kwargs):  # Ctrl-C after the first step was logged
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return no_step(*args, **kwargs)

    monkeypatch.setattr(asag.engine.trainer, "train_step", interrupted_in_the_second_step)
    assert main(train_args(data_root, out, "data.batch_size=1", "schedule.max_iters_per_epoch=2",
                           "runtime.log_every=1")) == 130
    assert list(out.iterdir()) == []

    monkeypatch.setattr(asag.engine.trainer, "train_step", no_step)
    assert main(train_args(data_root, out)) == 0  # the retry is no second run in the folder
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "last.pth", METRICS_FILE, TENSORBOARD_DIR]


def test_the_refusal_of_a_folder_names_a_checkpoint_that_exists(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / METRICS_FILE).write_text("{}\n")  # a run killed before its first checkpoint
    (logs / TENSORBOARD_DIR).mkdir()
    with pytest.raises(OutputError) as info:
        prepare_run_dir(logs, resume=None, overwrite=False)
    assert str(info.value) == (f"output folder {logs} holds the logs of a run that stopped before its "
                               f"first checkpoint (metrics.jsonl, tensorboard; nothing to resume); pass "
                               f"--overwrite to replace them or another --output-dir")
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for name in ("best.pth", "checkpoint_0003.pth", "checkpoint_0007.pth"):
        (numbered / name).write_bytes(b"x")
    with pytest.raises(OutputError) as info:
        prepare_run_dir(numbered, resume=None, overwrite=False)
    assert f"pass --resume {numbered / 'checkpoint_0007.pth'} to continue it" in str(info.value)
    assert prepare_run_dir(logs, resume=None, overwrite=True) == logs and list(logs.iterdir()) == []
