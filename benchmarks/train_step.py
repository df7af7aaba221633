"""Training-step time: the release's exact path against the default (fp32) and bf16 autocast.

For each preset (ASAG-A and ASAG-S, R50, four heads, random weights) three trainers are built from the
same seed with :func:`asag.build.build_trainer` and stepped through the public step API
(``Trainer.train_step``) on the same random batch (``--batch`` images of ``--size`` with random boxes):

* ``release``: ``model.roi_pooling=torchvision runtime.memory_format=contiguous
  schedule.optimizer_kernel=for_loop`` -- the step before this change, the release's numbers exactly;
* ``default``: the configuration's defaults (``auto`` RoIAlign and memory format, fused AdamW), fp32;
* ``bf16``: the default with ``runtime.amp=bf16`` (autocast of backbone and FPN; only on a CPU with
  native bf16, or with ``--bf16``).

Each round steps every trainer once (round-robin, so drifts of a shared machine hit all alike) and
times forward, loss, backward and optimizer step (clip + AdamW) separately. Prints medians, the ratio
of every part to the release path, and the load average before and after.

    python benchmarks/train_step.py [--presets asag_a_r50_1x_100q asag_s_r50_3x_100q] [--size 512x640]
                                    [--batch 2] [--repeats 3] [--warmup 1] [--threads 2] [--epoch 0] [--bf16]
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

from asag.build import build_trainer
from asag.commands.benchmark import parse_size
from asag.config import load_config
from asag.engine.benchmark import StageTimer, random_inputs, timing_stats
from asag.engine.trainer import STEP_PARTS
from asag.modeling.fast import cpu_supports_bf16
from asag.structures import ImageTargets

PRESETS = ["asag_a_r50_1x_100q", "asag_s_r50_3x_100q"]
# The step before this change: the release's RoIAlign, memory layout and per-tensor AdamW.
RELEASE_PATH = ["model.roi_pooling=torchvision", "runtime.memory_format=contiguous",
                "schedule.optimizer_kernel=for_loop"]
OBJECTS_PER_IMAGE = (7, 4, 9, 3)  # cycled over the batch


def random_targets(image_sizes: torch.Tensor, num_classes: int, seed: int = 2) -> list[ImageTargets]:
    """Random boxes (normalised cxcywh, sides 0.05-0.45) and labels, ``OBJECTS_PER_IMAGE`` per image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (h, w) in enumerate(image_sizes.tolist()):
        n = OBJECTS_PER_IMAGE[i % len(OBJECTS_PER_IMAGE)]
        centres, sides = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.4 + 0.05
        boxes = torch.cat([centres, sides], 1)
        out.append(ImageTargets(boxes, torch.randint(0, num_classes, (n,), generator=g), i, (h, w), (h, w)))
    return out


def variants(bf16: bool) -> dict[str, tuple[list[str], str | None]]:
    out = {"release": (RELEASE_PATH, None), "default": ([], None)}
    if bf16:
        out["bf16"] = ([], "bf16")
    return out


def time_preset(preset: str, args: argparse.Namespace) -> dict[str, StageTimer]:
    inputs = random_inputs(args.batch, args.size, seed=1)
    trainers, timers = {}, {}
    for name, (overrides, amp) in variants(args.bf16 or cpu_supports_bf16()).items():
        cfg = load_config(preset, overrides)
        cfg.model.backbone.weights = None
        torch.manual_seed(0)
        trainers[name] = build_trainer(cfg, amp=amp)
        timers[name] = StageTimer(torch.device("cpu"))
    targets = random_targets(inputs.image_sizes, cfg.model.num_classes)
    for r in range(args.warmup + args.repeats):
        for name, trainer in trainers.items():
            wrap = timers[name] if r >= args.warmup else StageTimer(torch.device("cpu"))
            torch.manual_seed(r)
            trainer.train_step(inputs.images, inputs.image_sizes, targets, epoch=args.epoch, wrap=wrap)
            times = " ".join(f"{part} {wrap.seconds[part][-1]:.2f}" for part in STEP_PARTS)
            print(f"  {preset} round {r + 1} {name}: {times} s", flush=True)
        print(f"  {preset} round {r + 1}/{args.warmup + args.repeats}, load {os.getloadavg()[0]:.1f}",
              flush=True)
    del trainers
    gc.collect()
    return timers


def report(preset: str, timers: dict[str, StageTimer]) -> None:
    medians = {name: {part: timing_stats(t.seconds[part]).median for part in STEP_PARTS}
               for name, t in timers.items()}
    for m in medians.values():
        m["step"] = sum(m[part] for part in STEP_PARTS)
    parts = [*STEP_PARTS, "step"]
    print(f"\n{preset}: median ms per part (ratio to release)")
    print(f"  {'variant':>8} " + " ".join(f"{p:>18}" for p in parts))
    base = medians["release"]
    for name, m in medians.items():
        cells = [f"{m[p]:>9.0f} ({m[p] / base[p]:.2f}x)" for p in parts]
        print(f"  {name:>8} " + " ".join(f"{c:>18}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--size", type=parse_size, default=(512, 640), help="HEIGHTxWIDTH of every image")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch", type=int, default=0, help="0: GT-derived patches (teacher forcing)")
    parser.add_argument("--bf16", action="store_true",
                        help="time bf16 autocast even without native CPU bf16 (emulated; default: only "
                             "with it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.size[0]}x{args.size[1]}, epoch {args.epoch}, {args.repeats} rounds after {args.warmup} "
          f"warm-up; cpu bf16: {cpu_supports_bf16()}; load average {os.getloadavg()}")
    for preset in args.presets:
        report(preset, time_preset(preset, args))
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
