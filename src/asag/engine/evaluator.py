"""Evaluation of a detector over a data loader, single-process or distributed.

Each rank runs the model on its share of the images (see
:func:`asag.engine.distributed.build_eval_sampler`), converts the detections to COCO result records
and gathers them on every rank (``all_gather_object``); rank 0 writes the results JSON and scores
them; the metrics are then broadcast so every rank returns the same result. Two metrics, same call
pattern: :func:`evaluate` (COCO AP via pycocotools or faster-coco-eval, :class:`EvalResult`) and
:func:`evaluate_crowdhuman` (CrowdHuman AP / mMR / Recall, :class:`CrowdHumanEvalResult`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch import Tensor, nn

from asag.engine.checkpoint import unwrap_model
from asag.engine.coco_eval import (
    AUTO_BACKEND,
    LabelMapping,
    detections_to_coco_results,
    resolve_backend,
    run_coco_eval,
    write_results_json,
)
from asag.engine.crowdhuman_eval import DEFAULT_MISS_RATE_RULE, MissRateRule, evaluate_coco_results
from asag.engine.distributed import all_gather_object, broadcast_object, is_main_process
from asag.engine.logger import RunLogger
from asag.engine.trainer import autocast_context, check_amp
from asag.structures import Batch

# Spec section 3.4: the levels the anchor generator may probe with patches.
PROBED_LEVELS = ("P4", "P3")


@dataclass
class EvalResult:
    """Evaluation metrics (COCO values in [0, 1]; -1 where the evaluated images hold no ground truth).

    ap, ap50, ap75, aps, apm, apl: COCO box AP@[.5:.95], @.5, @.75, small / medium / large.
    stats: all 12 COCOeval numbers (AP ..., AR@1, AR@10, AR@100, ARs, ARm, ARl).
    per_class_ap: category name -> AP (None unless requested).
    num_images / num_detections: images evaluated and detections produced (all ranks).
    images_per_second: images over the model time (forward + post-processing) of the slowest rank.
    mean_queries: mean number of real (unpadded) queries per image, when the model reports them.
    mean_patches: level -> mean number of probed patches per image, when the model reports them.
    results_path: the COCO results JSON, if written. summary: the COCOeval summary lines.
    backend: the COCOeval that computed them (``faster_coco_eval`` or ``pycocotools``;
    :mod:`asag.engine.coco_eval`).
    """

    ap: float
    ap50: float
    ap75: float
    aps: float
    apm: float
    apl: float
    stats: list[float]
    num_images: int
    num_detections: int
    images_per_second: float
    backend: str
    mean_queries: float | None = None
    mean_patches: dict[str, float] | None = None
    per_class_ap: dict[str, float] | None = None
    results_path: str | None = None
    summary: str = ""


@dataclass
class CrowdHumanEvalResult:
    """CrowdHuman metrics (spec section 10; see :mod:`asag.engine.crowdhuman_eval`), in [0, 1]; -1 when
    the evaluated images hold no person box.

    ap: area under the precision-recall curve. mmr: log-average miss rate over FPPI [1e-2, 1] (lower is
    better). recall: final recall of the ranked list.
    num_images / num_detections: images evaluated and detections produced (all ranks).
    num_people / num_ignore: person boxes and ignore regions of the evaluated images.
    num_true_positives / num_false_positives / num_ignored: outcomes of the detections.
    images_per_second, mean_queries, mean_patches, results_path: as in :class:`EvalResult`.
    summary: the metrics and counts on one line.
    """

    ap: float
    mmr: float
    recall: float
    num_images: int
    num_detections: int
    num_people: int
    num_ignore: int
    num_true_positives: int
    num_false_positives: int
    num_ignored: int
    images_per_second: float
    mean_queries: float | None = None
    mean_patches: dict[str, float] | None = None
    results_path: str | None = None
    summary: str = ""


@dataclass
class _ShardRecord:
    """What one rank collected (plain data, gathered across ranks)."""

    results_by_image: dict[int, list[dict]] = field(default_factory=dict)
    model_seconds: float = 0.0
    query_sum: float = 0.0
    query_images: int = 0
    patch_sums: dict[str, float] = field(default_factory=dict)
    patch_images: int = 0


def _query_counts(output: object) -> Tensor | None:
    """``[B]`` real queries per image, or None when the output has no valid mask."""
    valid_mask = getattr(output, "valid_mask", None)
    return valid_mask.sum(dim=1) if isinstance(valid_mask, Tensor) else None


def _patch_counts(output: object, batch_size: int) -> dict[str, float] | None:
    """Level -> probed patches in this batch (loss-only patches excluded), or None when the output
    carries no anchor-generator predictions."""
    anchors = getattr(output, "anchors", None)
    predictions = getattr(anchors, "patch_predictions", None)
    if predictions is None:
        return None
    counts = dict.fromkeys(PROBED_LEVELS, 0.0)
    for prediction in predictions:
        if prediction.level not in counts:
            continue
        real = prediction.batch_idx < batch_size
        if prediction.loss_only is not None:
            real = real & ~prediction.loss_only
        if getattr(prediction, "valid", None) is not None:  # static mode: used patch slots only
            real = real & prediction.valid
        counts[prediction.level] += float(real.sum())
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_batch(module: nn.Module, batch: Batch, record: _ShardRecord, *, device: torch.device,
               amp: str | None, label_map: LabelMapping) -> None:
    """Forward + post-processing of one batch; add its results and statistics to ``record``."""
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast_context(device, amp):
        output = module(batch.images, batch.image_sizes)
        detections = module.postprocess(output, batch.orig_sizes)
    _sync(device)
    record.model_seconds += time.perf_counter() - start
    results = detections_to_coco_results(detections, batch.image_ids, label_map)
    for image_id in batch.image_ids:
        record.results_by_image.setdefault(int(image_id), [])
    for item in results:
        record.results_by_image[item["image_id"]].append(item)
    queries = _query_counts(output)
    if queries is not None:
        record.query_sum += float(queries.sum())
        record.query_images += len(batch)
    patches = _patch_counts(output, len(batch))
    if patches is not None:
        for level, count in patches.items():
            record.patch_sums[level] = record.patch_sums.get(level, 0.0) + count
        record.patch_images += len(batch)


def _merge(records: list[_ShardRecord]) -> _ShardRecord:
    """One record for all ranks; an image evaluated twice (padding samplers) keeps its first results."""
    merged = _ShardRecord()
    for record in records:
        for image_id, results in record.results_by_image.items():
            merged.results_by_image.setdefault(image_id, results)
        merged.model_seconds = max(merged.model_seconds, record.model_seconds)
        merged.query_sum += record.query_sum
        merged.query_images += record.query_images
        for level, count in record.patch_sums.items():
            merged.patch_sums[level] = merged.patch_sums.get(level, 0.0) + count
        merged.patch_images += record.patch_images
    merged.results_by_image = dict(sorted(merged.results_by_image.items()))
    return merged


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    coco_gt: COCO,
    label_map: LabelMapping,
    device: torch.device | str,
    amp: str | None = None,
    results_json: str | Path | None = None,
    per_class: bool = False,
    max_batches: int | None = None,
    logger: RunLogger | None = None,
    backend: str = AUTO_BACKEND,
) -> EvalResult:
    """Evaluate ``model`` on ``loader`` against ``coco_gt`` (COCO bbox metrics).

    Args:
        model: the detector (a DDP wrapper is unwrapped): ``model(images [B,3,H,W], image_sizes [B,2])``
            in eval mode and ``model.postprocess(output, orig_sizes [B,2]) -> list[Detections]``
            (boxes xyxy in original pixels, contiguous labels).
        loader: yields :class:`asag.structures.Batch`; in distributed runs each rank's share.
        coco_gt: the ground truth; only the images seen in the loader are scored.
        label_map: maps contiguous labels to ``coco_gt`` category ids (``to_category_ids``).
        amp: evaluation precision (None: fp32; "bf16"; "fp16" on CUDA).
        results_json: where rank 0 writes the COCO results (None: not written).
        per_class: also report AP per category. max_batches: stop early (smoke tests).
        backend: the COCOeval to score with: ``auto``, ``faster_coco_eval`` or ``pycocotools``
            (:func:`asag.engine.coco_eval.resolve_backend`; resolved before the model runs).
    Returns:
        the same :class:`EvalResult` on every rank. With no detections at all, AP is 0.
    """
    backend = resolve_backend(backend)  # a missing package fails before the model runs, not after
    merged = _collect(model, loader, device=device, amp=amp, label_map=label_map, max_batches=max_batches,
                      logger=logger)
    result = None
    if is_main_process():
        result = _score(merged, coco_gt, results_json=results_json, per_class=per_class, backend=backend)
    return broadcast_object(result)


def evaluate_crowdhuman(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    coco_gt: COCO,
    label_map: LabelMapping,
    device: torch.device | str,
    amp: str | None = None,
    results_json: str | Path | None = None,
    max_batches: int | None = None,
    logger: RunLogger | None = None,
    miss_rate_rule: MissRateRule = DEFAULT_MISS_RATE_RULE,
) -> CrowdHumanEvalResult:
    """Evaluate ``model`` on ``loader`` with the CrowdHuman metrics (AP, mMR, Recall; spec section 10).

    Same arguments as :func:`evaluate` (no per-class AP: the protocol has one class). ``coco_gt`` is
    the COCO file written by ``asag data convert-crowdhuman`` (``iscrowd = 1``: ignore regions); it
    must have a single category (:class:`asag.errors.ConfigError` otherwise). Every image seen in the
    loader counts, with or without detections. ``miss_rate_rule``: how mMR samples the miss rate
    ("toolkit", the CrowdHuman toolkit's and the default, or "caltech"; see
    :mod:`asag.engine.crowdhuman_eval`).
    Returns:
        the same :class:`CrowdHumanEvalResult` on every rank.
    """
    merged = _collect(model, loader, device=device, amp=amp, label_map=label_map, max_batches=max_batches,
                      logger=logger)
    result = None
    if is_main_process():
        result = _score_crowdhuman(merged, coco_gt, results_json=results_json, miss_rate_rule=miss_rate_rule)
    return broadcast_object(result)


def _collect(model: nn.Module, loader: Iterable[Batch], *, device: torch.device | str, amp: str | None,
             label_map: LabelMapping, max_batches: int | None, logger: RunLogger | None) -> _ShardRecord:
    """Run the model over this rank's batches and merge the records of all ranks."""
    device = torch.device(device)
    check_amp(amp, device)
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    record = _ShardRecord()
    bar = logger.progress(loader, desc="eval") if logger is not None else iter(loader)
    for index, batch in enumerate(bar):
        if max_batches is not None and index >= max_batches:
            break
        _run_batch(module, batch.to(device), record, device=device, amp=amp, label_map=label_map)
    module.train(was_training)
    return _merge(all_gather_object(record))


def _score(
    record: _ShardRecord, coco_gt: COCO, *, results_json: str | Path | None, per_class: bool, backend: str
) -> EvalResult:
    """Write the results JSON and run the COCO evaluation of ``backend`` on the merged record (rank 0)."""
    results = [item for items in record.results_by_image.values() for item in items]
    path = write_results_json(results_json, results) if results_json is not None else None
    metrics = run_coco_eval(coco_gt, results, image_ids=list(record.results_by_image), per_class=per_class,
                            backend=backend)
    num_images = len(record.results_by_image)
    return EvalResult(
        ap=metrics.ap,
        ap50=metrics.ap50,
        ap75=metrics.ap75,
        aps=metrics.aps,
        apm=metrics.apm,
        apl=metrics.apl,
        stats=metrics.stats,
        num_images=num_images,
        num_detections=len(results),
        **_run_statistics(record),
        per_class_ap=metrics.per_class_ap,
        results_path=str(path) if path is not None else None,
        summary=metrics.summary,
        backend=metrics.backend,
    )


def _run_statistics(record: _ShardRecord) -> dict:
    """Throughput and model statistics shared by both result types."""
    num_images = len(record.results_by_image)
    return dict(
        images_per_second=num_images / record.model_seconds if record.model_seconds > 0 else 0.0,
        mean_queries=record.query_sum / record.query_images if record.query_images else None,
        mean_patches=(
            {level: count / record.patch_images for level, count in record.patch_sums.items()}
            if record.patch_images
            else None
        ),
    )


def _score_crowdhuman(
    record: _ShardRecord, coco_gt: COCO, *, results_json: str | Path | None,
    miss_rate_rule: MissRateRule = DEFAULT_MISS_RATE_RULE,
) -> CrowdHumanEvalResult:
    """Write the results JSON and compute the CrowdHuman metrics on the merged record (rank 0)."""
    results = [item for items in record.results_by_image.values() for item in items]
    path = write_results_json(results_json, results) if results_json is not None else None
    metrics = evaluate_coco_results(coco_gt, record.results_by_image, miss_rate_rule)
    return CrowdHumanEvalResult(
        ap=metrics.ap,
        mmr=metrics.mmr,
        recall=metrics.recall,
        num_images=metrics.num_images,
        num_detections=metrics.num_detections,
        num_people=metrics.num_people,
        num_ignore=metrics.num_ignore,
        num_true_positives=metrics.num_true_positives,
        num_false_positives=metrics.num_false_positives,
        num_ignored=metrics.num_ignored,
        **_run_statistics(record),
        results_path=str(path) if path is not None else None,
        summary=metrics.summary,
    )
