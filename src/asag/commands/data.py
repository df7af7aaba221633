"""``asag data synth | stats | convert-crowdhuman``: data set generation, statistics and conversion."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from asag.config import field_option
from asag.errors import OutputError
from asag.outputs import check_new_file, check_output_dir


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
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a data set already in --out (its JSON files and images are removed "
                            "first; default: refuse)")
    synth.set_defaults(func=run_synth)

    stats = sub.add_parser("stats", help="print statistics of a COCO JSON or of every JSON in a folder")
    stats.add_argument("path", help="COCO-format JSON file, or a folder of them")
    stats.set_defaults(func=run_stats)

    convert = sub.add_parser("convert-crowdhuman", help="convert CrowdHuman .odgt annotations to COCO JSON")
    convert.add_argument("--odgt", required=True, help="annotation_{train,val}.odgt")
    convert.add_argument("--images", required=True, help="folder holding <ID>.jpg")
    convert.add_argument("--out", required=True, help="COCO JSON to write")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an existing --out (default: refuse)")
    convert.set_defaults(func=run_convert_crowdhuman)


def run_synth(args: argparse.Namespace) -> int:
    from asag.data.synthetic import generate_synthetic

    out, created = check_no_data_set(Path(args.out), overwrite=args.overwrite)
    start = time.perf_counter()
    try:
        paths = generate_synthetic(out, args.images, args.seed, args.val_images)
    except BaseException:  # interrupted or failed: no partial data set is left behind
        remove_data_set(out, created)
        raise
    elapsed = time.perf_counter() - start
    print(f"wrote {paths.train_json}, {paths.val_json} and {paths.root / 'images'} in {elapsed:.1f} s")
    return run_stats(argparse.Namespace(path=str(paths.root)))


def check_no_data_set(out: Path, *, overwrite: bool) -> tuple[Path, bool]:
    """Check the folder of ``asag data synth`` before anything is generated: one that already holds files
    of a synthetic data set is refused unless ``overwrite``, which removes them first (other files stay).
    Returns ``(folder, created)``, ``created`` telling whether this run made the folder."""
    from asag.data.synthetic import synthetic_files

    found = synthetic_files(out)
    if found and not overwrite:
        images = sum(p.suffix == ".png" for p in found)
        names = [p.name for p in found if p.suffix != ".png"] + ([f"{images} images"] if images else [])
        raise OutputError(f"--out {out} already holds a data set ({', '.join(names)}); pass --overwrite to "
                          f"replace it or choose another --out")
    created = not out.exists()
    check_output_dir(out, "--out")
    if found:
        remove_data_set(out, created=False)
    return out, created


def remove_data_set(out: Path, created: bool) -> None:
    """Remove the synthetic data set files under ``out`` and the image folders they leave empty (``out``
    itself too when ``created`` and empty)."""
    from asag.data.synthetic import synthetic_files, synthetic_paths

    for path in synthetic_files(out):
        path.unlink(missing_ok=True)
    paths = synthetic_paths(out)
    folders = (paths.train_images, paths.val_images, paths.train_images.parent, *([out] if created else []))
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def run_stats(args: argparse.Namespace) -> int:
    from asag.data.stats import collect_stats, format_stats

    for stats in collect_stats(args.path):
        print(format_stats(stats))
    return 0


def run_convert_crowdhuman(args: argparse.Namespace) -> int:
    from asag.data.crowdhuman import convert_crowdhuman

    check_new_file(args.out, "--out", overwrite=args.overwrite)
    summary = convert_crowdhuman(args.odgt, args.images, args.out)
    print(
        f"wrote {args.out}: {summary.images} images, {summary.boxes} person boxes, "
        f"{summary.ignore_regions} ignore regions"
    )
    return 0
