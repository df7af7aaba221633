"""Evaluation plots of ``asag eval``: the JSON beside each PNG holds exactly what pycocotools computes, the
error analysis and the confusion matrix on hand-made cases where every error is known, and the command."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from asag.cli import build_parser, main
from asag.commands.eval import draw_plots, plots_folder
from asag.engine.coco_analysis import BACKGROUND, ERROR_SETTINGS, confusion_matrix, error_analysis
from asag.engine.coco_eval import run_coco_eval
from asag.engine.evaluator import CrowdHumanEvalResult
from asag.viz.eval_plots import PLOT_FILES, PLOT_STEMS, write_eval_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECALL_POINTS = 101  # pycocotools' recall thresholds 0, 0.01, ..., 1


def make_coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def box(x: float, y: float, w: float = 100.0, h: float = 100.0) -> list[float]:
    return [float(x), float(y), float(w), float(h)]


def annotations(boxes: list[tuple[int, int, list[float]]], crowd: frozenset[int] = frozenset()) -> list[dict]:
    """``(image_id, category_id, bbox)`` -> COCO annotations (ids from 1; indices in ``crowd`` are crowd)."""
    return [{"id": i + 1, "image_id": image, "category_id": cat, "bbox": b, "area": b[2] * b[3],
             "iscrowd": int(i in crowd)} for i, (image, cat, b) in enumerate(boxes)]


# ------------------------------------------------------------------ JSON = pycocotools' precision array


def varied_case(seed: int = 0) -> tuple[COCO, list[dict]]:
    """4 classes (the last without ground truth), objects of every size, jittered, confused and spurious
    detections."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c, "name": n, "supercategory": s}
                  for c, n, s in [(1, "cat", "animal"), (2, "dog", "animal"), (5, "car", "vehicle"),
                                  (9, "boat", "vehicle")]]
    images, boxes, results = [], [], []
    for image in range(1, 13):
        images.append({"id": image, "width": 640, "height": 480})
        for side in (20.0, 60.0, 150.0):  # small, medium, large
            cat = int(rng.choice([1, 2, 5]))
            b = box(rng.uniform(0, 400), rng.uniform(0, 250), side, side * rng.uniform(0.7, 1.3))
            boxes.append((image, cat, b))
            jitter = rng.normal(0, 0.12, 4) * [b[2], b[3], b[2], b[3]]
            label = cat if rng.random() < 0.8 else int(rng.choice([1, 2, 5, 9]))
            results.append({"image_id": image, "category_id": label, "bbox": list(np.add(b, jitter)),
                            "score": float(rng.uniform(0.2, 1))})
        results.append({"image_id": image, "category_id": int(rng.choice([1, 2, 5, 9])),
                        "bbox": box(*rng.uniform(0, 300, 2), 40, 40), "score": float(rng.uniform(0, 0.5))})
    return make_coco(images, categories, annotations(boxes)), results


@pytest.fixture(scope="module")
def varied_plots(tmp_path_factory):
    coco, results = varied_case()
    out = tmp_path_factory.mktemp("plots")
    written = write_eval_plots(coco, results, out)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    return coco, results, out, written, reference


def load(path) -> dict:
    return json.loads(path.read_text())


def test_every_plot_is_a_png_beside_its_json(varied_plots):
    _, _, out, written, _ = varied_plots
    assert sorted(p.name for p in written) == sorted(PLOT_FILES)
    for stem in PLOT_STEMS:
        assert (out / f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert load(out / f"{stem}.json")


def test_mean_pr_curves_are_pycocotools_precision_averaged_over_classes_with_ground_truth(varied_plots):
    _, _, out, _, reference = varied_plots
    record = load(out / "pr_curves.json")
    precision = reference.eval["precision"]  # [T, R, K, A, M]
    assert record["recall"] == pytest.approx(list(reference.params.recThrs), abs=0)
    for a, area in enumerate(["all", "small", "medium", "large"]):
        at_100 = precision[:, :, :, a, -1]  # [T, R, K]
        with_gt = at_100[0, 0] > -1
        assert with_gt.tolist()[:3] == [True, True, True] and not with_gt[3]  # "boat" has no ground truth
        assert record["curves"]["0.50"][area] == pytest.approx(at_100[0][:, with_gt].mean(axis=1), abs=1e-12)
        assert record["curves"]["0.75"][area] == pytest.approx(at_100[5][:, with_gt].mean(axis=1), abs=1e-12)
        assert record["curves"]["0.50:0.95"][area] == pytest.approx(
            at_100[:, :, with_gt].mean(axis=(0, 2)), abs=1e-12)
    # the areas under the curves are pycocotools' AP, AP50, AP75, APs, APm, APl
    ap = record["ap"]
    drawn = [ap["0.50:0.95"]["all"], ap["0.50"]["all"], ap["0.75"]["all"], ap["0.50:0.95"]["small"],
             ap["0.50:0.95"]["medium"], ap["0.50:0.95"]["large"]]
    assert drawn == pytest.approx(reference.stats[:6], abs=1e-12)


def test_per_class_curves_and_ap_are_the_class_columns(varied_plots):
    coco, results, out, _, reference = varied_plots
    precision = reference.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    classes = load(out / "pr_curves_per_class.json")["classes"]
    assert [c["category_id"] for c in classes] == [1, 2, 5, 9]
    for k, item in enumerate(classes[:3]):
        assert item["curves"]["0.50"] == pytest.approx(precision[0, :, k], abs=1e-12)
        assert item["curves"]["0.50:0.95"] == pytest.approx(precision[:, :, k].mean(axis=0), abs=1e-12)
    assert classes[3]["curves"] is None and classes[3]["ap"] is None
    rows = load(out / "ap_per_class.json")["classes"]
    expected = run_coco_eval(coco, results, per_class=True).per_class_ap
    drawn = {r["name"]: r["ap"] for r in rows[:3]}
    assert drawn == pytest.approx({name: expected[name] for name in ("cat", "dog", "car")}, abs=1e-12)
    assert [r["ap"] for r in rows[:3]] == sorted((r["ap"] for r in rows[:3]), reverse=True)
    assert rows[3] == {"category_id": 9, "name": "boat", "ap": None, "ap50": None, "ap75": None}


def test_error_analysis_starts_from_the_ap50_and_ap75_curves_and_ends_at_one(varied_plots):
    _, _, out, _, _ = varied_plots
    pr = load(out / "pr_curves.json")["curves"]
    record = load(out / "error_analysis.json")
    assert record["settings"] == list(ERROR_SETTINGS)
    assert record["curves"]["C50"] == pytest.approx(pr["0.50"]["all"], abs=1e-12)
    assert record["curves"]["C75"] == pytest.approx(pr["0.75"]["all"], abs=1e-12)
    assert record["curves"]["FN"] == [1.0] * RECALL_POINTS
    aps = [record["ap"][s] for s in ERROR_SETTINGS]
    assert aps == sorted(aps)  # each setting forgives more
    per_class = load(out / "error_analysis_per_class.json")["classes"]
    assert per_class[3]["curves"] is None  # no ground truth
    mean_oth = np.mean([c["curves"]["Oth"] for c in per_class[:3]], axis=0)
    assert record["curves"]["Oth"] == pytest.approx(mean_oth, abs=1e-12)


# ------------------------------------------------------------ error analysis: one error of each kind


def one_error_of_each_kind(supercategories: bool = True) -> tuple[COCO, list[dict]]:
    """Class a has 3 objects; its detections, by score: one on a b object (b shares a's supercategory),
    one on a c object (another supercategory), one on background, a true positive at IoU 0.6 and a
    localisation error at IoU 0.25; its third object is missed. b and c are found exactly."""
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    if supercategories:
        for category, name in zip(categories, ["animal", "animal", "vehicle"]):
            category["supercategory"] = name
    objects = [(1, 1, box(0, 0)), (1, 1, box(200, 0)), (1, 1, box(400, 0, 50, 50)), (1, 2, box(0, 200)),
               (1, 3, box(200, 200))]
    detections = [(1, box(0, 200), 0.95), (1, box(200, 200), 0.93), (1, box(450, 350), 0.91),
                  (1, box(25, 0), 0.9), (1, box(260, 0), 0.8), (2, box(0, 200), 0.5), (3, box(200, 200), 0.5)]
    results = [{"image_id": 1, "category_id": c, "bbox": b, "score": s} for c, b, s in detections]
    coco = make_coco([{"id": 1, "width": 640, "height": 480}], categories, annotations(objects))
    return coco, results


def precision_area(reached_recall_points: int, precision: float) -> float:
    """AP of a curve at ``precision`` up to the ``reached_recall_points``-th recall point, 0 after."""
    return reached_recall_points * precision / RECALL_POINTS


def test_each_error_kind_removed_raises_the_ap_by_hand():
    coco, results = one_error_of_each_kind()
    ap = error_analysis(coco, results).per_class[0].ap()
    # ranked: confusion (b), confusion (c), background, TP, localisation error; 3 objects
    one_third, two_thirds = 34, 67  # recall points 0 .. 0.33 and 0 .. 0.66
    assert ap == pytest.approx({
        "C75": 0.0,  # the true positive has IoU 0.6
        "C50": precision_area(one_third, 1 / 4),  # 3 false positives before the one true positive
        "Loc": precision_area(two_thirds, 2 / 5),  # the IoU 0.25 detection now counts
        "Sim": precision_area(two_thirds, 2 / 4),  # the detection on the b object is ignored
        "Oth": precision_area(two_thirds, 2 / 3),  # ... and the one on the c object
        "BG": precision_area(two_thirds, 1.0),  # ... and the background one: only the miss is left
        "FN": 1.0,
    }, abs=1e-12)
    b_and_c = error_analysis(coco, results).per_class[1:]
    assert all(item.ap() == dict.fromkeys(ERROR_SETTINGS, pytest.approx(1.0)) for item in b_and_c)


def test_without_supercategories_sim_equals_oth():
    coco, results = one_error_of_each_kind(supercategories=False)
    analysis = error_analysis(coco, results)
    ap = analysis.per_class[0].ap()
    assert not analysis.supercategories
    assert ap["Sim"] == ap["Oth"] == pytest.approx(precision_area(67, 2 / 3))


def test_error_analysis_only_counts_the_given_images():
    coco, results = one_error_of_each_kind()
    images = [*coco.dataset["images"], {"id": 2, "width": 640, "height": 480}]
    extra = [*coco.dataset["annotations"],
             {"id": 99, "image_id": 2, "category_id": 1, "bbox": box(0, 0), "area": 1e4, "iscrowd": 0}]
    bigger = make_coco(images, coco.dataset["categories"], extra)
    assert (error_analysis(bigger, results, image_ids=[1]).per_class[0].ap()
            == error_analysis(coco, results).per_class[0].ap())


# -------------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_counts_by_hand():
    coco, results = one_error_of_each_kind()
    matrix = confusion_matrix(coco, results, score_threshold=0.3)
    assert matrix.names == ["a", "b", "c", BACKGROUND]
    # rows: true a, b, c, background; columns: detected a, b, c, background (missed)
    assert matrix.counts == [
        [1, 0, 0, 2],  # a: one found (IoU 0.6), the IoU-0.25 one and the small one missed
        [0, 1, 0, 0],  # b is taken by its own detection although a's scores higher
        [0, 0, 1, 0],
        [4, 0, 0, 0],  # a's detections on b, on c, on background and the IoU-0.25 one
    ]
    confident = confusion_matrix(coco, results, score_threshold=0.92)  # only a's on b and on c
    assert confident.counts == [[0, 0, 0, 3], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix_skips_crowd_regions_and_takes_the_best_iou():
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    objects = [(1, 1, box(0, 0)), (1, 1, box(10, 0)), (1, 2, box(300, 300, 200, 100))]
    coco = make_coco([{"id": 1, "width": 640, "height": 480}], categories, annotations(objects, crowd={2}))
    # the first detection overlaps both a objects (IoU 0.85, 0.96) and takes the closer one, the 2nd, which
    # leaves the 1st object to the second detection (IoU 0.54 with it, 0.43 with the 2nd)
    results = [{"image_id": 1, "category_id": 1, "bbox": box(8, 0), "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": box(-30, 0), "score": 0.8},
               {"image_id": 1, "category_id": 2, "bbox": box(320, 300), "score": 0.7},  # inside the crowd
               {"image_id": 1, "category_id": 2, "bbox": box(500, 0), "score": 0.6}]  # background
    matrix = confusion_matrix(coco, results, score_threshold=0.5)
    assert matrix.counts == [[2, 0, 0], [0, 0, 0], [0, 1, 0]]


# ---------------------------------------------------------------------------------- asag eval


def test_eval_writes_the_plots_and_refuses_to_replace_them(tiny_checkpoint, tmp_path, capsys):
    out, plots = tmp_path / "eval", tmp_path / "plots"
    ckpt = str(tiny_checkpoint / "ckpt.pth")
    assert main(["eval", ckpt, "--out", str(out), "--plots", str(plots), "--confusion-score", "0.05"]) == 0
    assert f"plots: {len(PLOT_FILES)} files (PNG + JSON) in {plots}" in capsys.readouterr().out
    for stem in PLOT_STEMS:
        png = (plots / f"{stem}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
        assert load(plots / f"{stem}.json")
    assert load(plots / "confusion_matrix.json")["score_threshold"] == 0.05
    assert not (out / "pr_curves.png").exists()
    # a second run refuses, before evaluating, a --plots or an --out that holds plots
    assert main(["eval", ckpt, "--out", str(tmp_path / "other"), "--plots", str(plots)]) == 2
    assert f"--plots {plots} already holds pr_curves.png" in capsys.readouterr().err
    assert main(["eval", ckpt, "--out", str(plots), "--no-plots"]) == 2
    assert "pr_curves.png" in capsys.readouterr().err


def parse_eval(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["eval", "ckpt.pth", *options])


def test_plots_go_to_the_output_folder_unless_told_otherwise(tmp_path):
    assert plots_folder(tmp_path, parse_eval()) == tmp_path
    assert plots_folder(tmp_path, parse_eval("--plots", str(tmp_path / "p"))) == tmp_path / "p"
    assert plots_folder(tmp_path, parse_eval("--no-plots")) is None
    with pytest.raises(SystemExit):  # one or the other
        parse_eval("--plots", "p", "--no-plots")


def test_crowdhuman_results_get_no_plots(tmp_path):
    result = CrowdHumanEvalResult(ap=0.5, mmr=0.5, recall=0.5, num_images=1, num_detections=1, num_people=1,
                                  num_ignore=0, num_true_positives=1, num_false_positives=0, num_ignored=0,
                                  images_per_second=1.0)
    assert "none for evaluation.metric=crowdhuman" in draw_plots(result, None, tmp_path, 0.3)
    assert not any(tmp_path.iterdir())
