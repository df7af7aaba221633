"""ASAG-A and ASAG-S (one decoder head) against torchvision's RetinaNet, FCOS and Faster R-CNN.

All models have ResNet-50-FPN backbones and random weights (nothing is downloaded), run in eval mode
under ``torch.inference_mode`` on the same image, with the same number of threads, interleaved
round-robin in one process so that a drifting machine hits all of them alike; each model's median
latency and its ratio to ASAG-A are printed.

* ASAG-A / ASAG-S: the speed presets (one head, 300-query setting), with the anchor generator's
  last-layer biases crafted as in ``crafting.py`` so that Adaptive Probing visits P4 and P3 (up to 500
  queries), as a trained model does on a crowded image; "random" rows show the same models with plain
  random weights, whose anchor generator never probes (spec Appendix C). Timed: ``model(images,
  image_sizes)`` + ``postprocess`` on a normalised, padded 800x1216 batch.
* torchvision detectors: ``retinanet_resnet50_fpn``, ``fcos_resnet50_fpn``, ``fasterrcnn_resnet50_fpn``
  with ``min_size=800, max_size=1216`` so that their built-in transform keeps the 800x1216 image at
  scale 1 (it still normalises and copies it; their timed call includes that and their own
  post-processing). Random heads score nearly every box below the 0.05 threshold (prior-probability
  bias), so their post-processing is light; Faster R-CNN always classifies its 1000 proposals.

    python benchmarks/compare_detectors.py [--size 800x1216] [--repeats 7] [--warmup 1] [--threads 2]
        [--device cpu|cuda] [--models ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from crafting import crafted_detector
from torch import Tensor
from torchvision.models.detection import fasterrcnn_resnet50_fpn, fcos_resnet50_fpn, retinanet_resnet50_fpn

from asag.commands.benchmark import parse_size
from asag.engine.benchmark import MS_PER_S, random_inputs, time_call, timing_stats

ASAG_PRESETS = {"ASAG-A": "asag_a_r50_speed", "ASAG-S": "asag_s_r50_speed"}
TORCHVISION = {"RetinaNet": retinanet_resnet50_fpn, "FCOS": fcos_resnet50_fpn,
               "Faster R-CNN": fasterrcnn_resnet50_fpn}
BASELINE = "ASAG-A"
Runner = Callable[[Tensor, Tensor], int]  # run(images, image_sizes) -> count per image


def asag_runner(preset: str, crafted: bool, device: torch.device) -> Runner:
    """``run(images, image_sizes) -> number of queries`` for an ASAG preset with random weights."""
    model = crafted_detector(preset, craft=crafted).to(device)

    def run(images: Tensor, sizes: Tensor) -> int:
        output = model(images, sizes)
        model.postprocess(output, sizes)
        return int(output.valid_mask.sum()) // len(images)

    return run


def torchvision_runner(builder, size: tuple[int, int], device: torch.device) -> Runner:
    """``run(images, image_sizes) -> number of detections`` for a torchvision detector (random weights)."""
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, min_size=size[0], max_size=size[1]).eval().to(device)

    def run(images: Tensor, sizes: Tensor) -> int:
        h, w = sizes[0].tolist()
        out = model(list(images[:, :, :h, :w]))
        return sum(len(o["scores"]) for o in out) // len(images)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = ["ASAG-A", "ASAG-S", "ASAG-A random", "ASAG-S random", *TORCHVISION]
    parser.add_argument("--models", nargs="+", choices=models, default=models)
    parser.add_argument("--size", default="800x1216", help="HxW of the image")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = parse_size(args.size)
    names = args.models if BASELINE in args.models else [BASELINE, *args.models]
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, size {args.size}, "
          f"batch {args.batch_size}, {args.repeats} interleaved rounds after {args.warmup} warm-up call(s)")

    runners = {}
    for name in names:
        if name in TORCHVISION:
            runners[name] = torchvision_runner(TORCHVISION[name], size, device)
        else:
            base = name.split()[0]
            runners[name] = asag_runner(ASAG_PRESETS[base], crafted="random" not in name, device=device)
    inputs = random_inputs(args.batch_size, size, device, seed=1)
    images, sizes = inputs.images, inputs.image_sizes

    times: dict[str, list[float]] = {name: [] for name in runners}
    counts: dict[str, int] = {}
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(args.warmup):
                time_call(partial(run, images, sizes), device)
        for _ in range(args.repeats):
            for name, run in runners.items():
                counts[name], seconds = time_call(partial(run, images, sizes), device)
                times[name].append(seconds)

    stats = {name: timing_stats(values) for name, values in times.items()}
    base = stats[BASELINE].median
    print(f"\n{'model':>14} {'median ms':>10} {'q1':>8} {'q3':>8} {'vs ASAG-A':>10} {'images/s':>9} "
          f"{'queries / dets':>15}")
    for name, t in stats.items():
        print(f"{name:>14} {t.median:>10.1f} {t.q1:>8.1f} {t.q3:>8.1f} {t.median / base:>10.2f} "
              f"{args.batch_size * MS_PER_S / t.median:>9.2f} {counts[name]:>15}")
    print("\nqueries / dets: ASAG queries per image (before post-processing); torchvision: detections "
          "per image after its score threshold")


if __name__ == "__main__":
    main()
