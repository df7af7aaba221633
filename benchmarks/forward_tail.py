"""The data-dependent part of the forward: everything after the FPN (anchor generator, query
preparation, proposal stage, decoder heads) plus post-processing, on fixed FPN levels.

The backbone and FPN take most of a CPU forward and are noisy on a shared machine; this script times
only the rest, for ``--fast`` and ``--fast --static`` copies of the crafted speed presets
(``crafting.py``: Adaptive Probing happens), interleaved round-robin in one process. The anchor
generator's share comes from module hooks inside the same calls. To compare two versions of the code,
run the script alternately with ``PYTHONPATH`` pointing at each tree's ``src`` (docs/performance.md,
"One implementation per step: before / after").

    python benchmarks/forward_tail.py [--models ASAG-A ASAG-S] [--size 800x1216] [--repeats 15]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from crafting import crafted_detector

from asag.commands.benchmark import parse_size
from asag.engine.benchmark import random_inputs
from asag.modeling.fast import optimize_for_inference

PRESETS = {"ASAG-A": "asag_a_r50_speed", "ASAG-S": "asag_s_r50_speed"}
WARMUP = 2
MS_PER_S = 1e3


def time_tails(preset: str, size: tuple[int, int], repeats: int) -> dict[str, list[float]]:
    """``setting part -> ms`` per round for the ``fast`` and ``fast_static`` copies of ``preset``."""
    model = crafted_detector(preset, [])
    models = {"fast": optimize_for_inference(model),
              "fast_static": optimize_for_inference(copy.deepcopy(model).set_static(True))}
    inputs = random_inputs(1, size, seed=1)
    times: dict[str, list[float]] = {f"{s} {p}": [] for s in models for p in ("tail", "anchor generator")}
    marks: dict[str, float] = {}

    def mark(name: str):
        return lambda *_: marks.__setitem__(name, time.perf_counter())

    for m in models.values():
        m.anchor_generator.register_forward_pre_hook(mark("start"))
        m.anchor_generator.register_forward_hook(mark("end"))
    with torch.inference_mode():
        features = models["fast"].extract_features(inputs.images, inputs.image_sizes)
        for round_ in range(WARMUP + repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m.postprocess(m.forward_features(features, inputs.image_sizes), inputs.orig_sizes)
                if round_ >= WARMUP:
                    times[f"{name} tail"].append((time.perf_counter() - start) * MS_PER_S)
                    times[f"{name} anchor generator"].append((marks["end"] - marks["start"]) * MS_PER_S)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--size", default="800x1216", help="HxW of the random image")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size}, {args.repeats} rounds")
    for name in args.models:
        for part, ms in time_tails(PRESETS[name], parse_size(args.size), args.repeats).items():
            q1, _, q3 = statistics.quantiles(ms, n=4)
            print(f"{name} {part:>28}: median {statistics.median(ms):8.1f} ms (q1 {q1:.1f}, q3 {q3:.1f})")


if __name__ == "__main__":
    main()
