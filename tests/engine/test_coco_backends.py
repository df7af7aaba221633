"""The two COCO evaluation backends (``evaluation.backend``) give the same numbers.

faster-coco-eval and pycocotools agree on every ``stats`` value, per-class AP, ``eval["recall"]`` and
``eval["scores"]`` entry, and on every ``eval["precision"]`` entry but one kind: where the first detection
of a ranked list is a true positive, pycocotools' precision there is ``1 / (1 + eps) = 1 - 2**-52``
(it divides by ``tp + fp + np.spacing(1)``) and faster-coco-eval's is ``1.0``. So AP / AR differ by at
most 2**-52. Score ties are broken the same way (stable sorts: the order of the results within an
image, the image order across images).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_fakes import make_coco

from asag.cli import main
from asag.config import load_config
from asag.engine import coco_eval
from asag.engine.coco_analysis import curves_from_evaluator, error_analysis
from asag.engine.coco_eval import (
    AUTO_BACKEND,
    BACKENDS,
    COCO_STAT_NAMES,
    FASTER_COCO_EVAL,
    PYCOCOTOOLS,
    CocoMetrics,
    accumulated_eval,
    load_results,
    resolve_backend,
    run_coco_eval,
)
from asag.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from coco_eval_speed import coco_index, random_coco_case  # noqa: E402

ONE_ULP = 2.0**-52  # one unit in the last place of 1.0: the largest difference of two backends' numbers
BELOW_ONE = 1.0 - ONE_ULP  # pycocotools' precision of a single true positive: 1 / (1 + eps)


def metrics_of_both(coco, results, **options) -> dict[str, CocoMetrics]:
    return {backend: run_coco_eval(coco, results, per_class=True, backend=backend, **options)
            for backend in BACKENDS}


def assert_same_metrics(metrics: dict[str, CocoMetrics]) -> None:
    """Every stat and per-class AP within one ulp of 1.0, the same summary and counts."""
    reference, fast = metrics[PYCOCOTOOLS], metrics[FASTER_COCO_EVAL]
    assert (reference.backend, fast.backend) == (PYCOCOTOOLS, FASTER_COCO_EVAL)
    for name, a, b in zip(COCO_STAT_NAMES, reference.stats, fast.stats):
        assert abs(a - b) <= ONE_ULP, (name, a, b)
    assert reference.per_class_ap.keys() == fast.per_class_ap.keys()
    for name, a in reference.per_class_ap.items():
        assert abs(a - fast.per_class_ap[name]) <= ONE_ULP, (name, a, fast.per_class_ap[name])
    assert reference.summary == fast.summary and len(reference.summary.splitlines()) == len(COCO_STAT_NAMES)
    assert (reference.num_images, reference.num_detections) == (fast.num_images, fast.num_detections)


def assert_same_arrays(reference, fast) -> np.ndarray:
    """``eval`` arrays of two evaluators: recall and scores equal; precision equal except pycocotools'
    ``1 - 2**-52`` where faster-coco-eval has 1.0. Returns where they differ ``[T, R, K, A, M]``."""
    np.testing.assert_array_equal(reference.eval["recall"], fast.eval["recall"])
    np.testing.assert_array_equal(reference.eval["scores"], fast.eval["scores"])
    p, q = reference.eval["precision"], fast.eval["precision"]  # [T, R, K, A, M]
    assert p.shape == q.shape
    differ = p != q
    assert np.all(p[differ] == BELOW_ONE) and np.all(q[differ] == 1.0)
    return differ


def evaluators_of_both(coco, results, **options) -> dict:
    return {backend: accumulated_eval(coco, load_results(coco, results), backend=backend, **options)
            for backend in BACKENDS}


def box(image_id: int, category_id: int, bbox, *, crowd: int = 0, ann_id: int) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(map(float, bbox)),
            "area": float(bbox[2] * bbox[3]), "iscrowd": crowd}


def detection(image_id: int, category_id: int, bbox, score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(map(float, bbox)), "score": score}


def ground_truth(num_images: int, boxes: list[tuple], categories=(1, 2, 3, 4)) -> object:
    """``boxes``: ``(image_id, category_id, bbox[, crowd])``."""
    images = [{"id": i, "width": 640, "height": 480} for i in range(1, num_images + 1)]
    annotations = [box(b[0], b[1], b[2], crowd=b[3] if len(b) > 3 else 0, ann_id=k)
                   for k, b in enumerate(boxes, start=1)]
    return make_coco({"images": images, "annotations": annotations,
                      "categories": [{"id": c, "name": f"c{c}"} for c in categories]})


# ------------------------------------------------------------------------------ the known difference


def test_a_single_true_positive_is_the_one_place_where_the_backends_differ():
    coco = ground_truth(1, [(1, 1, [10, 10, 100, 100])], categories=(1,))
    results = [detection(1, 1, [12, 10, 100, 100], 0.9)]
    metrics = metrics_of_both(coco, results)
    assert metrics[FASTER_COCO_EVAL].ap == metrics[FASTER_COCO_EVAL].ap50 == 1.0
    assert BELOW_ONE <= metrics[PYCOCOTOOLS].ap < 1.0 and BELOW_ONE <= metrics[PYCOCOTOOLS].ap50 < 1.0
    assert_same_metrics(metrics)
    evaluators = evaluators_of_both(coco, results)
    assert assert_same_arrays(evaluators[PYCOCOTOOLS], evaluators[FASTER_COCO_EVAL]).any()
    # a second true positive ranked next gives 2 / (2 + eps) = 1.0 in both: no difference left, except
    # where only one detection per image counts (maxDets 1, the last axis' first entry)
    coco2 = ground_truth(1, [(1, 1, [10, 10, 100, 100]), (1, 1, [300, 200, 100, 100])], categories=(1,))
    results2 = [*results, detection(1, 1, [300, 200, 100, 100], 0.8)]
    evaluators = evaluators_of_both(coco2, results2)
    differ = assert_same_arrays(evaluators[PYCOCOTOOLS], evaluators[FASTER_COCO_EVAL])
    assert evaluators[FASTER_COCO_EVAL].params.maxDets == [1, 10, 100]
    assert differ[..., 0].any() and not differ[..., 1:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_ties_keep_the_image_order_and_the_result_order(backend):
    """Equal scores: the false positive of image 1 ranks before the true positive of image 2 (and, in
    one image, the first result before the second), so precision never exceeds 1/2: AP50 = 0.5."""
    coco = ground_truth(2, [(2, 1, [10, 10, 100, 100])], categories=(1,))
    across = [detection(2, 1, [10, 10, 100, 100], 0.5), detection(1, 1, [10, 10, 100, 100], 0.5)]
    assert run_coco_eval(coco, across, backend=backend).ap50 == pytest.approx(0.5, abs=1e-15)
    coco = ground_truth(1, [(1, 1, [10, 10, 100, 100])], categories=(1,))
    within = [detection(1, 1, [300, 300, 100, 100], 0.5), detection(1, 1, [10, 10, 100, 100], 0.5)]
    assert run_coco_eval(coco, within, backend=backend).ap50 == pytest.approx(0.5, abs=1e-15)
    assert run_coco_eval(coco, within[::-1], backend=backend).ap50 == pytest.approx(1.0, abs=ONE_ULP)


# ------------------------------------------------------------------------------------- crowd regions


def test_crowd_regions_ignore_the_detections_on_them_in_both():
    coco = ground_truth(2, [(1, 1, [10, 10, 100, 100]), (1, 1, [200, 100, 300, 250], 1),
                            (2, 1, [50, 50, 40, 40], 1), (2, 2, [100, 100, 60, 60])], categories=(1, 2))
    results = [
        detection(1, 1, [11, 10, 100, 100], 0.9),  # true positive
        detection(1, 1, [220, 120, 50, 50], 0.8),  # inside the crowd region: ignored
        detection(1, 1, [300, 200, 80, 80], 0.8),  # inside it too (a crowd region takes many)
        detection(1, 1, [150, 60, 120, 120], 0.7),  # 39% of it on the region: false positive
        detection(2, 1, [50, 50, 40, 40], 0.95),  # on image 2's crowd region: ignored
        detection(2, 2, [100, 100, 60, 60], 0.6),  # true positive of class 2
    ]
    metrics = metrics_of_both(coco, results)
    assert_same_metrics(metrics)
    for m in metrics.values():
        assert m.ap50 == pytest.approx(1.0, abs=ONE_ULP)  # the false positive ranks after the true positive
        assert m.ar100 == pytest.approx(1.0)
    evaluators = evaluators_of_both(coco, results)
    assert_same_arrays(evaluators[PYCOCOTOOLS], evaluators[FASTER_COCO_EVAL])


# ---------------------------------------------------------------------------------------- edge cases


def edge_case():
    """Image 1: an object found; 2: an object never found; 3: nothing at all; 4: no object, two false
    positives; 5: only a crowd region, with a detection on it; 6: an object and a detection of a class
    without ground truth. Category 3 has detections but no object, category 4 neither."""
    coco = ground_truth(6, [(1, 1, [10, 10, 100, 100]), (2, 2, [30, 40, 20, 20]), (5, 1, [0, 0, 200, 200], 1),
                            (6, 1, [100, 100, 50, 50])])
    results = [detection(1, 1, [12, 11, 98, 100], 0.7), detection(4, 1, [5, 5, 30, 30], 0.9),
               detection(4, 3, [200, 200, 30, 30], 0.4), detection(5, 1, [10, 10, 50, 50], 0.8),
               detection(6, 3, [100, 100, 50, 50], 0.6)]
    return coco, results


@pytest.mark.parametrize("image_ids", [None, [1, 2], [3, 4], [3], [2, 5]])
def test_empty_images_missed_objects_and_categories_without_ground_truth(image_ids):
    coco, results = edge_case()
    metrics = metrics_of_both(coco, results, image_ids=image_ids)
    assert_same_metrics(metrics)
    for m in metrics.values():
        assert m.per_class_ap["c3"] == m.per_class_ap["c4"] == -1.0
        if image_ids in ([3, 4], [3]):  # no object at all: every number undefined
            assert m.stats == [-1.0] * len(COCO_STAT_NAMES)
    evaluators = evaluators_of_both(coco, results, image_ids=image_ids)
    assert_same_arrays(evaluators[PYCOCOTOOLS], evaluators[FASTER_COCO_EVAL])


def test_no_detections_at_all():
    coco, _ = edge_case()
    metrics = metrics_of_both(coco, [])
    assert_same_metrics(metrics)
    assert metrics[FASTER_COCO_EVAL].ap == 0.0 and metrics[FASTER_COCO_EVAL].per_class_ap["c3"] == -1.0


# ----------------------------------------------------------------------------- a large random case


@pytest.fixture(scope="module")
def random_case():
    """2000 images, about 12 detections each (more than 100 on none), 8 categories (the last without
    ground truth), scores on 51 levels (many ties)."""
    data, results = random_coco_case(2000, 12, 8, seed=3)
    return coco_index(data), results


def test_random_case_stats_and_per_class_ap_agree(random_case):
    coco, results = random_case
    metrics = metrics_of_both(coco, results)
    assert_same_metrics(metrics)
    assert 0.05 < metrics[PYCOCOTOOLS].ap < 0.9 and metrics[PYCOCOTOOLS].per_class_ap["class_8"] == -1.0


def test_random_case_precision_recall_and_scores_arrays_agree(random_case):
    coco, results = random_case
    evaluators = evaluators_of_both(coco, results)
    reference = evaluators[PYCOCOTOOLS].eval["precision"]
    assert (reference == -1).any() and (reference > 0).any()  # classes / areas without objects, and hits
    assert assert_same_arrays(evaluators[PYCOCOTOOLS], evaluators[FASTER_COCO_EVAL]).any()


def test_the_hundred_detection_cut_with_ties_agrees():
    """Up to 150 detections per image on 4 levels of score: the 100 kept are the same in both."""
    data, results = random_coco_case(40, 100, 3, seed=5, score_levels=3)
    coco = coco_index(data)
    assert max(np.bincount([r["image_id"] for r in results])) > 100
    assert_same_metrics(metrics_of_both(coco, results))
    evaluators = evaluators_of_both(coco, results)
    assert_same_arrays(evaluators[PYCOCOTOOLS], evaluators[FASTER_COCO_EVAL])


def test_plots_and_error_analysis_agree():
    data, results = random_coco_case(150, 20, 5, seed=7)
    coco = coco_index(data)
    evaluators = evaluators_of_both(coco, results)
    curves = {b: curves_from_evaluator(e, coco) for b, e in evaluators.items()}
    for setting, areas in curves[PYCOCOTOOLS].mean.items():
        for area, curve in areas.items():
            other = curves[FASTER_COCO_EVAL].mean[setting][area]
            assert (curve is None) == (other is None)
            if curve is not None:
                np.testing.assert_allclose(curve, other, rtol=0, atol=ONE_ULP)
    analyses = {b: error_analysis(coco, results, backend=b) for b in BACKENDS}
    reference, fast = analyses[PYCOCOTOOLS], analyses[FASTER_COCO_EVAL]
    assert reference.supercategories and reference.overall.keys() == fast.overall.keys()
    for setting, curve in reference.overall.items():
        np.testing.assert_allclose(curve, fast.overall[setting], rtol=0, atol=ONE_ULP)
    for a, b in zip(reference.per_class, fast.per_class):
        assert (a.curves is None) == (b.curves is None)
        for setting, curve in (a.curves or {}).items():
            np.testing.assert_allclose(curve, b.curves[setting], rtol=0, atol=ONE_ULP)
    # Sim / Oth (the ignored confusions of the mixin) differ from Loc: the mixin worked in both
    assert any(c.curves["Oth"] != c.curves["Loc"] for c in fast.per_class if c.curves)


def test_with_other_max_dets_only_the_summary_of_ap_differs():
    """pycocotools' ``summarize`` takes ``stats[0]`` (AP) at 100 detections per image whatever
    ``params.maxDets`` says (-1 when 100 is not among them); faster-coco-eval at ``maxDets[-1]``.
    ``run_coco_eval`` keeps the default ``[1, 10, 100]``, where both read the same entry; the arrays
    agree under any parameters."""
    data, results = random_coco_case(100, 30, 3, seed=5)
    coco = coco_index(data)

    def fewer_detections(params) -> None:
        params.maxDets = [1, 10, 20]

    evaluators = evaluators_of_both(coco, results, setup=fewer_detections)
    assert_same_arrays(evaluators[PYCOCOTOOLS], evaluators[FASTER_COCO_EVAL])
    stats = {}
    for backend, evaluator in evaluators.items():
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.summarize()
        stats[backend] = np.asarray(evaluator.stats[: len(COCO_STAT_NAMES)])
    precision = evaluators[PYCOCOTOOLS].eval["precision"][:, :, :, 0, -1]  # [T, R, K]: area all, 20 dets
    ap_at_20 = precision[precision > -1].mean()
    assert stats[PYCOCOTOOLS][0] == -1.0
    assert ap_at_20 > 0 and stats[FASTER_COCO_EVAL][0] == pytest.approx(ap_at_20, abs=1e-15)
    np.testing.assert_allclose(stats[PYCOCOTOOLS][1:], stats[FASTER_COCO_EVAL][1:], rtol=0, atol=ONE_ULP)


# ------------------------------------------------------------------------------- choosing a backend


def test_auto_prefers_faster_coco_eval_and_falls_back_to_pycocotools(monkeypatch):
    assert resolve_backend(AUTO_BACKEND) == FASTER_COCO_EVAL  # a core dependency
    coco, results = edge_case()
    assert run_coco_eval(coco, results).backend == FASTER_COCO_EVAL
    monkeypatch.setattr(coco_eval, "_faster_evaluator", lambda: None)  # as if it could not be imported
    assert resolve_backend(AUTO_BACKEND) == PYCOCOTOOLS
    assert run_coco_eval(coco, results).backend == PYCOCOTOOLS
    assert resolve_backend(PYCOCOTOOLS) == PYCOCOTOOLS
    with pytest.raises(ConfigError, match=r"evaluation.backend=faster_coco_eval: the faster_coco_eval "
                                          r"package cannot be imported \(pip install faster-coco-eval"):
        run_coco_eval(coco, results, backend=FASTER_COCO_EVAL)


def test_config_names_the_backend():
    assert load_config("tiny_cpu").evaluation.backend == AUTO_BACKEND
    assert load_config("tiny_cpu", ["evaluation.backend=pycocotools"]).evaluation.backend == PYCOCOTOOLS
    with pytest.raises(ConfigError, match="evaluation.backend"):
        load_config("tiny_cpu", ["evaluation.backend=detectron2"])
    with pytest.raises(ConfigError, match="evaluation.backend='detectron2'"):
        resolve_backend("detectron2")


def test_a_missing_faster_coco_eval_stops_eval_and_train_before_the_model_runs(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.setattr(coco_eval, "_faster_evaluator", lambda: None)
    data = tiny_checkpoint / "data"
    code = main(["eval", str(tiny_checkpoint / "ckpt.pth"), f"data.root={data}",
                 "--out", str(tmp_path / "eval"), "evaluation.backend=faster_coco_eval"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("asag eval: error: evaluation.backend=faster_coco_eval: the faster_coco_eval "
                          "package cannot be imported") and len(err.splitlines()) == 1
    assert not (tmp_path / "eval" / "metrics.json").exists()
    run = tmp_path / "run"
    assert main(["train", "tiny_cpu", f"data.root={data}", f"runtime.output_dir={run}",
                 "evaluation.backend=faster_coco_eval"]) == 2
    assert "evaluation.backend=faster_coco_eval" in capsys.readouterr().err
    assert not any(run.glob("*.pth"))
