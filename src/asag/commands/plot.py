"""``asag plot RUN``: the training curves of a run (loss and its terms, learning rate, evaluation AP
against the iteration) as one PNG, drawn from the run's ``metrics.jsonl``.

``asag train`` draws the same figure into its run folder at the end (``curves.png``); this command draws
it for any run, finished, interrupted or still training. An existing output file is never replaced
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asag.errors import OutputError
from asag.outputs import check_output_file
from asag.viz.curves import CURVES_FILE, metrics_file, write_curves


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot", help="draw the training curves of a run (loss, terms, learning rate, AP) from metrics.jsonl")
    parser.add_argument("run", help="run folder of asag train (or its metrics.jsonl)")
    parser.add_argument("--out", metavar="FILE",
                        help=f"PNG file to write (default: {CURVES_FILE} in the run folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=run)


def output_file(source: Path, out: str | None, *, overwrite: bool) -> Path:
    """The figure's path: ``--out`` or ``curves.png`` beside the metrics file; an existing file is refused
    unless ``overwrite``, an unwritable place always (before anything is read)."""
    path = Path(out) if out is not None else source.parent / CURVES_FILE
    check_output_file(path, "--out")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it or --out FILE to write "
                          f"another file")
    return path


def run(args: argparse.Namespace) -> int:
    source = metrics_file(args.run)
    out = output_file(source, args.out, overwrite=args.overwrite)
    print(f"training curves: {write_curves(source, out)}")
    return 0
