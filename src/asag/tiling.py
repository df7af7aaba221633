"""Prediction on images far larger than the training size: overlapping tiles, merged into one result.

A detector trained on images of a few hundred pixels resizes a 4000 x 4000 photo to that size, and its
small objects vanish. :func:`predict_tiled` instead cuts the image into overlapping ``tile x tile``
crops (:func:`tile_grid`), predicts them in batches (each crop goes through the model's own evaluation
resize, like any image), maps the boxes back to full-image pixels by adding the crop's offset, and
merges (:func:`merge_tiles`; docs/inference.md, "Large images"):

1. **Cut boxes.** A box is *cut* when it reaches to within ``edge_margin`` (a fraction of the tile side)
   of an edge of its tile that lies inside the image (an edge on the image border cuts nothing).
   Such a box may show only the part of an object that its tile sees.
2. **Fragments go.** A cut box is dropped when at least ``min_ioa`` of its area lies inside an uncut box
   of the same class from another tile (or from the full-image pass): another tile sees that object
   whole.
3. **Duplicates go.** Class-wise NMS (torchvision ``batched_nms``) at IoU ``nms_iou`` over the remaining
   boxes of all tiles: an object seen whole by two overlapping tiles keeps its best box.

``full_image=True`` adds the whole image, resized by the model as usual, as one more "tile" whose
boxes are never cut: large objects that no tile sees whole are found there, and their fragments in
the tiles are dropped by rule 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import PIL.Image
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from asag.config import FRACTION, Range, check_number
from asag.errors import ConfigError
from asag.ops.boxes import intersection_over_foreground
from asag.structures import Detections

DEFAULT_TILE_OVERLAP = 0.2
TILE_OVERLAP_RANGE = Range(0, 1, high_open=True)  # a tile must advance
MIN_TILE = 32  # pixels; below this a tile holds too little for the model's coarsest levels
TILE_RANGE = Range(MIN_TILE)
# Merging defaults (module docstring): a box within 1 % of the tile side of an interior tile edge is cut;
# it goes when half of it lies inside an uncut same-class box of another tile; NMS IoU of duplicates.
DEFAULT_EDGE_MARGIN = 0.01
DEFAULT_MIN_IOA = 0.5
DEFAULT_MERGE_IOU = 0.5
FULL_IMAGE = -1  # the source index of the full-image pass


@dataclass(frozen=True)
class Tile:
    """One crop of an image: pixel box ``[x0, x1) x [y0, y1)`` and which of its edges lie inside the
    image (``interior``: left, top, right, bottom)."""

    x0: int
    y0: int
    x1: int
    y1: int
    interior: tuple[bool, bool, bool, bool]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)``, as ``PIL.Image.crop`` takes it."""
        return self.x0, self.y0, self.x1, self.y1


def check_tiling(tile: int, overlap: float) -> None:
    """ConfigError unless ``tile`` is an integer of at least :data:`MIN_TILE` px and ``overlap`` in [0, 1)."""
    if not isinstance(tile, int) or isinstance(tile, bool):
        raise ConfigError(f"tile must be an integer number of pixels, got {tile!r}")
    check_number("tile", tile, TILE_RANGE)
    check_number("tile_overlap", overlap, TILE_OVERLAP_RANGE)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one side of ``length`` px: ``0, s, 2s, ...`` with stride
    ``s = tile - round(overlap * tile)`` (at least 1), as many as needed to reach the end, the last one
    shifted back to ``length - tile`` so that it stays inside. A side not longer than ``tile``: ``[0]``
    (one tile, as long as the side)."""
    if length <= tile:
        return [0]
    stride = max(1, tile - round(overlap * tile))
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def tile_grid(width: int, height: int, tile: int, overlap: float = DEFAULT_TILE_OVERLAP) -> list[Tile]:
    """The tiles of a ``width x height`` image, row by row: ``tile x tile`` crops (sides of the image
    shorter than ``tile``: the whole side) overlapping by about ``overlap`` of a tile (see
    :func:`tile_starts`)."""
    check_tiling(tile, overlap)
    tiles = []
    for y0 in tile_starts(height, tile, overlap):
        for x0 in tile_starts(width, tile, overlap):
            x1, y1 = min(x0 + tile, width), min(y0 + tile, height)
            tiles.append(Tile(x0, y0, x1, y1, (x0 > 0, y0 > 0, x1 < width, y1 < height)))
    return tiles


def cut_boxes(boxes: Tensor, tile: Tile, margin: float) -> Tensor:
    """``[N]`` bool: which of ``boxes`` (``[N, 4]`` xyxy in full-image pixels, found in ``tile``) reach to
    within ``margin`` px of (or past) an interior edge of ``tile``."""
    left, top, right, bottom = tile.interior
    cut = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    if left:
        cut |= boxes[:, 0] <= tile.x0 + margin
    if top:
        cut |= boxes[:, 1] <= tile.y0 + margin
    if right:
        cut |= boxes[:, 2] >= tile.x1 - margin
    if bottom:
        cut |= boxes[:, 3] >= tile.y1 - margin
    return cut


@dataclass
class TiledDetections:
    """Detections of all tiles in full-image pixels, before merging: ``boxes [N, 4]`` xyxy, ``scores
    [N]``, ``labels [N]`` contiguous class indices, ``source [N]`` the tile index of each box
    (:data:`FULL_IMAGE` for the full-image pass) and ``cut [N]`` (:func:`cut_boxes`)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    source: Tensor
    cut: Tensor


def gather_tiles(per_tile: Sequence[Detections], tiles: Sequence[Tile], margin: float,
                 full_image: Detections | None = None) -> TiledDetections:
    """Detections of each tile (boxes in the tile's pixels; ``per_tile[i]`` of ``tiles[i]``) and of the
    optional full-image pass (full-image pixels, never cut) -> one :class:`TiledDetections` in
    full-image pixels."""
    boxes, scores, labels, source, cut = [], [], [], [], []
    for index, (dets, tile) in enumerate(zip(per_tile, tiles, strict=True)):
        shifted = dets.boxes.float() + dets.boxes.new_tensor([tile.x0, tile.y0, tile.x0, tile.y0]).float()
        boxes.append(shifted)
        cut.append(cut_boxes(shifted, tile, margin))
        scores.append(dets.scores.float())
        labels.append(dets.labels)
        source.append(torch.full_like(dets.labels, index))
    if full_image is not None:
        boxes.append(full_image.boxes.float())
        cut.append(torch.zeros(len(full_image), dtype=torch.bool, device=full_image.boxes.device))
        scores.append(full_image.scores.float())
        labels.append(full_image.labels)
        source.append(torch.full_like(full_image.labels, FULL_IMAGE))
    if not boxes:
        empty = torch.zeros(0, dtype=torch.int64)
        return TiledDetections(torch.zeros(0, 4), torch.zeros(0), empty, empty.clone(),
                               torch.zeros(0, dtype=torch.bool))
    return TiledDetections(torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(source),
                           torch.cat(cut))


def fragments(dets: TiledDetections, min_ioa: float) -> Tensor:
    """``[N]`` bool: the cut boxes of which at least ``min_ioa`` of the area lies inside an uncut box of
    the same class from another source (rule 2 of the module docstring)."""
    dropped = torch.zeros(len(dets.scores), dtype=torch.bool, device=dets.scores.device)
    cut_idx = dets.cut.nonzero().flatten()
    whole_idx = (~dets.cut).nonzero().flatten()
    if len(cut_idx) == 0 or len(whole_idx) == 0:
        return dropped
    ioa = intersection_over_foreground(dets.boxes[cut_idx][None], dets.boxes[whole_idx][None])[0]  # [c, w]
    same_class = dets.labels[cut_idx, None] == dets.labels[None, whole_idx]
    other_source = dets.source[cut_idx, None] != dets.source[None, whole_idx]
    dropped[cut_idx] = ((ioa >= min_ioa) & same_class & other_source).any(dim=1)
    return dropped


def merge_tiles(dets: TiledDetections, *, nms_iou: float = DEFAULT_MERGE_IOU,
                min_ioa: float = DEFAULT_MIN_IOA) -> Detections:
    """The merged detections of the whole image (rules 2 and 3 of the module docstring), best first."""
    check_number("nms_iou", nms_iou, FRACTION)
    check_number("min_ioa", min_ioa, FRACTION)
    kept = (~fragments(dets, min_ioa)).nonzero().flatten()
    order = kept[batched_nms(dets.boxes[kept], dets.scores[kept], dets.labels[kept], nms_iou)]  # by score
    return Detections(dets.boxes[order], dets.scores[order], dets.labels[order])


class RawPredictor(Protocol):
    """What :func:`predict_tiled` needs of a detector (:class:`asag.api.Detector`)."""

    def predict_raw(self, images: Sequence[PIL.Image.Image]) -> list[Detections]: ...


def predict_tiled(
    detector: RawPredictor, image: PIL.Image.Image, tile: int, overlap: float = DEFAULT_TILE_OVERLAP, *,
    batch_size: int = 4, full_image: bool = False, score_threshold: float = 0.0, topk: int | None = None,
    nms_iou: float = DEFAULT_MERGE_IOU, edge_margin: float = DEFAULT_EDGE_MARGIN,
    min_ioa: float = DEFAULT_MIN_IOA,
) -> Detections:
    """Detections of a (large) RGB ``image`` predicted tile by tile (module docstring), boxes in its
    pixels, best first.

    ``batch_size`` tiles go through the model at once. Each tile keeps its detections with
    ``score >= score_threshold``, at most ``topk`` (best first) before merging; the merged result is not
    capped. ``edge_margin``: of the tile side (rule 1); ``min_ioa`` (rule 2); ``nms_iou`` (rule 3).
    """
    tiles = tile_grid(image.width, image.height, tile, overlap)
    check_number("batch_size", batch_size, Range(1))
    check_number("score_threshold", score_threshold, FRACTION)
    check_number("edge_margin", edge_margin, FRACTION)
    per_tile: list[Detections] = []
    for start in range(0, len(tiles), batch_size):
        crops = [image.crop(t.box) for t in tiles[start:start + batch_size]]
        per_tile += [_best(d, score_threshold, topk) for d in detector.predict_raw(crops)]
    whole = _best(detector.predict_raw([image])[0], score_threshold, topk) if full_image else None
    gathered = gather_tiles(per_tile, tiles, edge_margin * tile, whole)
    return merge_tiles(gathered, nms_iou=nms_iou, min_ioa=min_ioa)


def _best(dets: Detections, score_threshold: float, topk: int | None) -> Detections:
    """The detections with ``score >= score_threshold``, at most ``topk`` of the best."""
    keep = (dets.scores >= score_threshold).nonzero().flatten()
    keep = keep[dets.scores[keep].argsort(descending=True, stable=True)][:topk]
    return Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])
