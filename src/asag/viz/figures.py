"""Matplotlib figures for the plots of ``asag eval``, ``asag train`` and ``asag plot``.

Figures are made without pyplot (no global state, no GUI backend: they render with Agg) and matplotlib is
imported only when a figure is drawn, so importing this module costs nothing. Every figure is saved as
PNG beside a JSON file that holds the numbers drawn (:func:`write_json`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asag.outputs import atomic_write, atomic_write_text

if TYPE_CHECKING:  # matplotlib is imported lazily
    from matplotlib.figure import Figure

DPI = 100  # pixels per inch of the saved PNGs
TITLE_SIZE = 12
LABEL_SIZE = 10
SMALL_SIZE = 8  # tick labels and legends of dense figures


def new_figure(width: float, height: float, *, layout: str | None = "constrained") -> Figure:
    """An empty figure of ``width x height`` inches, rendered by Agg. ``layout``: matplotlib's layout
    engine (None: place the axes yourself, much faster for figures of many panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG file (atomically)."""
    return atomic_write(path, lambda handle: figure.savefig(handle, dpi=DPI, format="png"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON (numbers as Python writes them: nothing is rounded)."""
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def grid_shape(count: int) -> tuple[int, int]:
    """``(rows, columns)`` of a near-square grid of ``count`` panels (at least one)."""
    columns = max(1, math.ceil(math.sqrt(count)))
    return max(1, math.ceil(count / columns)), columns
