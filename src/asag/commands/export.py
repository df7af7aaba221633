"""``asag export CHECKPOINT --format onnx|pt2 --size HxW [--batch-size B] --out FILE [--overwrite]``: the
static model with post-processing, for ONNX Runtime or ``torch.export.load`` (input / output contract:
docs/inference.md).

The options and ``--out`` are checked before the model loads: an existing ``--out`` is refused unless
``--overwrite``, as are a folder, an unwritable place and a size over the limit
(:func:`asag.export.check_export_size`). The file is written atomically: a failure or Ctrl-C leaves the
earlier file (or none), never a truncated one."""

from __future__ import annotations

import argparse
import time

from asag.api import load_model
from asag.commands.benchmark import parse_size
from asag.errors import ConfigError
from asag.export import EXPORT_FORMATS, check_export_size, export_model, format_of
from asag.outputs import check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export the static model to ONNX or torch.export (.pt2)")
    parser.add_argument("checkpoint", help="checkpoint written by asag train or asag convert")
    parser.add_argument("--format", choices=EXPORT_FORMATS, help="default: from the suffix of --out")
    parser.add_argument("--size", required=True,
                        help="fixed padded input HEIGHTxWIDTH, multiples of 32 (e.g. 800x1216 or 1344x1344)")
    parser.add_argument("--batch-size", type=int, default=1, help="fixed batch size of the exported graph")
    parser.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (default: refuse)")
    parser.add_argument("--fast", action="store_true", help="fold the backbone's batch norms first")
    parser.add_argument("--used-head", help="head to export: main or aux_k (default: the checkpoint's)")
    parser.add_argument("--inference-level", choices=["P3P6", "P4P6", "P5P6"],
                        help="probing depth (default: the checkpoint's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fmt = args.format or format_of(args.out)
    if format_of(args.out) != fmt:
        raise ConfigError(f"--out {args.out}: the suffix does not match --format {fmt}")
    size = parse_size(args.size)
    check_export_size(size, args.batch_size)
    check_output_file(args.out, "--out", overwrite=args.overwrite)
    model, cfg, label_map = load_model(args.checkpoint, used_head=args.used_head,
                                       inference_level=args.inference_level)
    model.set_static(True)
    if args.fast:
        from asag.modeling.fast import fold_batch_norms

        fold_batch_norms(model.backbone)
    start = time.perf_counter()
    out = export_model(model, cfg, label_map, args.out, size=size, batch_size=args.batch_size, fmt=fmt)
    print(f"exported {args.checkpoint} ({fmt}, batch {args.batch_size}, {size[0]}x{size[1]}) -> {out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0
