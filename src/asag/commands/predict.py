"""``asag predict CHECKPOINT INPUTS...``: detections of images, videos and streams.

Images (files, folders of images, glob patterns): ``predictions.json`` holds one record per readable
image: ``file`` (the input path), ``detections`` and, with ``--draw``, ``drawing`` (the file name of its
drawing in ``--out``; names are unique even for equal stems in different folders). Unreadable images,
and images that an exported model cannot take (larger than its fixed input size), are skipped, listed on
stderr, and the exit status is 1. ``--tile SIZE`` predicts each image on overlapping tiles and merges
them (:mod:`asag.tiling`), for images far larger than the training size.

Videos: an input whose name ends in a video suffix (:data:`asag.video.VIDEO_SUFFIXES`, any case; also a
glob pattern such as ``clips/*.mp4``) or that is a URL (``rtsp://...``) is a video, and with ``--frames``
every folder given is one video made of its images (at ``--fps``). Each video ``NAME`` gives
``NAME_pred.mp4`` (the detections drawn, the source's frame rate and size) and ``NAME_frames.jsonl`` (one
line per frame); see :mod:`asag.video`. A run takes either images or videos. A video that cannot be
opened is one error line before any work (exit status 2); one that fails part way stops the run with a
line saying how many frames were written (the outputs so far stay valid files).

Earlier results are never replaced without ``--overwrite``: the default ``--out`` is a new folder
(``predictions``, else ``predictions_2``, ...), and a given ``--out`` that already holds a file this run
would write (``predictions.json``, a drawing, a video's outputs) is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from asag.api import Detection, Detector, resolve_device
from asag.config import FRACTION, POSITIVE, POSITIVE_REAL, field_option, option_type
from asag.data.formats import IMAGE_SUFFIXES
from asag.engine.checkpoint import EXPORTED_SUFFIXES
from asag.engine.host_memory import configure_host_memory
from asag.errors import ConfigError, DataError
from asag.export import RUNTIMES
from asag.modeling.fast import add_inference_arguments
from asag.outputs import atomic_write_text, removed_if_unused, results_dir, unique_stems
from asag.tiling import DEFAULT_MERGE_IOU, DEFAULT_TILE_OVERLAP, TILE_OVERLAP_RANGE, TILE_RANGE
from asag.video import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FPS,
    VIDEO_SUFFIXES,
    is_stream_url,
    is_video_spec,
    require_av,
    video_name,
    video_outputs,
    write_video_predictions,
)
from asag.viz.draw import draw_detections


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="detect objects in images")
    parser.add_argument("checkpoint", help="checkpoint written by asag train or asag convert, or a "
                        "model written by asag export (.onnx / .pt2)")
    parser.add_argument("images", nargs="+", metavar="INPUT",
                        help="image files, folders of images or glob patterns; or videos: names ending in "
                             f"{' '.join(VIDEO_SUFFIXES)} (any case) and stream URLs (rtsp://...)")
    parser.add_argument("--frames", action="store_true",
                        help="read each folder given as the frames of one video at --fps (its images in "
                             "natural order of their names: frame_2 before frame_10)")
    parser.add_argument("--fps", type=option_type(float, POSITIVE_REAL), default=None,
                        help=f"frame rate of --frames (default: {DEFAULT_FPS:g})")
    parser.add_argument("--batch-size", type=option_type(int, POSITIVE), default=DEFAULT_BATCH_SIZE,
                        help="video frames (or, with --tile, tiles of one image) per forward pass")
    parser.add_argument("--tile", type=option_type(int, TILE_RANGE), metavar="SIZE",
                        help="for images far larger than the training size: predict overlapping SIZE x SIZE "
                             "px tiles and merge them (docs/inference.md, 'Large images'; default: off)")
    parser.add_argument("--tile-overlap", type=option_type(float, TILE_OVERLAP_RANGE), default=None,
                        help=f"with --tile: overlap of neighbouring tiles, a fraction of SIZE (default: "
                             f"{DEFAULT_TILE_OVERLAP:g})")
    parser.add_argument("--tile-full-image", action="store_true",
                        help="with --tile: also predict the whole image, resized as without tiling, for "
                             "objects larger than a tile")
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
                             "model's detections as evaluated; with --tile: the IoU of merging the tiles, "
                             f"default {DEFAULT_MERGE_IOU:g})")
    parser.add_argument("--used-head", help="head to use: main or aux_k (default: the stored used_head)")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"],
                        help="probing depth (default: the stored inference_level)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--runtime", choices=list(RUNTIMES), default=None,
                        help="runtime of an exported .onnx model (default: onnxruntime); openvino runs on "
                             "the CPU, also with --precision bf16 (docs/deployment.md)")
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
    """A checkpoint's detector, or an exported model's (``.onnx`` / ``.pt2`` of ``asag export``, run by
    ``--runtime`` at ``--precision``; warnings while it loads, e.g. that it has no checksum, are one line
    each on stderr)."""
    configure_host_memory(args.host_memory, resolve_device(args.device))
    if Path(args.checkpoint).suffix.lower() not in EXPORTED_SUFFIXES:
        if args.runtime is not None:
            raise ConfigError(f"{args.checkpoint}: --runtime chooses the runtime of an exported model "
                              "(.onnx); a checkpoint runs with torch")
        return Detector.from_checkpoint(args.checkpoint, device=args.device, used_head=args.used_head,
                                        inference_level=args.inference_level, fast=args.fast,
                                        compile=args.compile, dtype=args.precision, static=args.static,
                                        cuda_graph=args.cuda_graph)
    fixed = {"--used-head": args.used_head, "--inference-level": args.inference_level, "--fast": args.fast,
             "--compile": args.compile, "--cuda-graph": args.cuda_graph}
    given = [name for name, value in fixed.items() if value]
    if given:
        raise ConfigError(f"{args.checkpoint}: {', '.join(given)} cannot change an exported model "
                          "(choose them at `asag export`)")
    with warnings.catch_warnings(record=True) as caught:  # e.g. asag.export.ExportWarning (no checksum)
        warnings.simplefilter("always")
        detector = Detector.from_exported(args.checkpoint, device=args.device,
                                          runtime=args.runtime or RUNTIMES[0], precision=args.precision)
    for warning in caught:
        print(f"asag predict: warning: {warning.message}", file=sys.stderr)
    return detector


def drawing_file(name: str) -> str:
    """File name of the drawing of the image with unique name ``name`` (see ``unique_stems``)."""
    return f"{name}_pred.png"


def is_video_input(spec: str, frames: bool) -> bool:
    """Whether ``asag predict`` reads input ``spec`` as a video (module docstring): a video name or URL;
    with ``--frames`` every input (folders of frames, videos)."""
    return frames or is_video_spec(spec)


def expand_videos(specs: list[str], frames: bool) -> list[str]:
    """Video files, glob patterns of videos, stream URLs and (``frames``) folders of frames -> the
    videos, each once, in the order given; anything else is a DataError naming it."""
    def usable(path: str) -> bool:
        is_video_file = Path(path).suffix.lower() in VIDEO_SUFFIXES and Path(path).is_file()
        return is_video_file or (frames and Path(path).is_dir())

    videos: list[str] = []
    for spec in specs:
        if is_stream_url(spec) or usable(spec):
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(f for f in glob.glob(spec, recursive=True) if usable(f))
            if not found:
                raise DataError(f"{spec}: pattern matches no {'folders or ' if frames else ''}videos")
        elif Path(spec).is_file():  # with --frames
            raise DataError(f"{spec}: with --frames, give folders of frames (or videos)")
        else:
            raise DataError(f"{spec}: no such {'folder or ' if frames else ''}file")
        videos += [v for v in found if v not in videos]
    return videos


def check_options(args: argparse.Namespace) -> None:
    """Options that only make sense with others, and the choice between images and videos: one line
    naming the option or input."""
    if args.fps is not None and not args.frames:
        raise ConfigError("--fps is the frame rate of --frames (a video has its own)")
    if args.tile is None and (args.tile_overlap is not None or args.tile_full_image):
        option = "--tile-overlap" if args.tile_overlap is not None else "--tile-full-image"
        raise ConfigError(f"{option} goes with --tile SIZE")
    videos = [spec for spec in args.images if is_video_input(spec, args.frames)]
    images = [spec for spec in args.images if not is_video_input(spec, args.frames)]
    if images and videos:
        raise ConfigError(f"give either images or videos, not both in one run ({images[0]} is an image "
                          f"input, {videos[0]} a video)")


def predict_image(detector: Detector, image, args: argparse.Namespace) -> list[Detection]:
    """The detections of one image with the command's filters, tiled with ``--tile``."""
    if args.tile is None:
        return detector.predict(image, score_threshold=args.score_threshold, topk=args.topk,
                                nms_iou=args.nms_iou)
    return detector.predict_tiled(image, args.tile, tile_overlap(args), batch_size=args.batch_size,
                                  full_image=args.tile_full_image, score_threshold=args.score_threshold,
                                  topk=args.topk, nms_iou=args.nms_iou)


def tile_overlap(args: argparse.Namespace) -> float:
    return DEFAULT_TILE_OVERLAP if args.tile_overlap is None else args.tile_overlap


def run(args: argparse.Namespace) -> int:
    check_options(args)
    if any(is_video_input(spec, args.frames) for spec in args.images):
        return run_videos(args)
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
            dets = predict_image(detector, image, args)
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


def run_videos(args: argparse.Namespace) -> int:
    """Predict every video of ``args`` (module docstring): all are opened first, so that an unreadable
    one is reported before any work; then each is written in turn, with its throughput."""
    require_av()
    sources = [(video, args.fps if Path(video).is_dir() else None)
               for video in expand_videos(args.images, args.frames)]
    names = unique_stems([video_name(source) for source, _ in sources])
    outputs = [video_outputs(name) for name in names]
    out, created = results_dir(args.out, "predictions", [f for pair in outputs for f in pair],
                               overwrite=args.overwrite)
    with removed_if_unused(out, created), contextlib.ExitStack() as opened:
        detector = load_detector(args)
        videos = [opened.enter_context(detector.predict_video(
            source, batch_size=args.batch_size, fps=fps, score_threshold=args.score_threshold,
            topk=args.topk, nms_iou=args.nms_iou, tile=args.tile, tile_overlap=tile_overlap(args),
            tile_full_image=args.tile_full_image)) for source, fps in sources]
        for results, (video_file, jsonl_file) in zip(videos, outputs):
            summary = write_video_predictions(results, out / video_file, out / jsonl_file)
            print(f"{results.name}: {summary.frames} frames, {summary.detections} detections, "
                  f"{summary.frames_per_second:.2f} frames/s -> {out / video_file}, {out / jsonl_file}")
            if summary.missing_frames:
                print(f"asag predict: warning: {results.name}: declares {summary.declared_frames} frames, "
                      f"only {summary.frames} could be decoded (truncated or damaged?)", file=sys.stderr)
    return 0


def report_unreadable(failed: list[str], total: int, command: str = "predict") -> int:
    """Print one line per image that could not be read or processed; exit status 1 if there was any,
    else 0."""
    for message in failed:
        print(f"asag {command}: error: {message}", file=sys.stderr)
    if failed:
        print(f"asag {command}: error: {len(failed)} of {total} images could not be read or processed "
              f"(listed above); the others were processed", file=sys.stderr)
    return 1 if failed else 0
