"""How many patches and anchors the dynamic mode really uses: the measurements behind the static
mode's default budgets (``model.anchor_generator.static_patches_per_level`` and ``max_anchors``).

Runs the dynamic model and records, per image, the patches kept by the patch NMS at P4 and P3 and the
anchors chosen for output before the ``max_anchors`` cap; prints their distribution and, for a few
candidate budgets, the share of images where that budget would bind (the static mode then keeps the
highest-ranked patches, i.e. the first ones of the NMS, as the dynamic mode's
``max_patches_per_level`` does).

    python benchmarks/static_budgets.py CHECKPOINT [--data ROOT]          # a trained model, its val split
    python benchmarks/static_budgets.py asag_a_r50_speed --size 800x1216  # crafted random weights/images
"""

from __future__ import annotations

import argparse
import statistics

import torch
from crafting import crafted_detector

from asag.api import load_model
from asag.build import build_dataset, build_loader
from asag.commands.benchmark import is_checkpoint, parse_size
from asag.engine.benchmark import random_inputs
from asag.modeling.anchor_generator import PROBE_ORDER

CANDIDATE_BUDGETS = (5, 10, 15, 20, 30)
PERCENTILES = (50, 90, 99)


def per_image_counts(model, images, sizes) -> list[dict[str, int]]:
    """Per image: probed patches per level and anchors chosen before the cap (dynamic mode)."""
    with torch.inference_mode():
        out = model(images, sizes).anchors
    counts = [{name: 0 for _, _, name in PROBE_ORDER} for _ in range(len(images))]
    for prediction in out.patch_predictions:
        if prediction.level in counts[0]:
            for b in prediction.batch_idx.tolist():
                counts[b][prediction.level] += 1
    for b, stages in enumerate(out.selected):
        counts[b]["anchors"] = sum(len(s) for s in stages)
    return counts


def dataset_counts(target: str, data: str | None, max_images: int | None) -> list[dict[str, int]]:
    overrides = [f"data.root={data}"] if data else []
    model, cfg, _ = load_model(target, overrides=overrides)
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False)
    counts: list[dict[str, int]] = []
    for batch in loader:
        counts += per_image_counts(model, batch.images, batch.image_sizes)
        if max_images is not None and len(counts) >= max_images:
            break
    return counts[:max_images]


def random_counts(preset: str, size: tuple[int, int], images: int) -> list[dict[str, int]]:
    model = crafted_detector(preset)
    counts: list[dict[str, int]] = []
    for seed in range(images):
        inputs = random_inputs(1, size, "cpu", seed=seed)
        counts += per_image_counts(model, inputs.images, inputs.image_sizes)
    return counts


def report(counts: list[dict[str, int]], max_anchors: int | None) -> None:
    print(f"{len(counts)} images")
    for key in counts[0]:
        values = sorted(c[key] for c in counts)
        cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
        summary = ", ".join(f"p{p} {cuts[p - 1]:.0f}" for p in PERCENTILES)
        print(f"{key:>8}: mean {statistics.fmean(values):.2f}, {summary}, max {values[-1]}")
        budgets = (max_anchors,) if key == "anchors" and max_anchors else CANDIDATE_BUDGETS
        if key != "anchors" or max_anchors:
            print("          would bind at budget " + ", ".join(
                f"{b}: {sum(v > b for v in values) / len(values):.1%}" for b in budgets))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="checkpoint (its val split) or preset (crafted, random images)")
    parser.add_argument("--data", help="data.root of the checkpoint's data set")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--size", default="800x1216", help="HxW of the random images (preset)")
    parser.add_argument("--images", type=int, default=8, help="random images (preset)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if is_checkpoint(args.target):
        counts = dataset_counts(args.target, args.data, args.max_images)
        max_anchors = load_model(args.target)[1].model.anchor_generator.max_anchors
    else:
        counts = random_counts(args.target, parse_size(args.size), args.images)
        max_anchors = None
    report(counts, max_anchors)


if __name__ == "__main__":
    main()
