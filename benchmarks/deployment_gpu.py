"""The static model with CUDA graphs on a GPU, against the dynamic ``--fast`` and plain paths and
torchvision's FCOS and Faster R-CNN, in one interleaved run; and the host-device syncs of the static
forward (must be 0).

Models: an R50 speed preset (default ``asag_a_r50_speed``: one head, 300-query setting) with random
weights, calibrated frozen-BN statistics and crafted anchor biases so that Adaptive Probing visits P4 and
P3 (``inference_speed.py``, ``crafting.py``); torchvision's detectors as in ``compare_detectors.py``.
Settings, per batch size (default 1 and 4), all on the same random 800x1216 batch:

* ``plain``: the dynamic model as built, ``model(...)`` + ``postprocess``;
* ``fast``: ``optimize_for_inference`` (``--fast``), dynamic;
* ``static fast``: the same, in static mode (``detect``);
* ``static fast + graph``: that model replayed from a CUDA graph (``--fast --static --cuda-graph``;
  the capture happens in the warm-up);
* ``FCOS``, ``Faster R-CNN``: torchvision, random weights.

Syncs: ``torch.cuda.set_sync_debug_mode("warn")`` warnings during one static forward + post-processing
after a warm-up call (the first call's lazy CUDA initialisation is not counted).

    python benchmarks/deployment_gpu.py [--batch-sizes 1 4] [--repeats 30] [--warmup 5] [--size 800x1216]
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch
from compare_detectors import TORCHVISION, torchvision_runner
from inference_speed import benchmark_model

from asag.commands.benchmark import parse_size
from asag.engine.benchmark import MS_PER_S, random_inputs, time_call, timing_stats
from asag.engine.cuda_graph import CudaGraphDetector
from asag.engine.syncs import CudaSyncCount
from asag.modeling.fast import optimize_for_inference

BASELINE = "FCOS"


def count_syncs(model, images, sizes) -> int:
    """Sync warnings of one ``detect`` call (after a warm-up call)."""
    with torch.no_grad():
        model.detect(images, sizes, sizes)
        torch.cuda.synchronize()
        with CudaSyncCount() as syncs:
            model.detect(images, sizes, sizes)
        torch.cuda.synchronize()
    return syncs.total


def runners(preset: str, size: tuple[int, int], device: torch.device) -> dict:
    model = benchmark_model(preset, [])
    plain = copy.deepcopy(model).to(device)
    fast = optimize_for_inference(model, device=device).to(device)
    static_fast = optimize_for_inference(model, device=device).to(device).set_static(True)
    graphs = CudaGraphDetector(static_fast)
    calls = {
        "plain": lambda x, s: plain.postprocess(plain(x, s), s),
        "fast": lambda x, s: fast.postprocess(fast(x, s), s),
        "static fast": lambda x, s: static_fast.detect(x, s, s),
        "static fast + graph": lambda x, s: graphs.detect(x, s, s),
    }
    for name in ("FCOS", "Faster R-CNN"):
        calls[name] = torchvision_runner(TORCHVISION[name], size, device)
    return calls, static_fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="asag_a_r50_speed")
    parser.add_argument("--size", default="800x1216")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("deployment_gpu.py needs a CUDA device")
    device = torch.device("cuda")
    size = parse_size(args.size)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.preset}, size {args.size}, "
          f"{args.repeats} interleaved rounds after {args.warmup} warm-up calls")
    calls, static_fast = runners(args.preset, size, device)
    for batch in args.batch_sizes:
        inputs = random_inputs(batch, size, device, seed=1)
        images, sizes = inputs.images, inputs.image_sizes
        print(f"\nbatch {batch}: host-device syncs of the static forward + post-processing: "
              f"{count_syncs(static_fast, images, sizes)} (must be 0)")
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.inference_mode():
            for call in calls.values():
                for _ in range(args.warmup):
                    time_call(partial(call, images, sizes), device)
            for _ in range(args.repeats):
                for name, call in calls.items():
                    times[name].append(time_call(partial(call, images, sizes), device)[1])
        stats = {name: timing_stats(values) for name, values in times.items()}
        base = stats[BASELINE].median
        print(f"{'setting':>20} {'FPS / FCOS':>11} {'FPS':>8} {'median ms':>10} {'q1':>7} {'q3':>7}")
        for name, t in stats.items():
            fps = batch * MS_PER_S / t.median
            print(f"{name:>20} {base / t.median:>11.2f} {fps:>8.1f} {t.median:>10.2f} {t.q1:>7.2f} "
                  f"{t.q3:>7.2f}")


if __name__ == "__main__":
    main()
