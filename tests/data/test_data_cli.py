import json

import numpy as np
import pytest
from coco_files import ann, write_coco

from asag.cli import main
from asag.data.stats import compute_stats, size_classes


def _stats_json(tmp_path):
    images = [(1, "a.png", 200, 200), (2, "b.png", 200, 200), (3, "c.png", 200, 200)]
    annotations = [
        ann(1, 1, 1, [0, 0, 10, 10]),  # area 100: small
        ann(2, 1, 5, [0, 0, 40, 50]),  # 2000: medium
        ann(3, 2, 5, [0, 0, 100, 100]),  # 10000: large
        ann(4, 2, 90, [0, 0, 32, 32]),  # 1024: medium (the boundary belongs to medium)
        ann(5, 2, 90, [0, 0, 150, 150], iscrowd=1),  # crowd: not a box
    ]
    return write_coco(tmp_path, images, annotations, write_images=False)[0]


def test_size_classes_boundaries():
    assert size_classes(np.array([0, 1023.9, 1024, 9215.9, 9216, 1e6])) == (2, 2, 2)


def test_compute_stats(tmp_path):
    stats = compute_stats(_stats_json(tmp_path))
    assert (stats.num_images, stats.images_without_boxes, stats.num_boxes, stats.num_crowd) == (3, 1, 4, 1)
    assert stats.per_class == [(1, "person", 1), (5, "airplane", 2), (90, "toothbrush", 1)]
    assert (stats.small, stats.medium, stats.large) == (1, 2, 1)
    assert stats.num_classes == 3


def test_cli_stats_prints_numbers(tmp_path, capsys):
    path = _stats_json(tmp_path)
    assert main(["data", "stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "images: 3 (1 without boxes)" in out
    assert "boxes: 4 (crowd regions: 1; degenerate, dropped: 0)" in out
    assert "classes: 3" in out
    assert "5 airplane: 2" in out and "90 toothbrush: 1" in out
    assert "sizes: small 1 (25.0%), medium 2 (50.0%), large 1 (25.0%)" in out


def test_cli_synth_then_stats(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out_dir), "--images", "4", "--seed", "2", "--val-images", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for split, count in (("train", 4), ("val", 2)):
        data = json.loads((out_dir / f"{split}.json").read_text())
        assert len(data["images"]) == count
        assert len(list((out_dir / "images" / split).glob("*.png"))) == count
        boxes = len(data["annotations"])
        assert f"{split}.json\n  images: {count} (0 without boxes)\n  boxes: {boxes} " in printed
    assert main(["data", "stats", str(out_dir)]) == 0
    assert capsys.readouterr().out.count("classes: 5") == 2


def test_cli_synth_chosen_classes(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out_dir), "--images", "3", "--val-images", "1",
            "--classes", "crescent, heart,trapezoid"]
    assert main(argv) == 0
    for split in ("train", "val"):
        categories = json.loads((out_dir / f"{split}.json").read_text())["categories"]
        assert [(c["id"], c["name"]) for c in categories] == [(1, "crescent"), (2, "heart"), (3, "trapezoid")]


def test_cli_synth_unknown_class_is_one_line_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out_dir), "--images", "1", "--classes", "star,,heart"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("asag data: error: --classes: unknown shape class ''; the catalogue: rectangle, ")
    assert not out_dir.exists()


def test_cli_synth_list_classes_needs_no_other_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "synth", "--list-classes"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("13 shape classes (* = default: rectangle,ellipse,triangle,cross,ring):\n")
    assert "\n* ring " in out and "\n  hourglass " in out


def test_cli_missing_file_exit_code_2(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "asag data: error: annotation file or folder not found" in err and "missing.json" in err
    assert "Traceback" not in err


def test_cli_malformed_json_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert main(["data", "stats", str(bad)]) == 2
    assert "bad.json: malformed JSON" in capsys.readouterr().err


def test_cli_empty_folder_exit_code_2(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "no .json annotation files" in capsys.readouterr().err
