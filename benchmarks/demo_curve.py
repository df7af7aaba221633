"""Time the README's main job, ``asag demo``, and print its learning curve.

Runs ``asag demo`` from a fresh output folder (so the synthetic data set is generated too, as on a new
install), measures the whole command's wall-clock time, then reads the run's ``metrics.jsonl``: for
every evaluation (the demo preset evaluates every 3 epochs) the epoch, the cumulative training time
and the COCO AP, AP50, AP75, APs, APm, APl on the synthetic validation split. The last line checks the
demo's promise (AP50 >= 0.5 within 10 minutes). Run it on an otherwise idle machine; the
numbers in docs/demo.md come from this script.

    python benchmarks/demo_curve.py [--output-dir /tmp/demo_curve] [--threads N] [--budget-minutes M]
                                    [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from asag.cli import main as asag_main

TARGET_MINUTES, TARGET_AP50 = 10.0, 0.5
COLUMNS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def read_curve(metrics_file: Path) -> list[dict]:
    """One row per evaluation: epoch (1-based), cumulative training seconds, the COCO numbers."""
    rows, seconds = [], 0.0
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "epoch":
            seconds += float(record.get("seconds", 0.0))
        elif record.get("kind") == "eval":
            rows.append({"epoch": record["epoch"] + 1, "train_s": seconds,
                         **{k: float(record[k]) for k in COLUMNS}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo preset")
    parser.add_argument("--output-dir", default="/tmp/demo_curve", help="emptied first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--budget-minutes", help="asag demo --budget-minutes (default: the demo's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    start = time.perf_counter()
    budget = ["--budget-minutes", args.budget_minutes] if args.budget_minutes is not None else []
    code = asag_main(["demo", "--output-dir", str(out), *budget, *args.overrides])
    minutes = (time.perf_counter() - start) / 60
    if code != 0:
        print(f"asag demo failed with exit code {code}")
        return code
    rows = read_curve(out / "metrics.jsonl")
    print(f"\n{'epoch':>5} {'train min':>9} " + " ".join(f"{c.upper():>6}" for c in COLUMNS))
    for row in rows:
        values = " ".join(f"{100 * row[c]:>6.1f}" for c in COLUMNS)
        print(f"{row['epoch']:>5} {row['train_s'] / 60:>9.2f} {values}")
    final = rows[-1] if rows else None
    met = final is not None and final["ap50"] >= TARGET_AP50 and minutes <= TARGET_MINUTES
    print(f"\nwhole `asag demo`: {minutes:.2f} min wall-clock; target AP50 >= {TARGET_AP50} within "
          f"{TARGET_MINUTES:.0f} min: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
