"""Selection of the anchor generator's patches and output anchors (spec 3.4 step 4, 3.5).

The containers passed between the stages of :class:`~asag.modeling.anchor_generator.AnchorGenerator`
and the functions that turn the stages' chosen anchors into the padded ``[B, Q, 4]`` query boxes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from asag.modeling.patches import count_per_group, rank_in_group

# Each anchor is (cx, cy, w, h, confidence logit) (spec 3.2).
ANCHOR_FIELDS = 5


@dataclass
class StageAnchors:
    """Decoded anchors of one stage, the input of the next probing step.

    anchors: ``[N, K, 5]`` pixel cxcywh + confidence (after the zeroing rules), detached.
    image_idx: ``[N]`` int64 image of each row (rows are images at the coarse stage, patches after).
    coarse: True for the P5-crops/P6 stage (the ``min_anchors`` fallback applies only there).
    row_valid: static mode: ``[N]`` bool, False for the empty patch slots (their anchors are ignored);
        ``None`` when every row is real. Static rows are image-major, the same count per image.
    """

    anchors: Tensor
    image_idx: Tensor
    coarse: bool
    row_valid: Tensor | None = None


@dataclass
class StageSelection:
    """Anchors of one stage chosen for output, as a mask (extracted for all stages at once in ``_pack``).

    anchors: ``[N, K, 5]`` the stage's pixel cxcywh + confidence.
    chosen: ``[N, K]`` bool, the output anchors.
    position: ``[N, K]`` int64 output order inside a row (ascending).
    image_idx: ``[N]`` int64 image of each row.
    reached: ``[B]`` bool, images that own rows at this stage (their group exists even when empty).
    """

    anchors: Tensor
    chosen: Tensor
    position: Tensor
    image_idx: Tensor
    reached: Tensor


@dataclass
class PackedAnchors:
    """The output anchors of every stage, extracted in output order (images ascending, then stages
    coarse to fine, rows, positions).

    anchors: ``[n, 5]`` pixel cxcywh + confidence. image_idx / stage_idx: ``[n]`` int64.
    reached: ``[S, B]`` bool, images that own rows at each stage.
    """

    anchors: Tensor
    image_idx: Tensor
    stage_idx: Tensor
    reached: Tensor


@dataclass
class FlatSelections:
    """Every stage's anchors flattened to one list (``M = sum N_s * K_s`` entries).

    anchors: ``[M, 5]``; chosen: ``[M]`` bool; image_idx / stage_idx: ``[M]`` int64; order_key: ``[M]``
    int64, increasing with (image, stage, row, position).
    """

    anchors: Tensor
    chosen: Tensor
    image_idx: Tensor
    stage_idx: Tensor
    order_key: Tensor


def flatten_selections(selections: list[StageSelection]) -> FlatSelections:
    """Flatten the stage selections (no host sync); see :class:`FlatSelections`."""
    max_rows = max(s.anchors.shape[0] for s in selections)
    max_cols = max(s.anchors.shape[1] for s in selections)
    parts = []
    for stage, sel in enumerate(selections):
        rows, cols = sel.chosen.shape
        row_idx = torch.arange(rows, device=sel.chosen.device)[:, None].expand(rows, cols)  # [N, K]
        images = sel.image_idx[:, None].expand(rows, cols)  # [N, K]
        key = ((images * len(selections) + stage) * max_rows + row_idx) * max_cols + sel.position
        parts.append((sel.anchors.reshape(-1, ANCHOR_FIELDS), sel.chosen.reshape(-1), images.reshape(-1),
                      torch.full_like(images, stage).reshape(-1), key.reshape(-1)))
    return FlatSelections(*(torch.cat(column) for column in zip(*parts)))


@dataclass
class RankedSelections:
    """Static mode: every image's anchors of all stages in output order, chosen ones first.

    anchors: ``[B, T, 5]``; chosen: ``[B, T]`` bool (a prefix of each row); stage_idx: ``[B, T]`` int64;
    reached: ``[S, B]`` bool, images that own real rows at each stage.
    """

    anchors: Tensor
    chosen: Tensor
    stage_idx: Tensor
    reached: Tensor


def rank_static_selections(selections: list[StageSelection], num_images: int) -> RankedSelections:
    """Concatenate static-mode stages per image and sort by (chosen first, stage, row, position).

    Static rows are image-major with the same number ``R_s`` per image, so stage ``s`` is a
    ``[B, R_s * K_s]`` block of every image; the sort key is unique among chosen anchors.
    """
    anchors, chosen, stage_idx, keys = [], [], [], []
    offset = 0
    for stage, sel in enumerate(selections):
        rows, cols = sel.chosen.shape
        per_image = rows // num_images
        row_in_image = (torch.arange(rows, device=sel.chosen.device) % per_image)[:, None]  # [N, 1]
        key = (row_in_image * (cols + 1) + sel.position).reshape(num_images, -1)  # [B, R * K]
        keys.append(key + offset)
        offset += per_image * (cols + 1)
        anchors.append(sel.anchors.reshape(num_images, -1, ANCHOR_FIELDS))
        chosen.append(sel.chosen.reshape(num_images, -1))
        stage_idx.append(torch.full_like(key, stage))
    chosen_all = torch.cat(chosen, dim=1)  # [B, T]
    key = torch.cat(keys, dim=1).masked_fill(~chosen_all, offset)  # unchosen last
    order = torch.argsort(key, dim=1, stable=True)  # [B, T]
    return RankedSelections(
        torch.cat(anchors, dim=1).gather(1, order[..., None].expand(-1, -1, ANCHOR_FIELDS)),
        chosen_all.gather(1, order), torch.cat(stage_idx, dim=1).gather(1, order),
        torch.stack([s.reached for s in selections]),
    )


def _static_groups(ranked: RankedSelections, num_images: int) -> list[list[Tensor]]:
    """``AnchorOutput.selected`` of the static mode, built on first use (host reads allowed there)."""
    flat = ranked.chosen.reshape(-1).nonzero()[:, 0]  # [n]
    images = torch.div(flat, ranked.chosen.shape[1], rounding_mode="floor")
    packed = PackedAnchors(ranked.anchors.reshape(-1, ANCHOR_FIELDS)[flat], images,
                           ranked.stage_idx.reshape(-1)[flat], ranked.reached)
    return _groups_per_image(packed, num_images)


def _groups_per_image(packed: PackedAnchors, num_images: int) -> list[list[Tensor]]:
    """Per image, the ``[n, 5]`` output anchors of every stage it reached (coarse to fine)."""
    num_stages = packed.reached.shape[0]
    cells = packed.image_idx * num_stages + packed.stage_idx  # [n] (image, stage) cell, ascending
    counts = count_per_group(cells, num_images * num_stages).view(num_images, num_stages)  # [B, S]
    counts, reached = torch.stack([counts, packed.reached.T.long()]).tolist()  # one host sync
    parts = iter(torch.split(packed.anchors, [n for row in counts for n in row]))
    groups: list[list[Tensor]] = [[] for _ in range(num_images)]
    for image in range(num_images):
        for stage in range(num_stages):
            part = next(parts)
            if reached[image][stage]:
                groups[image].append(part)
    return groups


class StageGroups(list):
    """``AnchorOutput.selected``: per image, the ``[n, 5]`` output anchors of every stage it reached.

    A list filled on first use: splitting the anchors per image needs the counts on the host, which
    inference (where nobody asks for them) should not wait for. Reads behave as on the plain
    ``list[list[Tensor]]``; copies and pickles are plain lists.
    """

    def __init__(self, packed=(), num_images: int | None = None, build=None) -> None:
        lazy = num_images is not None or build is not None
        super().__init__(() if lazy else packed)
        if num_images is not None:
            build = functools.partial(_groups_per_image, packed, num_images)
        self._pending = build

    def _build(self) -> None:
        if self._pending is not None:
            build, self._pending = self._pending, None
            list.extend(self, build())

    def __reduce_ex__(self, protocol):
        self._build()
        return list, (list(list.__iter__(self)),)


def _building(method):
    def wrapper(self, *args, **kwargs):
        self._build()
        return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    return wrapper


for _name in ("__len__", "__iter__", "__getitem__", "__contains__", "__reversed__", "__eq__", "__ne__",
              "__repr__", "__add__", "index", "count", "copy"):
    setattr(StageGroups, _name, _building(getattr(list, _name)))


def capped_slots(conf: Tensor, images: Tensor, num_images: int, max_anchors: int) -> tuple[Tensor, Tensor]:
    """Output slot of every anchor under the per-image cap (spec 3.5 C), without host syncs.

    Args:
        conf: ``[n]`` confidences of anchors grouped by image (ascending).
        images: ``[n]`` int64 image index.
    Returns:
        ``[n]`` int64 slot (column of the padded output; ``>= max_anchors`` = dropped) and ``[B]`` kept
        anchors per image. Images over the cap take their anchors by descending confidence (ties keep
        their order); the others keep their order.
    """
    counts = count_per_group(images, num_images)  # [B]
    by_conf = torch.sort(conf, descending=True, stable=True).indices
    by_conf = by_conf[torch.argsort(images[by_conf], stable=True)]  # per image, descending confidence
    conf_rank = torch.empty_like(images).scatter_(0, by_conf, rank_in_group(images[by_conf], num_images))
    over = counts[images] > max_anchors  # [n]
    slots = torch.where(over, conf_rank, rank_in_group(images, num_images))
    return slots, counts.clamp(max=max_anchors)


def cap_per_image(
    anchors: Tensor, images: Tensor, num_images: int, max_anchors: int
) -> tuple[Tensor, Tensor]:
    """Keep the ``max_anchors`` most confident anchors of every image that has more (spec 3.5 C).

    Args:
        anchors: ``[n, 5]`` pixel cxcywh + confidence, grouped by image (ascending).
        images: ``[n]`` int64 image index.
    Returns:
        The kept anchors and their images, grouped by image. Images over the cap are sorted by
        descending confidence (ties keep their order); the others keep their order.
    """
    slots, _ = capped_slots(anchors[:, 4], images, num_images, max_anchors)
    kept = (slots < max_anchors).nonzero()[:, 0]
    kept = kept[torch.argsort(images[kept] * max(max_anchors, 1) + slots[kept])]
    return anchors[kept], images[kept]
