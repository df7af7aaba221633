"""Training curves of a run: loss and its terms, learning rate and evaluation AP against the iteration,
one PNG per run (``curves.png`` in the run folder) drawn from its ``metrics.jsonl``, which holds the
numbers (see :class:`asag.engine.logger.RunLogger`).

:func:`training_curves` extracts the series (plain data); :func:`draw_curves` draws them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asag.engine.logger import METRICS_FILE, current_records, flatten_scalars, read_metrics
from asag.errors import AsagError, DataError
from asag.outputs import describe_os_error
from asag.viz.figures import LABEL_SIZE, SMALL_SIZE, TITLE_SIZE, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CURVES_FILE = "curves.png"
TERM_PREFIX = "terms/"
# Evaluation numbers drawn when a record has them (COCO, then CrowdHuman), with their legend labels.
EVAL_SERIES = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "mmr": "mMR (lower is better)", "recall": "Recall"}
FIGURE_SIZE = (14.0, 8.5)  # inches
FEW_POINTS = 50  # series with at most this many points are drawn with markers
TAB10 = 10  # lines that the default colour cycle tells apart
MANY_TERMS = 8  # above this many loss terms the legend moves beside the panel
NO_EVALUATION = "no evaluation in this run\n(runtime.eval_every=0, or it ended before the first)"


@dataclass
class TrainingCurves:
    """The series of a run, each value NaN where a record lacks it.

    steps: iterations of the ``train`` records; loss, lr: one value per step; terms: loss term name ->
    one value per step (the raw, unweighted terms). eval_steps: iterations of the ``eval`` records; evals:
    name (:data:`EVAL_SERIES`) -> one value per evaluation. epoch_ends: iterations at which epochs ended.
    """

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    eval_steps: list[int] = field(default_factory=list)
    evals: dict[str, list[float]] = field(default_factory=dict)
    epoch_ends: list[int] = field(default_factory=list)


def _value(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _series(records: list[Mapping[str, Any]], names: Iterable[str]) -> dict[str, list[float]]:
    return {name: [_value(r, name) for r in records] for name in names}


def training_curves(records: Iterable[Mapping[str, Any]]) -> TrainingCurves:
    """The series of a run's metrics records (:func:`~asag.engine.logger.read_metrics`), after dropping
    what a resumed run superseded (:func:`~asag.engine.logger.current_records`); ordered by step. Loss
    terms are the ``terms/NAME`` values of the ``train`` records (flat or nested); evaluation series are
    those of :data:`EVAL_SERIES` that some ``eval`` record holds."""
    records = current_records(records)
    train = sorted((flatten_scalars(r) | {"step": r["step"]} for r in records if r["kind"] == "train"),
                   key=lambda r: r["step"])
    evals = sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"])
    term_names = sorted({k for r in train for k in r if k.startswith(TERM_PREFIX)})
    eval_names = [name for name in EVAL_SERIES if any(not math.isnan(_value(r, name)) for r in evals)]
    return TrainingCurves(
        steps=[int(r["step"]) for r in train],
        loss=_series(train, ["loss"])["loss"],
        lr=_series(train, ["lr"])["lr"],
        terms={name[len(TERM_PREFIX):]: values for name, values in _series(train, term_names).items()},
        eval_steps=[int(r["step"]) for r in evals],
        evals=_series(evals, eval_names),
        epoch_ends=sorted(int(r["step"]) for r in records if r["kind"] == "epoch"),
    )


# ----------------------------------------------------------------------------------------- drawing


def _axes(ax: Axes, title: str, ylabel: str, epoch_ends: list[int]) -> None:
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.set_xlabel("iteration", fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=SMALL_SIZE)
    ax.grid(alpha=0.3)
    for step in epoch_ends:
        ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)


def _positive(values: Iterable[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


def _colours(count: int) -> list:
    """Distinct line colours: matplotlib's 10-colour cycle, its 20-colour map for more lines."""
    from matplotlib import colormaps

    name = "tab10" if count <= TAB10 else "tab20"
    return [colormaps[name](i % colormaps[name].N) for i in range(count)]


def draw_curves(curves: TrainingCurves, title: str) -> Figure:
    """Four panels against the iteration: total loss, loss terms (log scale when all positive), learning
    rate, and the evaluations; dotted lines mark the ends of epochs."""
    figure = new_figure(*FIGURE_SIZE)
    (loss_ax, terms_ax), (lr_ax, eval_ax) = figure.subplots(2, 2, sharex=True)
    ends = curves.epoch_ends
    style = {"linewidth": 1, "marker": "." if len(curves.steps) <= FEW_POINTS else None}
    _axes(loss_ax, "total loss (weighted sum)", "loss", ends)
    loss_ax.plot(curves.steps, curves.loss, color="black", **style)
    _axes(terms_ax, "loss terms (unweighted)", "value", ends)
    if curves.terms:
        terms_ax.set_prop_cycle(color=_colours(len(curves.terms)))
        for name, values in curves.terms.items():
            terms_ax.plot(curves.steps, values, label=name, **style)
        if all(_positive(v) for v in curves.terms.values()):
            terms_ax.set_yscale("log")
        many = len(curves.terms) > MANY_TERMS
        terms_ax.legend(fontsize=SMALL_SIZE, ncols=1, loc="center left" if many else "best",
                        bbox_to_anchor=(1.01, 0.5) if many else None)
    _axes(lr_ax, "learning rate (first parameter group)", "learning rate", ends)
    lr_ax.plot(curves.steps, curves.lr, color="tab:purple", **style)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _axes(eval_ax, "evaluation", "value", ends)
    if curves.evals:
        for name, values in curves.evals.items():
            eval_ax.plot(curves.eval_steps, values, marker="o", label=EVAL_SERIES[name])
        eval_ax.legend(fontsize=SMALL_SIZE, loc="best")
    else:
        eval_ax.text(0.5, 0.5, NO_EVALUATION, ha="center", va="center", transform=eval_ax.transAxes,
                     color="grey", fontsize=LABEL_SIZE)
    for ax in (loss_ax, terms_ax):  # the shared iteration axis is labelled below the lower panels
        ax.set_xlabel("")
    figure.suptitle(f"{title} (dotted: end of an epoch)" if ends else title, fontsize=TITLE_SIZE)
    return figure


# ------------------------------------------------------------------------------------------- files


def metrics_file(run: str | os.PathLike) -> Path:
    """``run/metrics.jsonl`` for a run folder, or ``run`` itself for a file; DataError when missing."""
    path = Path(run)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{path}: no {METRICS_FILE} there (not a run folder of asag train)" if path.is_dir()
                        else f"{path}: no such file or folder")
    return file


def write_curves(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the training curves of a run folder (or of a ``metrics.jsonl`` file) into ``out`` (default:
    ``curves.png`` beside the metrics file), replacing it. DataError for a log without training records."""
    source = metrics_file(run)
    curves = training_curves(read_metrics(source))
    if not curves.steps:
        raise DataError(f'{source}: no training record (kind "train") to draw')
    out = Path(out) if out is not None else source.parent / CURVES_FILE
    title = f"training curves: {source.parent.resolve().name}"
    return save_figure(draw_curves(curves, title=title), out)


def curves_after_training(run_dir: str | os.PathLike, log: Callable[[str], Any] = print) -> Path | None:
    """:func:`write_curves` at the end of ``asag train``: a log that cannot be drawn or a figure that
    cannot be written is reported through ``log`` (the training itself succeeded) and gives None."""
    try:
        path = write_curves(run_dir)
    except AsagError as err:
        log(f"training curves not drawn: {err}")
        return None
    except OSError as err:
        log(f"training curves not drawn: {describe_os_error(err)}")
        return None
    log(f"training curves: {path}")
    return path
