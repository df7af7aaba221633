"""No command replaces a file without being asked, and a run that fails or is interrupted leaves nothing
misleading behind (half-written files, temporary files)."""

import errno
import json
from pathlib import Path

import PIL.Image
import pytest

from asag.cli import main
from asag.data.synthetic import generate_synthetic
from asag.outputs import atomic_write_text


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
