"""``asag eval CHECKPOINT``: COCO metrics of a checkpoint on a COCO-format data set."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from asag.api import load_model, resolve_device
from asag.build import build_dataset, build_loader, check_num_classes
from asag.engine.distributed import cleanup_distributed, init_distributed, is_main_process
from asag.engine.evaluator import evaluate


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint (COCO AP via pycocotools)")
    parser.add_argument("checkpoint", help="checkpoint written by asag train or asag convert")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.root=/data/coco data.val_batch_size=4")
    parser.add_argument("--data", metavar="ROOT", help="shortcut for data.root=ROOT")
    parser.add_argument("--used-head", help="head to evaluate: main or aux_k")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"], help="probing depth")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    parser.add_argument("--per-class", action="store_true", help="also report AP per class")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", metavar="DIR", default=".", help="where results JSON and metrics go")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.batch_size:
        overrides.append(f"data.val_batch_size={args.batch_size}")
    device = resolve_device(args.device)
    dist = init_distributed(device.type)
    try:
        model, cfg, label_map = load_model(args.checkpoint, used_head=args.used_head,
                                           inference_level=args.inference_level, overrides=overrides)
        device = dist.device if dist.distributed else device
        dataset = build_dataset(cfg.data, "val")
        check_num_classes(cfg.model, dataset.label_map, str(dataset.ann_file))
        out = Path(args.out)
        loader = build_loader(dataset, cfg.data, train=False)
        result = evaluate(model.to(device), loader, coco_gt=dataset.coco, label_map=label_map, device=device,
                          results_json=out / "results.json", per_class=args.per_class)
    finally:
        cleanup_distributed()
    if is_main_process():
        print(result.summary)
        print(format_result(result))
        (out / "metrics.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
        print(f"detections: {out / 'results.json'}; metrics: {out / 'metrics.json'}")
    return 0


def format_result(result) -> str:
    lines = [f"AP {result.ap:.4f}  AP50 {result.ap50:.4f}  AP75 {result.ap75:.4f}  "
             f"APs {result.aps:.4f}  APm {result.apm:.4f}  APl {result.apl:.4f}",
             f"{result.num_images} images, {result.images_per_second:.2f} images/s"]
    if result.mean_queries is not None:
        lines.append(f"mean queries per image {result.mean_queries:.1f}")
    if result.mean_patches:
        lines.append("mean probed patches per image: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in result.mean_patches.items()))
    if result.per_class_ap:
        lines += [f"  {name:24s} {ap:.4f}" for name, ap in result.per_class_ap.items()]
    return "\n".join(lines)
