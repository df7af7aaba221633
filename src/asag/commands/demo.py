"""``asag demo``: synthetic data -> train a small ASAG-A on the CPU -> evaluate -> predict and draw.

Training runs within a wall-clock budget (``--budget-minutes``, default 8): the first iterations are
timed on this machine and the preset's schedule is shortened to fit (:mod:`asag.engine.budget`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import time
from pathlib import Path

import torch

from asag.api import Detector, resolve_device
from asag.build import (
    build_criterion,
    build_dataset,
    build_loader,
    build_model,
    build_optimizer_and_schedule,
    data_files,
    prepare_synthetic,
)
from asag.commands.eval import format_result
from asag.commands.predict import drawing_file
from asag.commands.train import build_evaluate_fn, resolve_amp, train, training_layout
from asag.config import Config, Range, apply_overrides, config_from_dict, load_config, option_type
from asag.engine.budget import BUDGET_SAFETY, BudgetPacer, SchedulePlan, plan_schedule
from asag.engine.checkpoint import seed_everything
from asag.engine.host_memory import configure_host_memory
from asag.engine.trainer import make_grad_scaler, set_amp_scope, train_one_epoch
from asag.outputs import atomic_write_text, check_output_dir, previous_run_files
from asag.viz.draw import draw_detections

DEMO_PRESET = "demo"
NUM_DRAWN = 6
DEFAULT_BUDGET_MINUTES = 8.0
# Speed probe: one untimed iteration (allocations, lazy initialisation), then up to PROBE_TIMED_ITERS
# timed ones within PROBE_BUDGET_SHARE of the budget; the evaluation time is extrapolated from
# PROBE_EVAL_BATCHES validation batches (the first is the slowest: a conservative estimate).
PROBE_TIMED_ITERS, PROBE_BUDGET_SHARE, PROBE_EVAL_BATCHES = 3, 0.02, 1
# Drawings: the demo's confident detections, without the near-duplicate boxes a model trained for minutes
# still places (a same-class box overlapping a better one by IoU > DRAW_NMS_IOU is hidden), on images
# scaled up so that their short side has at least DRAW_MIN_SIDE pixels. The threshold is at the best F1
# of the drawn boxes on the validation split (benchmarks/draw_threshold.py; docs/demo.md).
DRAW_SCORE_THRESHOLD = 0.45
DRAW_NMS_IOU = 0.5
DRAW_MIN_SIDE = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train and evaluate a small ASAG-A on a generated synthetic data set (CPU, minutes)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo preset")
    parser.add_argument("--output-dir", default="runs/demo",
                        help="data set, checkpoints, logs and drawings; a second demo there replaces the "
                             "first one's checkpoints and logs and reuses its data set")
    parser.add_argument("--budget-minutes", type=option_type(float, Range(0)), default=DEFAULT_BUDGET_MINUTES,
                        help="wall-clock minutes of training (speed probe and evaluations included); the "
                             "preset's schedule is shortened to fit, never lengthened; 0: the preset's "
                             f"schedule as it is (default: {DEFAULT_BUDGET_MINUTES:g})")
    parser.add_argument("--preset", default=DEMO_PRESET, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def preset_plan(cfg: Config, full_pass: int) -> SchedulePlan:
    """The configured schedule as a :class:`SchedulePlan`; ``full_pass``: batches in one pass over the
    training set."""
    per_epoch = min(full_pass, cfg.schedule.max_iters_per_epoch or full_pass)
    return SchedulePlan(cfg.schedule.epochs, per_epoch, tuple(sorted(cfg.schedule.milestones)),
                        cfg.schedule.warmup_iters, cfg.runtime.eval_every)


def plan_overrides(plan: SchedulePlan, full_pass: int) -> list[str]:
    """Config overrides that make ``plan`` the run's schedule."""
    per_epoch = "null" if plan.iters_per_epoch >= full_pass else str(plan.iters_per_epoch)
    return [f"schedule.epochs={plan.epochs}", f"schedule.milestones={list(plan.milestones)}",
            f"schedule.warmup_iters={plan.warmup_iters}", f"schedule.max_iters_per_epoch={per_epoch}",
            f"runtime.eval_every={plan.eval_every}"]


def measure_speed(cfg: Config, max_seconds: float) -> tuple[float, float, int]:
    """``(seconds per training iteration, seconds per evaluation, batches per pass)`` of ``cfg`` on this
    machine: a throw-away copy of the run (same model, data, precision and threads) trains one
    iteration (not counted, unless it alone took ``max_seconds``), then timed ones (up to
    :data:`PROBE_TIMED_ITERS`, stopping once ``max_seconds`` have gone into them), then evaluates
    :data:`PROBE_EVAL_BATCHES` validation batch(es) and extrapolates to the whole validation set."""
    rt = cfg.runtime
    device = resolve_device(rt.device)
    if rt.num_threads:
        torch.set_num_threads(rt.num_threads)
    configure_host_memory(rt.host_memory, device)  # as the run will
    seed_everything(rt.seed)
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    model = build_model(cfg).to(device)
    criterion = build_criterion(cfg).to(device)
    optimizer, scheduler = build_optimizer_and_schedule(model, cfg.schedule)
    with contextlib.redirect_stdout(io.StringIO()):  # the training run prints its precision message
        amp = resolve_amp(cfg, device)
    set_amp_scope(model, rt.amp_scope)
    channels_last = training_layout(cfg, model, device, amp).channels_last  # (probe: the run probes again)
    loader = build_loader(train_set, cfg.data, train=True, seed=rt.seed)
    batches = iter(loader)
    steps = cfg.schedule.accumulate_steps  # batches per iteration (optimiser step)

    def one_iteration() -> float:
        metrics = train_one_epoch(model, criterion, itertools.islice(batches, steps), optimizer, scheduler,
                                  epoch=0, device=device, amp=amp, scaler=make_grad_scaler(amp, device),
                                  clip_max_norm=cfg.schedule.clip_max_norm, log_every=0,
                                  channels_last=channels_last,
                                  accumulate_steps=steps)
        return metrics.seconds

    first = one_iteration()  # allocations and lazy initialisation make it the slowest: an upper bound
    timed: list[float] = []
    while (first < max_seconds and len(timed) < min(PROBE_TIMED_ITERS, len(loader) // steps - 1)
           and (not timed or sum(timed) < max_seconds)):
        timed.append(one_iteration())
    evaluate_fn = build_evaluate_fn(cfg, val_set, device=device, amp=amp, results_json=None)
    val_batches = len(build_loader(val_set, cfg.data, train=False))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_fn(model, max_batches=PROBE_EVAL_BATCHES)
    eval_seconds = (time.perf_counter() - start) * val_batches / min(PROBE_EVAL_BATCHES, val_batches)
    iter_seconds = sum(timed) / len(timed) if timed else first  # a very slow machine: the first one
    return iter_seconds, eval_seconds, len(loader) // steps


def fit_to_budget(cfg: Config, budget_seconds: float) -> tuple[Config, BudgetPacer]:
    """Measure the speed, then shorten ``cfg``'s schedule so that training (this measurement included)
    takes at most ``budget_seconds``; prints the measurement and both schedules. The returned pacer
    re-plans the later epochs' lengths from their measured speed (``train(epoch_iters=...)``)."""
    start = time.perf_counter()
    iter_seconds, eval_seconds, full_pass = measure_speed(cfg, PROBE_BUDGET_SHARE * budget_seconds)
    now = time.perf_counter()
    left = budget_seconds - (now - start)
    preset = preset_plan(cfg, full_pass)
    plan = plan_schedule(preset, budget_seconds=max(0.0, BUDGET_SAFETY * left), iter_seconds=iter_seconds,
                         eval_seconds=eval_seconds)
    print(f"budget: {budget_seconds / 60:.1f} min of training; measured {iter_seconds:.2f} s per iteration "
          f"(batch {cfg.data.batch_size}), {eval_seconds:.1f} s per evaluation")
    minutes = {p: p.seconds(iter_seconds, eval_seconds) / 60 for p in (preset, plan)}
    print(f"preset schedule:  {preset.describe()} (about {minutes[preset]:.1f} min here)")
    fits = "the preset fits" if plan == preset else f"shortened to {BUDGET_SAFETY:.0%} of the time left"
    print(f"chosen schedule:  {plan.describe()} (about {minutes[plan]:.1f} min; {fits})")
    if plan.total_iters < preset.total_iters:
        share = plan.total_iters / preset.total_iters
        print(f"note: the budget trains {share:.0%} of the preset's iterations on this machine, so "
              f"expect a lower AP than the full schedule's (docs/demo.md); --budget-minutes 0 "
              f"runs it in full (about {minutes[preset]:.1f} min here)")
    if plan.seconds(iter_seconds, eval_seconds) > left:
        print(f"note: {budget_seconds / 60:.1f} min is too short on this machine for even this schedule; "
              f"expect about {(budget_seconds - left) / 60 + minutes[plan]:.1f} min of training")
    data = apply_overrides(cfg.to_dict(), plan_overrides(plan, full_pass))
    pacer = BudgetPacer(plan, deadline=now + BUDGET_SAFETY * max(0.0, left), eval_seconds=eval_seconds,
                        max_iters_per_epoch=preset.iters_per_epoch)
    return config_from_dict(data), pacer


def draw_predictions(checkpoint: Path, cfg: Config, out: Path) -> tuple[Path, int]:
    """Draw the confident detections of the first validation images into ``out / predictions`` (their
    ``predictions.json`` lists the drawn ones)."""
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    _, image_dir = data_files(cfg.data, "val")
    drawn = out / "predictions"
    drawn.mkdir(parents=True, exist_ok=True)
    records = []
    for path in sorted(image_dir.iterdir())[:NUM_DRAWN]:
        dets = detector.predict(path, score_threshold=DRAW_SCORE_THRESHOLD, nms_iou=DRAW_NMS_IOU)
        image = draw_detections(detector.load_image(path), dets, min_side=DRAW_MIN_SIDE)
        image.save(drawn / drawing_file(path.stem))
        records.append({"file": str(path), "detections": [d.to_dict() for d in dets]})
    atomic_write_text(drawn / "predictions.json", json.dumps(records, indent=2))
    return drawn, len(records)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = check_output_dir(args.output_dir, "--output-dir")
    overrides = [f"data.root={out / 'data'}", *args.overrides]
    cfg = load_config(args.preset, overrides)
    print(f"asag demo: {cfg.description}")
    prepare_synthetic(cfg.data)
    if previous_run_files(out):  # a demo run folder is the demo's own: a new demo replaces the old one
        print(f"asag demo: replacing the earlier demo run in {out} (its data set is reused)")
    train_start = time.perf_counter()
    pacer = None
    if args.budget_minutes > 0:
        cfg, pacer = fit_to_budget(cfg, args.budget_minutes * 60)
    result = train(cfg, output_dir=out, overwrite=True, epoch_iters=pacer).result
    train_minutes = (time.perf_counter() - train_start) / 60
    final = result.evaluations[max(result.evaluations)] if result.evaluations else None
    checkpoint = result.best_checkpoint or result.last_checkpoint
    drawn, num_drawn = draw_predictions(checkpoint, cfg, out)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n== asag demo finished in {minutes:.1f} min ==")
    budget = f" (budget {args.budget_minutes:g} min)" if pacer is not None else " (no budget)"
    print(f"training:     {train_minutes:.1f} min{budget}, {result.iteration} iterations")
    if final is not None:
        print("final AP (COCO metrics on the validation split, last evaluation):")
        print(format_result(final))
    _, image_dir = data_files(cfg.data, "val")
    print(f"data set:     {cfg.data.root}")
    print(f"checkpoints:  {out} (best.pth, last.pth); metrics log {out / 'metrics.jsonl'}")
    print(f"predictions:  {drawn} ({num_drawn} drawn validation images, score >= {DRAW_SCORE_THRESHOLD}, "
          f"same-class boxes overlapping a better one by IoU > {DRAW_NMS_IOU} hidden)")
    print(f"next: asag eval {checkpoint} data.root={cfg.data.root}  |  "
          f"asag predict {checkpoint} {image_dir} --draw")
    return 0
