"""COCO-style box evaluation: detections -> result records -> COCOeval metrics.

Result records follow the COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` with boxes in original-image pixels.

Two backends run the same protocol (config ``evaluation.backend``; :func:`resolve_backend`):
``pycocotools`` (the reference) and ``faster_coco_eval`` (``COCOeval_faster``: matching and accumulation
in C++, several times faster). :func:`evaluator_class` is the one place that picks the ``COCOeval``
class; the ground truth and the detections stay pycocotools ``COCO`` objects for both (``loadRes`` of
pycocotools, the same annotation dicts in the same order). Their ``eval`` arrays agree exactly except in
one place: pycocotools divides by ``tp + fp + eps`` (``np.spacing(1)``), faster-coco-eval by ``tp + fp``,
so where the first counted detection of a ranked list is a true positive followed by a false positive (or
by nothing), pycocotools' precision at the recall points it reaches is ``1 - 2**-52`` and
faster-coco-eval's ``1.0`` (for ``tp + fp >= 2`` the eps is at most half a unit in the last place and both
divisions give the same double). ``stats`` and per-class AP differ by at most ``2**-52`` under the default
``maxDets`` ``[1, 10, 100]`` (with others, pycocotools still reads ``stats[0]`` at 100 detections). See
docs/evaluation.md and tests/engine/test_coco_backends.py.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from torch import Tensor
from torchvision.ops import box_convert

from asag.errors import ConfigError
from asag.outputs import atomic_write_text
from asag.structures import Detections

# Order of COCOeval.stats for bbox evaluation (pycocotools ``summarize``).
COCO_STAT_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar100", "ars", "arm", "arl")
# Indices into COCOeval.eval["precision"] of shape [T, R, K, A, M]: area range "all", maxDets 100.
_AREA_ALL, _MAX_DETS_LAST = 0, -1

# Evaluation backends (config evaluation.backend); "auto" resolves to the first one installed.
FASTER_COCO_EVAL, PYCOCOTOOLS, AUTO_BACKEND = "faster_coco_eval", "pycocotools", "auto"
BACKENDS = (FASTER_COCO_EVAL, PYCOCOTOOLS)


@functools.cache
def _faster_evaluator() -> type[COCOeval] | None:
    """faster-coco-eval's ``COCOeval_faster``, or None where the package cannot be imported."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


def faster_coco_eval_installed() -> bool:
    """Whether the ``faster_coco_eval`` package can be imported."""
    return _faster_evaluator() is not None


def resolve_backend(backend: str = AUTO_BACKEND) -> str:
    """The backend that evaluates: ``"auto"`` -> ``"faster_coco_eval"`` when installed, else
    ``"pycocotools"``; a named backend as it is.

    Raises:
        ConfigError: an unknown name, or ``faster_coco_eval`` named but not installed.
    """
    if backend == AUTO_BACKEND:
        return FASTER_COCO_EVAL if faster_coco_eval_installed() else PYCOCOTOOLS
    if backend not in BACKENDS:
        raise ConfigError(f"evaluation.backend={backend!r}: expected one of "
                          f"{', '.join((AUTO_BACKEND, *BACKENDS))}")
    if backend == FASTER_COCO_EVAL and not faster_coco_eval_installed():
        raise ConfigError(
            "evaluation.backend=faster_coco_eval: the faster_coco_eval package cannot be imported "
            "(pip install faster-coco-eval==1.8.0); evaluation.backend=auto or pycocotools evaluates "
            "without it")
    return backend


def evaluator_class(backend: str = AUTO_BACKEND) -> type[COCOeval]:
    """The ``COCOeval`` class of ``backend`` (resolved by :func:`resolve_backend`): pycocotools'
    ``COCOeval`` or faster-coco-eval's ``COCOeval_faster`` (same constructor, ``params``, ``evaluate``,
    ``accumulate``, ``summarize``, ``stats`` and ``eval`` arrays)."""
    if resolve_backend(backend) == FASTER_COCO_EVAL:
        return _faster_evaluator()
    return COCOeval


@functools.cache
def _extended(base: type[COCOeval], extension: type) -> type[COCOeval]:
    """``base`` with the methods of the mixin ``extension`` in front (one class per pair)."""
    return type(f"{extension.__name__.lstrip('_')}{base.__name__}", (extension, base), {})


class LabelMapping(Protocol):
    """Maps contiguous labels ``0..C-1`` to the data set's category ids."""

    def to_category_ids(self, labels: Tensor) -> Tensor: ...


@dataclass
class CocoMetrics:
    """COCOeval bbox metrics, in [0, 1]; -1 where undefined (no ground truth in that range).

    ap: AP@[.50:.95]; ap50 / ap75: AP at IoU 0.5 / 0.75; aps / apm / apl: AP for small / medium /
    large objects; ar1 / ar10 / ar100: AR with 1 / 10 / 100 detections per image; ars / arm / arl:
    AR@100 by object size. per_class_ap: category name -> AP@[.50:.95] (None unless asked).
    summary: the backend's printed summary (the 12 lines of ``stats``).
    backend: the backend that evaluated (``faster_coco_eval`` or ``pycocotools``).
    """

    ap: float
    ap50: float
    ap75: float
    aps: float
    apm: float
    apl: float
    ar1: float
    ar10: float
    ar100: float
    ars: float
    arm: float
    arl: float
    per_class_ap: dict[str, float] | None
    summary: str
    num_detections: int
    num_images: int
    backend: str

    @property
    def stats(self) -> list[float]:
        """The 12 numbers in pycocotools' ``stats`` order."""
        return [getattr(self, name) for name in COCO_STAT_NAMES]


def detections_to_coco_results(
    detections: Sequence[Detections], image_ids: Sequence[int], label_map: LabelMapping
) -> list[dict]:
    """COCO result records for a batch.

    Args:
        detections: one :class:`Detections` per image (boxes ``[K, 4]`` xyxy, original pixels).
        image_ids: the data set's image id of each image.
        label_map: maps the contiguous labels to category ids.
    Returns:
        one dict per detection, ``bbox`` as ``[x, y, w, h]`` in original pixels.
    """
    counts = [len(d) for d in detections]
    if sum(counts) == 0:
        return []
    boxes_xyxy = torch.cat([d.boxes.detach().float().cpu() for d in detections])  # [N, 4]
    boxes_xywh = box_convert(boxes_xyxy, in_fmt="xyxy", out_fmt="xywh")  # [N, 4]
    scores = torch.cat([d.scores.detach().float().cpu() for d in detections])  # [N]
    labels = torch.cat([d.labels.detach().cpu() for d in detections])  # [N]
    category_ids = label_map.to_category_ids(labels)  # [N]
    ids = torch.repeat_interleave(torch.as_tensor(list(image_ids), dtype=torch.int64), torch.tensor(counts))
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(ids.tolist(), category_ids.tolist(), boxes_xywh.tolist(), scores.tolist())
    ]


def write_results_json(path: str | os.PathLike, results: Sequence[dict]) -> Path:
    """Write the result records as a JSON array (atomically: temporary file, then rename)."""
    return atomic_write_text(path, json.dumps(list(results)))


def load_results(coco_gt: COCO, results: Sequence[dict]) -> COCO:
    """The detections as a pycocotools COCO object; an empty list gives an empty result set (where
    ``COCO.loadRes`` would fail)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes([dict(r) for r in results])  # loadRes edits the records
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def accumulated_eval(
    coco_gt: COCO,
    coco_dt: COCO,
    *,
    image_ids: Sequence[int] | None = None,
    setup: Callable[[Params], None] | None = None,
    backend: str = AUTO_BACKEND,
    extension: type | None = None,
) -> COCOeval:
    """A bbox ``COCOeval`` of ``coco_dt`` against ``coco_gt`` by ``backend`` (:func:`evaluator_class`),
    evaluated and accumulated (its ``eval["precision"]`` is ``[T, R, K, A, M]``), its printing going to
    standard output and silenced here (so that :func:`run_coco_eval` can catch the summary).

    Args:
        image_ids: restrict the evaluation to these images (default: every image of ``coco_gt``).
        setup: changes the parameters before the evaluation (IoU thresholds, categories, areas ...).
        backend: ``auto``, ``faster_coco_eval`` or ``pycocotools``.
        extension: a mixin class whose methods go in front of the backend's (e.g. a ``_prepare`` that
            calls ``super()._prepare()`` and then edits the ground-truth dicts of ``coco_gt.anns``, which
            both backends read after ``_prepare``).
    """
    backend = resolve_backend(backend)
    cls = evaluator_class(backend)
    if extension is not None:
        cls = _extended(cls, extension)
    evaluator = cls(coco_gt, coco_dt, iouType="bbox")
    if backend == FASTER_COCO_EVAL:  # it logs (logging.info) by default; pycocotools prints
        evaluator.print_function = print
    if image_ids is not None:
        evaluator.params.imgIds = sorted({int(i) for i in image_ids})
    if setup is not None:
        setup(evaluator.params)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def run_coco_eval(
    coco_gt: COCO,
    results: Sequence[dict],
    *,
    image_ids: Sequence[int] | None = None,
    per_class: bool = False,
    backend: str = AUTO_BACKEND,
) -> CocoMetrics:
    """Run the bbox evaluation of ``results`` against ``coco_gt``.

    Args:
        image_ids: restrict the evaluation to these images (default: every image of ``coco_gt``);
            pass the ids actually run so that a partial pass is not penalised for unseen images.
        per_class: also compute AP@[.50:.95] per category.
        backend: ``auto``, ``faster_coco_eval`` or ``pycocotools`` (:func:`resolve_backend`).
    """
    backend = resolve_backend(backend)
    evaluator = accumulated_eval(coco_gt, load_results(coco_gt, results), image_ids=image_ids,
                                 backend=backend)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(COCO_STAT_NAMES, evaluator.stats)}
    return CocoMetrics(
        **stats,
        per_class_ap=_per_class_ap(evaluator, coco_gt) if per_class else None,
        summary=_summary_lines(buffer.getvalue()),
        num_detections=len(results),
        num_images=len(evaluator.params.imgIds),
        backend=backend,
    )


def _summary_lines(text: str) -> str:
    """The printed lines of the 12 ``stats`` (faster-coco-eval prints AR@0.5 and AR@0.75 after them)."""
    lines = [line for line in text.splitlines() if line.strip().startswith("Average")]
    return "\n".join(lines[: len(COCO_STAT_NAMES)])


def _per_class_ap(evaluator: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP@[.50:.95] per category (area all, 100 detections); -1 for categories without ground truth."""
    precision = evaluator.eval["precision"][:, :, :, _AREA_ALL, _MAX_DETS_LAST]  # [T, R, K]
    out: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        valid = values[values > -1]
        out[category_name(coco_gt, cat_id)] = float(np.mean(valid)) if valid.size else -1.0
    return out


def category_name(coco_gt: COCO, cat_id: int) -> str:
    """The category's ``name``, or its id as text when it has none."""
    return str(coco_gt.cats[cat_id].get("name", cat_id))
