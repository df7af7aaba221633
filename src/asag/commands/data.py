"""``asag data synth | stats | convert-crowdhuman``: data set generation, statistics and conversion."""

from __future__ import annotations

import argparse
import time

from asag.config import field_option
from asag.outputs import check_output_dir, check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="generate, inspect and convert data sets")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = sub.add_parser("synth", help="write a synthetic COCO-format shapes data set")
    synth.add_argument("--out", required=True, help="output folder (train.json, val.json, images/)")
    synth.add_argument("--images", type=field_option("data.synthetic_train_images"), required=True,
                       help="number of training images")
    synth.add_argument("--seed", type=field_option("data.synthetic_seed"), default=0,
                       help="random seed (same seed, same bytes)")
    synth.add_argument("--val-images", type=field_option("data.synthetic_val_images"), default=None,
                       help="validation images (default: images / 4)")
    synth.add_argument("--classes", type=name_list, default=None, metavar="NAME,NAME,...",
                       help="shape classes, in category-id order (default: rectangle,ellipse,triangle,"
                            "cross,ring; the catalogue: --list-classes)")
    synth.add_argument("--list-classes", action=ListClassesAction,
                       help="print the catalogue of shape classes and exit")
    synth.set_defaults(func=run_synth)

    stats = sub.add_parser("stats", help="print statistics of a COCO JSON or of every JSON in a folder")
    stats.add_argument("path", help="COCO-format JSON file, or a folder of them")
    stats.set_defaults(func=run_stats)

    convert = sub.add_parser("convert-crowdhuman", help="convert CrowdHuman .odgt annotations to COCO JSON")
    convert.add_argument("--odgt", required=True, help="annotation_{train,val}.odgt")
    convert.add_argument("--images", required=True, help="folder holding <ID>.jpg")
    convert.add_argument("--out", required=True, help="COCO JSON to write")
    convert.set_defaults(func=run_convert_crowdhuman)


def name_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (the names are checked by the command)."""
    return [name.strip() for name in text.split(",")]


class ListClassesAction(argparse.Action):
    """``--list-classes``: print the shape catalogue and exit 0 (the other options are not required)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from asag.data.synthetic import format_catalogue

        print(format_catalogue())
        parser.exit()


def run_synth(args: argparse.Namespace) -> int:
    from asag.data.synthetic import check_classes, generate_synthetic

    classes = check_classes(args.classes, "--classes")
    check_output_dir(args.out, "--out")
    start = time.perf_counter()
    paths = generate_synthetic(args.out, args.images, args.seed, args.val_images, classes=classes)
    elapsed = time.perf_counter() - start
    print(f"wrote {paths.train_json}, {paths.val_json} and {paths.root / 'images'} in {elapsed:.1f} s")
    return run_stats(argparse.Namespace(path=str(paths.root)))


def run_stats(args: argparse.Namespace) -> int:
    from asag.data.stats import collect_stats, format_stats

    for stats in collect_stats(args.path):
        print(format_stats(stats))
    return 0


def run_convert_crowdhuman(args: argparse.Namespace) -> int:
    from asag.data.crowdhuman import convert_crowdhuman

    check_output_file(args.out, "--out")
    summary = convert_crowdhuman(args.odgt, args.images, args.out)
    print(
        f"wrote {args.out}: {summary.images} images, {summary.boxes} person boxes, "
        f"{summary.ignore_regions} ignore regions"
    )
    return 0
