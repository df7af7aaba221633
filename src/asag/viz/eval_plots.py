"""The plots of ``asag eval``: precision-recall curves, AP per class, the COCO error analysis and a
confusion matrix, each a PNG beside a JSON file of the same name holding the numbers drawn.

The numbers come from :mod:`asag.engine.coco_analysis`; the ``*_record`` functions here turn them into
the JSON content (plain data, testable without images) and the ``draw_*`` functions into figures.
:func:`write_eval_plots` does both for a ground truth and its COCO result records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pycocotools.coco import COCO

from asag.engine.coco_analysis import (
    AREA_ALL,
    ERROR_SETTINGS,
    IOU_SETTINGS,
    MAX_DETS,
    ClassCurves,
    ConfusionMatrix,
    ErrorAnalysis,
    PrecisionRecallCurves,
    confusion_matrix,
    curves_from_evaluator,
    error_analysis,
)
from asag.engine.coco_eval import AUTO_BACKEND, accumulated_eval, load_results
from asag.viz.figures import (
    LABEL_SIZE,
    SMALL_SIZE,
    TITLE_SIZE,
    grid_shape,
    new_figure,
    save_figure,
    write_json,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# File stems: each figure is <stem>.png with its numbers in <stem>.json.
PR_CURVES = "pr_curves"
PR_CURVES_PER_CLASS = "pr_curves_per_class"
AP_PER_CLASS = "ap_per_class"
ERROR_ANALYSIS = "error_analysis"
ERROR_ANALYSIS_PER_CLASS = "error_analysis_per_class"
CONFUSION_MATRIX = "confusion_matrix"
PLOT_STEMS = (PR_CURVES, PR_CURVES_PER_CLASS, AP_PER_CLASS, ERROR_ANALYSIS, ERROR_ANALYSIS_PER_CLASS,
              CONFUSION_MATRIX)
PLOT_FILES = tuple(f"{stem}.{ext}" for stem in PLOT_STEMS for ext in ("png", "json"))
DEFAULT_CONFUSION_SCORE = 0.3

AREA_TITLES = {"all": "all objects", "small": "small objects (area < 32²)",
               "medium": "medium objects (32² to 96²)", "large": "large objects (area > 96²)"}
IOU_LABELS = {"0.50": "IoU 0.50", "0.75": "IoU 0.75", "0.50:0.95": "IoU 0.50:0.95 (mean)"}
IOU_COLOURS = {"0.50": "tab:blue", "0.75": "tab:orange", "0.50:0.95": "tab:green"}
# Error analysis: what each setting forgives (JSON) and its colour (the bands of the stacked figure).
ERROR_DEFINITIONS = {
    "C75": "PR at IoU 0.75",
    "C50": "PR at IoU 0.50",
    "Loc": "PR at IoU 0.10: localisation errors ignored (duplicate detections remain false positives)",
    "Sim": "Loc, and detections on objects of another class of the same supercategory ignored",
    "Oth": "Loc, and detections on objects of any other class ignored",
    "BG": "Oth, and all false positives on background removed (precision 1 up to the recall Oth reaches)",
    "FN": "all errors removed, missed objects included (precision 1 at every recall)",
}
ERROR_COLOURS = {"C75": "#1f4e79", "C50": "#6fa8dc", "Loc": "#c0504d", "Sim": "#9bbb59", "Oth": "#8064a2",
                 "BG": "#f79646", "FN": "#d9d9d9"}
NO_GROUND_TRUTH = "no ground truth"
# Figure geometry, in inches.
PANEL_WIDTH, PANEL_HEIGHT = 4.2, 3.8  # one PR / error-analysis panel
SMALL_PANEL_WIDTH, SMALL_PANEL_HEIGHT = 2.6, 2.4  # one panel of a per-class grid
GRID_HEADER = 1.0  # room above a per-class grid for its title and legend
GRID_MIN_WIDTH = 9.0  # wide enough for the header's one-row legend
GRID_MARGIN = 0.6  # left and bottom margin of a per-class grid
GRID_TICKS = (0.0, 0.5, 1.0)
GRID_TICK_LABELS = ("0", "0.5", "1")
GRID_SPACE = 0.3  # space between grid panels, as a fraction of a panel's width
BAR_HEIGHT = 0.26  # one class of the AP bar chart
BAR_MARGIN = 1.4
BAR_WIDTH = 8.0
MAX_NAMED_MISSING = 5  # classes without ground truth named in the bar chart's title
BAR_LABEL_ROOM = 0.12  # room right of the longest bar for its value (AP units)
CELL_SIZE = 0.38  # one cell of the confusion matrix
DARK_CELL = 0.5  # row share above which a cell's count is written in white
THOUSANDS = 10_000  # counts from here on are written as "12k" in the matrix
MATRIX_MARGIN = 2.6
MIN_MATRIX_SIZE = 6.0
DENSE_CLASSES = 30  # above this many classes, labels and counts use the small font


# ------------------------------------------------------------------------------------ JSON content


def pr_curves_record(curves: PrecisionRecallCurves) -> dict:
    """``pr_curves.json``: the mean PR curves (over the classes with ground truth) per IoU setting and
    area range, and their areas (AP); None where no class has ground truth in the range."""
    return {"recall": curves.recall, "max_dets": MAX_DETS, "iou_settings": list(IOU_SETTINGS),
            "curves": curves.mean, "ap": curves.ap()}


def _class_record(item: ClassCurves) -> dict:
    return {"category_id": item.category_id, "name": item.name, "curves": item.curves, "ap": item.ap()}


def pr_curves_per_class_record(curves: PrecisionRecallCurves) -> dict:
    """``pr_curves_per_class.json``: each class's PR curve per IoU setting (area all) and its AP; None for a
    class without ground truth."""
    return {"recall": curves.recall, "max_dets": MAX_DETS, "area": AREA_ALL,
            "iou_settings": list(IOU_SETTINGS), "classes": [_class_record(c) for c in curves.per_class]}


def ap_per_class_record(curves: PrecisionRecallCurves) -> dict:
    """``ap_per_class.json``: AP (IoU 0.50:0.95), AP50 and AP75 per class (area all, 100 detections),
    sorted by AP from the highest; classes without ground truth last, with None."""
    rows = []
    for item in curves.per_class:
        ap = item.ap()
        rows.append({"category_id": item.category_id, "name": item.name,
                     "ap": ap["0.50:0.95"] if ap else None, "ap50": ap["0.50"] if ap else None,
                     "ap75": ap["0.75"] if ap else None})
    rows.sort(key=lambda r: (r["ap"] is None, -(r["ap"] or 0.0)))
    return {"metric": "AP@[.50:.95], area all, 100 detections per image", "classes": rows}


def error_analysis_record(analysis: ErrorAnalysis) -> dict:
    """``error_analysis.json``: the overall curve of each error-analysis setting (mean over the classes with
    ground truth) and its area, with what each setting forgives."""
    return {"recall": analysis.recall, "iou_thresholds": {"C75": 0.75, "C50": 0.5, "others": 0.1},
            "max_dets": MAX_DETS, "area": AREA_ALL, "settings": list(ERROR_SETTINGS),
            "definitions": ERROR_DEFINITIONS, "supercategories": analysis.supercategories,
            "curves": analysis.overall, "ap": analysis.ap()}


def error_analysis_per_class_record(analysis: ErrorAnalysis) -> dict:
    """``error_analysis_per_class.json``: the error-analysis curves and areas of each class."""
    return {"recall": analysis.recall, "settings": list(ERROR_SETTINGS),
            "classes": [_class_record(c) for c in analysis.per_class]}


def confusion_matrix_record(matrix: ConfusionMatrix) -> dict:
    """``confusion_matrix.json``: the counts, rows = true class, columns = detected class, the last of
    each named ``background``."""
    return {"score_threshold": matrix.score_threshold, "iou_threshold": matrix.iou_threshold,
            "rows": "true class (last: background = detections matching no object)",
            "columns": "detected class (last: background = objects no detection matches)",
            "names": matrix.names, "category_ids": matrix.category_ids, "counts": matrix.counts}


# ----------------------------------------------------------------------------------------- drawing


def _pr_axes(ax: Axes, *, title: str, small: bool = False) -> None:
    size = SMALL_SIZE if small else LABEL_SIZE
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("recall", fontsize=size)
    ax.set_ylabel("precision", fontsize=size)
    ax.set_title(title, fontsize=size if small else TITLE_SIZE)
    ax.tick_params(labelsize=SMALL_SIZE)
    if small:  # few ticks: panels are small, and every tick costs drawing time in a grid of 80
        ax.set_xticks(GRID_TICKS, GRID_TICK_LABELS)
        ax.set_yticks(GRID_TICKS, GRID_TICK_LABELS)
    ax.grid(alpha=0.3)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, NO_GROUND_TRUTH, ha="center", va="center", transform=ax.transAxes, color="grey")


def draw_pr_curves(curves: PrecisionRecallCurves) -> Figure:
    """One panel per area range, each with the mean PR curve of every IoU setting (legend: its AP)."""
    areas = list(next(iter(curves.mean.values())))
    figure = new_figure(PANEL_WIDTH * len(areas), PANEL_HEIGHT)
    axes = figure.subplots(1, len(areas), squeeze=False)[0]
    ap = curves.ap()
    for ax, area in zip(axes, areas):
        _pr_axes(ax, title=AREA_TITLES.get(area, area))
        if all(curves.mean[s][area] is None for s in IOU_SETTINGS):
            _no_data(ax)
            continue
        for setting in IOU_SETTINGS:
            ax.plot(curves.recall, curves.mean[setting][area], color=IOU_COLOURS[setting],
                    label=f"{IOU_LABELS[setting]}: AP {ap[setting][area]:.3f}")
        ax.legend(loc="upper right", fontsize=SMALL_SIZE)
    figure.suptitle("Precision-recall, mean over classes (100 detections per image)", fontsize=TITLE_SIZE)
    return figure


def _class_grid(count: int) -> tuple[Figure, list[Axes]]:
    """A figure with one small panel per class (placed by hand: a layout engine takes seconds per figure
    for COCO's 80 panels) and room on top for a title and a legend."""
    rows, columns = grid_shape(count)
    width = max(SMALL_PANEL_WIDTH * columns, GRID_MIN_WIDTH)
    height = SMALL_PANEL_HEIGHT * rows + GRID_HEADER
    figure = new_figure(width, height, layout=None)
    figure.subplots_adjust(left=GRID_MARGIN / width, right=1 - GRID_MARGIN / 2 / width,
                           bottom=GRID_MARGIN / height, top=1 - GRID_HEADER / height,
                           wspace=GRID_SPACE, hspace=GRID_SPACE * 2)
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


def draw_pr_curves_per_class(curves: PrecisionRecallCurves) -> Figure:
    """A grid with each class's PR curves at the three IoU settings (area all)."""
    figure, axes = _class_grid(len(curves.per_class))
    for ax, item in zip(axes, curves.per_class):
        ap = item.ap()
        title = item.name if ap is None else f"{item.name}: AP {ap['0.50:0.95']:.3f}"
        _pr_axes(ax, title=title, small=True)
        if item.curves is None:
            _no_data(ax)
            continue
        for setting in IOU_SETTINGS:
            ax.plot(curves.recall, item.curves[setting], color=IOU_COLOURS[setting])
    handles = [_line(IOU_COLOURS[s], IOU_LABELS[s]) for s in IOU_SETTINGS]
    _grid_header(figure, "Precision-recall per class (all objects)", handles)
    return figure


def _grid_header(figure: Figure, title: str, handles: list) -> None:
    """Title and one-row legend in the header of a :func:`_class_grid` figure."""
    height = figure.get_figheight()
    figure.suptitle(title, fontsize=TITLE_SIZE, y=1 - GRID_HEADER / 4 / height, va="center")
    figure.legend(handles=handles, loc="center", bbox_to_anchor=(0.5, 1 - GRID_HEADER * 0.6 / height),
                  ncols=len(handles), fontsize=LABEL_SIZE, frameon=False)


def _line(colour: str, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, label=label)


def draw_ap_per_class(record: dict) -> Figure:
    """Horizontal bars of AP per class (from :func:`ap_per_class_record`), highest first; the figure grows
    with the number of classes so that every name stays readable."""
    rows = [r for r in record["classes"] if r["ap"] is not None]
    missing = [r["name"] for r in record["classes"] if r["ap"] is None]
    figure = new_figure(BAR_WIDTH, BAR_HEIGHT * max(len(rows), 1) + BAR_MARGIN)
    ax = figure.subplots()
    positions = np.arange(len(rows))
    values = [r["ap"] for r in rows]
    ax.barh(positions, values, color="tab:blue", height=0.75)
    for y, value in zip(positions, values):
        ax.text(value + 0.005, y, f"{value:.3f}", va="center", fontsize=SMALL_SIZE)
    ax.set_yticks(positions, [r["name"] for r in rows], fontsize=SMALL_SIZE if len(rows) > DENSE_CLASSES
                  else LABEL_SIZE)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # highest AP on top, no empty margin
    ax.set_xlim(0, min(1.0, max(values, default=0.0) + BAR_LABEL_ROOM) if values else 1.0)
    ax.set_xlabel("AP@[.50:.95] (area all, 100 detections per image)", fontsize=LABEL_SIZE)
    ax.tick_params(axis="x", top=True, labeltop=len(rows) > DENSE_CLASSES)  # a scale on top of long charts
    ax.grid(axis="x", alpha=0.3)
    if values:
        ax.axvline(float(np.mean(values)), color="black", linestyle="--", linewidth=1, label="mean")
        ax.legend(loc="lower right", fontsize=SMALL_SIZE)
    mean = f"mean {np.mean(values):.3f}" if values else NO_GROUND_TRUTH
    title = f"AP per class ({len(rows)} classes, {mean})"
    if missing:
        shown = ", ".join(missing[:MAX_NAMED_MISSING])
        more = f" and {len(missing) - MAX_NAMED_MISSING} more" if len(missing) > MAX_NAMED_MISSING else ""
        title += f"; without ground truth: {shown}{more}"
    ax.set_title(title, fontsize=TITLE_SIZE, wrap=True)
    return figure


def _error_panel(ax: Axes, recall: Sequence[float], curves: dict[str, list[float]], *, title: str,
                 small: bool = False) -> None:
    """Stacked areas: the band between one setting's curve and the next is the AP that kind of error
    costs; the legend gives each setting's AP in brackets."""
    _pr_axes(ax, title=title, small=small)
    below = np.zeros(len(recall))
    for setting in ERROR_SETTINGS:
        above = np.maximum(np.asarray(curves[setting]), below)
        ax.fill_between(recall, below, above, color=ERROR_COLOURS[setting], linewidth=0,
                        label=f"[{np.mean(curves[setting]):.3f}] {setting}")
        ax.plot(recall, curves[setting], color="black", linewidth=0.4)
        below = above
    if not small:  # beside the panel: inside it would hide the lower left, where C75 and C50 lie
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=LABEL_SIZE,
                  title="[AP] setting", title_fontsize=LABEL_SIZE)


def draw_error_analysis(analysis: ErrorAnalysis) -> Figure:
    """The overall error-analysis figure: stacked PR areas C75 ... FN, mean over classes."""
    figure = new_figure(PANEL_WIDTH * 1.6, PANEL_HEIGHT * 1.4)
    ax = figure.subplots()
    with_gt = sum(item.curves is not None for item in analysis.per_class)
    sim = "" if analysis.supercategories else "; no supercategories: Sim = Oth"
    _error_panel(ax, analysis.recall, analysis.overall,
                 title=f"Error analysis: mean over {with_gt} classes{sim}")
    return figure


def draw_error_analysis_per_class(analysis: ErrorAnalysis) -> Figure:
    """A grid with each class's error-analysis areas (a shared legend of the settings on top)."""
    figure, axes = _class_grid(len(analysis.per_class))
    for ax, item in zip(axes, analysis.per_class):
        if item.curves is None:
            _pr_axes(ax, title=item.name, small=True)
            _no_data(ax)
            continue
        ap = item.ap()
        _error_panel(ax, analysis.recall, item.curves, small=True,
                     title=f"{item.name}: C50 {ap['C50']:.2f}, BG {ap['BG']:.2f}")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=ERROR_COLOURS[s], edgecolor="black", linewidth=0.4, label=s)
               for s in ERROR_SETTINGS]
    _grid_header(figure, "Error analysis per class (the area of each band: the AP that error costs)", handles)
    return figure


def _short_count(count: int) -> str:
    """A count that fits a matrix cell: ``"950"``, ``"12k"`` from :data:`THOUSANDS` on (the JSON is exact)."""
    return f"{count / 1000:.0f}k" if count >= THOUSANDS else str(count)


def draw_confusion_matrix(matrix: ConfusionMatrix) -> Figure:
    """Counts in every non-zero cell; colours: the share of the row (the true class's objects, or the
    background detections); the figure grows with the number of classes."""
    counts = np.asarray(matrix.counts, dtype=np.float64)
    size = max(MIN_MATRIX_SIZE, CELL_SIZE * len(matrix.names) + MATRIX_MARGIN)
    figure = new_figure(size + 1.0, size)
    ax = figure.subplots()
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    dense = len(matrix.names) > DENSE_CLASSES
    font = SMALL_SIZE if dense else LABEL_SIZE
    for (row, column), count in np.ndenumerate(counts):
        if count:
            colour = "white" if shares[row, column] > DARK_CELL else "black"
            ax.text(column, row, _short_count(int(count)), ha="center", va="center", fontsize=font,
                    color=colour)
    ticks = np.arange(len(matrix.names))
    ax.set_xticks(ticks, matrix.names, rotation=90, fontsize=SMALL_SIZE if dense else LABEL_SIZE)
    ax.set_yticks(ticks, matrix.names, fontsize=SMALL_SIZE if dense else LABEL_SIZE)
    ax.set_xlabel("detected class (background: object missed)", fontsize=LABEL_SIZE)
    ax.set_ylabel("true class (background: detection on no object)", fontsize=LABEL_SIZE)
    ax.set_title(f"Confusion matrix: score >= {matrix.score_threshold:g}, IoU >= {matrix.iou_threshold:g}",
                 fontsize=TITLE_SIZE)
    figure.colorbar(image, ax=ax, shrink=0.6, label="share of the row")
    return figure


# ------------------------------------------------------------------------------------------ files


def _save(out: Path, stem: str, record: dict, figure: Figure) -> list[Path]:
    return [write_json(out / f"{stem}.json", record), save_figure(figure, out / f"{stem}.png")]


def write_eval_plots(coco_gt: COCO, results: Sequence[dict], out: str | os.PathLike, *,
                     image_ids: Sequence[int] | None = None,
                     confusion_score: float = DEFAULT_CONFUSION_SCORE,
                     backend: str = AUTO_BACKEND) -> list[Path]:
    """Evaluate ``results`` (COCO result records) against ``coco_gt`` on ``image_ids`` (default: all its
    images) with ``backend`` (``auto``, ``faster_coco_eval`` or ``pycocotools``) and write every plot
    with its JSON into folder ``out`` (which must exist): the files of :data:`PLOT_FILES`. Returns the
    files written."""
    out = Path(out)
    evaluator = accumulated_eval(coco_gt, load_results(coco_gt, results), image_ids=image_ids,
                                 backend=backend)
    curves = curves_from_evaluator(evaluator, coco_gt)
    analysis = error_analysis(coco_gt, results, image_ids, backend=backend)
    matrix = confusion_matrix(coco_gt, results, image_ids, score_threshold=confusion_score)
    ap_record = ap_per_class_record(curves)
    written: list[Path] = []
    written += _save(out, PR_CURVES, pr_curves_record(curves), draw_pr_curves(curves))
    written += _save(out, PR_CURVES_PER_CLASS, pr_curves_per_class_record(curves),
                     draw_pr_curves_per_class(curves))
    written += _save(out, AP_PER_CLASS, ap_record, draw_ap_per_class(ap_record))
    written += _save(out, ERROR_ANALYSIS, error_analysis_record(analysis), draw_error_analysis(analysis))
    written += _save(out, ERROR_ANALYSIS_PER_CLASS, error_analysis_per_class_record(analysis),
                     draw_error_analysis_per_class(analysis))
    written += _save(out, CONFUSION_MATRIX, confusion_matrix_record(matrix), draw_confusion_matrix(matrix))
    return written
