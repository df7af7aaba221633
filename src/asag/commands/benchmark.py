"""``asag benchmark PRESET|CHECKPOINT``: latency, FPS, per-stage times, FLOPs, parameters, memory, and
(with ``--data``) queries, probed patches and anchor / proposal recall over a data set."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from asag.api import load_model, resolve_device
from asag.build import build_dataset, build_loader, build_model
from asag.config import NON_NEGATIVE, POSITIVE, Config, field_option, load_config, option_type
from asag.engine.benchmark import (
    BenchmarkSettings,
    benchmark,
    craft_probing_biases,
    format_result,
    scan_dataset,
)
from asag.engine.host_memory import configure_host_memory
from asag.engine.recall import format_recall
from asag.engine.trainer import autocast_context, check_amp
from asag.errors import ConfigError
from asag.modeling.detector import ASAG
from asag.modeling.fast import add_inference_arguments, optimize_for_inference
from asag.outputs import atomic_write_text, check_output_file

PRESET_SUFFIXES = (".yaml", ".yml")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="measure latency, FLOPs, memory, queries and recall",
        description="Time a preset (random weights) or a checkpoint on random images; optionally scan a "
                    "data set for queries, probed patches and anchor/proposal recall.",
    )
    parser.add_argument("target", metavar="PRESET|CHECKPOINT", help="preset name, YAML file or checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--size", default="800x1216", help="input size HxW of the timed images")
    parser.add_argument("--batch-size", type=option_type(int, POSITIVE), default=1,
                        help="images per timed run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--warmup", type=option_type(int, NON_NEGATIVE), default=2, help="untimed runs first")
    parser.add_argument("--repeats", type=option_type(int, POSITIVE), default=10, help="timed runs")
    parser.add_argument("--threads", type=field_option("runtime.num_threads"),
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--amp", choices=["fp16", "bf16"],
                        help="autocast backbone and FPN (default: float32)")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"],
                        help="probing depth (default: the stored or preset inference_level)")
    parser.add_argument("--queries", type=option_type(int, POSITIVE), metavar="N",
                        help="run proposal stage and decoder with N fixed queries per image (default: the "
                             "queries the anchor generator makes)")
    parser.add_argument("--craft", action=argparse.BooleanOptionalAction, default=None,
                        help="craft anchor-generator biases so that probing happens on random inputs "
                             "(default: on for presets, off for checkpoints)")
    parser.add_argument("--seed", type=field_option("runtime.seed"), default=0,
                        help="seed of a preset's random weights and crafting")
    add_inference_arguments(parser)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON (default: print only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json file (default: refuse)")
    parser.add_argument("--data", metavar="ROOT", help="data set root (data.root) to scan (default: no scan; "
                                                       "with --static: also how often a budget bound)")
    parser.add_argument("--max-images", type=option_type(int, POSITIVE), metavar="N",
                        help="images of the data set to scan (default: all)")
    parser.add_argument("--recall", action="store_true",
                        help="with --data: anchor and proposal AR@100/300/1000")
    parser.set_defaults(func=run)


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1216"`` -> ``(800, 1216)`` (height x width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 800x1216")
    return int(parts[0]), int(parts[1])


def is_checkpoint(target: str) -> bool:
    path = Path(target)
    return path.is_file() and path.suffix not in PRESET_SUFFIXES


def load_target(target: str, overrides: list[str], seed: int = 0) -> tuple[ASAG, Config]:
    """A checkpoint's trained model, or a preset's randomly initialised model (seeded, no backbone
    weights)."""
    if is_checkpoint(target):
        model, cfg, _ = load_model(target, overrides=overrides)
        return model, cfg
    cfg = load_config(target, overrides)
    cfg.model.backbone.weights = None  # timing does not need ImageNet weights
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "repeats", "queries", "max_images", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.recall and not args.data:
        raise ConfigError("--recall needs a data set: add --data ROOT")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    size = parse_size(args.size)
    device = resolve_device(args.device)
    check_amp(args.amp, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    host_memory = configure_host_memory(args.host_memory, device)
    print(host_memory.line())
    overrides = list(args.overrides) + ([f"data.root={args.data}"] if args.data else [])
    model, cfg = load_target(args.target, overrides, args.seed)
    crafted = args.craft if args.craft is not None else not is_checkpoint(args.target)
    if crafted:
        craft_probing_biases(model.anchor_generator, args.seed)
    if args.static:
        model.eval().set_static(True)
    if args.fast or args.compile or args.precision != "fp32":
        model = optimize_for_inference(model.to(device), fold_bn=args.fast, channels_last=args.fast,
                                       compile=args.compile, dtype=args.precision)
        print(f"inference-optimised model: {model.inference_settings}")
    amp_context = functools.partial(autocast_context, device, args.amp)
    settings = BenchmarkSettings(size=size, batch_size=args.batch_size, warmup=args.warmup,
                                 repeats=args.repeats, inference_level=args.inference_level,
                                 num_queries=args.queries, amp=args.amp, count_flops=not args.no_flops,
                                 seed=args.seed)
    result = benchmark(model, settings, device=device, name=args.target, crafted=crafted,
                       amp_context=amp_context)
    if args.data:
        cfg.data.val_batch_size = args.batch_size
        dataset = build_dataset(cfg.data, "val")
        loader = build_loader(dataset, cfg.data, train=False)
        result.dataset = scan_dataset(model, loader, device, max_images=args.max_images,
                                      inference_level=args.inference_level, recall=args.recall,
                                      amp_context=amp_context)
    print(format_result(result))
    if result.dataset is not None and result.dataset.recall is not None:
        print(format_recall(result.dataset.recall))
    if args.json:
        out = atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2))
        print(f"results: {out}")
    return 0
