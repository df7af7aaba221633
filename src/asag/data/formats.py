"""YOLO text labels and Pascal VOC XML -> COCO-format data sets (``asag data convert``).

Each reader is a pure function of the source folder returning a :class:`DetectionSource` (class names,
and per split the images and their boxes as 0-based COCO ``[x, y, w, h]`` pixels);
:func:`write_coco_dataset` writes any of them in one layout::

    OUT/annotations/{split}.json    COCO JSON, category ids 1..N in class order, image ids 1..I
    OUT/images/{split}/...          the images: symbolic links to the sources (default) or copies

Image sizes come from the image headers (no pixel decoding) with the EXIF orientation applied, the frame
labelling tools show; :class:`asag.data.coco.CocoDetection` reads the images in that frame. Boxes reaching
outside their image are clipped to it (the readers count them); an image without a label file, or without
objects, is kept as an image without boxes. Every problem of the source raises :class:`DataError` naming
the file (and for YOLO labels the line).

**YOLO** (``class cx cy w h`` per line, normalised to [0, 1], class indices 0-based), two layouts:

* a ``data.yaml`` (the file, or a folder holding it) with ``names`` (a list, or a ``{index: name}``
  mapping with indices 0..N-1), optionally ``nc`` (must equal the number of names), ``path`` (the data
  set root, relative to the YAML's folder; default that folder) and splits ``train`` / ``val`` / ``test``:
  each an image folder (searched recursively), a text file listing image paths (relative ones resolved
  against the list's folder), or a list of those. A relative split path starting with ``../`` that does
  not exist is also tried without it (the layout of Roboflow exports).
* a folder with ``images/``, ``labels/`` and a names file (``classes.txt`` or ``obj.names`` in the folder,
  or ``labels/classes.txt``; one name per line): the subfolders of ``images/`` are the splits (one split,
  named by ``split``, when ``images/`` holds image files itself).

The label file of ``.../images/.../x.jpg`` is ``.../labels/.../x.txt`` (the last ``images`` folder of the
path replaced by ``labels``); for an image path without an ``images`` folder, ``x.txt`` next to the image.
A line with more than 5 columns and an odd count of at least 7 is a segmentation polygon ``class x1 y1 x2
y2 ...``: its bounding box becomes the box. Values may exceed [0, 1] by :data:`NORMALISED_TOLERANCE`.
Label files for which no image exists are refused (a wrong image extension, say, would otherwise lose
their boxes).

**Pascal VOC** (``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main/{train, val, trainval,
test}.txt``; without those files every XML is in one split named by ``split``): VOC boxes are 1-based
inclusive pixel indices, so ``x = xmin - 1``, ``w = xmax - xmin + 1`` (likewise y, h), the VOC devkit's
convention. The class names are the objects' names across the converted XML files, sorted, unless
``classes`` fixes them and their order. ``difficult`` objects follow :data:`VOC_DIFFICULT_MODES`:
``crowd`` (default) writes them with ``iscrowd: 1``, regions the COCO evaluation ignores, as the VOC
evaluation ignores difficult objects; ``keep`` writes them as ordinary boxes; ``skip`` leaves them out.
The XML's ``<size>``, when given, must be the image's size (stored or EXIF-oriented; its boxes are in
that frame).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from asag.data.image import read_image_header
from asag.errors import ConfigError, DataError, OutputError
from asag.outputs import atomic_write_text, check_new_files, check_output_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_SUFFIX_LIST = "/".join(suffix[1:] for suffix in IMAGE_SUFFIXES)  # for messages: "jpg/jpeg/png/..."
DEFAULT_SPLIT = "train"
# How far a normalised YOLO value may lie outside [0, 1] (rounding of labelling tools).
NORMALISED_TOLERANCE = 1e-3
YOLO_BOX_COLUMNS = 5  # class cx cy w h
YOLO_SPLIT_KEYS = ("train", "val", "test")
YOLO_YAML_NAMES = ("data.yaml", "data.yml")
LABELIMG_NAMES_FILE = "classes.txt"
YOLO_NAMES_FILES = ("classes.txt", "obj.names", "labels/classes.txt")
VOC_SPLITS = ("train", "val", "trainval", "test")
VOC_DIFFICULT_MODES = ("crowd", "keep", "skip")
# The splits `asag train` uses, by preference (train: first present; val: first present).
TRAIN_SPLITS = ("train", "trainval")
VAL_SPLITS = ("val", "valid", "test")
_MAX_LISTED = 3


# --------------------------------------------------------------------------------------- container


@dataclass(frozen=True)
class SourceImage:
    """One image: its file, its name under the split's output image folder (``/``-separated, relative)
    and its size in pixels (EXIF orientation applied unless a VOC ``<size>`` says otherwise)."""

    path: Path
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class SourceBox:
    """One object: ``image`` its position in the split's images, ``category`` its 0-based class index,
    ``bbox`` COCO ``(x, y, w, h)`` in 0-based pixels inside the image, ``iscrowd`` an ignore region."""

    image: int
    category: int
    bbox: tuple[float, float, float, float]
    iscrowd: bool = False


@dataclass
class SplitData:
    """The images of one split and their boxes."""

    images: list[SourceImage] = field(default_factory=list)
    boxes: list[SourceBox] = field(default_factory=list)


@dataclass
class DetectionSource:
    """A data set read from a source format.

    categories: class names; category id ``i + 1`` is ``categories[i]``.
    splits: split name -> its data, in the source's order.
    notes: what the conversion changed or decided, one line each (printed by ``asag data convert``).
    """

    categories: tuple[str, ...]
    splits: dict[str, SplitData]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- shared helpers


def _listed(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (", ..." if len(items) > _MAX_LISTED else "")


def check_class_names(names: Sequence[Any], source: str) -> tuple[str, ...]:
    """Class names as stripped strings; refuses an empty list, empty names and repeated names."""
    cleaned = tuple(str(name).strip() for name in names)
    if not cleaned:
        raise DataError(f"{source}: no class names")
    if "" in cleaned:
        raise DataError(f"{source}: class {cleaned.index('')} has an empty name")
    repeated = sorted({name for name in cleaned if cleaned.count(name) > 1})
    if repeated:
        raise DataError(f"{source}: repeated class names {_listed(repeated)}")
    return cleaned


def check_split_name(name: str, option: str) -> str:
    """A split name usable as a file name (``annotations/{name}.json``)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"{option} {name!r}: a split name must be a plain file name such as 'train'")
    return name


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem.<ext>`` for the first image suffix that exists (any case of the suffix)."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def clip_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int,
             where: str) -> tuple[tuple[float, float, float, float], bool]:
    """Corner coordinates in 0-based pixels -> COCO ``(x, y, w, h)`` clipped to ``width`` x ``height``,
    and whether clipping changed it. Raises :class:`DataError` (``where`` names the culprit) when nothing
    of the box lies inside the image."""
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        raise DataError(f"{where}: the box ({x1:g}, {y1:g}) - ({x2:g}, {y2:g}) lies outside the "
                        f"{width}x{height} image")
    return (cx1, cy1, cx2 - cx1, cy2 - cy1), (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)


def _clip_note(count: int) -> list[str]:
    return [f"{count} boxes reaching outside their image were clipped to it"] if count else []


def _relative_name(path: Path, base: Path, where: str) -> str:
    """``path`` relative to ``base`` (``/``-separated), the image's output name."""
    try:
        relative = path.relative_to(base)
    except ValueError:
        relative = None
    if relative is None or ".." in relative.parts:
        raise DataError(f"{where}: image {path} lies outside {base}")
    return relative.as_posix()


def _add_image(split: SplitData, image: SourceImage, seen: dict[str, Path], where: str) -> int:
    """Append ``image`` and return its position; refuses two files with one output name."""
    if image.file_name in seen and seen[image.file_name] == image.path:
        raise DataError(f"{where}: image {image.path} is listed twice")
    if image.file_name in seen:
        raise DataError(f"{where}: images {seen[image.file_name]} and {image.path} would both be written as "
                        f"{image.file_name}")
    seen[image.file_name] = image.path
    split.images.append(image)
    return len(split.images) - 1


# -------------------------------------------------------------------------------------------- YOLO


def read_names_file(path: Path) -> tuple[str, ...]:
    """Class names, one per line (``classes.txt``, ``obj.names``); trailing blank lines are ignored, a
    blank line between names is an error (it would shift every later class index)."""
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}, line {lineno}: empty class name (class {lineno - 1})")
    return check_class_names(lines, str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


def yolo_label_path(image: Path) -> Path:
    """The label file of an image: the last ``images`` folder of the path replaced by ``labels`` and the
    suffix by ``.txt``; without an ``images`` folder, the ``.txt`` next to the image."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _number(token: str, what: str, where: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataError(f"{where}: {what} {token!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {what} {token!r} is not a finite number")
    return value


def parse_yolo_line(line: str, num_classes: int, where: str) -> tuple[int, tuple[float, ...], bool]:
    """One label line -> ``(class index, normalised corners (x1, y1, x2, y2), is a polygon)``.

    ``class cx cy w h`` is a box; ``class x1 y1 x2 y2 x3 y3 ...`` (at least 3 points) a polygon, whose
    bounding box is returned. ``where`` ("file, line n") starts every error message.
    """
    tokens = line.split()
    polygon = len(tokens) > YOLO_BOX_COLUMNS
    if len(tokens) < YOLO_BOX_COLUMNS or (polygon and len(tokens) % 2 == 0):  # odd and > 5: >= 3 points
        raise DataError(f"{where}: {len(tokens)} columns; expected 5 (class cx cy w h) or a class and the "
                        f"x y pairs of a polygon (3 points or more); extra columns such as a confidence are "
                        f"not supported")
    label = _number(tokens[0], "class index", where)
    if not label.is_integer():
        raise DataError(f"{where}: class index {tokens[0]!r} is not an integer")
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: class index {int(label)} is out of range: there are {num_classes} class "
                        f"names (0..{num_classes - 1})")
    values = [_number(token, "value", where) for token in tokens[1:]]
    outside = [v for v in values if not -NORMALISED_TOLERANCE <= v <= 1 + NORMALISED_TOLERANCE]
    if outside:
        raise DataError(f"{where}: value {outside[0]:g} is outside [0, 1]; YOLO coordinates are normalised "
                        f"by the image width and height")
    if polygon:
        xs, ys = values[0::2], values[1::2]
        corners = (min(xs), min(ys), max(xs), max(ys))
    else:
        cx, cy, w, h = values
        corners = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    if corners[2] <= corners[0] or corners[3] <= corners[1]:
        raise DataError(f"{where}: zero or negative box width or height")
    return int(label), corners, polygon


@dataclass
class _YoloCounts:
    """What a YOLO conversion changed, for :attr:`DetectionSource.notes`."""

    polygons: int = 0
    clipped: int = 0
    unlabelled: int = 0  # images without a label file


def _read_yolo_labels(label_file: Path, image: SourceImage, image_pos: int, num_classes: int,
                      counts: _YoloCounts) -> list[SourceBox]:
    """The boxes of one label file in pixels of ``image`` (no file: no boxes)."""
    if not label_file.is_file():
        counts.unlabelled += 1
        return []
    boxes = []
    for lineno, line in enumerate(_read_text(label_file).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label_file}, line {lineno}"
        label, (x1, y1, x2, y2), polygon = parse_yolo_line(line, num_classes, where)
        w, h = image.width, image.height
        bbox, clipped = clip_box(x1 * w, y1 * h, x2 * w, y2 * h, w, h, where)
        counts.polygons += polygon
        counts.clipped += clipped
        boxes.append(SourceBox(image_pos, label, bbox))
    return boxes


@dataclass(frozen=True)
class _ImageEntry:
    """An image source of a YOLO split: a folder (searched recursively) or a list file's images."""

    base: Path  # output names are relative to this folder
    images: tuple[Path, ...]
    label_dir: Path | None  # the folder whose .txt files must all belong to an image (None: not checked)


def _folder_entry(folder: Path) -> _ImageEntry:
    """The images under ``folder``; its label folder is checked for stray label files unless the labels
    sit next to the images (other text files may live there)."""
    images = tuple(sorted(p for p in folder.rglob("*") if is_image_file(p)))
    label_dir = yolo_label_path(folder / "x").parent
    separate = label_dir != folder and label_dir.is_dir()
    return _ImageEntry(folder, images, label_dir if separate else None)


def _list_entry(list_file: Path) -> _ImageEntry:
    base = list_file.parent
    images = []
    for lineno, line in enumerate(_read_text(list_file).splitlines(), start=1):
        if not line.strip():
            continue
        path = base / line.strip()
        if not path.is_file():
            raise DataError(f"{list_file}, line {lineno}: image {path} not found")
        images.append(path)
    return _ImageEntry(base, tuple(images), None)


def _orphan_labels(entry: _ImageEntry, used: set[Path], names_files: Iterable[Path]) -> list[Path]:
    """Label files in the entry's label folder for which no image was found (names files, and LabelImg's
    ``classes.txt``, are not label files)."""
    if entry.label_dir is None:
        return []
    skip = used | {p.resolve() for p in names_files}
    return sorted(p for p in entry.label_dir.rglob("*.txt")
                  if p.name != LABELIMG_NAMES_FILE and p.resolve() not in skip)


def _read_yolo_split(entries: Sequence[_ImageEntry], names: tuple[str, ...], names_files: Sequence[Path],
                     where: str, counts: _YoloCounts) -> SplitData:
    split, seen = SplitData(), {}
    for entry in entries:
        used = set()
        for path in entry.images:
            width, height = read_image_header(path).oriented
            image = SourceImage(path, _relative_name(path, entry.base, where), width, height)
            pos = _add_image(split, image, seen, where)
            label_file = yolo_label_path(path)
            used.add(label_file.resolve())
            split.boxes += _read_yolo_labels(label_file, image, pos, len(names), counts)
        orphans = _orphan_labels(entry, used, names_files)
        if orphans:
            raise DataError(
                f"{orphans[0]}: no image for this label file in {entry.base} (looked for "
                f"{_SUFFIX_LIST} files); {len(orphans)} label files without an "
                f"image: add the images or remove the label files"
            )
    if not split.images:
        raise DataError(f"{where}: no images ({_SUFFIX_LIST} files)")
    return split


def _yolo_names(data: Mapping[str, Any], source: str) -> tuple[str, ...]:
    names = data.get("names")
    if isinstance(names, Mapping):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or \
                sorted(keys) != list(range(len(keys))):
            raise DataError(f"{source}: 'names' as a mapping needs the class indices 0..N-1 as keys, got "
                            f"{_listed(keys)}")
        names = [names[i] for i in range(len(keys))]
    if not isinstance(names, list):
        raise DataError(f"{source}: missing or invalid 'names' (a list of class names or an "
                        f"{{index: name}} mapping)")
    result = check_class_names(names, source)
    nc = data.get("nc")
    if nc is not None and nc != len(result):
        raise DataError(f"{source}: 'nc' is {nc!r} but 'names' lists {len(result)} classes")
    return result


def _yolo_entry(root: Path, value: Any, key: str, source: str) -> _ImageEntry:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}: '{key}' must be a path or a list of paths, got {value!r}")
    path = root / value
    if not path.exists() and value.startswith("../"):
        path = root / value[3:]
    if path.is_dir():
        return _folder_entry(path)
    if path.is_file():
        return _list_entry(path)
    raise DataError(f"{source}: '{key}' {value!r}: {root / value} not found")


def read_yolo_yaml(yaml_file: Path) -> DetectionSource:
    """A YOLO data set described by a ``data.yaml`` (module docstring)."""
    source = str(yaml_file)
    try:
        data = yaml.safe_load(_read_text(yaml_file))
    except yaml.YAMLError as err:
        raise DataError(f"{yaml_file}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, Mapping):
        raise DataError(f"{yaml_file}: expected a mapping with 'names' and 'train'/'val' paths")
    names = _yolo_names(data, source)
    root = yaml_file.parent / str(data.get("path") or ".")
    if not root.is_dir():
        raise DataError(f"{yaml_file}: 'path' {data.get('path')!r}: folder {root} not found (a relative "
                        f"'path' is resolved against the YAML file's folder)")
    counts, splits = _YoloCounts(), {}
    for key in YOLO_SPLIT_KEYS:
        value = data.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        entries = [_yolo_entry(root, v, key, source) for v in values]
        splits[key] = _read_yolo_split(entries, names, [], f"{source} ({key})", counts)
    if not splits:
        raise DataError(f"{yaml_file}: no split paths ({', '.join(YOLO_SPLIT_KEYS)})")
    return _yolo_source(names, splits, counts)


def _yolo_source(names: tuple[str, ...], splits: dict[str, SplitData],
                 counts: _YoloCounts) -> DetectionSource:
    notes = _clip_note(counts.clipped)
    if counts.polygons:
        notes.append(f"{counts.polygons} segmentation polygons were converted to their bounding boxes")
    if counts.unlabelled:
        notes.append(f"{counts.unlabelled} images have no label file and are written without boxes")
    return DetectionSource(names, splits, notes)


def read_yolo_folder(folder: Path, split: str | None) -> DetectionSource:
    """A YOLO folder with ``images/``, ``labels/`` and a names file (module docstring)."""
    names_files = [folder / name for name in YOLO_NAMES_FILES if (folder / name).is_file()]
    if not names_files:
        raise DataError(f"{folder}: no class names file ({', '.join(YOLO_NAMES_FILES)}) and no data.yaml")
    contents = {path: read_names_file(path) for path in names_files}
    if len(set(contents.values())) > 1:
        raise DataError(f"{folder}: the names files {', '.join(str(p) for p in names_files)} disagree; "
                        f"keep one")
    names = contents[names_files[0]]
    image_root = folder / "images"
    if not (folder / "labels").is_dir():
        raise DataError(f"{folder}: no labels/ folder next to images/")
    if any(is_image_file(p) for p in image_root.iterdir()):
        entries = {split or DEFAULT_SPLIT: image_root}
    else:
        _check_no_split(split, folder, "its images/ subfolders")
        entries = {p.name: p for p in sorted(image_root.iterdir()) if p.is_dir()}
        if not entries:
            raise DataError(f"{image_root}: no images and no split folders")
    counts = _YoloCounts()
    splits = {name: _read_yolo_split([_folder_entry(path)], names, names_files, str(path), counts)
              for name, path in entries.items()}
    return _yolo_source(names, splits, counts)


def _check_no_split(split: str | None, source: Path, what: str) -> None:
    if split is not None:
        raise ConfigError(f"--split {split}: {source} defines its splits ({what}); --split names the one "
                          f"split of a source without splits")


def read_yolo(src: str | os.PathLike, split: str | None = None) -> DetectionSource:
    """A YOLO data set: ``src`` a ``data.yaml``, a folder holding one, or a folder with ``images/``,
    ``labels/`` and a names file. ``split`` names the one split of a source without splits."""
    src = Path(src)
    if src.is_file():
        _check_no_split(split, src, "its split keys")
        return read_yolo_yaml(src)
    if not src.is_dir():
        raise DataError(f"YOLO data set not found: {src}")
    for name in YOLO_YAML_NAMES:
        if (src / name).is_file():
            _check_no_split(split, src / name, "its split keys")
            return read_yolo_yaml(src / name)
    if not (src / "images").is_dir():
        raise DataError(f"{src}: not a YOLO data set: expected a data.yaml, or images/ and labels/ folders "
                        f"with a classes.txt or obj.names")
    return read_yolo_folder(src, split)


# --------------------------------------------------------------------------------------------- VOC


@dataclass(frozen=True)
class VocObject:
    """One ``<object>`` of a VOC XML: class name, ``difficult`` flag and the 1-based inclusive pixel box
    ``(xmin, ymin, xmax, ymax)``."""

    name: str
    difficult: bool
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class VocRecord:
    """A parsed VOC annotation file: the image's ``<filename>`` and ``<size>`` (None when absent or 0)."""

    xml: Path
    filename: str | None
    size: tuple[int, int] | None
    objects: tuple[VocObject, ...]


def _voc_int(text: str | None, what: str, where: str) -> int:
    value = _number((text or "").strip(), what, where)
    if not value.is_integer():
        raise DataError(f"{where}: {what} {text!r} is not an integer")
    return int(value)


def _voc_object(obj: ET.Element, number: int, xml: Path) -> VocObject:
    name = (obj.findtext("name") or "").strip()
    where = f"{xml}, object {number}" + (f" ({name!r})" if name else "")
    if not name:
        raise DataError(f"{where}: no <name>")
    difficult = _voc_int(obj.findtext("difficult") or "0", "<difficult>", where)
    if difficult not in (0, 1):
        raise DataError(f"{where}: <difficult> must be 0 or 1, got {difficult}")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DataError(f"{where}: no <bndbox>")
    coords = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = bndbox.findtext(tag)
        if text is None:
            raise DataError(f"{where}: <bndbox> has no <{tag}>")
        coords.append(_number(text.strip(), f"<{tag}>", where))
    xmin, ymin, xmax, ymax = coords
    if xmax < xmin or ymax < ymin:
        raise DataError(f"{where}: zero or negative box width or height (xmin {xmin:g}, xmax {xmax:g}, "
                        f"ymin {ymin:g}, ymax {ymax:g})")
    return VocObject(name, bool(difficult), (xmin, ymin, xmax, ymax))


def parse_voc_xml(xml: Path) -> VocRecord:
    """Read one VOC annotation file (:class:`DataError` naming it for malformed XML or fields)."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as err:
        raise DataError(f"{xml}: malformed XML ({err})") from None
    except FileNotFoundError:
        raise DataError(f"{xml}: annotation file not found") from None
    if root.tag != "annotation":
        raise DataError(f"{xml}: expected an <annotation> root element, got <{root.tag}>")
    size = None
    size_node = root.find("size")
    if size_node is not None and size_node.findtext("width") is not None:
        width = _voc_int(size_node.findtext("width"), "<size><width>", str(xml))
        height = _voc_int(size_node.findtext("height"), "<size><height>", str(xml))
        size = (width, height) if width > 0 and height > 0 else None
    filename = (root.findtext("filename") or "").strip() or None
    objects = tuple(_voc_object(obj, k, xml) for k, obj in enumerate(root.findall("object"), start=1))
    return VocRecord(xml, filename, size, objects)


def _voc_image(record: VocRecord, image_dir: Path) -> SourceImage:
    path = image_dir / record.filename if record.filename else None
    if path is None or not path.is_file():
        path = find_image(image_dir, record.xml.stem)
    if path is None:
        named = f"{record.filename} or " if record.filename else ""
        raise DataError(f"{record.xml}: image not found in {image_dir} (looked for {named}{record.xml.stem}"
                        f".{_SUFFIX_LIST})")
    header = read_image_header(path)
    size = header.oriented
    if record.size is not None:
        if record.size not in (header.oriented, header.stored):
            raise DataError(f"{record.xml}: <size> says {record.size[0]}x{record.size[1]} but {path} is "
                            f"{size[0]}x{size[1]} pixels (w x h)")
        size = record.size
    return SourceImage(path, _relative_name(path, image_dir, str(record.xml)), *size)


def _voc_boxes(record: VocRecord, image_dir: Path, categories: Sequence[str],
               difficult: str) -> tuple[SourceImage, list[SourceBox], int]:
    """The image of one annotation file, its boxes (``image`` 0, set by the split) and how many of them
    were clipped. VOC's 1-based inclusive ``xmin..xmax`` becomes ``x = xmin - 1``, ``w = xmax - xmin + 1``."""
    image = _voc_image(record, image_dir)
    boxes, clipped = [], 0
    for number, obj in enumerate(record.objects, start=1):
        if obj.difficult and difficult == "skip":
            continue
        xmin, ymin, xmax, ymax = obj.box
        bbox, was_clipped = clip_box(xmin - 1, ymin - 1, xmax, ymax, image.width, image.height,
                                     f"{record.xml}, object {number} ({obj.name!r})")
        clipped += was_clipped
        boxes.append(SourceBox(0, categories.index(obj.name), bbox, obj.difficult and difficult == "crowd"))
    return image, boxes, clipped


def _voc_ids(list_file: Path) -> list[str]:
    return [line.split()[0] for line in _read_text(list_file).splitlines() if line.strip()]


def _voc_categories(records: Iterable[VocRecord], classes: Sequence[str] | None,
                    src: Path) -> tuple[str, ...]:
    if classes is not None:
        names = check_class_names(classes, "--classes")
        for record in records:
            for number, obj in enumerate(record.objects, start=1):
                if obj.name not in names:
                    raise DataError(f"{record.xml}, object {number}: class {obj.name!r} is not in --classes "
                                    f"({','.join(names)})")
        return names
    found = sorted({obj.name for record in records for obj in record.objects})
    if not found:
        raise DataError(f"{src}: no objects in the annotation files; pass --classes to name the classes")
    return tuple(found)


def read_voc(src: str | os.PathLike, split: str | None = None, classes: Sequence[str] | None = None,
             difficult: str = "crowd") -> DetectionSource:
    """A Pascal VOC data set (module docstring). ``split`` names the one split when ``src`` has no
    ``ImageSets/Main`` split files; ``classes`` fixes the class names and their order; ``difficult`` one
    of :data:`VOC_DIFFICULT_MODES`."""
    if difficult not in VOC_DIFFICULT_MODES:
        raise ConfigError(f"--voc-difficult {difficult!r}: choose one of {', '.join(VOC_DIFFICULT_MODES)}")
    src = Path(src)
    ann_dir, image_dir, sets_dir = src / "Annotations", src / "JPEGImages", src / "ImageSets" / "Main"
    for folder in (ann_dir, image_dir):
        if not folder.is_dir():
            raise DataError(f"{src}: not a Pascal VOC folder: {folder} not found (expected Annotations/, "
                            f"JPEGImages/ and optionally ImageSets/Main/)")
    split_files = {name: sets_dir / f"{name}.txt" for name in VOC_SPLITS
                   if (sets_dir / f"{name}.txt").is_file()}
    if split_files:
        _check_no_split(split, sets_dir, ", ".join(f"{name}.txt" for name in split_files))
        ids = {name: _voc_ids(path) for name, path in split_files.items()}
    else:
        ids = {split or DEFAULT_SPLIT: sorted(p.stem for p in ann_dir.glob("*.xml"))}
    records: dict[str, VocRecord] = {}
    for name, members in ids.items():
        if not members:
            where = split_files[name] if split_files else f"{ann_dir}/*.xml"
            raise DataError(f"{where}: no images listed")
        for image_id in members:
            if image_id not in records:
                records[image_id] = parse_voc_xml(ann_dir / f"{image_id}.xml")
    categories = _voc_categories(records.values(), classes, src)
    converted = {image_id: _voc_boxes(record, image_dir, categories, difficult)
                 for image_id, record in records.items()}  # each image once, whatever its splits
    splits = {}
    for name, members in ids.items():
        data, seen = SplitData(), {}
        for image_id in members:
            image, boxes, _ = converted[image_id]
            pos = _add_image(data, image, seen, str(split_files.get(name, ann_dir)))
            data.boxes += [replace(box, image=pos) for box in boxes]
        splits[name] = data
    notes = _clip_note(sum(clipped for _, _, clipped in converted.values()))
    difficult_count = sum(obj.difficult for record in records.values() for obj in record.objects)
    if difficult_count:
        action = {"crowd": "written as crowd regions (iscrowd 1, ignored by the evaluation)",
                  "keep": "kept as ordinary boxes", "skip": "left out"}[difficult]
        notes.append(f"{difficult_count} difficult objects {action} (--voc-difficult {difficult})")
    return DetectionSource(categories, splits, notes)


# ------------------------------------------------------------------------------------ COCO writing


def _json_number(value: float) -> int | float:
    """Integral floats as ints (``47`` rather than ``47.0``), other values unchanged."""
    return int(value) if float(value).is_integer() else value


def coco_dict(split: SplitData, categories: Sequence[str]) -> dict[str, Any]:
    """The COCO JSON of one split: image ids 1..I in image order, annotation ids 1..A, category id
    ``i + 1`` for class ``i``, ``area`` = w * h of the box."""
    images = [{"id": pos + 1, "file_name": image.file_name, "width": image.width, "height": image.height}
              for pos, image in enumerate(split.images)]
    annotations = [
        {"id": k + 1, "image_id": box.image + 1, "category_id": box.category + 1,
         "bbox": [_json_number(v) for v in box.bbox], "area": _json_number(box.bbox[2] * box.bbox[3]),
         "iscrowd": int(box.iscrowd)}
        for k, box in enumerate(split.boxes)
    ]
    cats = [{"id": i + 1, "name": name} for i, name in enumerate(categories)]
    return {"images": images, "annotations": annotations, "categories": cats}


def write_coco_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a COCO dict as JSON, atomically (the folder is created). Returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(data) + "\n")
    return path


@dataclass(frozen=True)
class ConvertedPaths:
    """Where :func:`write_coco_dataset` wrote each split: ``{split: (annotation JSON, image folder)}``."""

    root: Path
    splits: dict[str, tuple[Path, Path]]


def output_paths(split: str) -> tuple[str, str]:
    """The annotation file and image folder of ``split``, relative to the output folder."""
    return f"annotations/{split}.json", f"images/{split}"


def _inside(path: Path, folder: Path) -> bool:
    plain = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    return plain or path.resolve().is_relative_to(folder.resolve())


def _check_sources_outside(source: DetectionSource, out_dir: Path) -> None:
    """Refuse an output image folder that holds source images (``--overwrite`` would delete them)."""
    for name, split in source.splits.items():
        folder = out_dir / output_paths(name)[1]
        if not folder.exists():
            continue
        for image in split.images:
            if _inside(image.path, folder):
                raise OutputError(f"--out {out_dir}: the output image folder {folder} holds source images "
                                  f"({image.path}); choose another --out")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _place_image(image: SourceImage, dest: Path, copy: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(image.path, dest)
        return
    try:
        os.symlink(image.path.resolve(), dest)
    except OSError as err:
        raise OutputError(f"{dest}: cannot create a symbolic link ({err.strerror or err}); pass "
                          f"--copy-images to copy the images instead") from None


def write_coco_dataset(source: DetectionSource, out_dir: str | os.PathLike, *, copy_images: bool = False,
                       overwrite: bool = False) -> ConvertedPaths:
    """Write every split of ``source`` under ``out_dir`` (module docstring for the layout). Existing
    files of these splits are refused unless ``overwrite`` (then they are replaced; other files stay);
    an output image folder holding source images is always refused."""
    out_dir = check_output_dir(out_dir, "--out")
    names = [path for split in source.splits for path in output_paths(split)]
    check_new_files(out_dir, names, overwrite=overwrite, option="--out")
    _check_sources_outside(source, out_dir)
    written = {}
    for name, split in source.splits.items():
        ann_rel, images_rel = output_paths(name)
        ann_file, image_dir = out_dir / ann_rel, out_dir / images_rel
        _remove(ann_file)
        _remove(image_dir)
        for image in split.images:
            _place_image(image, image_dir / image.file_name, copy_images)
        write_coco_json(coco_dict(split, source.categories), ann_file)
        written[name] = (ann_file, image_dir)
    return ConvertedPaths(out_dir, written)


def train_overrides(paths: ConvertedPaths, num_classes: int) -> list[str]:
    """The ``asag train`` overrides that train on the converted data set: the first present of
    :data:`TRAIN_SPLITS` (else the first split) for training, the first of :data:`VAL_SPLITS` for
    validation (none: ``runtime.eval_every=0``)."""
    splits = list(paths.splits)
    train = next((s for s in TRAIN_SPLITS if s in splits), splits[0])
    val = next((s for s in VAL_SPLITS if s in splits and s != train), None)
    root = paths.root.resolve()
    overrides = ["data.format=coco", f"data.root={root}"]
    for key, split in (("train", train), ("val", val)):
        if split is not None:
            ann_rel, images_rel = output_paths(split)
            overrides += [f"data.{key}_annotations={ann_rel}", f"data.{key}_images={images_rel}"]
    if val is None:
        overrides.append("runtime.eval_every=0")
    return [*overrides, f"model.num_classes={num_classes}"]
