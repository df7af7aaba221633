"""``asag visualize CHECKPOINT IMAGE...``: every stage of the pipeline, and FPN heat maps, drawn per image.

For each image ``<name>_pipeline.png`` (``<name>`` is the file's stem, extended by its extension and
parent folders where two inputs share a stem) shows one titled panel per stage (probed patches, anchors,
proposals, detections, and ground truth with ``--ann``), like the supplement's Figure C-2;
``--separate`` also writes each panel as ``<name>_<stage>.png``. With ``--features P3,P4``,
``<name>_features.png`` holds the mean-activation heat maps of those FPN levels (Figure C-3).
As with ``asag predict``, earlier figures are never replaced without ``--overwrite``: the default
``--out`` is a new folder (``visualizations``, else ``visualizations_2``, ...), and a given ``--out``
that already holds a figure this run would write is refused before the model loads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from asag.api import Detector
from asag.commands.predict import expand_images, report_unreadable
from asag.config import FRACTION, option_type
from asag.data import collate
from asag.errors import ConfigError, DataError
from asag.outputs import removed_if_unused, results_dir, unique_stems
from asag.viz.draw import Panel, compose_panels
from asag.viz.features import FPN_LEVELS, feature_panels, with_colour_bar
from asag.viz.pipeline import (
    STAGES,
    GroundTruth,
    PipelineTrace,
    ground_truth_for,
    load_ground_truth,
    pipeline_panels,
    run_pipeline,
    trace_image,
)

DEFAULT_SCORE_THRESHOLD = 0.3  # as ``asag predict``


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "visualize", help="draw every pipeline stage (patches, anchors, proposals, detections, GT) per image")
    parser.add_argument("checkpoint", help="checkpoint written by asag train or asag convert")
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--ann",
                        help="COCO-format annotation file: adds a ground-truth panel (default: none)")
    parser.add_argument("--stages", help=f"comma-separated stages to draw (default: {','.join(STAGES)})")
    parser.add_argument("--features",
                        help=f"comma-separated FPN levels to draw as heat maps ({','.join(FPN_LEVELS)}; "
                             f"default: none)")
    parser.add_argument("--out", help="output folder (default: a new folder ./visualizations, or "
                        "./visualizations_2, ... when it exists)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the figures of an earlier run in --out (default: refuse)")
    parser.add_argument("--separate", action="store_true", help="also write one PNG per stage")
    parser.add_argument("--score-threshold", type=option_type(float, FRACTION),
                        default=DEFAULT_SCORE_THRESHOLD, help="minimum score of a drawn detection")
    parser.add_argument("--used-head", help="head to use: main or aux_k (default: the stored used_head)")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"],
                        help="probing depth (default: the stored inference_level)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.set_defaults(func=run)


def parse_list(text: str | None, allowed: tuple[str, ...], option: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against ``allowed`` (error names the option)."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        choices = ", ".join(allowed)
        raise ConfigError(f"{option}: unknown value(s) {', '.join(unknown)}; choose from {choices}")
    return items


def choose_stages(text: str | None, has_annotations: bool) -> list[str]:
    """The stages to draw; ground truth needs ``--ann`` (silently left out of the default set)."""
    if text is None:
        return [s for s in STAGES if s != "gt" or has_annotations]
    stages = parse_list(text, STAGES, "--stages")
    if not stages:
        raise ConfigError("--stages: no stage given")
    if "gt" in stages and not has_annotations:
        raise ConfigError("--stages gt: needs an annotation file (--ann COCO_JSON)")
    return stages


@dataclass
class ImageFigures:
    """What is drawn for one image: the stage panels, the feature panels and the trace behind them."""

    trace: PipelineTrace
    stages: dict[str, Panel]
    features: list[Panel]


def visualise_image(
    detector: Detector,
    path: Path,
    stages: list[str],
    levels: list[str],
    score_threshold: float,
    inference_level: str | None = None,
    annotations: dict[str, GroundTruth] | None = None,
) -> ImageFigures:
    """Run the detector on one image file and draw its stages and heat maps."""
    image = detector.load_image(path)
    batch = collate([detector.preprocess(image)]).to(detector.device)
    run_ = run_pipeline(detector.model, batch.images, batch.image_sizes, batch.orig_sizes, inference_level)
    gt = ground_truth_for(annotations, path, (image.height, image.width)) if annotations else None
    patch_size = detector.model.anchor_generator.patch_size
    trace = trace_image(run_, 0, detector.label_map, patch_size, score_threshold, gt)
    size_hw = tuple(batch.image_sizes[0].tolist())
    return ImageFigures(trace, pipeline_panels(image, trace, stages),
                        feature_panels(image, run_.features, 0, levels, size_hw))


def figure_file(stem: str, part: str) -> str:
    """File name of one figure of an image: ``<stem>_<part>.png`` (part: pipeline, a stage, features)."""
    return f"{stem}_{part}.png"


def planned_files(stems: list[str], stages: list[str], separate: bool, features: bool) -> list[str]:
    """Every file :func:`save_figures` can write for these images (checked before the work starts)."""
    parts = ["pipeline", *(stages if separate else []), *(["features"] if features else [])]
    return [figure_file(stem, part) for stem in stems for part in parts]


def save_figures(figures: ImageFigures, stem: str, out: Path, separate: bool) -> list[Path]:
    """Write the figures of one image; returns the files written."""
    written = []
    if figures.stages:
        written.append(out / figure_file(stem, "pipeline"))
        compose_panels(list(figures.stages.values())).save(written[-1])
    if separate:
        for stage, panel in figures.stages.items():
            written.append(out / figure_file(stem, stage))
            panel.image.save(written[-1])
    if figures.features:
        written.append(out / figure_file(stem, "features"))
        with_colour_bar(compose_panels(figures.features)).save(written[-1])
    return written


def summary(path: Path, trace: PipelineTrace, has_annotations: bool) -> str:
    """One line of counts per image."""
    patches = ", ".join(f"{level} {len(b)}" for level, b in trace.patches.items()) or "none"
    if trace.ground_truth is not None:
        gt = f", {len(trace.ground_truth)} GT"
    else:
        gt = ", not in the annotation file" if has_annotations else ""
    return (f"{path.name}: patches {patches}; {len(trace.anchors)} anchors, "
            f"{len(trace.proposals)} proposals, {len(trace.detections)} detections{gt}")


def run(args: argparse.Namespace) -> int:
    stages = choose_stages(args.stages, args.ann is not None)
    levels = parse_list(args.features, FPN_LEVELS, "--features")
    paths = expand_images(args.images)
    names = unique_stems(paths)
    annotations = load_ground_truth(args.ann) if args.ann else None
    files = planned_files(names, stages, args.separate, features=bool(levels))
    out, created = results_dir(args.out, "visualizations", files, overwrite=args.overwrite)
    with removed_if_unused(out, created):
        detector = Detector.from_checkpoint(args.checkpoint, device=args.device, used_head=args.used_head,
                                            inference_level=args.inference_level)
    lines, failed = [], []
    for path, name in tqdm(list(zip(paths, names)), desc="visualize", unit="img", disable=None):
        try:
            figures = visualise_image(detector, path, stages, levels, args.score_threshold,
                                      args.inference_level, annotations)
        except DataError as err:  # an unreadable image: the others are still drawn
            failed.append(str(err))
            continue
        written = save_figures(figures, name, out, args.separate)
        lines.append(f"{summary(path, figures.trace, annotations is not None)} -> {written[0].name}"
                     if written else summary(path, figures.trace, annotations is not None))
    print("\n".join(lines))
    print(f"{len(lines)} images -> {out}")
    return report_unreadable(failed, len(paths), "visualize")
