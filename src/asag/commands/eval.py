"""``asag eval CHECKPOINT``: metrics of a checkpoint on a COCO-format data set (COCO AP, or the CrowdHuman
AP / mMR / Recall when ``evaluation.metric=crowdhuman``).

Results go to a new folder beside the checkpoint (``runs/x/eval_best``, then ``eval_best_2`` ...) or to
``--out``, where earlier results are never replaced without ``--overwrite``. With the COCO metric the
plots of :mod:`asag.viz.eval_plots` (PR curves, AP per class, error analysis, confusion matrix; each PNG
beside a JSON of its numbers) go to the same folder, or to ``--plots DIR``; ``--no-plots`` skips them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from asag.api import load_model, resolve_device
from asag.build import build_dataset, check_annotated, check_num_classes
from asag.commands.train import build_evaluate_fn
from asag.config import FRACTION, field_option, option_type
from asag.engine.distributed import cleanup_distributed, init_distributed, is_main_process
from asag.engine.evaluator import CrowdHumanEvalResult, EvalResult
from asag.engine.host_memory import configure_host_memory
from asag.modeling.fast import add_inference_arguments
from asag.outputs import atomic_write_text, check_new_files, check_output_dir, fresh_dir
from asag.viz.eval_plots import DEFAULT_CONFUSION_SCORE, PLOT_FILES, write_eval_plots

RESULT_FILES = ("results.json", "metrics.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint (COCO AP, or CrowdHuman AP/mMR/Recall: evaluation.metric)")
    parser.add_argument("checkpoint", help="checkpoint written by asag train or asag convert")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.root=/data/coco data.val_batch_size=4")
    parser.add_argument("--data", metavar="ROOT",
                        help="shortcut for data.root=ROOT (default: the stored data.root)")
    parser.add_argument("--used-head", help="head to evaluate: main or aux_k (default: the stored used_head)")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"],
                        help="probing depth (default: the stored inference_level)")
    parser.add_argument("--batch-size", type=field_option("data.val_batch_size"),
                        help="evaluation batch size (default: data.val_batch_size)")
    parser.add_argument("--per-class", action="store_true", help="also report AP per class")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for results.json and metrics.json (default: a new folder eval_<name> "
                             "next to the checkpoint, numbered _2, _3 ... if it exists)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results.json / metrics.json / plots already in --out or --plots "
                             "(default: refuse)")
    plots = parser.add_mutually_exclusive_group()
    plots.add_argument("--plots", metavar="DIR",
                       help="folder for the plots (PR curves, AP per class, error analysis, confusion "
                            "matrix; PNG + JSON; COCO metric only) (default: the output folder)")
    plots.add_argument("--no-plots", action="store_true", help="draw no plots")
    parser.add_argument("--confusion-score", type=option_type(float, FRACTION),
                        default=DEFAULT_CONFUSION_SCORE,
                        help="score threshold of the detections counted in the confusion matrix")
    add_inference_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.batch_size is not None:
        overrides.append(f"data.val_batch_size={args.batch_size}")
    device = resolve_device(args.device)
    out = output_folder(args.checkpoint, args.out, overwrite=args.overwrite)
    plots = plots_folder(out, args)
    dist = init_distributed(device.type)
    try:
        device = dist.device if dist.distributed else device
        configure_host_memory(args.host_memory, device)
        model, cfg, label_map = load_model(args.checkpoint, used_head=args.used_head,
                                           inference_level=args.inference_level, overrides=overrides,
                                           fast=args.fast, compile=args.compile, dtype=args.precision,
                                           device=device, static=args.static)
        dataset = build_dataset(cfg.data, "val")
        check_num_classes(cfg.model, dataset.label_map, str(dataset.ann_file))
        check_annotated(dataset)
        if is_main_process():  # only rank 0 writes; checked before the evaluation, not after
            check_output_dir(out, "--out")
            if plots is not None:
                check_output_dir(plots, "--plots" if args.plots else "--out")
        evaluate_fn = build_evaluate_fn(cfg, dataset, device=device, amp=None, label_map=label_map,
                                        results_json=out / "results.json", per_class=args.per_class or None)
        result = evaluate_fn(model.to(device))
    finally:
        cleanup_distributed()
    if is_main_process():
        print(result.summary)
        print(format_result(result))
        atomic_write_text(out / "metrics.json", json.dumps(dataclasses.asdict(result), indent=2))
        print(f"detections: {out / 'results.json'}; metrics: {out / 'metrics.json'}")
        if plots is not None:
            print(draw_plots(result, dataset, plots, args.confusion_score))
        if args.overwrite and not (plots == out and isinstance(result, EvalResult)):
            removed = remove_earlier_plots(out)
            if removed:
                print(f"removed {len(removed)} plot files of an earlier evaluation from {out} (they showed "
                      f"other results)")
    return 0


def remove_earlier_plots(folder: Path) -> list[Path]:
    """Delete the plot files in ``folder`` (``--overwrite`` replaced the results they were drawn from and
    this run draws none there); returns them."""
    found = [folder / name for name in PLOT_FILES if (folder / name).is_file()]
    for path in found:
        path.unlink()
    return found


def plots_folder(out: Path, args: argparse.Namespace) -> Path | None:
    """Where the plots go (None: ``--no-plots``); a ``--plots`` folder holding plots of an earlier run is
    refused unless ``--overwrite`` (the output folder itself is checked by :func:`output_folder`)."""
    if args.no_plots:
        return None
    if args.plots is None:
        return out
    folder = Path(args.plots)
    check_new_files(folder, PLOT_FILES, overwrite=args.overwrite, option="--plots")
    return folder


def draw_plots(result, dataset, folder: Path, confusion_score: float) -> str:
    """Write the evaluation plots of a COCO result into ``folder``; returns the line to print."""
    if not isinstance(result, EvalResult):
        return "plots: none for evaluation.metric=crowdhuman (they show the COCO metric)"
    detections = json.loads(Path(result.results_path).read_text(encoding="utf-8"))
    written = write_eval_plots(dataset.coco, detections, folder, image_ids=dataset.image_ids,
                               confusion_score=confusion_score, backend=result.backend)
    return f"plots: {len(written)} files (PNG + JSON) in {folder}"


def output_folder(checkpoint: str, out: str | None, *, overwrite: bool) -> Path:
    """``--out``, refused if it holds earlier results (unless ``overwrite``); by default a folder that
    does not exist yet, ``eval_<checkpoint name>`` beside the checkpoint."""
    if out is None:
        path = Path(checkpoint)
        return fresh_dir(path.parent, f"eval_{path.stem}")
    check_new_files(Path(out), RESULT_FILES + PLOT_FILES, overwrite=overwrite, option="--out")
    return Path(out)


def format_result(result) -> str:
    if isinstance(result, CrowdHumanEvalResult):
        first = f"AP {result.ap:.4f}  mMR {result.mmr:.4f}  Recall {result.recall:.4f}"
    else:
        first = (f"AP {result.ap:.4f}  AP50 {result.ap50:.4f}  AP75 {result.ap75:.4f}  "
                 f"APs {result.aps:.4f}  APm {result.apm:.4f}  APl {result.apl:.4f}")
    lines = [first, f"{result.num_images} images, {result.images_per_second:.2f} images/s"]
    if isinstance(result, EvalResult):
        lines.append(f"COCO evaluation backend: {result.backend}")
    if result.mean_queries is not None:
        lines.append(f"mean queries per image {result.mean_queries:.1f}")
    if result.mean_patches:
        lines.append("mean probed patches per image: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in result.mean_patches.items()))
    if getattr(result, "per_class_ap", None):
        lines += [f"  {name:24s} {ap:.4f}" for name, ap in result.per_class_ap.items()]
    return "\n".join(lines)
