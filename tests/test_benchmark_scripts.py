"""The benchmark scripts' helpers and a smoke run of the ones that need no GPU and little time."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import precision_accuracy  # noqa: E402


def test_sorted_scores_groups_by_image_in_descending_order(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": 2, "score": 0.1}, {"image_id": 1, "score": 0.3},
                                {"image_id": 2, "score": 0.7}]))
    scores = precision_accuracy.sorted_scores(path)
    assert scores.keys() == {1, 2}
    assert torch.equal(scores[2], torch.tensor([0.7, 0.1]))


def test_max_score_difference_compares_rank_by_rank():
    a = {1: torch.tensor([0.9, 0.5]), 2: torch.tensor([0.4])}
    same = {1: torch.tensor([0.9, 0.5]), 2: torch.tensor([0.4])}
    assert precision_accuracy.max_score_difference(a, same) == 0
    # ranks are compared in order; a missing detection counts as score 0
    b = {1: torch.tensor([0.8, 0.5, 0.2]), 2: torch.tensor([0.4])}
    assert precision_accuracy.max_score_difference(a, b) == pytest.approx(0.2)
    assert precision_accuracy.max_score_difference(a, {1: a[1]}) == pytest.approx(0.4)


def test_precision_accuracy_runs_on_a_checkpoint(tiny_checkpoint, capsys):
    ckpt = str(tiny_checkpoint / "ckpt.pth")
    precision_accuracy.main([ckpt, "--device", "cpu", "--settings", "plain", "fast"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fast |")]
    assert len(rows) == 1
    change, diff = rows[0].split("|")[5:7]
    assert float(change) == 0.0 and float(diff) < 1e-4  # folding is exact up to float rounding


# ------------------------------------------------------------------------------ benchmarks/tiling.py

import tiling as tiling_benchmark  # noqa: E402


def test_tiling_scene_ground_truth_and_perfect_scores():
    scene = tiling_benchmark.make_scene(300, 30, 8, 24, seed=1, classes=["ellipse", "ring"],
                                        category_ids=[4, 9])
    truth = scene.coco
    assert scene.image.size == (300, 300) and 20 <= len(truth["annotations"]) <= 30
    assert {a["category_id"] for a in truth["annotations"]} <= {4, 9}
    assert all(a["bbox"][0] >= 0 and a["bbox"][0] + a["bbox"][2] <= 300 for a in truth["annotations"])
    perfect = [tiling_benchmark.Detection([x, y, x + w, y + h], 0.9, a["category_id"], "")
               for a in truth["annotations"] for x, y, w, h in [a["bbox"]]]
    assert tiling_benchmark.coco_scores(truth, perfect) == {"recall50": 1.0, "ap50": 1.0, "ap": 1.0}
    assert tiling_benchmark.coco_scores(truth, perfect[: len(perfect) // 2])["recall50"] < 0.75
    assert tiling_benchmark.coco_scores(truth, []) == {"recall50": 0.0, "ap50": 0.0, "ap": 0.0}


def test_tiling_benchmark_runs_on_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    """Mechanics only (a random tiny model evaluating at 64 px): four settings, scores in range."""
    ckpt = torch.load(tiny_checkpoint / "ckpt.pth", weights_only=True)
    ckpt["config"]["data"].update(val_size=64, val_max_size=64)
    torch.save(ckpt, tmp_path / "small.pth")
    out = tmp_path / "tiling.json"
    assert tiling_benchmark.main(["--checkpoint", str(tmp_path / "small.pth"), "--size", "128",
                                  "--objects", "8", "--min-object", "8", "--max-object", "24",
                                  "--tile-overlap", "0", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["setting"] for row in rows] == ["whole image (resized)", "whole image + NMS 0.5",
                                                "tiled 64 px, overlap 0", "tiled 64 px + full image"]
    assert all(0 <= row["recall50"] <= 1 and 0 <= row["ap"] <= row["ap50"] <= 1 for row in rows)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    assert table[1].startswith(f"| whole image (resized) | {rows[0]['detections']} |")


def test_tiling_benchmark_without_checkpoint_says_how_to_get_one(capsys):
    assert tiling_benchmark.main([]) == 2
    assert "asag demo" in capsys.readouterr().err


# ----------------------------------------------------------------------- benchmarks/coco_eval_speed.py

import coco_eval_speed  # noqa: E402


def test_coco_eval_speed_times_both_backends_on_one_case(capsys):
    assert coco_eval_speed.main(["--images", "30", "--detections", "10", "--categories", "4",
                                 "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "30 images" in out and "2 interleaved repeats" in out
    rows = [line for line in out.splitlines() if line.startswith(("| faster_coco_eval |", "| pycocotools |"))]
    assert len(rows) == 2 and all(len(row.split("|")[3].split(",")) == 2 for row in rows)
    stats_diff = re.search(r"largest difference: stats (\S+), per-class AP (\S+)", out)
    assert stats_diff and max(float(stats_diff[1].rstrip(",")), float(stats_diff[2])) <= 2.0**-52


def test_random_coco_case_is_seeded_and_varied():
    data, results = coco_eval_speed.random_coco_case(200, 20, 5, seed=2)
    assert (data, results) == coco_eval_speed.random_coco_case(200, 20, 5, seed=2)
    annotations = data["annotations"]
    areas = [a["area"] for a in annotations]
    assert min(areas) < 32**2 < 96**2 < max(areas) and 32**2 in areas  # all sizes, and the limits
    assert any(a["iscrowd"] for a in annotations) and {a["category_id"] for a in annotations} == {1, 2, 3, 4}
    scores = [r["score"] for r in results]
    assert len(set(scores)) <= coco_eval_speed.SCORE_LEVELS + 1 < len(scores)  # ties
    per_image = np.bincount([r["image_id"] for r in results], minlength=201)[1:]
    assert (per_image == 0).any() and per_image.max() > 20
