"""``asag predict CHECKPOINT IMAGES...``: detections as JSON, optionally drawn on the images.

``predictions.json`` holds one record per readable image: ``file`` (the input path), ``detections``
and, with ``--draw``, ``drawing`` (the file name of its drawing in ``--out``; names are unique even for
equal stems in different folders). Unreadable images, and images that an exported model cannot take
(larger than its fixed input size), are skipped, listed on stderr, and the exit status is 1. Earlier
results are never replaced without ``--overwrite``: the default ``--out`` is a new folder
(``predictions``, else ``predictions_2``, ...), and a given ``--out`` that already holds
``predictions.json`` (or a drawing this run would write) is refused.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from asag.api import Detector
from asag.config import FRACTION, field_option, option_type
from asag.engine.checkpoint import EXPORTED_SUFFIXES
from asag.errors import ConfigError, DataError
from asag.modeling.fast import add_inference_arguments
from asag.outputs import atomic_write_text, removed_if_unused, results_dir, unique_stems
from asag.viz.draw import draw_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="detect objects in images")
    parser.add_argument("checkpoint", help="checkpoint written by asag train or asag convert, or a "
                        "model written by asag export (.onnx / .pt2)")
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--out", help="output folder for predictions.json and the drawings (default: a new "
                        "folder ./predictions, or ./predictions_2, ... when it exists)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (default: refuse)")
    parser.add_argument("--draw", action="store_true", help="also write annotated images")
    parser.add_argument("--score-threshold", type=option_type(float, FRACTION), default=0.3,
                        help="minimum score of a kept detection")
    parser.add_argument("--topk", type=field_option("model.postprocess.topk"), default=100,
                        help="most detections kept per image")
    parser.add_argument("--nms-iou", type=option_type(float, FRACTION), default=None,
                        help="also drop detections overlapping a better one of the same class by more than "
                             "this IoU (hides a briefly trained model's near-duplicates; default: off, the "
                             "model's detections as evaluated)")
    parser.add_argument("--used-head", help="head to use: main or aux_k (default: the stored used_head)")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"],
                        help="probing depth (default: the stored inference_level)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_inference_arguments(parser)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay CUDA graphs of the static model, one per input-size bucket (CUDA only)")
    parser.set_defaults(func=run)


def expand_images(specs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns (relative or absolute, ``**`` allowed)
    -> image paths, each file once, in the order given; clear errors."""
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
        elif glob.has_magic(spec):
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True)
                           if Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(f).is_file())
            if not found:
                raise DataError(f"{spec}: pattern matches no images")
            paths += found
        else:
            raise DataError(f"{spec}: no such file or folder")
    unique = {path.resolve(): path for path in reversed(paths)}  # first occurrence wins
    return [path for path in paths if unique[path.resolve()] is path]


def load_detector(args: argparse.Namespace) -> Detector:
    """A checkpoint's detector, or an exported model's (``.onnx`` / ``.pt2`` of ``asag export``; warnings
    while it loads, e.g. that it has no checksum, are one line each on stderr)."""
    if Path(args.checkpoint).suffix.lower() not in EXPORTED_SUFFIXES:
        return Detector.from_checkpoint(args.checkpoint, device=args.device, used_head=args.used_head,
                                        inference_level=args.inference_level, fast=args.fast,
                                        compile=args.compile, dtype=args.precision, static=args.static,
                                        cuda_graph=args.cuda_graph)
    fixed = {"--used-head": args.used_head, "--inference-level": args.inference_level, "--fast": args.fast,
             "--compile": args.compile, "--precision": args.precision != "fp32",
             "--cuda-graph": args.cuda_graph}
    given = [name for name, value in fixed.items() if value]
    if given:
        raise ConfigError(f"{args.checkpoint}: {', '.join(given)} cannot change an exported model "
                          "(choose them at `asag export`)")
    with warnings.catch_warnings(record=True) as caught:  # e.g. asag.export.ExportWarning (no checksum)
        warnings.simplefilter("always")
        detector = Detector.from_exported(args.checkpoint, device=args.device)
    for warning in caught:
        print(f"asag predict: warning: {warning.message}", file=sys.stderr)
    return detector


def drawing_file(name: str) -> str:
    """File name of the drawing of the image with unique name ``name`` (see ``unique_stems``)."""
    return f"{name}_pred.png"


def run(args: argparse.Namespace) -> int:
    paths = expand_images(args.images)
    names = unique_stems(paths)
    drawings = [drawing_file(name) for name in names] if args.draw else []
    out, created = results_dir(args.out, "predictions", ["predictions.json", *drawings],
                               overwrite=args.overwrite)
    with removed_if_unused(out, created):
        detector = load_detector(args)
    records, failed = [], []
    for path, name in tqdm(list(zip(paths, names)), desc="predict", unit="img", disable=None):
        try:
            image = detector.load_image(path)
        except DataError as err:
            failed.append(str(err))
            continue
        try:
            dets = detector.predict(image, score_threshold=args.score_threshold, topk=args.topk,
                                    nms_iou=args.nms_iou)
        except DataError as err:  # e.g. larger than an exported model's input size
            failed.append(f"{path}: {err}")
            continue
        record = {"file": str(path), "detections": [d.to_dict() for d in dets]}
        if args.draw:
            record["drawing"] = drawing_file(name)
            draw_detections(image, dets).save(out / record["drawing"])
        records.append(record)
    atomic_write_text(out / "predictions.json", json.dumps(records, indent=2))
    print(f"{len(records)} images, {sum(len(r['detections']) for r in records)} detections -> "
          f"{out / 'predictions.json'}" + (f"; drawings in {out}" if args.draw else ""))
    return report_unreadable(failed, len(paths))


def report_unreadable(failed: list[str], total: int, command: str = "predict") -> int:
    """Print one line per image that could not be read or processed; exit status 1 if there was any,
    else 0."""
    for message in failed:
        print(f"asag {command}: error: {message}", file=sys.stderr)
    if failed:
        print(f"asag {command}: error: {len(failed)} of {total} images could not be read or processed "
              f"(listed above); the others were processed", file=sys.stderr)
    return 1 if failed else 0
