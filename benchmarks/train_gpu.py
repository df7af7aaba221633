"""Training throughput on a CUDA GPU: images/s of a training step (fp32, fp16 and bf16 autocast), of the
data loader alone, and the host syncs of one step counted by ``torch.cuda.set_sync_debug_mode``.

One command on a machine with a GPU (no data set needed: the synthetic one is generated into
``--data``; pass a COCO-format ``data.root`` through ``--data-overrides`` to time a real loader):

    python benchmarks/train_gpu.py [--preset asag_a_r50_1x_100q] [--batch 4] [--size 800x1216]
                                   [--steps 10] [--warmup 3] [--data runs/train-gpu-data]

* step: ``Trainer.train_step`` (``asag.build.build_trainer``, the preset's defaults: RoIAlign ``auto``
  = torchvision's on CUDA, channels-last, fused AdamW) on one random batch of ``--batch`` images of
  ``--size``, each precision round-robin, median of ``--steps`` timed steps after ``--warmup``;
* loader: ``asag.build.build_loader`` over the training split at the preset's ``data.num_workers``,
  images/s over ``--steps`` batches (decode + augmentation + collate, no model);
* syncs: one step of each precision under ``torch.cuda.set_sync_debug_mode("warn")`` (after a
  warm-up), warnings counted; the CPU-side audit by stage is ``count_step_syncs``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from asag.build import build_dataset, build_loader, build_trainer
from asag.commands.benchmark import parse_size
from asag.config import load_config
from asag.engine.benchmark import random_inputs
from asag.engine.syncs import CudaSyncCount
from asag.structures import ImageTargets

PRECISIONS = {"fp32": None, "fp16": "fp16", "bf16": "bf16"}


def random_targets(image_sizes: torch.Tensor, num_classes: int, per_image: int = 8) -> list[ImageTargets]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i, (h, w) in enumerate(image_sizes.tolist()):
        centres = torch.rand(per_image, 2, generator=g) * 0.6 + 0.2
        sides = torch.rand(per_image, 2, generator=g) * 0.4 + 0.05
        labels = torch.randint(0, num_classes, (per_image,), generator=g)
        out.append(ImageTargets(torch.cat([centres, sides], 1), labels, i, (h, w), (h, w)))
    return out


def time_steps(args: argparse.Namespace) -> None:
    inputs = random_inputs(args.batch, args.size, device="cuda", seed=1)
    trainers = {}
    for name, amp in PRECISIONS.items():
        cfg = load_config(args.preset, ["runtime.device=cuda"])
        cfg.model.backbone.weights = None
        torch.manual_seed(0)
        trainers[name] = build_trainer(cfg, device="cuda", amp=amp)
    targets = [t.to("cuda") for t in random_targets(inputs.image_sizes.cpu(), cfg.model.num_classes)]
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(args.warmup + args.steps):
        for name, trainer in trainers.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(inputs.images, inputs.image_sizes, targets, epoch=1)
            torch.cuda.synchronize()
            if r >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["fp32"])
    print(f"training step, {args.preset}, batch {args.batch}, {args.size[0]}x{args.size[1]}, "
          f"{torch.cuda.get_device_name()}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:>5}: {median * 1e3:8.1f} ms/step  {args.batch / median:7.2f} images/s  "
              f"({median / base:.2f}x fp32)")
    for name, trainer in trainers.items():
        syncs = count_cuda_syncs(trainer, inputs, targets)
        print(f"  syncs of one {name} step (set_sync_debug_mode): {syncs}")


def count_cuda_syncs(trainer, inputs, targets) -> int:
    with CudaSyncCount() as syncs:
        trainer.train_step(inputs.images, inputs.image_sizes, targets, epoch=1)
    return syncs.total


def time_loader(args: argparse.Namespace) -> None:
    overrides = [f"data.root={args.data}", "data.format=synthetic", f"data.batch_size={args.batch}",
                 *args.data_overrides]
    cfg = load_config(args.preset, overrides)
    loader = build_loader(build_dataset(cfg.data, "train"), cfg.data, train=True)
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    start, images = time.perf_counter(), 0
    for _ in range(args.steps):
        images += len(next(batches))
    seconds = time.perf_counter() - start
    print(f"data loader alone ({cfg.data.num_workers} workers, {cfg.data.format}): "
          f"{images / seconds:.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="asag_a_r50_1x_100q")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=parse_size, default=(800, 1216))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data", default="runs/train-gpu-data", help="synthetic data set folder")
    parser.add_argument("--data-overrides", nargs="*", default=[], metavar="key=value")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_gpu.py needs a CUDA device")
    time_steps(args)
    time_loader(args)


if __name__ == "__main__":
    main()
