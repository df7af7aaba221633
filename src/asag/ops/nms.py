"""Greedy non-maximum suppression with fixed shapes (the static inference mode, docs/inference.md).

torchvision's ``nms`` returns a list whose length depends on the data, which forces a host read on a
GPU and cannot be captured in a CUDA graph or exported with fixed shapes. The functions here compute
the same greedy NMS on ``[B, M]`` rows with masks and loops whose length is fixed by the caller:

* :func:`fixed_budget_nms` picks, per row, the first ``max_kept`` boxes torchvision's greedy NMS keeps
  (a loop of ``max_kept`` steps: take the best live box, suppress its overlaps; one graph loop in an
  exported model, :func:`repeat_steps`, so that the graph does not grow with the budget); with
  ``max_kept=None`` the data sizes the loop: it runs in rounds (:data:`DATA_ROUND` steps, then twice as
  many each time) until no candidate is left, reading the rows' counts back from the device after each
  round (the kept boxes are then exactly torchvision's);
* :func:`sorted_nms_keep` marks which boxes of a row already sorted by descending score survive (a loop
  over the ``M`` columns, one graph loop in an exported model), for the class-wise NMS after the top-k of
  post-processing.

Both reproduce ``torchvision.ops.nms`` on the CPU exactly: scores sorted descending with ties in index
order (torchvision's stable sort), IoU computed with the same float32 operations
(``inter / (area_i + area_j - inter)``) and compared with ``>`` against the threshold as the kernel
does in float64, here in float32 against the largest float32 not above it (the same decision, and no
float64 in an exported graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Greedy steps of the first round when the data sizes the NMS (``max_kept=None``); each later round is
# twice as long. One round covers the release's speed path (at most 15 patches per image and level,
# docs/inference.md); a level with up to 48 kept boxes per image needs two host reads.
DATA_ROUND = 16


@dataclass
class FixedNMS:
    """Result of :func:`fixed_budget_nms` for ``B`` rows and ``T`` kept-box slots.

    index: ``[B, T]`` int64 column of the t-th kept box (meaningless where ``kept`` is False).
    kept: ``[B, T]`` bool, True for the slots holding a kept box (a prefix of each row).
    overflow: ``[B]`` bool, True where greedy NMS would have kept more than ``T`` boxes (the budget
        bound: the kept boxes are then the ``T`` best-scored survivors).
    counts: kept boxes per row, read back to the host, when the data sized ``T`` (None otherwise).
    """

    index: Tensor
    kept: Tensor
    overflow: Tensor
    counts: list[int] | None = None


def float32_threshold(threshold: float) -> float:
    """The largest float32 value not above ``threshold``. For a float32 ``x``, ``x > threshold`` in
    float64 (torchvision's NMS kernel) is ``x > float32_threshold(threshold)`` in float32."""
    value = np.float32(threshold)
    if float(value) > threshold:
        value = np.nextafter(value, np.float32(-np.inf))
    return float(value)


def box_areas(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy -> ``[...]`` areas ``(x2 - x1) * (y2 - y1)`` (torchvision's NMS formula)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def iou_against(box: Tensor, area: Tensor, boxes: Tensor, areas: Tensor) -> Tensor:
    """IoU of one box per row with every box of the row, in torchvision's NMS order of operations.

    Args:
        box: ``[B, 1, 4]`` xyxy; area: ``[B, 1]``; boxes: ``[B, M, 4]`` xyxy; areas: ``[B, M]``.
    Returns:
        ``[B, M]`` float IoU (NaN where both boxes are empty, which never suppresses).
    """
    top_left = torch.maximum(box[..., :2], boxes[..., :2])  # [B, M, 2]
    bottom_right = torch.minimum(box[..., 2:], boxes[..., 2:])  # [B, M, 2]
    wh = (bottom_right - top_left).clamp(min=0.0)
    inter = wh[..., 0] * wh[..., 1]  # [B, M]
    return inter / (area + areas - inter)


def suppresses(iou: Tensor, threshold: float) -> Tensor:
    """``iou > threshold`` (``threshold`` from :func:`float32_threshold`): False where ``iou`` is NaN (two
    empty boxes, or NaN coordinates), as torch compares. An exported graph states that explicitly
    (``& ~isnan``): OpenVINO's CPU plugin (2026.4) evaluates ONNX ``Greater(NaN, t)`` as True. Eagerly the
    guard would change nothing but add two operations to each greedy step, so it is left out."""
    hits = iou > threshold
    return hits & ~iou.isnan() if torch.compiler.is_exporting() else hits


def fixed_budget_nms(
    boxes: Tensor, scores: Tensor, candidates: Tensor, iou_threshold: float, max_kept: int | None,
    limit: int | None = None,
) -> FixedNMS:
    """The first ``max_kept`` boxes of greedy NMS in every row, with fixed shapes and no host reads.

    Equal to ``torchvision.ops.nms(boxes[b][candidates[b]], scores[b][candidates[b]], iou_threshold)``
    truncated to ``max_kept`` and mapped back to columns, for every row ``b``: step ``t`` takes the
    live candidate of highest score (ties: lowest column, as torchvision's stable sort), then kills it
    and every live box whose IoU with it exceeds ``iou_threshold``.

    Args:
        boxes: ``[B, M, 4]`` xyxy (any frame, one frame per row; an expanded view is fine).
        scores: ``[B, M]`` finite scores.
        candidates: ``[B, M]`` bool, the boxes taking part.
        iou_threshold: boxes overlapping a kept box by more than this are suppressed.
        max_kept: ``T``, the budget of kept boxes per row (the loop length); None: sized by the data,
            steps in rounds (:data:`DATA_ROUND` steps, doubling) until no row has a live candidate (or
            ``limit`` steps ran), one host read per round; ``T`` is then the largest count and ``counts``
            is filled.
        limit: with ``max_kept=None``, the most boxes kept per row (None: no limit).
    Returns:
        :class:`FixedNMS` with ``[B, T]`` columns in greedy (descending score) order.
    """
    areas = box_areas(boxes)  # [B, M]
    columns = torch.arange(boxes.shape[1], device=boxes.device)[None]  # [1, M]
    threshold = float32_threshold(iou_threshold)
    live = candidates.clone()
    picks = [torch.zeros(boxes.shape[0], 0, dtype=torch.int64, device=boxes.device)]
    kept = [picks[0].bool()]
    done, counts = 0, None
    while (steps := _round_length(done, max_kept, limit)) > 0:
        round_picks, round_kept, live = _greedy_steps(boxes, areas, scores, live, columns, threshold, steps)
        picks.append(round_picks)
        kept.append(round_kept)
        done += steps
        if max_kept is None:  # one host read per round: the rows' counts and whether any is unfinished
            state = torch.cat([sum(k.sum(dim=1) for k in kept), live.any(dim=1).long()]).tolist()
            counts, unfinished = state[:len(state) // 2], any(state[len(state) // 2:])
            if not unfinished:
                break
    width = done if counts is None else max(counts, default=0)  # the data's budget: the largest count
    index, kept_mask = torch.cat(picks[1:] or picks, dim=1), torch.cat(kept[1:] or kept, dim=1)
    return FixedNMS(index[:, :width], kept_mask[:, :width], live.any(dim=1), counts)


def _round_length(done: int, max_kept: int | None, limit: int | None) -> int:
    """Steps of the next round: the rest of a fixed budget; else :data:`DATA_ROUND` steps more than all
    rounds so far (16, 32, 64, ...), within ``limit``."""
    if max_kept is not None:
        return max_kept - done
    steps = DATA_ROUND + done
    return steps if limit is None else max(min(steps, limit - done), 0)


def _greedy_steps(boxes: Tensor, areas: Tensor, scores: Tensor, live: Tensor, columns: Tensor,
                  threshold: float, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` greedy NMS steps from the ``[B, M]`` bool ``live`` candidates: ``[B, steps]`` picked
    columns, ``[B, steps]`` bool kept (False once a row has no candidate left) and the live mask after.

    Run by :func:`repeat_steps`: a Python loop, or one graph loop when the model is being exported."""

    def step(_: int | Tensor, live: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        best = scores.masked_fill(~live, float("-inf")).argmax(dim=1, keepdim=True)  # [B, 1]
        kept = live.gather(1, best)  # [B, 1]; False once no candidate is left
        box = boxes.gather(1, best[..., None].expand(-1, -1, 4))  # [B, 1, 4]
        iou = iou_against(box, areas.gather(1, best), boxes, areas)  # [B, M]
        return live & ~suppresses(iou, threshold) & (columns != best), best, kept

    live, (picks, kept) = repeat_steps(step, live, steps)
    return picks, kept, live


def repeat_steps(step: Callable[[int | Tensor, Tensor], tuple[Tensor, ...]], state: Tensor, steps: int
                 ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``steps`` (at least one) applications of ``step``: ``state, *outputs = step(t, state)`` for
    ``t = 0 .. steps - 1``, each output ``[B, 1]``.

    Returns the last state and each output of the steps side by side, ``[B, steps]`` (column ``t``: step
    ``t``). Eagerly (and under ``torch.compile``) a Python loop, ``t`` an int; while the model is exported
    (``torch.export``, ``torch.onnx.export(dynamo=True)``) the first step and one ``torch.while_loop`` for
    the others (an ONNX ``Loop``), ``t`` then a ``[1]`` int64 tensor after the first step (read a column
    with :func:`step_column`): the graph holds ``step`` twice whatever ``steps`` is, where a Python loop
    would be unrolled ``steps`` times. The state keeps its shape; the outputs keep theirs from step to step.
    """
    if torch.compiler.is_exporting():
        return _graph_loop(step, state, steps)
    columns: list[tuple[Tensor, ...]] = []
    for t in range(steps):
        state, *outputs = step(t, state)
        columns.append(tuple(outputs))
    return state, tuple(torch.cat(side, dim=1) for side in zip(*columns))


def step_column(x: Tensor, t: int | Tensor) -> Tensor:
    """``x[:, t]`` for the step index ``t`` of :func:`repeat_steps`: a view eagerly, an ``index_select``
    in the graph loop (a tensor index of a loop counter). The selected column is then taken with
    ``[:, 0]``, not ``squeeze(1)``: ``torch.while_loop`` traces its body with symbolic sizes, where a
    ``squeeze`` of a size not known to be 1 keeps the dimension and the body's state changes shape."""
    return x[:, t] if isinstance(t, int) else x.index_select(1, t)[:, 0]


def _graph_loop(step: Callable[[int | Tensor, Tensor], tuple[Tensor, ...]], state: Tensor, steps: int
                ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """:func:`repeat_steps` as the first step, then one ``torch.while_loop`` over a step counter ``[1]``
    for the others; step ``t`` writes its outputs into column ``t`` of ``[B, steps]`` buffers (with
    ``where``: a loop body may not write in place), which the first step's outputs fill to begin with."""
    state, *first = step(0, state)
    buffers = tuple(out.repeat(1, steps) for out in first)  # [B, steps]
    slots = torch.arange(steps, device=state.device)[None]  # [1, steps]

    def body(t: Tensor, state: Tensor, *buffers: Tensor) -> tuple[Tensor, ...]:
        state, *outputs = step(t, state)
        here = slots == t  # [1, steps]
        return t + 1, state, *(torch.where(here, out, buffer) for out, buffer in zip(outputs, buffers))

    start = torch.ones(1, dtype=torch.int64, device=state.device)
    _, state, *buffers = torch.while_loop(lambda t, *_: (t < steps).all(), body, (start, state, *buffers))
    return state, tuple(buffers)


def sorted_nms_keep(boxes: Tensor, groups: Tensor, candidates: Tensor, iou_threshold: float) -> Tensor:
    """Grouped greedy NMS of rows already sorted by descending score, as a mask.

    Column ``j`` survives unless a surviving column ``i < j`` of the same group overlaps it by more than
    ``iou_threshold`` (torchvision's ``batched_nms`` on the candidates of each row, ties in column
    order). The loop runs over the ``M`` columns of a precomputed ``[B, M, M]`` overlap matrix: fixed
    length, no host reads, one graph loop in an exported model (:func:`repeat_steps`).

    Args:
        boxes: ``[B, M, 4]`` xyxy; groups: ``[B, M]`` int (e.g. class labels); candidates: ``[B, M]`` bool.
    Returns:
        ``[B, M]`` bool, True for the surviving candidates.
    """
    num = boxes.shape[1]
    if num == 0:
        return candidates.clone()
    areas = box_areas(boxes)  # [B, M]
    iou = iou_against(boxes[:, :, None], areas[:, :, None], boxes[:, None], areas[:, None])  # [B, M, M]
    later = torch.ones(num, num, dtype=torch.bool, device=boxes.device).triu(diagonal=1)  # [M, M] i < j
    same_group = groups[:, :, None] == groups[:, None, :]
    hits = suppresses(iou, float32_threshold(iou_threshold)) & same_group & later

    def step(i: int | Tensor, keep: Tensor) -> tuple[Tensor]:  # column i, if kept, suppresses its hits
        return (keep & ~(step_column(hits, i) & step_column(keep, i)[:, None]),)

    return repeat_steps(step, candidates.clone(), num)[0]
