"""Typed containers that cross module boundaries.

Box formats and coordinate frames (see ``docs`` and the spec, section 0):

* *pixel frame*: pixels of the resized, unpadded image (``0..w``, ``0..h``);
* *normalised frame*: pixel frame divided by ``(w, h, w, h)``; targets and head outputs live here;
* *patch frame*: coordinates normalised to one anchor-generator patch (the unit square);
* *original pixels*: pixels of the image as it was read from disk (detections live here).

Every container offers ``to(device)`` so the engine can move whole objects at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


def _move(value, device: torch.device | str):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if hasattr(value, "to") and hasattr(value, "__dataclass_fields__"):
        return value.to(device)
    return value


class _Movable:
    def to(self, device: torch.device | str):
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


# --------------------------------------------------------------------------------------------- data


@dataclass
class ImageTargets(_Movable):
    """Ground truth of one image.

    boxes: ``[N, 4]`` float, cxcywh in the normalised frame of the resized, unpadded image.
    labels: ``[N]`` int64 contiguous class indices ``0..C-1`` (see :class:`asag.data.labels.LabelMap`).
    image_id: the data set's image id.
    size: ``(h, w)`` of the resized, unpadded image.
    orig_size: ``(h, w)`` of the image as read from disk.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int = 0
    size: tuple[int, int] = (0, 0)
    orig_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Batch(_Movable):
    """A collated batch.

    images: ``[B, 3, Hp, Wp]`` normalised images, zero-padded bottom/right to the batch maximum rounded
        up to a multiple of 32.
    image_sizes: ``[B, 2]`` int64 ``(h, w)`` of each resized, unpadded image.
    orig_sizes: ``[B, 2]`` int64 ``(h, w)`` of each original image.
    targets: one :class:`ImageTargets` per image (empty boxes at inference).
    image_ids: data set image ids.
    """

    images: Tensor
    image_sizes: Tensor
    orig_sizes: Tensor
    targets: list[ImageTargets]
    image_ids: list[int]

    def __len__(self) -> int:
        return self.images.shape[0]


# --------------------------------------------------------------------------------- anchor generator


@dataclass
class PatchSet(_Movable):
    """Patches chosen at one probed level (P4 or P3) of the anchor generator.

    batch_idx: ``[N]`` int64 image of each patch.
    crop_pos: ``[N, 2]`` int64 ``(x, y)`` top-left in feature cells.
    loss_only: ``[N]`` bool, True for GT-derived / random patches that only feed the loss.
    valid: ``[N]`` bool, False for the empty slots of a fixed patch budget; None when every patch is real
        (the data sized the budget, or training).
    """

    batch_idx: Tensor
    crop_pos: Tensor
    loss_only: Tensor
    valid: Tensor | None = None

    def __len__(self) -> int:
        return int(self.batch_idx.numel())


@dataclass
class PatchPredictions(_Movable):
    """Raw anchor predictions of one anchor-generator level, in the patch frame.

    level: ``"P6"``, ``"P5"`` (the four crops of the 30x30 map), ``"P4"`` or ``"P3"``.
    raw: for P6 ``[B, n6, K, 5]`` (n6 = 4 flipped copies in training, 1 otherwise); for P5
        ``[B, 4, K, 5]``; for P4/P3 ``[n_patches, K, 5]``. Columns ``cx, cy, w, h`` have the sigmoid
        applied (patch frame); column 4 is the raw confidence logit.
    batch_idx: ``[B]`` (P6/P5) or ``[n_patches]`` int64 image index of each row.
    crop_pos: ``None`` for P6; ``[4, 2]`` (row, col) crop offsets on the 30x30 grid for P5;
        ``[n_patches, 2]`` (x, y) top-left in feature cells for P4/P3.
    loss_only: ``[n_patches]`` bool, True for patches that only feed the loss (GT-derived or random
        patches added in training); ``None`` for P6/P5.
    stride: feature stride of the level (0 for P6/P5, whose frame is the image).
    valid: P4/P3 with a fixed patch budget: ``[n_patches]`` bool, False for the empty patch slots (their
        rows are computed and ignored); ``None`` when every row is a probed patch.
    """

    level: str
    raw: Tensor
    batch_idx: Tensor
    crop_pos: Tensor | None = None
    loss_only: Tensor | None = None
    stride: int = 0
    valid: Tensor | None = None


@dataclass
class OutputAnchors(_Movable):
    """The anchors that the anchor generator's stages chose for output, flat over all stages' anchors
    (``M`` entries; gathered without a host read, so the unchosen ones stay, masked).

    anchors: ``[M, 5]`` pixel cxcywh + confidence; chosen: ``[M]`` bool.
    image_idx / stage_idx: ``[M]`` int64 image and stage (0 = P5/P6, then P4, P3) of each entry.
    order_key: ``[M]`` int64, increasing with (image, stage, row, position): the output order.
    reached: ``[S, B]`` bool, images that own rows at each stage (their group exists even when empty).
    """

    anchors: Tensor
    chosen: Tensor
    image_idx: Tensor
    stage_idx: Tensor
    order_key: Tensor
    reached: Tensor

    @classmethod
    def from_groups(cls, groups: list[list[Tensor]]) -> OutputAnchors:
        """The inverse of :meth:`per_image`: ``groups[b][s]`` are the ``[n, 5]`` anchors of stage ``s`` of
        image ``b`` (an image lists the stages it reached, coarse first)."""
        num_stages = max((len(g) for g in groups), default=0)
        parts = [(a, b, s) for b, g in enumerate(groups) for s, a in enumerate(g)]
        anchors = torch.cat([a for a, _, _ in parts]) if parts else torch.zeros(0, 5)
        image = torch.cat([torch.full((len(a),), b) for a, b, _ in parts]) if parts else torch.zeros(0).long()
        stage = torch.cat([torch.full((len(a),), s) for a, _, s in parts]) if parts else torch.zeros(0).long()
        reached = torch.tensor([[s < len(g) for g in groups] for s in range(num_stages)], dtype=torch.bool)
        return cls(anchors, torch.ones(len(anchors), dtype=torch.bool), image, stage,
                   torch.arange(len(anchors)), reached.view(num_stages, len(groups)))

    def per_image(self) -> list[list[Tensor]]:
        """Per image, the ``[n, 5]`` chosen anchors of every stage it reached (coarse to fine), in output
        order. One host read (the group sizes)."""
        num_stages, num_images = self.reached.shape
        order = torch.argsort(self.order_key)  # output order
        order = order[torch.argsort((~self.chosen[order]).to(torch.uint8), stable=True)]  # chosen first
        cells = self.image_idx * num_stages + self.stage_idx  # [M] (image, stage) of each entry
        counts = torch.zeros(num_images * num_stages, dtype=torch.int64, device=cells.device)
        counts.index_add_(0, cells, self.chosen.long())
        sizes, reached = torch.stack([counts, self.reached.T.reshape(-1).long()]).tolist()  # one host read
        parts = torch.split(self.anchors[order], [*sizes, len(order) - sum(sizes)])  # the last: unchosen
        groups: list[list[Tensor]] = [[] for _ in range(num_images)]
        for cell, part in enumerate(parts[:-1]):
            if reached[cell]:
                groups[cell // num_stages].append(part)
        return groups


@dataclass
class AnchorOutput(_Movable):
    """What the anchor generator hands to the rest of the model.

    patch_predictions: per-level raw predictions for the loss, ordered P6, P5, then P4 and P3 when
        they were probed.
    boxes: ``[B, Q, 4]`` anchors, cxcywh in pixels of the resized unpadded image; padded rows hold the
        full-image box ``(w/2, h/2, w, h)``.
    valid_mask: ``[B, Q]`` bool, True for real anchors (always a prefix of each row).
    output_anchors: the anchors every stage chose for output (before the ``max_anchors`` cap), read per
        image through :attr:`selected`; None when not recorded.
    budget_bound: with fixed budgets: ``"P4"``, ``"P3"``, ``"queries"`` -> ``[B]`` bool, True where that
        budget bound for the image (more patches / anchors than slots); ``None`` when the data sized them.
    """

    patch_predictions: list[PatchPredictions]
    boxes: Tensor
    valid_mask: Tensor
    output_anchors: OutputAnchors | None = None
    budget_bound: dict[str, Tensor] | None = None

    @property
    def num_queries(self) -> int:
        return self.boxes.shape[1]

    @property
    def selected(self) -> list[list[Tensor]]:
        """Per image, per stage it reached (P5/P6, P4, P3), the ``[n, 5]`` pixel cxcywh + confidence of the
        anchors chosen for output (for visualisation and statistics). Computed on each access, with one
        host read (:meth:`OutputAnchors.per_image`); ``[]`` when not recorded."""
        return [] if self.output_anchors is None else self.output_anchors.per_image()


# ---------------------------------------------------------------------------------- query / heads


@dataclass
class QuerySet(_Movable):
    """Queries entering the proposal stage (denoising queries first, then the anchors).

    boxes: ``[B, L, 4]`` cxcywh pixels, ``L = num_dn + Q``.
    attn_mask: ``[B * num_heads, L, L]`` bool, True = the query (row) may not attend to the key (column).
    valid_mask: ``[B, Q]`` bool over the anchor (matching) part only.
    num_dn: number of denoising queries at the front (0 without denoising).
    dn_boxes / dn_labels: per image denoising targets (normalised cxcywh / labels) of the first rows of
        the denoising part; ``None`` without denoising.
    """

    boxes: Tensor
    attn_mask: Tensor
    valid_mask: Tensor
    num_dn: int = 0
    dn_boxes: list[Tensor] | None = None
    dn_labels: list[Tensor] | None = None


@dataclass
class HeadOutput(_Movable):
    """Predictions of the proposal stage or of one decoder head.

    logits: ``[B, L, C]`` class logits.
    boxes: ``[B, L, 4]`` cxcywh in the normalised frame.
    """

    logits: Tensor
    boxes: Tensor


@dataclass
class ProposalOutput(_Movable):
    """Proposal-stage result.

    prediction: logits and normalised cxcywh proposals ``[B, L, *]`` (supervised as "rpn").
    content: ``[B, L, d]`` query content handed to the decoder heads.
    xyzr: ``[B, L, 4]`` detached refined boxes in the xyzr parameterisation (stride-4 units).
    """

    prediction: HeadOutput
    content: Tensor
    xyzr: Tensor


@dataclass
class ModelOutput(_Movable):
    """The detector's output, identical in structure for training and evaluation.

    anchors: anchor-generator output.
    queries: the query set (with denoising queries and attention mask).
    proposals: proposal-stage predictions, ``[B, L, *]``.
    heads: the parallel decoder heads' predictions, ``[B, L, *]``; the last one is the main head
        (``aux_0 .. aux_{n-2}`` come first). A model that keeps only one head has a list of one.
    """

    anchors: AnchorOutput
    queries: QuerySet
    proposals: HeadOutput
    heads: list[HeadOutput]

    @property
    def num_dn(self) -> int:
        return self.queries.num_dn

    @property
    def valid_mask(self) -> Tensor:
        """``[B, Q]`` bool mask of the real (non-padded) matching queries."""
        return self.anchors.valid_mask


@dataclass
class Detections(_Movable):
    """Post-processed detections of one image.

    boxes: ``[K, 4]`` xyxy in original-image pixels.
    scores: ``[K]`` sigmoid scores, descending.
    labels: ``[K]`` int64 contiguous class indices (map back with the data set's label map).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())


@dataclass
class DetectionBatch(_Movable):
    """Fixed-size detections of a batch: the static mode's post-processing output (and an exported
    model's outputs, docs/inference.md).

    boxes: ``[B, K, 4]`` float32 xyxy in original-image pixels.
    scores: ``[B, K]`` float32 sigmoid scores, descending over the valid entries of a row.
    labels: ``[B, K]`` int64 contiguous class indices.
    valid: ``[B, K]`` bool, True for real detections, always a prefix of each row; the padding after it
        holds zeros (box, score and label 0).
    ``K`` is fixed by the model: ``min(topk, Q * C)`` with ``Q = max_anchors``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    valid: Tensor

    def to_list(self) -> list[Detections]:
        """Per image, the valid entries as :class:`Detections` (one host read for the whole batch)."""
        counts = self.valid.sum(dim=1).tolist()
        return [Detections(self.boxes[b, :n], self.scores[b, :n], self.labels[b, :n])
                for b, n in enumerate(counts)]
