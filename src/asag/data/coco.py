"""COCO-format detection data sets: any ``instances``-style JSON plus an image folder (spec 9.1).

The JSON is validated once, at construction, without decoding images: every problem raises
:class:`asag.errors.DataError` naming the file and the culprit. Boxes are converted to xyxy pixels,
clipped to the image, and degenerate ones dropped (one :class:`DataWarning` summarises how many).
Crowd annotations (``iscrowd = 1``) never enter the targets; the evaluator reads them from the JSON.
Images are decoded in ``__getitem__``; a decoding failure raises ``DataError`` naming the image file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from asag.data.image import open_image
from asag.data.labels import LabelMap
from asag.data.transforms import DetectionTransform, Sample
from asag.errors import DataError

# Spec 9.1: training drops images with a side shorter than this many pixels.
MIN_TRAIN_IMAGE_SIDE = 32
# How many offending names an error or warning lists before "...".
_MAX_LISTED = 5


class DataWarning(UserWarning):
    """A data set problem that was repaired (clipped boxes, dropped degenerate boxes)."""


@dataclass
class ImageAnnotations:
    """Non-crowd targets of one image as stored in the JSON, after clipping.

    boxes_xyxy: ``[N, 4]`` float32 xyxy in pixels of the original image. labels: ``[N]`` int64
    contiguous indices.
    """

    boxes_xyxy: Tensor
    labels: Tensor


@dataclass
class CocoIndex:
    """The validated content of a COCO JSON, as arrays (no per-annotation Python objects kept).

    image_ids / widths / heights: ``[I]`` int64; file_names: ``I`` relative paths.
    boxes_xyxy: ``[A, 4]`` float32 clipped xyxy pixels of the kept non-crowd annotations, grouped by image;
    labels: ``[A]`` int64 contiguous indices; offsets: ``[I + 1]`` int64, image i owns rows
    ``offsets[i]:offsets[i+1]``. num_clipped / num_dropped: repaired non-crowd boxes.
    """

    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    file_names: list[str]
    label_map: LabelMap
    boxes_xyxy: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    num_clipped: int = 0
    num_dropped: int = 0

    def num_boxes(self) -> np.ndarray:
        """``[I]`` number of kept non-crowd boxes per image."""
        return np.diff(self.offsets)


# ------------------------------------------------------------------------------------ JSON level


def load_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO-format JSON file, checking it is an object with ``images`` and ``categories``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise DataError(f"{path}: malformed JSON ({where}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read annotation file ({err})") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise DataError(f"{path}: expected a JSON object with 'images' and 'categories', got a {kind}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or invalid '{key}' list")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' must be a list")
    return data


def _listed(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (", ..." if len(items) > _MAX_LISTED else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A JSON number: not a numeric string, not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _image_table(images: list[Any], source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Image ids, widths, heights ``[I]`` int64 and file names; rejects incomplete or duplicate entries."""
    for pos, img in enumerate(images):
        ok = isinstance(img, Mapping) and isinstance(img.get("file_name"), str)
        ok = ok and all(_is_int(img.get(k)) for k in ("id", "width", "height"))
        if not ok or img["width"] <= 0 or img["height"] <= 0:
            raise DataError(
                f"{source}: image #{pos} needs an integer 'id', a 'file_name' and positive integer "
                f"'width'/'height', got {img!r}"
            )
    ids = np.array([img["id"] for img in images], dtype=np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{source}: duplicate image ids {_listed(unique[counts > 1].tolist())}")
    widths = np.array([img["width"] for img in images], dtype=np.int64)
    heights = np.array([img["height"] for img in images], dtype=np.int64)
    return ids, widths, heights, [img["file_name"] for img in images]


def _bad_annotation(anns: list[Any], source: str) -> DataError:
    """The error for the first annotation lacking a field or with a malformed ``bbox``."""
    for pos, ann in enumerate(anns):
        name = f"annotation id {ann.get('id', '?')}" if isinstance(ann, Mapping) else f"annotation #{pos}"
        fields = ("id", "image_id", "category_id")
        if not isinstance(ann, Mapping) or not all(_is_int(ann.get(k)) for k in fields) or "bbox" not in ann:
            return DataError(f"{source}: {name} needs integer {', '.join(fields)} and a 'bbox', got {ann!r}")
        if not _is_int(ann.get("iscrowd", 0)):
            return DataError(f"{source}: {name} has a non-integer 'iscrowd' {ann['iscrowd']!r}")
        bbox = ann["bbox"]
        numbers = isinstance(bbox, list) and len(bbox) == 4
        if not numbers or not all(_is_number(v) and np.isfinite(v) for v in bbox):
            expected = "expected 4 finite numbers x, y, w, h"
            return DataError(f"{source}: {name} has a malformed bbox {bbox!r} ({expected})")
    return DataError(f"{source}: malformed annotations")


def annotation_columns(anns: list[Any], source: str) -> dict[str, np.ndarray]:
    """Columns ``id, image_id, category_id, iscrowd`` ``[A]`` int64 and ``bbox`` ``[A, 4]`` float64 (xywh)."""
    try:  # no dtype first: numeric strings ("12.5") or nulls give a str / object array, refused below
        raw = {
            "id": np.array([a["id"] for a in anns]),
            "image_id": np.array([a["image_id"] for a in anns]),
            "category_id": np.array([a["category_id"] for a in anns]),
            "iscrowd": np.array([a.get("iscrowd", 0) for a in anns]),
            "bbox": np.array([a["bbox"] for a in anns]),
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _bad_annotation(anns, source) from None
    if anns and (any(raw[k].dtype.kind not in "iu" for k in ("id", "image_id", "category_id", "iscrowd"))
                 or raw["bbox"].dtype.kind not in "iuf" or raw["bbox"].shape != (len(anns), 4)):
        raise _bad_annotation(anns, source)
    cols = {k: v.astype(np.int64) for k, v in raw.items() if k != "bbox"}
    cols["bbox"] = raw["bbox"].astype(np.float64).reshape(len(anns), 4)
    if not np.isfinite(cols["bbox"]).all():
        raise _bad_annotation(anns, source)
    unique, counts = np.unique(cols["id"], return_counts=True)
    if (counts > 1).any():  # pycocotools indexes annotations by id: duplicates would vanish silently
        raise DataError(f"{source}: duplicate annotation ids {_listed(unique[counts > 1].tolist())}")
    return cols


def _lookup(sorted_keys: np.ndarray, order: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``values`` among keys (``order`` sorts them) and a ``found`` mask, both ``[A]``."""
    pos = np.searchsorted(sorted_keys, values).clip(max=max(len(sorted_keys) - 1, 0))
    found = sorted_keys[pos] == values if len(sorted_keys) else np.zeros(len(values), dtype=bool)
    return order[pos] if len(order) else pos, found


def _check_annotation_refs(
    cols: dict[str, np.ndarray], image_ids: np.ndarray, label_map: LabelMap, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Image position and contiguous label ``[A]`` of each annotation; rejects unknown ids, negative sizes."""
    order = np.argsort(image_ids, kind="stable")
    image_pos, found = _lookup(image_ids[order], order, cols["image_id"])
    if not found.all():
        pairs = [f"{a} (image_id {i})" for a, i in zip(cols["id"][~found], cols["image_id"][~found])]
        raise DataError(f"{source}: annotation ids {_listed(pairs)} refer to image ids missing from 'images'")
    cat_ids = np.asarray(label_map.category_ids, dtype=np.int64)
    labels, known = _lookup(cat_ids, np.arange(len(cat_ids)), cols["category_id"])
    if not known.all():
        pairs = [f"{a} (category_id {c})" for a, c in zip(cols["id"][~known], cols["category_id"][~known])]
        problem = "use category ids missing from 'categories'"
        raise DataError(f"{source}: annotation ids {_listed(pairs)} {problem}")
    negative = (cols["bbox"][:, 2] < 0) | (cols["bbox"][:, 3] < 0)
    if negative.any():
        ids = _listed(cols["id"][negative].tolist())
        raise DataError(f"{source}: annotation ids {ids} have a negative bbox width or height")
    return image_pos, labels


def clip_boxes_xywh(
    bbox_xywh: np.ndarray, widths: np.ndarray, heights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Convert ``[A, 4]`` COCO xywh boxes to xyxy clipped to ``[0, W] x [0, H]`` (``widths``/``heights``
    ``[A]``, per box). Returns the ``[A, 4]`` xyxy boxes and a ``[A]`` mask of boxes that were changed."""
    x1, y1 = bbox_xywh[:, 0], bbox_xywh[:, 1]
    xyxy = np.stack([x1, y1, x1 + bbox_xywh[:, 2], y1 + bbox_xywh[:, 3]], axis=1)  # [A, 4]
    limits = np.stack([widths, heights, widths, heights], axis=1).astype(np.float64)  # [A, 4]
    clipped = np.clip(xyxy, 0.0, limits)
    return clipped, (clipped != xyxy).any(axis=1)


def _warn_repairs(source: str, ann_ids: np.ndarray, clipped: np.ndarray, degenerate: np.ndarray) -> None:
    if not clipped.any() and not degenerate.any():
        return
    message = f"{source}: {int(clipped.sum())} boxes extending outside their image were clipped"
    if degenerate.any():
        message += (
            f"; {int(degenerate.sum())} boxes with zero width or height (after clipping) were dropped "
            f"(annotation ids {_listed(ann_ids[degenerate].tolist())})"
        )
    warnings.warn(message, DataWarning, stacklevel=3)


def parse_coco(data: Mapping[str, Any], source: str) -> CocoIndex:
    """Validate a loaded COCO dict and index its non-crowd boxes by image (``source`` names the file)."""
    image_ids, widths, heights, file_names = _image_table(data["images"], source)
    if len(image_ids) == 0:
        raise DataError(f"{source}: the data set is empty (no images)")
    label_map = LabelMap.from_categories(data["categories"], source)
    anns = data.get("annotations", [])
    cols = annotation_columns(anns, source)
    image_pos, labels = _check_annotation_refs(cols, image_ids, label_map, source)
    boxes, clipped = clip_boxes_xywh(cols["bbox"], widths[image_pos], heights[image_pos])
    crowd = cols["iscrowd"] != 0
    degenerate = ~crowd & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    _warn_repairs(source, cols["id"], clipped & ~crowd, degenerate)
    keep = ~crowd & ~degenerate
    order = np.argsort(image_pos[keep], kind="stable")
    kept_pos = image_pos[keep][order]
    offsets = np.searchsorted(kept_pos, np.arange(len(image_ids) + 1)).astype(np.int64)  # [I + 1]
    return CocoIndex(
        image_ids=image_ids,
        widths=widths,
        heights=heights,
        file_names=file_names,
        label_map=label_map,
        boxes_xyxy=boxes[keep][order].astype(np.float32),
        labels=labels[keep][order].astype(np.int64),
        offsets=offsets,
        num_clipped=int((clipped & ~crowd).sum()),
        num_dropped=int(degenerate.sum()),
    )


def check_image_files(image_dir: Path, file_names: Sequence[str], source: str) -> None:
    """Fail early, before training starts, if the image folder or any listed image file is missing."""
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir} (images of {source})")
    with os.scandir(image_dir) as entries:
        present = {entry.name for entry in entries}
    nested = {name for name in file_names if "/" in name or os.sep in name}
    missing = [
        name
        for name in file_names
        if (not (image_dir / name).is_file() if name in nested else name not in present)
    ]
    if missing:
        raise DataError(f"{source}: {len(missing)} image files missing from {image_dir}: {_listed(missing)}")


# ----------------------------------------------------------------------------------- image level


def read_image(path: Path, width: int, height: int) -> PIL.Image.Image:
    """Decode an image as RGB (:func:`asag.data.image.open_image`), honouring its EXIF orientation.

    ``width``/``height`` are the JSON's; the annotations live in that frame. If the EXIF-rotated image
    has that size it is used; if only the stored (unrotated) pixels have it, those are used.
    """
    image, stored_size = open_image(path)
    if image.size != (width, height) and stored_size == (width, height):
        image, _ = open_image(path, exif=False)
    if image.size != (width, height):
        raise DataError(
            f"{path}: image is {image.width}x{image.height} pixels (w x h) but the annotation file says "
            f"{width}x{height}"
        )
    return image


# ---------------------------------------------------------------------------------------- dataset


class CocoDetection(Dataset):
    """A COCO-format detection data set.

    ``ann_file``: COCO JSON; ``image_dir``: folder the ``file_name`` entries are relative to;
    ``transforms``: e.g. :func:`asag.data.transforms.build_train_transforms` (default: to tensor and
    ImageNet normalisation only); ``training_filter``: drop images without a non-crowd box or with a side
    shorter than ``min_side`` (spec 9.1); off for evaluation, which keeps every image.

    Items are :class:`Sample` ``(image [3, h, w] float, ImageTargets)`` with normalised cxcywh boxes.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        transforms: DetectionTransform | None = None,
        training_filter: bool = False,
        min_side: int = MIN_TRAIN_IMAGE_SIDE,
        check_files: bool = True,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms if transforms is not None else DetectionTransform()
        self.index = parse_coco(load_coco_json(self.ann_file), str(self.ann_file))
        keep = np.ones(len(self.index.image_ids), dtype=bool)
        if training_filter:
            short = np.minimum(self.index.widths, self.index.heights)
            keep = (self.index.num_boxes() > 0) & (short >= min_side)
            if not keep.any():
                raise DataError(
                    f"{self.ann_file}: no image left for training (each needs a non-crowd box and sides "
                    f">= {min_side} px)"
                )
        self.positions = np.flatnonzero(keep)  # [N] positions in the index of the images served
        self.num_filtered = int((~keep).sum())
        if check_files:
            names = [self.index.file_names[i] for i in self.positions]
            check_image_files(self.image_dir, names, str(self.ann_file))
        self._coco: COCO | None = None

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def label_map(self) -> LabelMap:
        return self.index.label_map

    @property
    def image_ids(self) -> list[int]:
        """Image ids in item order."""
        return self.index.image_ids[self.positions].tolist()

    @property
    def coco(self) -> COCO:
        """The pycocotools index of the annotation file (all images and crowd regions), built on first use."""
        if self._coco is None:
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(str(self.ann_file))
        return self._coco

    def load_image(self, item: int) -> PIL.Image.Image:
        """The RGB image of item ``item`` in original pixels (EXIF orientation applied)."""
        pos = self.positions[item]
        path = self.image_dir / self.index.file_names[pos]
        return read_image(path, int(self.index.widths[pos]), int(self.index.heights[pos]))

    def annotations(self, item: int) -> ImageAnnotations:
        """Clipped non-crowd boxes (xyxy, original pixels) and labels of item ``item``."""
        pos = self.positions[item]
        start, end = self.index.offsets[pos], self.index.offsets[pos + 1]
        boxes = torch.from_numpy(self.index.boxes_xyxy[start:end].copy())  # [N, 4]
        return ImageAnnotations(boxes, torch.from_numpy(self.index.labels[start:end].copy()))

    def __getitem__(self, item: int) -> Sample:
        image = self.load_image(item)
        ann = self.annotations(item)
        image_id = int(self.index.image_ids[self.positions[item]])
        return self.transforms(image, ann.boxes_xyxy, ann.labels, image_id)
