"""How the anchor generator's evaluation cost scales with the image size.

Full-width model (d = 256, compress_dim 8, 1000-wide MLPs) with the official initialisation, except
for the biases of the two last linears (``proj_all.layers.2``, ``proj_patch.layers.2``), which are
crafted the way the official fixtures were: every anchor slot gets a role (refinement candidate,
confident, low, tiny, large) through its (cx, cy, w, h, confidence) logits, so Adaptive Probing really
runs (see ``crafting.py``). The same crafted model and the same role layout are used at every size;
FPN levels are random.

For each size the script times ``P5P6`` (no probing; the baseline), ``P4P6`` and ``P3P6`` in eval mode
under ``torch.no_grad`` and prints the median (and minimum) time, the median's ratio to the
baseline, the number of probed patches per level and the number of output queries.

    python benchmarks/anchor_generator_scaling.py [--repeats 15] [--threads 2] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from crafting import crafted_anchor_generator

SIZES = [(512, 512), (800, 1216), (1333, 1333)]  # (h, w) of the unpadded images
LEVELS = ["P5P6", "P4P6", "P3P6"]
STRIDES = (8, 16, 32)
PAD_MULTIPLE = 32  # the collate pads to a multiple of 32 (spec section 0)


def fpn_levels(size: tuple[int, int], batch: int, channels: int, seed: int) -> list[torch.Tensor]:
    """Random P3, P4, P5 of a batch padded to a multiple of 32."""
    generator = torch.Generator().manual_seed(seed)
    hp, wp = (-(-s // PAD_MULTIPLE) * PAD_MULTIPLE for s in size)
    return [torch.randn(batch, channels, hp // s, wp // s, generator=generator) for s in STRIDES]


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, tuple[float, float]]:
    """Median and minimum milliseconds of each call, timed round-robin so that drifts of a shared
    machine hit all calls alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = crafted_anchor_generator()
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"median of {args.repeats} interleaved rounds")
    print(f"{'size (h x w)':>14} {'level':>6} {'median ms':>10} {'min ms':>8} {'vs P5P6':>8} "
          f"{'P4 patches':>11} {'P3 patches':>11} {'queries':>8}")
    for size in SIZES:
        features = fpn_levels(size, args.batch, 256, seed=1)
        image_sizes = torch.tensor([size] * args.batch)
        calls = {level: partial(model, features, image_sizes, inference_level=level) for level in LEVELS}
        with torch.no_grad():
            medians = time_interleaved(calls, args.repeats)
            outputs = {level: fn() for level, fn in calls.items()}
        for level in LEVELS:
            out = outputs[level]
            counts = {p.level: len(p.batch_idx) for p in out.patch_predictions[2:]}
            ms, best = medians[level]
            ratio = ms / medians[LEVELS[0]][0]
            print(f"{size[0]:>6} x {size[1]:<5} {level:>6} {ms:>10.2f} {best:>8.2f} {ratio:>8.2f} "
                  f"{counts.get('P4', 0):>11} {counts.get('P3', 0):>11} {out.num_queries:>8}")

if __name__ == "__main__":
    main()
