"""Every stage of the ASAG pipeline drawn on one image (the supplement's Figure C-2).

Stages, one panel each (:data:`STAGES`):

* ``patches``: the squares Adaptive Probing cut from P4 and P3 (``AnchorOutput.patch_predictions``:
  top-left ``crop_pos`` ``(x, y)`` in feature cells times the level stride, side ``patch_size * stride``
  pixels of the resized image), each labelled with its level; loss-only training patches are skipped.
* ``anchors``: the dynamic anchors handed to the proposal stage (valid rows of ``AnchorOutput.boxes``).
* ``proposals``: the proposal stage's refined boxes (valid rows after the denoising rows), in the colour
  of their most likely class.
* ``detections``: the used head's post-processed detections above a score threshold, with class names
  and scores.
* ``gt``: ground truth read from a COCO-format annotation file.

Every box is converted to xyxy pixels of the *original* image, the frame the panels are drawn in. As in
Figure C-2, patches are red (P3 orange, to tell the levels apart) and anchors white; the other stages
use the class colours of :func:`asag.viz.draw.class_colour`, keyed by the data set's category id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from torch import Tensor
from torchvision.ops import box_convert

from asag.data.coco import load_coco_json, parse_coco
from asag.data.labels import LabelMap
from asag.modeling.detector import ASAG
from asag.structures import AnchorOutput, Detections, HeadOutput, ModelOutput
from asag.viz.draw import Panel, class_colour, draw_boxes

STAGES = ("patches", "anchors", "proposals", "detections", "gt")
# Figure C-2 of the supplement: patches red, anchors white. P3 patches orange so both levels show.
PATCH_COLOURS = {"P4": (255, 0, 0), "P3": (255, 150, 0)}
PATCH_COLOUR_NAMES = {"P4": "red", "P3": "orange"}
ANCHOR_COLOUR = (255, 255, 255)
# Outline widths in pixels: thin for the many anchors and proposals, thick for the few others.
LINE_WIDTHS = {"patches": 2, "anchors": 1, "proposals": 1, "detections": 2, "gt": 2}
# Anchor-generator stages in the order of ``AnchorOutput.selected`` (spec 3.5 C: coarse to fine).
ANCHOR_STAGE_NAMES = ("P5/P6", "P4", "P3")

Colour = tuple[int, int, int]
SizeHW = tuple[int, int]


@dataclass
class BoxSet:
    """Boxes of one stage of one image.

    boxes_xyxy: ``[N, 4]`` float xyxy in pixels of the original image.
    category_ids: ``[N]`` int64 data-set category ids (class colours), or ``None`` for a one-colour stage.
    captions: ``N`` texts drawn at the boxes (class names, scores, level names), or ``None``.
    """

    boxes_xyxy: Tensor
    category_ids: Tensor | None = None
    captions: list[str] | None = None

    def __len__(self) -> int:
        return int(self.boxes_xyxy.shape[0])


@dataclass
class PipelineTrace:
    """What one image went through, every box in xyxy pixels of the original image.

    image_hw: ``(h, w)`` of the original image.
    patches: per probed level (``"P4"``, ``"P3"`` as reached), its real patches (captions = level).
    anchors: the anchors entering the proposal stage.
    anchors_per_stage: anchors output by each anchor-generator stage reached (``ANCHOR_STAGE_NAMES``
        order), counted before the ``max_anchors`` cap.
    proposals: proposal-stage boxes with the category id of their most likely class.
    detections: detections scoring at least ``score_threshold`` (captions ``"name score"``).
    ground_truth: ground-truth boxes (captions = class names), or ``None`` without annotations.
    """

    image_hw: SizeHW
    patches: dict[str, BoxSet]
    anchors: BoxSet
    anchors_per_stage: list[int]
    proposals: BoxSet
    detections: BoxSet
    score_threshold: float = 0.0
    ground_truth: BoxSet | None = None


@dataclass
class PipelineRun:
    """One evaluation forward pass kept whole for drawing.

    features: FPN levels ``[P2, P3, P4, P5]``, each ``[B, d, H_l, W_l]`` float32 (padded batch).
    output: the model output; detections: per image, xyxy in original pixels.
    image_sizes / orig_sizes: ``[B, 2]`` int64 ``(h, w)`` of the resized unpadded and original images.
    """

    features: list[Tensor]
    output: ModelOutput
    detections: list[Detections]
    image_sizes: Tensor
    orig_sizes: Tensor


# ------------------------------------------------------------------------------------ forward pass


@torch.inference_mode()
def run_pipeline(
    model: ASAG, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor, inference_level: str | None = None
) -> PipelineRun:
    """Evaluation-mode forward keeping the features, the stage outputs and the detections.

    Args: ``images [B, 3, Hp, Wp]`` normalised padded batch; ``image_sizes`` / ``orig_sizes`` ``[B, 2]``
    ``(h, w)``; ``inference_level`` ``P3P6 | P4P6 | P5P6`` overrides the probing depth.
    """
    was_training = model.training
    model.eval()
    try:
        features = model.extract_features(images)
        output = model.forward_features(features, image_sizes, inference_level=inference_level)
        detections = model.postprocess(output, orig_sizes)
    finally:
        model.train(was_training)
    return PipelineRun(features, output, detections, image_sizes, orig_sizes)


# -------------------------------------------------------------------------------- box extraction


def patch_squares_xyxy(crop_pos: Tensor, stride: int, patch_size: int) -> Tensor:
    """``[N, 2]`` ``(x, y)`` patch top-left corners in feature cells -> ``[N, 4]`` xyxy squares of side
    ``patch_size * stride`` in pixels of the resized image."""
    top_left = crop_pos.to(torch.float32) * stride  # [N, 2] (x, y) px
    return torch.cat([top_left, top_left + patch_size * stride], dim=1)  # [N, 4]


def rescale_xyxy(boxes_xyxy: Tensor, from_hw: SizeHW, to_hw: SizeHW) -> Tensor:
    """``[N, 4]`` xyxy pixels of an image of size ``from_hw`` -> pixels of the same image at ``to_hw``."""
    (from_h, from_w), (to_h, to_w) = from_hw, to_hw
    scale = torch.tensor([to_w / from_w, to_h / from_h] * 2, dtype=torch.float32, device=boxes_xyxy.device)
    return boxes_xyxy.float() * scale


def probed_patches(anchors: AnchorOutput, image: int, patch_size: int) -> dict[str, Tensor]:
    """Per probed level (P4, P3 as reached), ``[N, 4]`` xyxy squares (resized-image pixels) of the real
    patches of one image. P6 and the P5 crops cover the whole image and are not drawn."""
    squares = {}
    for prediction in anchors.patch_predictions:
        if prediction.stride == 0 or prediction.crop_pos is None:
            continue
        mine = prediction.batch_idx == image
        if prediction.loss_only is not None:
            mine &= ~prediction.loss_only
        corners = prediction.crop_pos[mine]  # [N, 2] (x, y) cells
        squares[prediction.level] = patch_squares_xyxy(corners, prediction.stride, patch_size)
    return squares


def valid_anchors_xyxy(anchors: AnchorOutput, image: int) -> Tensor:
    """``[n, 4]`` xyxy (resized-image pixels) of one image's real anchors."""
    return box_convert(anchors.boxes[image][anchors.valid_mask[image]], "cxcywh", "xyxy")


def valid_proposals(
    proposals: HeadOutput, valid_mask: Tensor, num_dn: int, image: int, size_hw: SizeHW
) -> tuple[Tensor, Tensor]:
    """One image's real proposals.

    Args: ``proposals`` ``[B, num_dn + Q, *]`` (normalised cxcywh boxes); ``valid_mask`` ``[B, Q]``.
    Returns: ``[n, 4]`` xyxy in resized-image pixels and ``[n]`` contiguous label of the best class.
    """
    keep = valid_mask[image]  # [Q]
    boxes = proposals.boxes[image, num_dn:][keep]  # [n, 4] normalised cxcywh
    labels = proposals.logits[image, num_dn:][keep].argmax(-1)  # [n]
    h, w = size_hw
    scale = boxes.new_tensor([w, h, w, h])
    return box_convert(boxes, "cxcywh", "xyxy") * scale, labels


def detection_boxes(dets: Detections, label_map: LabelMap, score_threshold: float) -> BoxSet:
    """Detections scoring at least ``score_threshold``, captioned ``"name score"``."""
    keep = dets.scores >= score_threshold
    labels, scores = dets.labels[keep].cpu(), dets.scores[keep].cpu().tolist()
    captions = [f"{label_map.name_of(int(c))} {s:.2f}" for c, s in zip(labels.tolist(), scores)]
    return BoxSet(dets.boxes[keep].float().cpu(), label_map.to_category_ids(labels), captions)


def trace_image(
    run: PipelineRun,
    image: int,
    label_map: LabelMap,
    patch_size: int,
    score_threshold: float = 0.0,
    ground_truth: BoxSet | None = None,
) -> PipelineTrace:
    """Collect the boxes of every stage of image ``image`` of ``run`` in original-image pixels.

    ``label_map`` maps the model's contiguous labels to category ids and names; ``patch_size`` is the
    anchor generator's patch side in cells; ``ground_truth`` is already in original-image pixels.
    """
    size = tuple(run.image_sizes[image].tolist())
    orig = tuple(run.orig_sizes[image].tolist())
    out = run.output
    patches = {
        level: BoxSet(rescale_xyxy(squares, size, orig).cpu(), captions=[level] * len(squares))
        for level, squares in probed_patches(out.anchors, image, patch_size).items()
    }
    anchors = BoxSet(rescale_xyxy(valid_anchors_xyxy(out.anchors, image), size, orig).cpu())
    boxes, labels = valid_proposals(out.proposals, out.valid_mask, out.num_dn, image, size)
    proposals = BoxSet(rescale_xyxy(boxes, size, orig).cpu(), label_map.to_category_ids(labels.cpu()))
    return PipelineTrace(
        image_hw=orig,
        patches=patches,
        anchors=anchors,
        anchors_per_stage=[len(s) for s in out.anchors.selected[image]],
        proposals=proposals,
        detections=detection_boxes(run.detections[image], label_map, score_threshold),
        score_threshold=score_threshold,
        ground_truth=ground_truth,
    )


# ----------------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """Annotations of one image as listed in a COCO-format file: ``size_hw`` of the image there and its
    boxes (xyxy pixels in that frame, category ids, class names as captions)."""

    size_hw: SizeHW
    boxes: BoxSet


def load_ground_truth(path: str | os.PathLike) -> dict[str, GroundTruth]:
    """Read a COCO-format annotation file; keys are the listed file names and their base names.

    Raises :class:`asag.errors.DataError` (naming the file) for missing or malformed files.
    """
    index = parse_coco(load_coco_json(path), str(path))
    label_map = index.label_map
    by_name: dict[str, GroundTruth] = {}
    for i, name in enumerate(index.file_names):
        rows = slice(int(index.offsets[i]), int(index.offsets[i + 1]))
        labels = torch.from_numpy(index.labels[rows])
        boxes = BoxSet(torch.from_numpy(index.boxes_xyxy[rows]), label_map.to_category_ids(labels),
                       [label_map.name_of(int(c)) for c in labels.tolist()])
        entry = GroundTruth((int(index.heights[i]), int(index.widths[i])), boxes)
        by_name[name] = entry
        by_name.setdefault(Path(name).name, entry)
    return by_name


def ground_truth_for(
    index: dict[str, GroundTruth], path: str | os.PathLike, image_hw: SizeHW
) -> BoxSet | None:
    """The annotations of image file ``path`` (matched by base name) rescaled to the ``(h, w)`` it was
    read at, or ``None`` if the file lists no such image."""
    entry = index.get(Path(path).name)
    if entry is None:
        return None
    boxes = rescale_xyxy(entry.boxes.boxes_xyxy, entry.size_hw, image_hw)
    return BoxSet(boxes, entry.boxes.category_ids, entry.boxes.captions)


# ---------------------------------------------------------------------------------------- drawing


def clip_to_image(boxes_xyxy: Tensor, image_hw: SizeHW) -> tuple[Tensor, Tensor]:
    """Clamp ``[N, 4]`` xyxy pixel boxes to the image so boxes reaching past the border keep a visible
    outline there; returns the clamped boxes and an ``[N]`` mask of boxes that overlap the image."""
    h, w = image_hw
    x = boxes_xyxy[:, 0::2].clamp(0, w - 1)  # [N, 2]
    y = boxes_xyxy[:, 1::2].clamp(0, h - 1)  # [N, 2]
    clipped = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)  # [N, 4]
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, inside


def stage_boxes(trace: PipelineTrace, stage: str) -> tuple[BoxSet, list[Colour]]:
    """The boxes of one stage and the colour of each."""
    if stage == "patches":
        levels = list(trace.patches)
        merged = BoxSet(
            torch.cat([trace.patches[lv].boxes_xyxy for lv in levels]) if levels else torch.zeros(0, 4),
            captions=[c for lv in levels for c in trace.patches[lv].captions or []],
        )
        return merged, [PATCH_COLOURS.get(lv, PATCH_COLOURS["P4"]) for lv in levels
                        for _ in range(len(trace.patches[lv]))]
    if stage == "anchors":
        return trace.anchors, [ANCHOR_COLOUR] * len(trace.anchors)
    boxes = {"proposals": trace.proposals, "detections": trace.detections, "gt": trace.ground_truth}[stage]
    if boxes is None:
        raise ValueError(f"stage {stage!r} has no boxes in this trace (no ground truth given)")
    return boxes, [class_colour(int(c)) for c in boxes.category_ids.tolist()]


def stage_title(trace: PipelineTrace, stage: str) -> str:
    """One line naming the stage and its box counts."""
    if stage == "patches":
        parts = [f"{lv} x{len(b)} ({PATCH_COLOUR_NAMES.get(lv, '')})" for lv, b in trace.patches.items()]
        return "probed patches: " + (", ".join(parts) if parts else "none (no probing)")
    if stage == "anchors":
        per_stage = " + ".join(f"{n} {name}" for name, n in zip(ANCHOR_STAGE_NAMES, trace.anchors_per_stage))
        return f"anchors: {len(trace.anchors)} ({per_stage})"
    if stage == "proposals":
        return f"proposals: {len(trace.proposals)}"
    if stage == "detections":
        return f"detections: {len(trace.detections)} (score >= {trace.score_threshold:.2f})"
    return f"ground truth: {len(trace.ground_truth) if trace.ground_truth is not None else 0}"


def draw_stage(image: PIL.Image.Image, trace: PipelineTrace, stage: str) -> PIL.Image.Image:
    """A copy of ``image`` (the original, ``trace.image_hw``) with the boxes of one stage."""
    boxes, colours = stage_boxes(trace, stage)
    clipped, inside = clip_to_image(boxes.boxes_xyxy.reshape(-1, 4), (image.height, image.width))
    keep = inside.tolist()
    captions = [c for c, k in zip(boxes.captions, keep) if k] if boxes.captions else None
    return draw_boxes(image, clipped[inside].tolist(), [c for c, k in zip(colours, keep) if k], captions,
                      width=LINE_WIDTHS[stage], fill_labels=True)


def pipeline_panels(
    image: PIL.Image.Image, trace: PipelineTrace, stages: Sequence[str] = STAGES
) -> dict[str, Panel]:
    """One titled panel per stage, in the given order (``gt`` is skipped when the trace has no ground
    truth)."""
    return {
        stage: Panel(stage_title(trace, stage), draw_stage(image, trace, stage))
        for stage in stages
        if stage != "gt" or trace.ground_truth is not None
    }
