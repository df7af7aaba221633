"""``--static`` on ``asag predict | eval | benchmark``, ``load_model(static=True)``, and training refusing
static mode."""

import json
import shutil

import pytest

from asag.api import load_model
from asag.cli import main


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_load_model_static(checkpoint):
    model, _, _ = load_model(checkpoint / "ckpt.pth", static=True)
    assert model.static and not model.training
    fast, _, _ = load_model(checkpoint / "ckpt.pth", static=True, fast=True)
    assert fast.inference_settings is not None and fast.static
    plain, _, _ = load_model(checkpoint / "ckpt.pth", overrides=["model.static=true"])
    assert plain.static


def detections(path):
    return [d for record in json.loads(path.read_text()) for d in record["detections"]]


def test_commands_accept_static_with_the_same_detections(checkpoint, capsys):
    ckpt = str(checkpoint / "ckpt.pth")
    image = next((checkpoint / "data").rglob("*.png"), None) or next((checkpoint / "data").rglob("*.jpg"))
    for flags, out in (([], "dynamic"), (["--static"], "static"), (["--static", "--fast"], "fast_static")):
        assert main(["predict", ckpt, str(image), *flags, "--score-threshold", "0", "--out",
                     str(checkpoint / out)]) == 0
    reference = detections(checkpoint / "dynamic" / "predictions.json")
    assert reference
    for out in ("static", "fast_static"):
        ours = detections(checkpoint / out / "predictions.json")
        assert [d["category_id"] for d in ours] == [d["category_id"] for d in reference]
        for a, b in zip(ours, reference):
            assert abs(a["score"] - b["score"]) <= 2e-5
            assert max(abs(x - y) for x, y in zip(a["box_xyxy"], b["box_xyxy"])) <= 0.02
    assert main(["eval", ckpt, "--static", "--out", str(checkpoint)]) == 0
    assert "AP" in capsys.readouterr().out
    assert main(["benchmark", ckpt, "--static", "--size", "128x192", "--warmup", "0", "--repeats", "1",
                 "--no-flops", "--data", str(checkpoint / "data")]) == 0
    out = capsys.readouterr().out
    assert "static mode; budget bound in P4 patches" in out
    assert "data set, static mode: budget bound in" in out


def test_training_refuses_static_mode(tmp_path, capsys):
    assert main(["train", "tiny_cpu", "model.static=true", f"runtime.output_dir={tmp_path / 'run'}"]) == 2
    assert "static mode is for inference only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
