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


# ------------------------------------------------------------------ benchmarks/deployment.py, runtimes.py

import deployment  # noqa: E402
import runtimes  # noqa: E402

from asag.errors import ConfigError  # noqa: E402
from asag.structures import Detections  # noqa: E402


def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                      torch.tensor(labels, dtype=torch.int64))


def test_match_detections_pairs_same_label_by_best_overlap_one_to_one():
    ref = _detections([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [1, 1, 2])
    # swapped near-tie (ranks 0/1 exchange boxes), a shifted box, a wrong label at the third place
    got = _detections([[0, 0, 10, 12], [0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [1, 1, 3])
    assert deployment.match_detections(ref, got) == [(0, 1), (1, 0)]  # each got detection used once
    assert deployment.match_detections(ref, got, iou=0.95) == [(0, 1)]
    assert deployment.match_detections(ref, _detections([], [], [])) == []
    points = _detections([[5, 5, 5, 5], [9, 9, 9, 9]], [0.9, 0.8], [1, 1])  # zero area: no IoU with itself
    assert deployment.match_detections(points, points) == [(0, 0), (1, 1)]


def test_agreement_counts_matched_share_and_differences_over_matched_pairs():
    ref = [_detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.5], [0, 1])]
    same = deployment.agreement(ref, ref)
    assert (same.reference, same.detections, same.same_ranks, same.matched, same.score, same.box) == \
        (2, 2, True, 1.0, 0.0, 0.0)
    got = [_detections([[0, 0, 10, 12], [20, 20, 30, 30]], [0.85, 0.5], [0, 0])]
    part = deployment.agreement(ref, got)
    assert not part.same_ranks and part.matched == 0.5
    assert part.score == pytest.approx(0.05) and part.box == pytest.approx(2.0)
    assert deployment.agreement([_detections([], [], [])], [_detections([], [], [])]).matched == 1.0


def test_markdown_table_ratios_to_fcos_in_the_same_setting_size_and_batch():
    rows = [deployment.Row("asag", "onnxruntime", (512, 512), 4, 200.0, 190.0, 210.0),
            deployment.Row(deployment.FCOS, "onnxruntime", (512, 512), 4, 400.0, 390.0, 410.0),
            deployment.Row("asag", "pt2", (512, 512), 4, 300.0, 290.0, 310.0),
            deployment.Row(deployment.FCOS, "onnxruntime", (512, 512), 1, 100.0, 90.0, 110.0)]
    lines = deployment.markdown_table(rows).splitlines()
    assert lines[2] == "| asag | 512x512 | 4 | onnxruntime | 200.0 | 190.0-210.0 | 50.0 | 20.00 | 0.50 |"
    assert lines[3].endswith("| - |") and lines[4].endswith("| - |")  # FCOS itself; pt2 has no FCOS row


def test_cached_export_reuses_a_file_only_with_the_same_fingerprint(tmp_path, capsys):
    calls = []

    def export(path):
        calls.append(path)
        path.write_bytes(b"model")

    path = tmp_path / "m.onnx"
    assert deployment.cached_export(path, "a", export) == path and len(calls) == 1
    deployment.cached_export(path, "a", export)
    assert len(calls) == 1 and "reusing" in capsys.readouterr().out
    deployment.cached_export(path, "b", export)  # other weights / size / batch / torch
    assert len(calls) == 2
    (tmp_path / "m.onnx.json").unlink()  # an export that did not finish leaves no side file
    deployment.cached_export(path, "b", export)
    assert len(calls) == 3


def test_digest_changes_with_weights_and_settings():
    module = torch.nn.Linear(2, 2)
    base = deployment.digest(module, {"size": [32, 32]})
    assert base == deployment.digest(module, {"size": [32, 32]})
    assert base != deployment.digest(module, {"size": [64, 32]})
    with torch.no_grad():
        module.bias.add_(1)
    assert base != deployment.digest(module, {"size": [32, 32]})


@pytest.mark.slow
def test_fcos_deployed_returns_per_image_detections_and_its_fast_copy_the_same():
    fcos = deployment.fcos_model()
    fcos.fcos.score_thresh = 0.0  # random heads score below the default 0.05
    images = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        outputs = fcos(images)
        fast = deployment.fast_fcos(fcos)(images)
    dets = deployment.fcos_detections(outputs)
    assert len(dets) == 2 and all(len(d) == fcos.fcos.detections_per_img for d in dets)
    assert all(d.boxes.shape == (len(d), 4) for d in dets)
    same = deployment.agreement(dets, deployment.fcos_detections(fast))  # folded, channels-last
    assert same.matched == 1.0 and same.score < 1e-4 and same.box < 1e-2


@pytest.mark.parametrize(("name", "runtime", "precision", "message"), [
    ("m.onnx", "torch", "fp32", "runtime torch does not run .onnx files"),
    ("m.pt2", "openvino", "fp32", "runtime openvino does not run .pt2 files"),
    ("m.onnx", "onnxruntime", "bf16", "runtime onnxruntime runs exported files in fp32 only"),
    ("m.onnx", "tensorrt", "fp32", "runtime 'tensorrt': choose one of onnxruntime, openvino, torch"),
    ("m.bin", None, "fp32", "an exported model ends in .onnx or .pt2"),
])
def test_load_exported_refuses_combinations_that_do_not_exist(tmp_path, name, runtime, precision, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        runtimes.load_exported(tmp_path / name, runtime, precision)


def test_cpu_description_names_the_cpu_and_its_bf16_support():
    line = runtimes.cpu_description()
    assert line.startswith("CPU: ") and "bf16 flags present" in line and "native bf16 in PyTorch" in line


def test_default_export_size_fits_every_validation_image():
    from asag.config import load_config

    assert precision_accuracy.default_export_size(load_config("demo")) == (384, 384)
    larger = load_config("demo", ["data.val_max_size=400"])
    assert precision_accuracy.default_export_size(larger) == (416, 416)


def test_exported_detector_runs_the_file_in_postprocess():
    class Recorder:
        def predict(self, images, image_sizes, orig_sizes):
            self.args = (images, image_sizes, orig_sizes)
            return ["detections"]

    recorder = Recorder()
    model = precision_accuracy.ExportedDetector(recorder)
    images, sizes, orig = torch.zeros(1, 3, 32, 64), torch.tensor([[32, 60]]), torch.tensor([[64, 120]])
    assert model.postprocess(model(images, sizes), orig) == ["detections"]
    assert recorder.args[0] is images and recorder.args[1] is sizes and recorder.args[2] is orig


def test_results_table_compares_openvino_with_the_same_file_in_onnxruntime():
    from types import SimpleNamespace

    def result(ap):
        return SimpleNamespace(ap=ap, ap50=ap, ap75=ap)

    rows = [("plain", result(0.40)), ("fast_bf16", result(0.39)), ("onnxruntime", result(0.41)),
            ("openvino_bf16", result(0.403))]
    scores = {"plain": {1: torch.tensor([0.9])}, "fast_bf16": {1: torch.tensor([0.8])},
              "onnxruntime": {1: torch.tensor([0.9])}, "openvino_bf16": {1: torch.tensor([0.88])}}
    lines = precision_accuracy.results_table(rows, scores).splitlines()
    assert lines[0].endswith("| AP change vs onnxruntime | score diff. vs onnxruntime |")
    assert lines[1] == "|---" * 8 + "|"
    assert lines[3] == "| fast_bf16 | 39.00 | 39.00 | 39.00 | -1.00 (more than 0.5) | 1.0e-01 |  |  |"
    assert lines[5] == ("| openvino_bf16 | 40.30 | 40.30 | 40.30 | +0.30 | 2.0e-02 | -0.70 (more than 0.5) | "
                        "2.0e-02 |")
    without = precision_accuracy.results_table(rows[:2], scores).splitlines()
    assert without[0].endswith("| max abs. detection-score diff. |") and without[1] == "|---" * 6 + "|"


@pytest.mark.slow
def test_precision_accuracy_evaluates_exported_settings(tiny_checkpoint, capsys):
    """The checkpoint exported to ONNX (minutes) and run in ONNX Runtime and OpenVINO (float32): the
    same scores in both runtimes; the eager static model gives the plain model's."""
    ckpt = str(tiny_checkpoint / "ckpt.pth")
    precision_accuracy.main([ckpt, "--device", "cpu", "--settings", "plain", "static", "onnxruntime",
                             "openvino"])
    out = capsys.readouterr().out
    assert "exported the static model at 256x256, batch 1" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows.keys() == {"setting", "plain", "static", "onnxruntime", "openvino"}
    assert float(rows["static"][3]) == 0.0 and float(rows["static"][4]) < 1e-4
    assert float(rows["openvino"][5]) == 0.0 and float(rows["openvino"][6]) < 1e-4


def test_before_after_imports_a_revision_beside_the_current_package(tmp_path):
    """The revision's package is importable as ``asag_before``, every ``asag`` import rewritten, and its
    presets are its own; the interleaving alternates the order every round."""
    import before_after

    from asag.config import load_config

    if not (Path(before_after.REPO) / ".git").exists():
        pytest.skip("not a git checkout")
    before = before_after.import_revision("HEAD", tmp_path)
    try:
        assert before.__name__ == "asag_before" and before.build.__name__ == "asag_before.build"
        sources = "".join(p.read_text() for p in (tmp_path / "src" / "asag_before").rglob("*.py"))
        assert not re.search(r"\b(from|import) asag\b(?!_before)", sources)
        assert before.config.load_config("tiny_cpu").model.variant == load_config("tiny_cpu").model.variant
        calls = []
        medians = before_after.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
        assert calls == ["a", "b", "b", "a", "a", "b"] and set(medians) == {"a", "b"}
    finally:
        sys.path.remove(str(tmp_path / "src"))
        for name in [m for m in sys.modules if m == "asag_before" or m.startswith("asag_before.")]:
            del sys.modules[name]
