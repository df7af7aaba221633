"""The numbers behind ``asag eval``'s plots: precision-recall curves, the COCO error analysis and a
confusion matrix (:mod:`asag.viz.eval_plots` draws them and saves them as JSON).

Everything here computes plain numbers from a COCO ground truth and COCO result records (``image_id``,
``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels, ``score``), with the ``COCOeval`` of the chosen
backend (:func:`asag.engine.coco_eval.evaluator_class`: pycocotools or faster-coco-eval, the same
numbers); nothing is drawn.
Classes are in pycocotools' order (ascending category id). Curves hold one precision per recall point of
pycocotools (``R = 101`` points 0, 0.01, ..., 1); the area under a curve (its mean) is the matching AP.

* :func:`precision_recall_curves`: from ``COCOeval.eval["precision"]`` ``[T, R, K, A, M]`` (``-1``: the
  class has no ground truth in that area range), at 100 detections per image.
* :func:`error_analysis`: the COCO API's ``analyze()`` (after Hoiem et al., "Diagnosing error in object
  detectors", ECCV 2012): for every class, the PR curves C75, C50, Loc, Sim, Oth, BG and FN (see
  :data:`ERROR_SETTINGS`), each removing one more kind of error.
* :func:`confusion_matrix`: counts of detected class against true class at a score threshold.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from asag.engine.coco_eval import AUTO_BACKEND, accumulated_eval, category_name, load_results
from asag.errors import DataError

# The IoU settings of the PR curves: one threshold, or the mean over pycocotools' ten (0.50:0.05:0.95).
IOU_SETTINGS = ("0.50", "0.75", "0.50:0.95")
IOU_MEAN = "0.50:0.95"
# Detections per image of every curve here (pycocotools' largest maxDets, that of the AP).
MAX_DETS = 100
# pycocotools' "all" area range (every box), the one the error analysis uses.
AREA_ALL = "all"

# The error analysis (COCO API ``analyze``), each setting forgiving one more kind of error:
#   C75 / C50: PR at IoU 0.75 / 0.50 (the AP75 / AP50 of the class);
#   Loc: PR at IoU 0.10 (localisation errors ignored, duplicate detections still false positives);
#   Sim: Loc, and detections on an object of another class of the same supercategory are ignored;
#   Oth: Loc, and detections on an object of any other class are ignored;
#   BG: Oth, and every remaining false positive (matching no object at IoU 0.10) removed;
#   FN: every remaining error removed, including the objects never detected (precision 1).
ERROR_SETTINGS = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
ANALYSIS_IOUS = (0.75, 0.5, 0.1)  # the IoU thresholds of C75, C50 and Loc (Sim, Oth and BG use the last)
# Marks a ground-truth copy that the error analysis ignores (the ``_prepare`` of both backends derives its
# own ``ignore`` flag from ``iscrowd`` alone, which would also change how the IoU is computed).
CONFUSION_FLAG = "_asag_confusion"

BACKGROUND = "background"  # the extra row / column of the confusion matrix
CONFUSION_IOU = 0.5


# ------------------------------------------------------------------------------- PR curves


@dataclass
class ClassCurves:
    """The curves of one class: ``curves`` maps a setting (an IoU setting or an error-analysis setting)
    to ``R`` precisions; None when the class has no ground truth."""

    category_id: int
    name: str
    curves: dict[str, list[float]] | None

    def ap(self) -> dict[str, float] | None:
        """Area under each curve (None without ground truth)."""
        return None if self.curves is None else {s: float(np.mean(c)) for s, c in self.curves.items()}


@dataclass
class PrecisionRecallCurves:
    """PR curves at 100 detections per image.

    recall: the ``R`` recall points. mean: IoU setting -> area range (``all``, ``small``, ``medium``,
    ``large``) -> precision per recall point, averaged over the classes with ground truth in that range
    (None where no class has any). per_class: one :class:`ClassCurves` per class, area ``all``.
    """

    recall: list[float]
    mean: dict[str, dict[str, list[float] | None]]
    per_class: list[ClassCurves]

    def ap(self) -> dict[str, dict[str, float | None]]:
        """IoU setting -> area -> area under the mean curve: pycocotools' AP50, AP75, AP (and APs, APm,
        APl for the 0.50:0.95 setting)."""
        return {setting: {area: None if curve is None else float(np.mean(curve))
                          for area, curve in areas.items()}
                for setting, areas in self.mean.items()}


def _iou_index(iou_thresholds: np.ndarray, value: float) -> int:
    found = np.flatnonzero(np.isclose(iou_thresholds, value))
    if found.size == 0:
        raise ValueError(f"IoU threshold {value} is not among the evaluated ones {list(iou_thresholds)}")
    return int(found[0])


def _setting_precision(precision: np.ndarray, iou_thresholds: np.ndarray, setting: str) -> np.ndarray:
    """``precision [T, R, K]`` -> ``[R, K]`` for an IoU setting (the mean over T for 0.50:0.95)."""
    if setting == IOU_MEAN:
        return precision.mean(axis=0)
    return precision[_iou_index(iou_thresholds, float(setting))]


def _class_mean(curves: np.ndarray, valid: np.ndarray) -> list[float] | None:
    """``curves [R, K]`` averaged over the classes where ``valid [K]``; None when none is."""
    return curves[:, valid].mean(axis=1).tolist() if valid.any() else None


def precision_recall_curves(
    precision: np.ndarray,
    *,
    iou_thresholds: Sequence[float],
    recall: Sequence[float],
    area_labels: Sequence[str],
    category_ids: Sequence[int],
    names: Sequence[str],
) -> PrecisionRecallCurves:
    """PR curves from pycocotools' accumulated ``precision [T, R, K, A, M]`` (the last M: 100 detections).

    A class has ground truth in an area range where its entries are not -1 (pycocotools sets all ``T x R``
    of them together). ``iou_thresholds`` (T), ``recall`` (R), ``area_labels`` (A), ``category_ids`` and
    ``names`` (K) describe the axes.
    """
    precision = np.asarray(precision, dtype=np.float64)[..., -1]  # [T, R, K, A]
    ious = np.asarray(iou_thresholds, dtype=np.float64)
    has_gt = precision[0, 0] > -1  # [K, A]
    mean: dict[str, dict[str, list[float] | None]] = {}
    for setting in IOU_SETTINGS:
        mean[setting] = {area: _class_mean(_setting_precision(precision[..., a], ious, setting), has_gt[:, a])
                         for a, area in enumerate(area_labels)}
    a_all = list(area_labels).index(AREA_ALL)
    by_setting = {s: _setting_precision(precision[..., a_all], ious, s) for s in IOU_SETTINGS}  # [R, K] each
    per_class = [
        ClassCurves(int(cat), str(name),
                    {s: by_setting[s][:, k].tolist() for s in IOU_SETTINGS} if has_gt[k, a_all] else None)
        for k, (cat, name) in enumerate(zip(category_ids, names))
    ]
    return PrecisionRecallCurves([float(r) for r in recall], mean, per_class)


def curves_from_evaluator(evaluator: COCOeval, coco_gt: COCO) -> PrecisionRecallCurves:
    """:func:`precision_recall_curves` of an evaluated and accumulated ``COCOeval`` (either backend)."""
    p = evaluator.params
    return precision_recall_curves(
        evaluator.eval["precision"], iou_thresholds=p.iouThrs, recall=p.recThrs, area_labels=p.areaRngLbl,
        category_ids=p.catIds, names=[category_name(coco_gt, c) for c in p.catIds])


# --------------------------------------------------------------------------------- error analysis


@dataclass
class ErrorAnalysis:
    """The COCO error analysis at 100 detections per image, area ``all``.

    recall: the ``R`` recall points. overall: setting (:data:`ERROR_SETTINGS`) -> the mean curve over the
    classes with ground truth. per_class: one :class:`ClassCurves` per class. supercategories: whether the
    categories name supercategories (without them all classes form one group, and Sim equals Oth).
    """

    recall: list[float]
    overall: dict[str, list[float]]
    per_class: list[ClassCurves]
    supercategories: bool = True

    def ap(self) -> dict[str, float]:
        """Setting -> area under the overall curve."""
        return {s: float(np.mean(c)) for s, c in self.overall.items()}


class _ConfusionIgnoring:
    """Mixin for a ``COCOeval`` of either backend that also ignores the ground truth flagged
    :data:`CONFUSION_FLAG`: a detection matched to it is neither a true nor a false positive, and it is
    not a missed object. Its IoU stays the regular one (the backends' own ignore flag comes from
    ``iscrowd``, which would switch to the crowd IoU). Both backends set ``ignore`` on the annotation dicts
    of ``cocoGt`` in ``_prepare`` and read them only afterwards, so the flag is set on those dicts."""

    cocoGt: COCO

    def _prepare(self) -> None:
        super()._prepare()  # type: ignore[misc]
        for gt in self.cocoGt.anns.values():
            if gt.get(CONFUSION_FLAG):
                gt["ignore"] = 1


def _coco_from(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _supercategory_groups(coco_gt: COCO, cat_ids: Sequence[int]) -> tuple[dict[int, str], bool]:
    """Category id -> its supercategory (``""`` when it names none) and whether any category names one."""
    groups = {c: str(coco_gt.cats[c].get("supercategory") or "") for c in cat_ids}
    return groups, any(groups.values())


def _analysis_params(iou_thresholds: Sequence[float], cat_ids: Sequence[int] | None = None):
    """A ``COCOeval`` parameter setup: these IoU thresholds, area ``all`` only, 100 detections."""

    def setup(params: Params) -> None:
        params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        params.maxDets = [MAX_DETS]
        all_index = params.areaRngLbl.index(AREA_ALL)
        params.areaRng = [params.areaRng[all_index]]
        params.areaRngLbl = [AREA_ALL]
        if cat_ids is not None:
            params.catIds = list(cat_ids)

    return setup


def _confusions_ignored(coco_gt: COCO, detections: list[dict], cat_id: int, confusable: Sequence[int],
                        image_ids: Sequence[int], backend: str) -> np.ndarray:
    """PR curve ``[R]`` of class ``cat_id`` at IoU 0.1 when detections on objects of the ``confusable``
    classes are ignored: those objects are copied as ignored objects of class ``cat_id`` (only into the
    images where the class has detections: elsewhere an ignored object changes nothing)."""
    evaluated = set(image_ids)
    detected_images = sorted({d["image_id"] for d in detections} & evaluated)
    own = coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat_id]))
    copies = []
    if detected_images and confusable:
        ids = coco_gt.getAnnIds(imgIds=detected_images, catIds=list(confusable))
        copies = [{**a, "category_id": cat_id, CONFUSION_FLAG: True} for a in coco_gt.loadAnns(ids)]
    # fresh ids from 1: pycocotools takes a match to id 0 for no match
    annotations = [{**a, "id": i} for i, a in enumerate([*own, *copies], start=1)]
    images = coco_gt.dataset["images"]
    category = [coco_gt.cats[cat_id]]
    involved = ({a["image_id"] for a in own} | set(detected_images)) & evaluated
    coco_dt = _coco_from(images, category, [dict(d) for d in detections])
    evaluator = accumulated_eval(
        _coco_from(images, category, annotations), coco_dt, image_ids=sorted(involved),
        setup=_analysis_params(ANALYSIS_IOUS[-1:], [cat_id]), backend=backend, extension=_ConfusionIgnoring)
    return evaluator.eval["precision"][0, :, 0, 0, 0]


def error_analysis(coco_gt: COCO, results: Sequence[dict], image_ids: Sequence[int] | None = None, *,
                   backend: str = AUTO_BACKEND) -> ErrorAnalysis:
    """The COCO error analysis of ``results`` on the images ``image_ids`` (default: all of ``coco_gt``),
    evaluated by ``backend`` (``auto``, ``faster_coco_eval`` or ``pycocotools``).

    C75, C50 and Loc come from one evaluation at IoU 0.75, 0.5 and 0.1. Sim and Oth evaluate
    each class again at IoU 0.1 with the objects of the other classes of its supercategory (Sim) or of all
    other classes (Oth) turned into ignored objects of that class (the COCO API's definition). BG is 1 at
    every recall level that Oth reaches and 0 beyond: once the false positives that match no object at IoU
    0.1 are removed as well, only true positives are left. FN is 1 everywhere. Recall a class does not
    reach has precision 0, as in pycocotools; a class without ground truth has no curves (None) and is
    left out of the overall mean.
    """
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    coco_dt = load_results(coco_gt, results)
    base = accumulated_eval(coco_gt, coco_dt, image_ids=image_ids, setup=_analysis_params(ANALYSIS_IOUS),
                            backend=backend)
    cat_ids = list(base.params.catIds)
    precision = base.eval["precision"][:, :, :, 0, 0]  # [3, R, K]
    has_gt = precision[0, 0] > -1  # [K]
    groups, named = _supercategory_groups(coco_gt, cat_ids)
    num_recall = precision.shape[1]
    curves = np.zeros((len(ERROR_SETTINGS), num_recall, len(cat_ids)))  # [S, R, K]
    curves[: len(ANALYSIS_IOUS)] = precision
    sim, oth = ERROR_SETTINGS.index("Sim"), ERROR_SETTINGS.index("Oth")
    by_class: dict[int, list[dict]] = {}
    for detection in coco_dt.dataset["annotations"]:
        by_class.setdefault(detection["category_id"], []).append(detection)
    for k, cat in enumerate(cat_ids):
        if not has_gt[k]:
            continue
        detections = by_class.get(cat, [])
        others = [c for c in cat_ids if c != cat]
        similar = [c for c in others if groups[c] == groups[cat]]
        curves[sim, :, k] = _confusions_ignored(coco_gt, detections, cat, similar, image_ids, backend)
        curves[oth, :, k] = _confusions_ignored(coco_gt, detections, cat, others, image_ids, backend)
    curves[ERROR_SETTINGS.index("BG")] = curves[oth] > 0
    curves[ERROR_SETTINGS.index("FN")] = 1.0
    per_class = [
        ClassCurves(int(cat), category_name(coco_gt, cat),
                    {s: curves[i, :, k].tolist() for i, s in enumerate(ERROR_SETTINGS)}
                    if has_gt[k] else None)
        for k, cat in enumerate(cat_ids)
    ]
    overall = {s: (curves[i][:, has_gt].mean(axis=1) if has_gt.any() else np.zeros(num_recall)).tolist()
               for i, s in enumerate(ERROR_SETTINGS)}
    return ErrorAnalysis([float(r) for r in base.params.recThrs], overall, per_class, supercategories=named)


# ------------------------------------------------------------------------------ confusion matrix


@dataclass
class ConfusionMatrix:
    """Detections against ground truth at one score threshold.

    names: the K class names, then :data:`BACKGROUND`. category_ids: the K category ids.
    counts: ``[K + 1][K + 1]``, row = true class, column = detected class; the last row counts the
    detections that match no object, the last column the objects that no detection matches.
    """

    names: list[str]
    category_ids: list[int]
    counts: list[list[int]]
    score_threshold: float
    iou_threshold: float


def _pairwise_iou(dets: list[dict], boxes: list[dict], crowd: bool) -> np.ndarray:
    """``[D, G]`` IoU of the detections' and the annotations' ``bbox`` (pycocotools; ``crowd``: intersection
    over the detection's area)."""
    if not dets or not boxes:
        return np.zeros((len(dets), len(boxes)))
    ious = mask_utils.iou([d["bbox"] for d in dets], [b["bbox"] for b in boxes], [int(crowd)] * len(boxes))
    return np.asarray(ious, dtype=np.float64).reshape(len(dets), len(boxes))


def _match_image(dets: list[dict], gts: list[dict], crowd: list[dict], index: dict[int, int],
                 counts: np.ndarray, iou_threshold: float) -> None:
    """Add one image's outcomes to ``counts`` (see :func:`confusion_matrix` for the rule)."""
    background = counts.shape[0] - 1
    dets = sorted(dets, key=lambda d: -d["score"])  # stable: equal scores keep their order
    ious = _pairwise_iou(dets, gts, crowd=False)  # [D, G]
    det_rows = np.asarray([index[d["category_id"]] for d in dets], dtype=np.int64)
    gt_rows = np.asarray([index[g["category_id"]] for g in gts], dtype=np.int64)
    gt_of = np.full(len(dets), -1)  # matched object per detection
    taken = np.zeros(len(gts), dtype=bool)
    for same_class in (True, False):
        for d in np.flatnonzero(gt_of < 0):
            pool = (ious[d] >= iou_threshold) & ~taken
            if same_class:
                pool &= gt_rows == det_rows[d]
            if pool.any():
                gt_of[d] = int(np.argmax(np.where(pool, ious[d], -1.0)))
                taken[gt_of[d]] = True
    on_crowd = (_pairwise_iou(dets, crowd, crowd=True) >= iou_threshold).any(axis=1)  # [D]
    for d in range(len(dets)):
        if gt_of[d] >= 0:
            counts[gt_rows[gt_of[d]], det_rows[d]] += 1
        elif not on_crowd[d]:
            counts[background, det_rows[d]] += 1
    for g in np.flatnonzero(~taken):
        counts[gt_rows[g], background] += 1


def confusion_matrix(coco_gt: COCO, results: Sequence[dict], image_ids: Sequence[int] | None = None, *,
                     score_threshold: float, iou_threshold: float = CONFUSION_IOU) -> ConfusionMatrix:
    """Count, per image, which class the confident detections gave each object.

    Only detections with ``score >= score_threshold`` count. Within each image they are matched greedily,
    one object per detection and one detection per object, in two passes over the detections in
    decreasing score order: first each takes the free object *of its own class* with the highest IoU >=
    ``iou_threshold`` (pycocotools' true positives at that IoU); then each still unmatched detection
    takes the free object *of any class* with the highest such IoU (a class confusion). A detection
    left unmatched counts in row :data:`BACKGROUND` (a false positive on background) unless it lies on a
    crowd region (intersection over its own area >= ``iou_threshold``, as pycocotools), where it is not
    counted; an object left unmatched counts in column :data:`BACKGROUND` (missed). Crowd regions are
    not objects. So row sums are the objects of each class and column sums the counted detections.
    Images: ``image_ids`` (default: all of ``coco_gt``).
    """
    cat_ids = sorted(coco_gt.getCatIds())
    index = {c: k for k, c in enumerate(cat_ids)}
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["category_id"] not in index:
            raise DataError(f"detection of image {r['image_id']}: category id {r['category_id']} is not a "
                            f"category of the ground truth")
        if r["score"] >= score_threshold:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    counts = np.zeros((len(cat_ids) + 1, len(cat_ids) + 1), dtype=np.int64)
    for image_id in image_ids:
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        gts = [a for a in anns if not a.get("iscrowd")]
        crowd = [a for a in anns if a.get("iscrowd")]
        _match_image(by_image.get(image_id, []), gts, crowd, index, counts, iou_threshold)
    names = [category_name(coco_gt, c) for c in cat_ids]
    return ConfusionMatrix([*names, BACKGROUND], cat_ids, counts.tolist(), float(score_threshold),
                           float(iou_threshold))
