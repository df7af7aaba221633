"""``asag demo``: synthetic data -> train a small ASAG-A on the CPU -> evaluate -> predict and draw."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from asag.api import Detector
from asag.build import data_files, prepare_synthetic
from asag.commands.eval import format_result
from asag.commands.train import train
from asag.config import load_config
from asag.outputs import previous_run_files
from asag.viz.draw import draw_detections

DEMO_PRESET = "demo"
NUM_DRAWN = 6


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train and evaluate a small ASAG-A on a generated synthetic data set (CPU, minutes)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo preset")
    parser.add_argument("--output-dir", default="runs/demo",
                        help="data set, checkpoints, logs and drawings; a second demo there replaces the "
                             "first one's checkpoints and logs and reuses its data set")
    parser.add_argument("--preset", default=DEMO_PRESET, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.output_dir)
    overrides = [f"data.root={out / 'data'}", *args.overrides]
    cfg = load_config(args.preset, overrides)
    print(f"asag demo: {cfg.description}")
    prepare_synthetic(cfg.data)
    if previous_run_files(out):  # a demo run folder is the demo's own: a new demo replaces the old one
        print(f"asag demo: replacing the earlier demo run in {out} (its data set is reused)")
    run_ = train(cfg, output_dir=out, overwrite=True)
    result = run_.result
    final = result.evaluations[max(result.evaluations)] if result.evaluations else None
    checkpoint = result.best_checkpoint or result.last_checkpoint
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    _, image_dir = data_files(cfg.data, "val")
    drawn = out / "predictions"
    drawn.mkdir(parents=True, exist_ok=True)
    records = []
    for path in sorted(image_dir.iterdir())[:NUM_DRAWN]:
        dets = detector.predict(path, score_threshold=0.3)
        draw_detections(detector.load_image(path), dets).save(drawn / f"{path.stem}_pred.png")
        records.append({"file": str(path), "detections": [d.to_dict() for d in dets]})
    (drawn / "predictions.json").write_text(json.dumps(records, indent=2))
    minutes = (time.perf_counter() - start) / 60
    print(f"\n== asag demo finished in {minutes:.1f} min ==")
    if final is not None:
        print(format_result(final))
    print(f"data set:     {cfg.data.root}")
    print(f"checkpoints:  {out} (best.pth, last.pth); metrics log {out / 'metrics.jsonl'}")
    print(f"predictions:  {drawn} ({len(records)} drawn validation images)")
    print(f"next: asag eval {checkpoint} data.root={cfg.data.root}  |  "
          f"asag predict {checkpoint} {image_dir} --draw")
    return 0
