"""``asag predict CHECKPOINT IMAGES...``: detections as JSON, optionally drawn on the images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from asag.api import Detector
from asag.config import FRACTION, field_option, option_type
from asag.errors import DataError
from asag.modeling.fast import add_inference_arguments
from asag.viz.draw import draw_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="detect objects in images")
    parser.add_argument("checkpoint")
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--out", default="predictions", help="output folder (predictions.json, drawings)")
    parser.add_argument("--draw", action="store_true", help="also write annotated images")
    parser.add_argument("--score-threshold", type=option_type(float, FRACTION), default=0.3)
    parser.add_argument("--topk", type=field_option("model.postprocess.topk"), default=100)
    parser.add_argument("--used-head", help="head to use: main or aux_k")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"])
    parser.add_argument("--device", default="auto")
    add_inference_arguments(parser)
    parser.set_defaults(func=run)


def expand_images(specs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths; clear errors."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif any(c in spec for c in "*?["):
            found = sorted(f for f in Path().glob(spec) if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{spec}: pattern matches no images")
            paths += found
        else:
            raise DataError(f"{spec}: no such file or folder")
    return paths


def run(args: argparse.Namespace) -> int:
    paths = expand_images(args.images)
    detector = Detector.from_checkpoint(args.checkpoint, device=args.device, used_head=args.used_head,
                                        inference_level=args.inference_level, fast=args.fast,
                                        compile=args.compile, dtype=args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in tqdm(paths, desc="predict", unit="img", disable=None):
        dets = detector.predict(path, score_threshold=args.score_threshold, topk=args.topk)
        records.append({"file": str(path), "detections": [d.to_dict() for d in dets]})
        if args.draw:
            image = detector.load_image(path)
            draw_detections(image, dets).save(out / f"{path.stem}_pred.png")
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    print(f"{len(paths)} images, {sum(len(r['detections']) for r in records)} detections -> "
          f"{out / 'predictions.json'}" + (f"; drawings in {out}" if args.draw else ""))
    return 0
