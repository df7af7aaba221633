"""``asag data synth | stats | convert | convert-crowdhuman``: data set generation, statistics and
conversion."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from asag.config import field_option
from asag.errors import ConfigError, OutputError
from asag.outputs import check_output_dir, check_output_file, removed_if_unused


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

    formats = sub.add_parser("convert", help="convert a YOLO or Pascal VOC data set to COCO format")
    formats.add_argument("--from", dest="source_format", required=True, choices=SOURCE_FORMATS,
                         help="source format")
    formats.add_argument("src", help="yolo: a data.yaml, a folder holding one, or a folder with images/, "
                                     "labels/ and classes.txt (or obj.names); voc: the folder with "
                                     "Annotations/, JPEGImages/ and optionally ImageSets/Main/")
    formats.add_argument("--out", required=True,
                         help="output folder (annotations/{split}.json, images/{split}/)")
    formats.add_argument("--split", default=None,
                         help="name of the one split of a source without splits (default: train)")
    formats.add_argument("--classes", type=name_list, default=None, metavar="NAME,NAME,...",
                         help="voc: the class names in category-id order (default: the names in the XML "
                              "files, sorted)")
    formats.add_argument("--voc-difficult", choices=VOC_DIFFICULT_MODES, default=None,
                         help="voc: difficult objects as crowd regions that the evaluation ignores "
                              "(iscrowd 1), as ordinary boxes, or left out (default: crowd)")
    formats.add_argument("--copy-images", action="store_true",
                         help="copy the images (default: symbolic links to the source images)")
    formats.add_argument("--overwrite", action="store_true",
                         help="replace the files of these splits in --out")
    formats.set_defaults(func=run_convert)


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
    out, created = check_no_data_set(Path(args.out), overwrite=args.overwrite)
    start = time.perf_counter()
    try:
        paths = generate_synthetic(out, args.images, args.seed, args.val_images, classes=classes)
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

    check_output_file(args.out, "--out", overwrite=args.overwrite)
    summary = convert_crowdhuman(args.odgt, args.images, args.out)
    print(
        f"wrote {args.out}: {summary.images} images, {summary.boxes} person boxes, "
        f"{summary.ignore_regions} ignore regions"
    )
    return 0


SOURCE_FORMATS = ("yolo", "voc")
# = asag.data.formats.VOC_DIFFICULT_MODES (a test checks); importing it here would load torch at start-up
VOC_DIFFICULT_MODES = ("crowd", "keep", "skip")
VOC_ONLY_OPTIONS = (("classes", "--classes"), ("voc_difficult", "--voc-difficult"))


def run_convert(args: argparse.Namespace) -> int:
    """``asag data convert``: read the source, write the COCO data set, print its statistics and the
    ``asag train`` overrides that use it. The output folder is checked first; one this run created is
    removed again when the source turns out unusable."""
    from asag.data.formats import check_split_name, read_voc, read_yolo, train_overrides, write_coco_dataset
    from asag.data.stats import compute_stats, format_stats

    split = None if args.split is None else check_split_name(args.split, "--split")
    given = [option for attr, option in VOC_ONLY_OPTIONS if getattr(args, attr) is not None]
    if args.source_format == "yolo" and given:
        raise ConfigError(f"{', '.join(given)}: only for --from voc (YOLO class names come from the "
                          f"data.yaml or the names file)")
    created = not Path(args.out).exists()
    out = check_output_dir(args.out, "--out")
    with removed_if_unused(out, created):
        if args.source_format == "voc":
            source = read_voc(args.src, split, args.classes, args.voc_difficult or "crowd")
        else:
            source = read_yolo(args.src, split)
        paths = write_coco_dataset(source, out, copy_images=args.copy_images, overwrite=args.overwrite)
    how = "copies" if args.copy_images else "symbolic links"
    counts = ", ".join(f"{name} ({len(data.images)} images)" for name, data in source.splits.items())
    print(f"read {args.src} ({args.source_format}): {len(source.categories)} classes; splits {counts}")
    for note in source.notes:
        print(f"  {note}")
    splits = ",".join(paths.splits) if len(paths.splits) == 1 else "{" + ",".join(paths.splits) + "}"
    print(f"wrote {out / 'annotations' / splits}.json and {out / 'images' / splits} ({how})")
    for ann_file, _ in paths.splits.values():
        print(format_stats(compute_stats(ann_file)))
    overrides = " ".join(shlex.quote(o) for o in train_overrides(paths, len(source.categories)))
    print(f"train on it (PRESET: see `asag config list`):\n  asag train PRESET {overrides}")
    return 0
