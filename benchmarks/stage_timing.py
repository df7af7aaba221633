"""Where the time goes: per-stage evaluation time of ASAG-A and ASAG-S R50 (one decoder head).

Both speed presets (``asag_a_r50_speed``, ``asag_s_r50_speed``: R50, 300-query setting, one head, as the
release measured speed) are built with random weights and crafted anchor-generator biases
(``crafting.py``) so that Adaptive Probing happens. Each round runs the forward of each model on the
same random image (``asag.engine.benchmark.run_stages``: module hooks time backbone, FPN, anchor
generator, proposal stage, decoder, post-processing), the two models interleaved so that drifts of a
shared machine hit both alike. Prints the median time of every stage,
its share of the sum of medians, the spread, and the queries / probed patches of the run.

The crafted generator emits ``max_anchors`` (500) anchors, far more than a trained 300-query model
(about 312 on COCO val, README model zoo); by default the proposal stage and the decoder therefore run
on 312 fixed queries (``--queries``; 0 keeps the generator's anchors). The generator itself always runs
and probes in full.

Then the anchor generator alone, on the same two models, at 512x512, 800x1216 and 1333x1333: the FPN
levels are computed once per size and the generator is timed on them (interleaved again).

    python benchmarks/stage_timing.py [--repeats 8] [--warmup 1] [--threads 2] [--size 800x1216]
                                      [--queries 312]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from crafting import crafted_detector

from asag.commands.benchmark import parse_size
from asag.engine.benchmark import (
    STAGES,
    StagedRun,
    StageTimer,
    count_patches,
    random_inputs,
    run_stages,
    timing_stats,
)

PRESETS = {"ASAG-A": "asag_a_r50_speed", "ASAG-S": "asag_s_r50_speed"}
AG_SIZES = [(512, 512), (800, 1216), (1333, 1333)]  # (h, w) of the unpadded images
MS_PER_S = 1e3
# Average query count of the 300-query R50 models on COCO val (README model zoo rows 4 and 7).
PAPER_QUERIES = 312


def time_stages(models: dict, size: tuple[int, int], warmup: int, repeats: int, queries: int | None
                ) -> tuple[dict[str, StageTimer], dict[str, StagedRun]]:
    """Per model, a :class:`StageTimer` holding ``repeats`` interleaved staged runs, and the last run."""
    inputs = random_inputs(1, size, seed=1)
    timers = {name: StageTimer(torch.device("cpu")) for name in models}
    runs = {}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                run_stages(model, inputs, num_queries=queries)
        for _ in range(repeats):
            for name, model in models.items():
                runs[name] = run_stages(model, inputs, probe=timers[name], num_queries=queries)
    return timers, runs


def print_stages(timers: dict[str, StageTimer], runs: dict[str, StagedRun], size: tuple[int, int]) -> None:
    print(f"\nper-stage time, batch 1, {size[0]}x{size[1]}, CPU fp32 (median ms, share of the sum of "
          f"medians, [min, max])")
    for name, run in runs.items():
        patches = count_patches(run.output.anchors, 1)
        stats = {stage: timing_stats(timers[name].seconds[stage]) for stage in STAGES}
        total = sum(s.median for s in stats.values())
        print(f"{name} ({PRESETS[name]}): anchor generator made {int(run.generated_queries.sum())} queries, "
              f"proposal stage and decoder ran {int(run.output.valid_mask.sum())}; probed patches "
              f"P4 {patches['P4']}, P3 {patches['P3']}; sum of medians {total:.0f} ms")
        for stage, s in stats.items():
            print(f"  {stage:>17} {s.median:>9.1f} ms {s.median / total:>6.1%}   [{s.min:.1f}, {s.max:.1f}]")


def time_anchor_generator(models: dict, warmup: int, repeats: int) -> None:
    print("\nanchor generator alone (eval, probing P4 and P3), median ms [min, max], same models")
    for size in AG_SIZES:
        inputs = random_inputs(1, size, seed=1)
        with torch.inference_mode():
            # [P3, P4, P5] of the FPN's [P2..P5]
            features = {name: m.extract_features(inputs.images)[1:4] for name, m in models.items()}
            calls = {name: partial(m.anchor_generator, features[name], inputs.image_sizes)
                     for name, m in models.items()}
            seconds = {name: [] for name in models}
            for _ in range(warmup):
                for fn in calls.values():
                    fn()
            for _ in range(repeats):
                for name, fn in calls.items():
                    start = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - start)
            outputs = {name: fn() for name, fn in calls.items()}
        for name, out in outputs.items():
            ms = [s * MS_PER_S for s in seconds[name]]
            patches = count_patches(out, 1)
            print(f"  {name} {size[0]:>5}x{size[1]:<5} {statistics.median(ms):>8.2f} ms "
                  f"[{min(ms):.2f}, {max(ms):.2f}]  P4 patches {patches['P4']:>3}, P3 patches "
                  f"{patches['P3']:>3}, queries {out.num_queries}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ag-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="800x1216", help="HxW of the per-stage timing")
    parser.add_argument("--queries", type=int, default=PAPER_QUERIES,
                        help="fixed queries of proposal stage and decoder (0: the generator's anchors)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds "
          f"after {args.warmup} warm-up")
    models = {name: crafted_detector(preset) for name, preset in PRESETS.items()}
    size = parse_size(args.size)
    timers, runs = time_stages(models, size, args.warmup, args.repeats, args.queries or None)
    print_stages(timers, runs, size)
    time_anchor_generator(models, warmup=2, repeats=args.ag_repeats)


if __name__ == "__main__":
    main()
