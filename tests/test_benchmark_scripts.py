"""The benchmark scripts' helpers and a smoke run of the ones that need no GPU and little time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
