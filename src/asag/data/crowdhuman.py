"""CrowdHuman ``.odgt`` annotations -> COCO format (spec 0, 9.1, 10).

An ``.odgt`` file holds one JSON object per line: ``{"ID": str, "gtboxes": [{"tag": "person" | "mask",
"fbox": [x, y, w, h], "vbox": ..., "hbox": ..., "extra": {"ignore": 0 | 1, ...}}, ...]}``. The COCO
output has one category (1, "person"), full-body boxes (``fbox``, original pixels, not clipped: the
data set clips them), and ``iscrowd = 1`` for ignore regions and "mask" tags, so they are excluded from
training targets and treated as ignore regions by the evaluation. Image sizes come from the image files
(``<ID>.jpg`` in the image folder); only their headers are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asag.data.formats import write_coco_json
from asag.data.image import read_image_header
from asag.errors import DataError

PERSON_CATEGORY = {"id": 1, "name": "person", "supercategory": "person"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PERSON_TAG = "person"
MASK_TAG = "mask"


def read_odgt(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` for each non-empty line of an ``.odgt`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("ID"), str):
                raise DataError(f"{path}, line {lineno}: expected an object with a string 'ID'")
            yield lineno, record


def _image_file(image_dir: Path, image_name: str, where: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        candidate = image_dir / f"{image_name}{ext}"
        if candidate.is_file():
            return candidate
    tried = ", ".join(IMAGE_EXTENSIONS)
    raise DataError(f"{where}: image {image_name!r} not found in {image_dir} (tried {tried})")


def _coco_box(box: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """One ``gtboxes`` entry as a COCO annotation (without ids), or ``None`` for unknown tags."""
    tag = box.get("tag")
    if tag not in (PERSON_TAG, MASK_TAG):
        return None
    fbox = box.get("fbox")
    numbers = isinstance(fbox, list) and all(type(v) in (int, float) for v in fbox)  # no "12", no true
    if not (numbers and len(fbox) == 4):
        raise DataError(f"{where}: malformed 'fbox' {fbox!r} (expected x, y, w, h)")
    if fbox[2] < 0 or fbox[3] < 0:
        raise DataError(f"{where}: 'fbox' {fbox!r} has a negative width or height")
    extra = box.get("extra") or {}
    ignore = tag == MASK_TAG or bool(extra.get("ignore", 0))
    ann = {"category_id": PERSON_CATEGORY["id"], "bbox": list(fbox), "area": float(fbox[2] * fbox[3])}
    ann["iscrowd"] = int(ignore)
    for key in ("vbox", "hbox"):  # kept for the CrowdHuman evaluation (visible / head boxes)
        if key in box:
            ann[key] = box[key]
    return ann


def odgt_to_coco(odgt_path: str | os.PathLike, image_dir: str | os.PathLike) -> dict[str, Any]:
    """Convert an ``.odgt`` file to a COCO dict (image ids 1..N in file order; ``file_name`` relative
    to ``image_dir``; the record ``ID`` kept as ``odgt_id``)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    images, annotations = [], []
    for lineno, record in read_odgt(odgt_path):
        where = f"{odgt_path}, line {lineno}"
        path = _image_file(image_dir, record["ID"], where)
        width, height = read_image_header(path).stored
        image_id = len(images) + 1
        entry = {"id": image_id, "file_name": path.name, "width": width, "height": height}
        images.append({**entry, "odgt_id": record["ID"]})
        for box in record.get("gtboxes", []):
            ann = _coco_box(box, where) if isinstance(box, Mapping) else None
            if ann is not None:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    if not images:
        raise DataError(f"{odgt_path}: no records")
    return {"images": images, "annotations": annotations, "categories": [PERSON_CATEGORY]}


@dataclass(frozen=True)
class ConversionSummary:
    """Counts of a conversion: images, person boxes (``iscrowd = 0``), ignore regions (``iscrowd = 1``)."""

    images: int
    boxes: int
    ignore_regions: int


def convert_crowdhuman(
    odgt_path: str | os.PathLike, image_dir: str | os.PathLike, out_json: str | os.PathLike
) -> ConversionSummary:
    """Write the COCO JSON of :func:`odgt_to_coco` to ``out_json`` (atomically: all of it or nothing)."""
    data = odgt_to_coco(odgt_path, image_dir)
    write_coco_json(data, out_json)
    crowd = sum(ann["iscrowd"] for ann in data["annotations"])
    return ConversionSummary(len(data["images"]), len(data["annotations"]) - crowd, crowd)
