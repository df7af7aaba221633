"""Plain eager fp32 ASAG against the inference-optimised settings: latency, stage shares, output drift.

For each model (default: ASAG-A and ASAG-S R50 speed presets -- one decoder head, 300-query setting)
one detector is built with random (seeded) weights, frozen-BN statistics calibrated on a random image
so that activations keep a realistic scale (the folding then has real work to do), and crafted
anchor-generator biases (``crafting.py``) so that Adaptive Probing happens. Each setting is a copy
made by :func:`asag.modeling.fast.optimize_for_inference` from that same model:

    plain         the model as built, ``torch.no_grad`` (what ``asag eval`` runs without flags)
    infer         inference mode only (no folding, default layout)
    fold          + batch norms folded into the convolutions
    cl            channels-last levels (backbone, FPN, anchor generator, RoI pooling as a gather), no folding
    fast          folding + channels-last                          (``--fast``)
    fast_bf16     + bfloat16 backbone and FPN                      (``--fast --precision bf16``)
    fast_fp16     + float16 backbone and FPN (CUDA only)           (``--fast --precision fp16``)
    fast_compile  + torch.compile of backbone, FPN, decoder        (``--fast --compile``; slow to start)
    static        the plain model in static mode                   (``--static``)
    fast_static   folding + channels-last in static mode           (``--fast --static``)
    fast_fp16_static  + float16 backbone and FPN (CUDA only)       (``--fast --static --precision fp16``)

All settings see the same random images; the timed rounds run the settings round-robin (interleaved),
so that the drifts of a shared machine hit all of them alike, and medians are reported. Each timed call
is ``model(images, image_sizes)`` followed by ``model.postprocess``. Module hooks timestamp the anchor
generator, the proposal stage (with query preparation) and the post-processing inside the same timed
calls, so the share of these data-dependent stages in the end-to-end time comes from the same runs.
Output drift of each setting against ``plain``: whether the query counts agree, the largest shift of
an anchor, queries that moved by more than a pixel, the largest difference of the main head's logits
and boxes (queries paired by anchor box, see ``pair_queries``) and of the detection scores. The host-sync
audit (:class:`asag.engine.syncs.SyncAudit`) of one extra run counts the operations that would make the
host wait for a CUDA device (on CUDA the count comes from the same audit).

    python benchmarks/inference_speed.py [--models ASAG-A ASAG-S] [--batch-sizes 1 4] [--size 800x1216]
        [--settings plain fold cl fast fast_bf16] [--repeats 5] [--warmup 1] [--threads 2]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from crafting import crafted_detector
from torch import Tensor, nn

from asag.commands.benchmark import parse_size
from asag.engine.benchmark import random_inputs
from asag.engine.syncs import SyncAudit
from asag.modeling.backbone import FrozenBatchNorm2d
from asag.modeling.detector import ASAG
from asag.modeling.fast import cpu_supports_bf16, optimize_for_inference
from asag.structures import Detections, ModelOutput

PRESETS = {"ASAG-A": "asag_a_r50_speed", "ASAG-S": "asag_s_r50_speed", "ASAG-D": "asag_d_r50_speed"}
DEFAULT_MODELS = ["ASAG-A", "ASAG-S"]
# Setting name -> optimize_for_inference arguments (None: the plain model under torch.no_grad).
SETTINGS: dict[str, dict | None] = {
    "plain": None,
    "infer": dict(fold_bn=False, channels_last=False),
    "fold": dict(fold_bn=True, channels_last=False),
    "cl": dict(fold_bn=False, channels_last=True),
    "fast": dict(fold_bn=True, channels_last=True),
    "fast_bf16": dict(fold_bn=True, channels_last=True, dtype="bf16"),
    "fast_fp16": dict(fold_bn=True, channels_last=True, dtype="fp16"),
    "fast_compile": dict(fold_bn=True, channels_last=True, compile=True),
    "static": dict(static=True),
    "fast_static": dict(fold_bn=True, channels_last=True, static=True),
    "fast_fp16_static": dict(fold_bn=True, channels_last=True, dtype="fp16", static=True),
}
# Stages timed with module hooks; "features" (backbone + FPN) and "decoder" are the gaps between them.
STAGES = ("features", "anchor_generator", "proposal", "decoder", "postprocess")
DATA_DEPENDENT = ("anchor_generator", "proposal", "postprocess")
CALIBRATION_SIZE = (256, 384)  # (h, w) of the random image that sets the frozen-BN statistics
MS_PER_S = 1e3


# ------------------------------------------------------------------------------------------ models


@torch.no_grad()
def calibrate_frozen_norms(backbone: nn.Module, images: Tensor, seed: int = 0) -> None:
    """Give every FrozenBN the mean/variance of its input on ``images`` (one pass, in order) and a
    random affine near (1, 0), so that activations keep unit scale as in a trained backbone."""
    generator = torch.Generator().manual_seed(seed)

    def set_statistics(norm: FrozenBatchNorm2d, args: tuple) -> None:
        x = args[0]
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)))
        c = norm.weight.numel()
        norm.weight.copy_(0.5 + torch.rand(c, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(c, generator=generator))

    norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(set_statistics) for m in norms]
    try:
        backbone(images)
    finally:
        for handle in handles:
            handle.remove()


def benchmark_model(preset: str, overrides: list[str], seed: int = 0) -> ASAG:
    """Crafted detector of ``preset`` with calibrated frozen batch norms (eval mode, CPU)."""
    model = crafted_detector(preset, overrides, seed=seed)
    images = torch.randn(1, 3, *CALIBRATION_SIZE, generator=torch.Generator().manual_seed(seed))
    calibrate_frozen_norms(model.backbone, images, seed)
    return model


def make_settings(model: ASAG, names: list[str], device: torch.device) -> dict[str, ASAG]:
    variants = {}
    for name in names:
        kwargs = dict(SETTINGS[name] or {})
        base = copy.deepcopy(model).set_static(True) if kwargs.pop("static", False) else model
        variants[name] = optimize_for_inference(base, device=device, **kwargs) if kwargs else base
    return variants


# ------------------------------------------------------------------------------------------ timing


@dataclass
class StageClock:
    """Readings from hooks on the eager stages of one model; ``stages()`` splits one call into stages.

    The reading is the time (CUDA synchronised first) unless ``read`` gives another counter (e.g. the
    number of sync warnings so far, ``cuda_syncs.py``)."""

    device: torch.device
    read: Callable[[], float] | None = None
    marks: dict[str, float] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def mark(self, name: str) -> None:
        if self.read is not None:
            self.marks[name] = self.read()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks[name] = time.perf_counter()

    def attach(self, model: ASAG) -> None:
        for name in ("anchor_generator", "proposal", "postprocessor"):
            module = getattr(model, name)
            self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self.mark(f"{n}>")))
            self.handles.append(module.register_forward_hook(lambda m, a, o, n=name: self.mark(f"{n}<")))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def stages(self) -> dict[str, float]:
        """Per stage of the last call (from ``mark('start')`` on): differences of the readings."""
        m = self.marks
        if "anchor_generator>" not in m:  # hooks not attached
            return {}
        return {
            "features": m["anchor_generator>"] - m["start"],
            "anchor_generator": m["anchor_generator<"] - m["anchor_generator>"],
            "proposal": m["proposal<"] - m["anchor_generator<"],
            "decoder": m["postprocessor>"] - m["proposal<"],
            "postprocess": m["postprocessor<"] - m["postprocessor>"],
        }


def detect(model: ASAG, images: Tensor, sizes: Tensor) -> tuple[ModelOutput, list[Detections]]:
    with torch.no_grad():
        output = model(images, sizes)
        return output, model.postprocess(output, sizes)


@dataclass
class Timings:
    total: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})


def time_interleaved(models: dict[str, ASAG], images: Tensor, sizes: Tensor, repeats: int, warmup: int,
                     device: torch.device, stage_hooks: bool = True) -> dict[str, Timings]:
    """``repeats`` round-robin rounds over the settings (after ``warmup`` untimed calls each). Without
    ``stage_hooks`` only end-to-end times are taken (on CUDA the hooks synchronise at each stage)."""
    clocks = {name: StageClock(device) for name in models}
    for name, model in models.items():
        if stage_hooks:
            clocks[name].attach(model)
        for _ in range(warmup):
            detect(model, images, sizes)
    timings = {name: Timings() for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            clock = clocks[name]
            clock.mark("start")
            detect(model, images, sizes)
            clock.mark("end")
            timings[name].total.append(clock.marks["end"] - clock.marks["start"])
            for stage, seconds in clock.stages().items():
                timings[name].stages[stage].append(seconds)
    for clock in clocks.values():
        clock.detach()
    return timings


# ------------------------------------------------------------------------------------------- drift


# Queries are paired with the plain model's query of the nearest anchor box. Anchors of nearly equal
# confidence may swap places in the capped, confidence-sorted query list; the pairing undoes such
# swaps, so the differences are those of the same query. A pair farther apart than this (pixels)
# counts as "moved" (a different query).
PAIR_DISTANCE_PX = 1.0


@dataclass
class Drift:
    """Output differences of a setting against ``plain``: same query counts, largest anchor shift of
    a paired query (pixels), queries that moved, largest |difference| of the main head's logits and
    normalised boxes over the paired queries, and of the detection scores."""

    same_queries: bool
    anchor_shift: float | None
    moved: int | None
    logits: float | None
    boxes: float | None
    scores: float | None


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


Result = tuple[ModelOutput, list[Detections]]


def pair_queries(ref_anchors: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """For each query of ``anchors`` ``[Q, 4]``, the nearest query of ``ref_anchors`` (L-inf pixels)
    and that distance."""
    distance = torch.cdist(anchors, ref_anchors, p=float("inf"))  # [Q, Q]
    nearest = distance.min(dim=1)
    return nearest.indices, nearest.values


def output_drift(ref: Result, out: Result) -> Drift:
    """Differences against the plain model; only comparable when the query counts agree."""
    (ref_out, ref_dets), (fast_out, fast_dets) = ref, out
    mask_a, mask_b = ref_out.valid_mask, fast_out.valid_mask  # static mode: more (padded) columns
    if not torch.equal(mask_a.sum(1), mask_b.sum(1)):
        return Drift(False, None, None, None, None, None)
    shift, moved, logits, boxes = 0.0, 0, 0.0, 0.0
    a, b = ref_out.heads[-1], fast_out.heads[-1]
    for i in range(len(mask_a)):
        ref_valid, valid = mask_a[i], mask_b[i]
        pair, distance = pair_queries(ref_out.anchors.boxes[i][ref_valid], fast_out.anchors.boxes[i][valid])
        kept = distance <= PAIR_DISTANCE_PX
        moved += int((~kept).sum())
        shift = max(shift, float(distance[kept].max()) if kept.any() else 0.0)
        logits = max(logits, _max_abs(a.logits[i][ref_valid][pair[kept]], b.logits[i][valid][kept]))
        boxes = max(boxes, _max_abs(a.boxes[i][ref_valid][pair[kept]], b.boxes[i][valid][kept]))
    scores = max((_max_abs(r.scores, f.scores) for r, f in zip(ref_dets, fast_dets)
                  if r.scores.shape == f.scores.shape), default=0.0)
    return Drift(True, shift, moved, logits, boxes, scores)


def count_syncs(model: ASAG, images: Tensor, sizes: Tensor) -> int:
    with SyncAudit() as audit:
        detect(model, images, sizes)
    return audit.total


# ------------------------------------------------------------------------------------------ report


def _sci(value: float | None) -> str:
    return f"{value:.2e}" if value is not None else "n/a"


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * MS_PER_S


def report(name: str, batch: int, timings: dict[str, Timings], drifts: dict[str, Drift],
           syncs: dict[str, int], queries: dict[str, float]) -> None:
    """Two tables: timings (medians, ratio to plain, stage split) and output drift against plain."""
    base = _median_ms(timings["plain"].total)
    print(f"\n{name}, batch {batch}: median of {len(timings['plain'].total)} interleaved rounds (ms)")
    print(f"{'setting':>16} {'median':>8} {'q1':>8} {'q3':>8} {'vs plain':>9} {'AG+prop+post':>13} "
          f"{'features':>9} {'AG':>7} {'proposal':>9} {'decoder':>8} {'post':>6}")
    for setting, t in timings.items():
        ms = [v * MS_PER_S for v in t.total]
        q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0],) * 3
        median = _median_ms(t.total)
        line = f"{setting:>16} {median:>8.1f} {q1:>8.1f} {q3:>8.1f} {median / base:>9.3f}"
        if not t.stages["features"]:  # no stage hooks: end-to-end only
            print(f"{line} {'-':>13}   ({1e3 / median * batch:.1f} images/s)")
            continue
        stage = {s: _median_ms(v) for s, v in t.stages.items()}
        share = statistics.median(sum(t.stages[s][i] for s in DATA_DEPENDENT) / total
                                  for i, total in enumerate(t.total))  # per run, then the median
        print(f"{line} {share:>13.1%} "
              f"{stage['features']:>9.1f} {stage['anchor_generator']:>7.1f} {stage['proposal']:>9.1f} "
              f"{stage['decoder']:>8.1f} {stage['postprocess']:>6.1f}")
    print(f"{'setting':>16} {'queries':>8} {'same n':>7} {'anchor px':>10} {'moved Q':>8} "
          f"{'max|dlogit|':>12} {'max|dbox|':>10} {'max|dscore|':>12} {'syncs':>6}")
    for setting, d in drifts.items():
        print(f"{setting:>16} {queries[setting]:>8.1f} {str(d.same_queries):>7} {_sci(d.anchor_shift):>10} "
              f"{str(d.moved):>8} {_sci(d.logits):>12} {_sci(d.boxes):>10} {_sci(d.scores):>12} "
              f"{syncs[setting]:>6}")


def run_case(name: str, model: ASAG, settings: list[str], batch: int, size: tuple[int, int],
             repeats: int, warmup: int, device: torch.device, stage_hooks: bool = True) -> None:
    models = make_settings(model.to(device), settings, device)
    inputs = random_inputs(batch, size, device, seed=1)
    images, sizes = inputs.images, inputs.image_sizes
    outputs = {s: detect(m, images, sizes) for s, m in models.items()}
    drifts = {s: output_drift(outputs["plain"], out) for s, out in outputs.items()}
    queries = {s: float(out[0].valid_mask.sum()) / batch for s, out in outputs.items()}
    syncs = {s: count_syncs(m, images, sizes) for s, m in models.items()}
    timings = time_interleaved(models, images, sizes, repeats, warmup, device, stage_hooks)
    report(name, batch, timings, drifts, syncs, queries)


def default_settings(device: torch.device) -> list[str]:
    names = ["plain", "fold", "cl", "fast"]
    if device.type == "cuda":
        names += ["fast_fp16"] + (["fast_bf16"] if torch.cuda.is_bf16_supported() else [])
    elif cpu_supports_bf16():
        names.append("fast_bf16")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(PRESETS), default=DEFAULT_MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--size", default="800x1216", help="HxW of the random images")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="default: plain fold cl fast "
                        "and the reduced precisions the device supports")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-stage-hooks", action="store_true",
                        help="time end to end only (the stage hooks synchronise a CUDA device at each stage)")
    parser.add_argument("--override", nargs="*", default=[], metavar="key=value",
                        help="preset overrides, e.g. model.anchor_generator.max_anchors=312")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = args.settings or default_settings(device)
    if "plain" not in settings:
        settings = ["plain", *settings]
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"size {args.size}, settings {settings}, overrides {args.override}")
    for name in args.models:
        model = benchmark_model(PRESETS[name], args.override)
        for batch in args.batch_sizes:
            run_case(name, model, settings, batch, parse_size(args.size), args.repeats, args.warmup, device,
                     stage_hooks=not args.no_stage_hooks)


if __name__ == "__main__":
    main()
