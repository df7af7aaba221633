"""Summary statistics of COCO-format annotation files (``asag data stats``).

Boxes are the non-crowd annotations of the JSON; their size class follows the COCO evaluation rule on
the annotation's ``area`` field (``w * h`` of the box when absent): small ``< 32^2``, medium ``< 96^2``,
large otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asag.data.coco import annotation_columns, load_coco_json, parse_coco
from asag.errors import DataError

# COCO evaluation area ranges (pycocotools COCOeval: areaRng small / medium / large).
SMALL_AREA = 32**2
MEDIUM_AREA = 96**2


@dataclass
class DatasetStats:
    """Counts of one annotation file.

    per_class: ``(category id, name, number of non-crowd boxes)`` in category-id order.
    dropped_boxes: non-crowd boxes the data set drops (zero width or height after clipping).
    """

    source: str
    num_images: int
    images_without_boxes: int
    num_boxes: int
    num_crowd: int
    dropped_boxes: int
    per_class: list[tuple[int, str, int]]
    small: int
    medium: int
    large: int

    @property
    def num_classes(self) -> int:
        return len(self.per_class)


def size_classes(areas: np.ndarray) -> tuple[int, int, int]:
    """Numbers of small, medium and large areas (COCO rule)."""
    small = int((areas < SMALL_AREA).sum())
    medium = int(((areas >= SMALL_AREA) & (areas < MEDIUM_AREA)).sum())
    return small, medium, int(len(areas) - small - medium)


def compute_stats(json_path: str | os.PathLike) -> DatasetStats:
    """Statistics of one COCO JSON (validated as :class:`asag.data.coco.CocoDetection` does)."""
    source = str(json_path)
    data = load_coco_json(json_path)
    index = parse_coco(data, source)
    anns = data.get("annotations", [])
    cols = annotation_columns(anns, source)
    crowd = cols["iscrowd"] != 0
    box_areas = cols["bbox"][:, 2] * cols["bbox"][:, 3]  # [A]
    areas = np.array([a.get("area", b) for a, b in zip(anns, box_areas)], dtype=np.float64)[~crowd]
    cat_ids = np.asarray(index.label_map.category_ids)
    labels = np.searchsorted(cat_ids, cols["category_id"][~crowd])  # [A'] contiguous (ids were validated)
    counts = np.bincount(labels, minlength=len(cat_ids))  # [C]
    images_with_boxes = len(np.unique(cols["image_id"][~crowd]))
    small, medium, large = size_classes(areas)
    return DatasetStats(
        source=source,
        num_images=len(index.image_ids),
        images_without_boxes=len(index.image_ids) - images_with_boxes,
        num_boxes=int((~crowd).sum()),
        num_crowd=int(crowd.sum()),
        dropped_boxes=index.num_dropped,
        per_class=[(int(c), n, int(k)) for c, n, k in zip(cat_ids, index.label_map.names, counts)],
        small=small,
        medium=medium,
        large=large,
    )


def collect_stats(path: str | os.PathLike) -> list[DatasetStats]:
    """Statistics of a JSON file, or of every ``*.json`` directly inside a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise DataError(f"{path}: no .json annotation files in this folder")
        return [compute_stats(f) for f in files]
    if not path.exists():
        raise DataError(f"annotation file or folder not found: {path}")
    return [compute_stats(path)]


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def format_stats(stats: DatasetStats) -> str:
    """A human-readable multi-line summary."""
    total = stats.num_boxes
    lines = [
        f"{stats.source}",
        f"  images: {stats.num_images} ({stats.images_without_boxes} without boxes)",
        f"  boxes: {total} (crowd regions: {stats.num_crowd}; degenerate, dropped: {stats.dropped_boxes})",
        f"  classes: {stats.num_classes}",
    ]
    lines += [f"    {cid:>4} {name}: {count}" for cid, name, count in stats.per_class]
    lines.append(
        f"  sizes: small {stats.small} ({_percent(stats.small, total)}), "
        f"medium {stats.medium} ({_percent(stats.medium, total)}), "
        f"large {stats.large} ({_percent(stats.large, total)})"
    )
    return "\n".join(lines)
