"""Training-step time: the release's exact path against the default, both layouts, and bf16 autocast.

For each preset (ASAG-A and ASAG-S, R50, four heads, random weights) one trainer per variant is built
from the same seed with :func:`asag.build.build_trainer` and stepped through the public step API
(``Trainer.train_step``) on the same random batch (``--batch`` images of ``--size`` with random boxes):

* ``release``: ``model.roi_pooling=torchvision runtime.memory_format=contiguous
  schedule.optimizer_kernel=for_loop runtime.host_memory=system``, fp32 -- the release's numbers
  exactly, with the C allocator as a plain process has it;
* ``default``: the configuration's defaults (``auto`` RoIAlign, ``auto`` memory format -- its rule for
  fp32 on this CPU --, fused AdamW, ``auto`` host memory -- freed memory kept on the CPU), fp32;
* ``default-sysmem``: the default with ``runtime.host_memory=system`` (what keeping freed memory saves);
* ``fp32-other``: the default in the layout ``auto`` did not pick (``fp32-cl`` or ``fp32-contig``);
* ``bf16``: the default with ``runtime.amp=bf16`` (autocast of backbone and FPN; ``auto`` picks
  channels-last for it);
* ``bf16-contig``: the same, contiguous;
* ``bf16-heads``: ``runtime.amp_scope=heads`` too (the decoder heads autocast as well; changes the
  numbers beyond the release's autocast).

The bf16 variants run only on a CPU with native bf16 (AVX512-BF16 or AMX), or with ``--bf16``
(emulated, slow); ``--variants`` picks a subset. Every variant runs in blocks, each in a fresh process
of its own (``runtime.host_memory`` sets the process's C allocator, so variants cannot share one):
build, ``--warmup`` untimed steps (kept memory settles over the first steps), ``--repeats`` timed
steps; the variants' blocks take turns for ``--rounds`` rounds, so that drifts of a shared machine hit
all alike. Forward, loss, backward and optimizer step (clip + AdamW) are timed separately. ``--clock
wall`` (default) measures wall time -- what a run takes, on a quiet machine; ``--clock cpu`` the CPU
time of all the process's threads -- the work each variant does, far less sensitive to other processes
sharing the cores (set ``OMP_WAIT_POLICY=PASSIVE`` so that idle OpenMP threads do not spin into it).
Prints the CPU (model name, native bf16, AMX), the threads, the load average before and after, and a
table of medians with every part's ratio to the release path.

    python benchmarks/train_step.py [--presets asag_a_r50_1x_100q asag_s_r50_3x_100q] [--size 512x640]
                                    [--batch 2] [--rounds 2] [--repeats 3] [--warmup 2] [--threads 2]
                                    [--epoch 0]
                                    [--clock wall|cpu] [--variants release default bf16 ...] [--bf16]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from asag.build import build_trainer
from asag.commands.benchmark import parse_size
from asag.config import load_config
from asag.engine.benchmark import StageTimer, cpu_name, random_inputs, timing_stats
from asag.engine.host_memory import configure_host_memory, glibc
from asag.engine.trainer import STEP_PARTS, use_channels_last
from asag.modeling.fast import cpu_has_amx, cpu_supports_bf16
from asag.structures import ImageTargets

PRESETS = ["asag_a_r50_1x_100q", "asag_s_r50_3x_100q"]
# The step before this change: the release's RoIAlign, memory layout and per-tensor AdamW.
SYSTEM_MEMORY = "runtime.host_memory=system"
RELEASE_PATH = ["model.roi_pooling=torchvision", "runtime.memory_format=contiguous",
                "schedule.optimizer_kernel=for_loop", SYSTEM_MEMORY]
CONTIGUOUS, CHANNELS_LAST = "runtime.memory_format=contiguous", "runtime.memory_format=channels_last"
BF16_VARIANTS = ("bf16", "bf16-contig", "bf16-heads")
OBJECTS_PER_IMAGE = (7, 4, 9, 3)  # cycled over the batch
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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


def all_variants() -> dict[str, tuple[list[str], str | None]]:
    """name -> (configuration overrides, amp); ``fp32-other`` is the layout fp32 ``auto`` leaves out."""
    fp32_cl = use_channels_last("auto", "cpu")
    return {
        "release": (RELEASE_PATH, None),
        "default": ([], None),
        "default-sysmem": ([SYSTEM_MEMORY], None),
        "fp32-contig" if fp32_cl else "fp32-cl": ([CONTIGUOUS if fp32_cl else CHANNELS_LAST], None),
        "bf16": ([], "bf16"),
        "bf16-contig": ([CONTIGUOUS], "bf16"),
        "bf16-heads": (["runtime.amp_scope=heads"], "bf16"),
    }


def chosen_variants(args: argparse.Namespace) -> dict[str, tuple[list[str], str | None]]:
    variants = all_variants()
    names = args.variants or list(variants)
    unknown = [n for n in names if n not in variants and n not in ("fp32-cl", "fp32-contig")]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(variants)}")
    if not (args.bf16 or cpu_supports_bf16()):
        names = [n for n in names if n not in BF16_VARIANTS]
    if "release" not in names:
        names.insert(0, "release")  # the reference of every ratio
    return {n: variants[n] for n in names if n in variants}


def run_block(preset: str, overrides: list[str], amp: str | None, args: argparse.Namespace,
              label: str) -> dict[str, list[float]]:
    """One variant in a process of its own: apply its ``runtime.host_memory``, build its trainer (seed 0),
    step it ``args.warmup`` times untimed and ``args.repeats`` times timed on the fixed batch; the seconds
    of every part of the timed steps."""
    torch.set_num_threads(args.threads)
    cfg = load_config(preset, overrides)
    cfg.model.backbone.weights = None
    print(f"  {label}: {configure_host_memory(cfg.runtime.host_memory, 'cpu').line()}", flush=True)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, amp=amp)
    inputs = random_inputs(args.batch, args.size, seed=1)
    targets = random_targets(inputs.image_sizes, cfg.model.num_classes)
    timer = StageTimer(torch.device("cpu"), clock=CLOCKS[args.clock])
    for r in range(args.warmup + args.repeats):
        wrap = timer if r >= args.warmup else StageTimer(torch.device("cpu"), clock=CLOCKS[args.clock])
        torch.manual_seed(r)
        trainer.train_step(inputs.images, inputs.image_sizes, targets, epoch=args.epoch, wrap=wrap)
        times = " ".join(f"{part} {wrap.seconds[part][-1]:.2f}" for part in STEP_PARTS)
        print(f"  {label} step {r + 1}{'' if r >= args.warmup else ' (warm-up)'}: {times} s", flush=True)
    return timer.seconds


def time_preset(preset: str, args: argparse.Namespace) -> dict[str, StageTimer]:
    """Every variant's timed steps, ``args.rounds`` blocks each, the variants' blocks in turn."""
    variants = chosen_variants(args)
    for name, (overrides, amp) in variants.items():
        print(f"  {name}: {' '.join(overrides) or 'defaults'}, amp {amp or 'fp32'}")
    timers = {name: StageTimer(torch.device("cpu"), clock=CLOCKS[args.clock]) for name in variants}
    spawn = multiprocessing.get_context("spawn")  # a fresh allocator and nothing shared per block
    for r in range(args.rounds):
        for name, (overrides, amp) in variants.items():
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                label = f"{preset} round {r + 1}/{args.rounds} {name}"
                seconds = pool.submit(run_block, preset, overrides, amp, args, label).result()
            for part, values in seconds.items():
                timers[name].seconds.setdefault(part, []).extend(values)
        print(f"  {preset} round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}", flush=True)
    return timers


def report(preset: str, timers: dict[str, StageTimer], clock: str) -> None:
    steps = {name: [sum(t.seconds[p][i] for p in STEP_PARTS) for i in range(len(t.seconds["forward"]))]
             for name, t in timers.items()}
    medians = {name: {part: timing_stats(t.seconds[part]).median for part in STEP_PARTS}
               for name, t in timers.items()}
    for name, m in medians.items():
        m["step"] = timing_stats(steps[name]).median  # the median step, not the sum of part medians
    parts = [*STEP_PARTS, "step"]
    base = medians["release"]
    print(f"\n{preset}: median {clock} ms (ratio to release), {len(steps['release'])} steps\n")
    print("| variant | " + " | ".join(parts) + " |")
    print("|---|" + "---|" * len(parts))
    for name, m in medians.items():
        cells = [f"{m[p]:.0f} ({m[p] / base[p]:.2f}x)" for p in parts]
        cells[-1] = f"**{cells[-1]}**"
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--size", type=parse_size, default=(512, 640), help="HEIGHTxWIDTH of every image")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="blocks per variant, the variants in turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch", type=int, default=0, help="0: GT-derived patches (teacher forcing)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time (a quiet machine) or the process's CPU time (a shared one)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="a subset of release, default, default-sysmem, fp32-cl / fp32-contig, bf16, "
                             "bf16-contig, bf16-heads (release is always timed: the ratios' reference)")
    parser.add_argument("--bf16", action="store_true",
                        help="time the bf16 variants even without native CPU bf16 (emulated; default: only "
                             "with it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; native bf16: {'yes' if cpu_supports_bf16() else 'no'}, AMX: "
          f"{'yes' if cpu_has_amx() else 'no'}; torch {torch.__version__}, {args.threads} threads, "
          f"{args.clock} clock; host memory controls: {'glibc' if glibc() else 'none (not glibc)'}")
    print(f"batch {args.batch}, {args.size[0]}x{args.size[1]}, epoch {args.epoch}; {args.rounds} rounds of "
          f"one process per variant: {args.warmup} warm-up + {args.repeats} timed steps; load average "
          f"{os.getloadavg()}")
    for preset in args.presets:
        report(preset, time_preset(preset, args), args.clock)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
