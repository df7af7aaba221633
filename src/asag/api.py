"""Python API: load a trained (or converted) checkpoint and detect objects in images.

>>> from asag.api import Detector
>>> detector = Detector.from_checkpoint("runs/demo/best.pth")
>>> for det in detector.predict("image.jpg"):
...     print(det.category_name, det.score, det.box)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from asag import tiling
from asag.build import build_model, build_transforms
from asag.config import FIELD_RANGES, FRACTION, POSITIVE, Config, check_number, config_from_dict
from asag.convert.official import head_index
from asag.data import LabelMap, collate
from asag.data.image import float_to_uint8, open_image, to_rgb
from asag.engine.checkpoint import load_checkpoint, one_line, weights_for_inference
from asag.errors import CheckpointError, ConfigError, DataError
from asag.modeling.detector import ASAG
from asag.modeling.fast import optimize_for_inference, resolve_precision
from asag.structures import Detections

if TYPE_CHECKING:
    from asag.video import VideoDetections


@dataclass
class Detection:
    """One detected object: ``box`` is ``[x1, y1, x2, y2]`` in pixels of the input image."""

    box: list[float]
    score: float
    category_id: int
    category_name: str

    def to_dict(self) -> dict:
        return {"box_xyxy": self.box, "score": self.score, "category_id": self.category_id,
                "category_name": self.category_name}


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device.

    Raises ConfigError for any other string, a CUDA device without CUDA, or a GPU index that does not
    exist.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {name!r}: expected {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ConfigError(f"device {name!r}: expected {DEVICE_CHOICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(
    path: str | Path, *, used_head: str | None = None, inference_level: str | None = None,
    overrides: Sequence[str] = (), fast: bool = False, compile: bool = False,
    dtype: str | torch.dtype | None = None, device: str | torch.device | None = None, static: bool = False,
) -> tuple[ASAG, Config, LabelMap]:
    """Rebuild the model stored in a checkpoint (our format, see ``asag convert`` for the authors').

    ``fast`` (fold batch norms, channels-last), ``compile`` and ``dtype`` (backbone/FPN precision
    ``fp32 | fp16 | bf16``) return an inference-optimised copy on ``device`` (default CPU); see
    :func:`asag.modeling.fast.optimize_for_inference` and ``docs/inference.md``. ``static`` switches on
    the static mode (fixed shapes, no host reads; :meth:`ASAG.set_static`, also ``model.static=true``
    in ``overrides``); it combines with the others.
    """
    ckpt = load_checkpoint(path)
    cfg = _stored_config(ckpt, path, overrides, used_head=used_head, inference_level=inference_level)
    model = build_model(cfg)
    _load_weights(model, weights_for_inference(ckpt), path)
    model.used_head = head_index(cfg.model.decoder.used_head, cfg.model.decoder.num_heads)
    label_map = _stored_label_map(ckpt, path) or _default_labels(cfg)
    check_label_map(label_map, cfg.model.num_classes, path)
    model = model.eval()
    if static:
        model.set_static(True)
    if fast or compile or resolve_precision(dtype) is not None:
        model = optimize_for_inference(model.to(device or "cpu"), fold_bn=fast, channels_last=fast,
                                       compile=compile, dtype=dtype)
    return model, cfg, label_map


def _stored_config(ckpt: dict, path: str | Path, overrides: Sequence[str], *, used_head: str | None,
                   inference_level: str | None) -> Config:
    """The checkpoint's configuration with ``overrides``; CheckpointError naming ``path`` when it is
    missing or malformed, ConfigError when an override (or ``used_head``, ``inference_level``) is wrong: an
    unknown key, a value out of range, a data field that the data format does not read."""
    from asag.config import apply_overrides

    stored = ckpt.get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise CheckpointError(f"{path}: no model configuration stored in this checkpoint")
    data = apply_overrides(stored, list(overrides))
    try:
        data["model"]["backbone"]["weights"] = None  # the checkpoint holds the trained backbone
        if used_head is not None:
            data["model"]["decoder"]["used_head"] = used_head
        if inference_level is not None:
            data["model"]["anchor_generator"]["inference_level"] = inference_level
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: the stored configuration is malformed (no section {err})") from None
    try:
        return config_from_dict(data)
    except ConfigError as err:
        changed = overrides or used_head is not None or inference_level is not None
        if changed and _is_valid(stored):  # the caller's change is at fault, not the checkpoint
            raise
        raise CheckpointError(f"{path}: the stored configuration is invalid: {err}") from None


def _is_valid(data: dict) -> bool:
    """Whether ``data`` (a stored configuration) is a valid :class:`Config`."""
    try:
        config_from_dict(data)
    except ConfigError:
        return False
    return True


def _load_weights(model: ASAG, state: object, path: str | Path) -> None:
    """Load ``state`` into ``model``; one CheckpointError naming ``path`` and every key or shape that
    does not fit."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no model weights stored in this checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit (strict=False still checks them)
        reason = one_line(err)
        raise CheckpointError(f"{path}: weights do not fit the stored configuration: {reason}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the stored configuration ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )


def _stored_label_map(ckpt: dict, path: str | Path) -> LabelMap | None:
    """The checkpoint's label map (None if it stores none); CheckpointError naming ``path`` when malformed."""
    data = ckpt.get("label_map")
    if not data:
        return None
    return parse_label_map(data, path)


def parse_label_map(data: object, path: str | Path) -> LabelMap:
    """A stored label map (the plain data of :meth:`LabelMap.to_dict`); CheckpointError naming ``path``
    when it is malformed."""
    try:
        return LabelMap.from_dict(data)
    except KeyError as err:
        raise CheckpointError(f"{path}: the stored label map has no {err} entry") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: the stored label map is malformed ({err})") from None


def check_label_map(label_map: LabelMap, num_classes: int, path: str | Path) -> None:
    """The stored label map must name every class the model predicts: with fewer names, detections of
    the unnamed classes could not be mapped to category ids (nothing predicted, or an evaluation that
    fails at the end); with more, some categories could never be predicted."""
    if len(label_map) != num_classes:
        relation = "fewer" if len(label_map) < num_classes else "more"
        raise CheckpointError(
            f"{path}: its label map has {len(label_map)} categories, {relation} than the model's "
            f"model.num_classes={num_classes}; the checkpoint is inconsistent (written by another tool or "
            f"edited?)"
        )


def _default_labels(cfg: Config) -> LabelMap:
    n = cfg.model.num_classes
    return LabelMap.from_dict({"category_ids": list(range(1, n + 1)),
                               "names": [f"class_{i}" for i in range(1, n + 1)]})


def check_filters(score_threshold: float, topk: int | None, nms_iou: float | None) -> None:
    """ConfigError naming the argument unless ``score_threshold`` and ``nms_iou`` (if given) are in
    [0, 1] and ``topk`` (if given) is a valid ``model.postprocess.topk``."""
    check_number("score_threshold", score_threshold, FRACTION)
    if topk is not None:
        check_number("topk", topk, FIELD_RANGES["model.postprocess.topk"])
    if nms_iou is not None:
        check_number("nms_iou", nms_iou, FRACTION)


class Detector:
    """A model, its preprocessing and its label map, ready for prediction."""

    def __init__(self, model: ASAG, cfg: Config, label_map: LabelMap, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.label_map = label_map
        self.device = device
        self.transforms = build_transforms(cfg.data, train=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", cuda_graph: bool = False,
                        **kwargs) -> Detector:
        """``kwargs`` as for :func:`load_model`, e.g. ``fast=True, dtype="bf16"``. ``cuda_graph``: run the
        static model through CUDA graphs captured per input-size bucket (CUDA only; see
        :mod:`asag.engine.cuda_graph`)."""
        resolved = resolve_device(device)
        if cuda_graph:
            from asag.engine.cuda_graph import CudaGraphDetector, check_cuda_graph_device

            check_cuda_graph_device(resolved)
        model, cfg, label_map = load_model(path, device=resolved, **kwargs)
        if cuda_graph:
            model = model.to(resolved).eval()
            model = CudaGraphDetector(model if model.static else model.set_static(True))
        return cls(model, cfg, label_map, resolved)

    @classmethod
    def from_exported(cls, path: str | Path, device: str = "auto", runtime: str = "onnxruntime",
                      precision: str = "fp32") -> Detector:
        """A detector running a file of ``asag export`` (``.onnx`` with ONNX Runtime or OpenVINO, ``.pt2``
        with ``torch.export.load``): the same preprocessing and :class:`Detection` output as the
        checkpoint; images are padded to the exported size (docs/inference.md, "Deployment"). The file is
        checked before anything runs (checksum, metadata, and for ``.pt2`` that it holds nothing that
        could run code); see :class:`asag.export.ExportedModel`.

        ``runtime``: ``"onnxruntime"`` or ``"openvino"`` (``.onnx`` only; OpenVINO runs on the CPU, so
        ``device="auto"`` is the CPU there). ``precision``: ``"fp32"``, or ``"bf16"`` with OpenVINO on a
        CPU with native bfloat16 (docs/deployment.md)."""
        from asag.export import ExportedModel

        cpu_only = runtime == "openvino" and device == "auto"
        resolved = torch.device("cpu") if cpu_only else resolve_device(device)
        exported = ExportedModel(path, resolved, runtime=runtime, precision=precision)
        detector = cls.__new__(cls)
        detector.model, detector.cfg, detector.device = exported, exported.cfg, resolved
        detector.label_map = exported.label_map
        detector.transforms = build_transforms(exported.cfg.data, train=False)
        return detector

    @staticmethod
    def load_image(image: PIL.Image.Image | Tensor | str | Path) -> PIL.Image.Image:
        """An 8-bit RGB PIL image from a PIL image (any mode), a ``[3, H, W]`` tensor (uint8, or float in
        [0, 1]: ``round(v * 255)``, DataError outside [0, 1]) or a path (EXIF orientation applied). Files
        and PIL images go through :func:`asag.data.image.to_rgb`, the converter of the training and
        evaluation reader; float tensors follow its rule for float images."""
        if isinstance(image, str | Path):
            return open_image(image)[0]
        if isinstance(image, Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise DataError(f"image tensor must be [3, H, W], got {tuple(image.shape)}")
            pixels = image.permute(1, 2, 0).cpu()  # [H, W, 3]
            if image.dtype == torch.uint8:
                return PIL.Image.fromarray(pixels.numpy())
            if not image.dtype.is_floating_point:
                raise DataError(f"image tensor must be uint8, or float in [0, 1], got {image.dtype}")
            return PIL.Image.fromarray(float_to_uint8(pixels.float().numpy()))  # the rule of float files
        if not isinstance(image, PIL.Image.Image):
            raise DataError(f"unsupported image type {type(image).__name__}")
        return to_rgb(image)

    def preprocess(self, image: PIL.Image.Image | Tensor | str | Path):
        """Any accepted image -> one ``(tensor, ImageTargets)`` sample with the evaluation transforms."""
        return self.transforms(self.load_image(image), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))

    def to_detections(self, dets: Detections, score_threshold: float = 0.0, topk: int | None = None,
                      nms_iou: float | None = None) -> list[Detection]:
        """The detections of one image with ``score >= score_threshold``, best first, at most ``topk``.

        ``nms_iou``: also drop every detection that overlaps a better-scored one of the same class by
        IoU above this (torchvision's ``batched_nms``). ASAG needs no NMS and its AP is measured
        without; a briefly trained model still places near-duplicate boxes, which this hides in
        drawings. None (the default): the model's detections as they are.
        """
        check_filters(score_threshold, topk, nms_iou)
        keep = dets.scores >= score_threshold
        boxes, scores, labels = dets.boxes[keep], dets.scores[keep], dets.labels[keep]
        if nms_iou is not None:
            kept = batched_nms(boxes.float(), scores.float(), labels, nms_iou)  # sorted by score
            boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
        if topk is not None:
            boxes, scores, labels = boxes[:topk], scores[:topk], labels[:topk]
        ids = self.label_map.to_category_ids(labels.cpu()).tolist()
        names = [self.label_map.name_of(label) for label in labels.cpu().tolist()]
        return [Detection([round(v, 2) for v in b], round(s, 5), i, n)
                for b, s, i, n in zip(boxes.cpu().tolist(), scores.cpu().tolist(), ids, names)]

    @torch.inference_mode()
    def predict_raw(self, images: Sequence) -> list[Detections]:
        """The model's detections of several images in one batch, unfiltered and unrounded: one
        :class:`Detections` per image (boxes in its pixels, contiguous labels), on ``self.device``."""
        batch = collate([self.preprocess(img) for img in images]).to(self.device)
        return self.model.predict(batch.images, batch.image_sizes, batch.orig_sizes)

    def predict_batch(self, images: Sequence, score_threshold: float = 0.0, topk: int | None = None,
                      nms_iou: float | None = None) -> list[list[Detection]]:
        """:meth:`predict` for several images in one batch."""
        return [self.to_detections(d, score_threshold, topk, nms_iou) for d in self.predict_raw(images)]

    def predict(self, image, score_threshold: float = 0.0, topk: int | None = None,
                nms_iou: float | None = None) -> list[Detection]:
        """Detections for one image (PIL image, ``[3, H, W]`` tensor or path), boxes in its pixels;
        filtering as in :meth:`to_detections`."""
        return self.predict_batch([image], score_threshold, topk, nms_iou)[0]

    def predict_tiled(self, image, tile: int, overlap: float = tiling.DEFAULT_TILE_OVERLAP, *,
                      batch_size: int = 4, full_image: bool = False, score_threshold: float = 0.0,
                      topk: int | None = None, nms_iou: float | None = None) -> list[Detection]:
        """Detections for one image far larger than the model's training size: predicted on overlapping
        ``tile x tile`` crops (``overlap``: fraction of a tile), ``batch_size`` crops per batch, merged
        (:mod:`asag.tiling`; docs/inference.md, "Large images"); ``full_image``: also the whole image,
        resized as usual, for objects larger than a tile. ``score_threshold`` and ``topk`` apply to each
        tile; ``nms_iou`` is the merging NMS (default :data:`asag.tiling.DEFAULT_MERGE_IOU`). Boxes in
        the image's pixels, best first."""
        check_filters(score_threshold, topk, nms_iou)
        merged = tiling.predict_tiled(
            self, self.load_image(image), tile, overlap, batch_size=batch_size, full_image=full_image,
            score_threshold=score_threshold, topk=topk,
            nms_iou=tiling.DEFAULT_MERGE_IOU if nms_iou is None else nms_iou)
        return self.to_detections(merged)

    def predict_video(self, source: str | Path, *, batch_size: int = 4, fps: float | None = None,
                      score_threshold: float = 0.0, topk: int | None = None, nms_iou: float | None = None,
                      tile: int | None = None, tile_overlap: float = tiling.DEFAULT_TILE_OVERLAP,
                      tile_full_image: bool = False) -> VideoDetections:
        """Detections frame by frame of a video file, a stream URL (anything FFmpeg opens, through PyAV:
        ``pip install "asag[video]"``) or a folder of images as frames at ``fps`` (default 30):

        >>> with detector.predict_video("clip.mp4", batch_size=4, score_threshold=0.3) as frames:
        ...     for frame in frames:
        ...         print(frame.index, frame.timestamp, len(frame.detections), frame.image.size)

        The source is opened now (an unreadable one is a DataError naming it); frames are decoded and
        predicted lazily, ``batch_size`` at a time (each frame tiled when ``tile`` is given, see
        :meth:`predict_tiled`). Yields :class:`asag.video.FrameDetections`; the iterator also has the
        source's ``fps`` and ``frame_count`` (None when unknown). A decoding failure part way raises
        :class:`asag.video.VideoDecodeError` after the frames before it. See :mod:`asag.video`.
        """
        from functools import partial

        from asag.video import VideoDetections, open_frames

        check_filters(score_threshold, topk, nms_iou)
        check_number("batch_size", batch_size, POSITIVE)
        if tile is None:
            predict = partial(self.predict_batch, score_threshold=score_threshold, topk=topk, nms_iou=nms_iou)
        else:
            tiling.check_tiling(tile, tile_overlap)
            tiled = partial(self.predict_tiled, tile=tile, overlap=tile_overlap, batch_size=batch_size,
                            full_image=tile_full_image, score_threshold=score_threshold, topk=topk,
                            nms_iou=nms_iou)

            def predict(images: Sequence) -> list[list[Detection]]:
                return [tiled(image) for image in images]

        return VideoDetections(open_frames(source, fps), predict, 1 if tile else batch_size)
