"""``asag eval`` says why instead of printing undefined metrics."""

import json
import shutil

from asag.cli import main


def unannotated_copy(src, dst):
    shutil.copytree(src, dst)
    val = json.loads((dst / "val.json").read_text())
    val["annotations"] = []
    (dst / "val.json").write_text(json.dumps(val))


def test_eval_without_annotations_explains_itself(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    unannotated_copy(tiny_checkpoint / "data", data)
    code = main(["eval", str(tiny_checkpoint / "ckpt.pth"), f"data.root={data}", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data / 'val.json'}: none of its 2 images has an annotated box" in err
    assert "AP is undefined" in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()


def test_train_with_unannotated_validation_set_stops_before_training(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    unannotated_copy(tiny_checkpoint / "data", data)
    run = tmp_path / "run"
    assert main(["train", "tiny_cpu", f"data.root={data}", f"runtime.output_dir={run}"]) == 2
    assert "none of its 2 images has an annotated box" in capsys.readouterr().err
    assert not any(run.glob("*.pth"))
