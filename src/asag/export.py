"""Export of the static detector to ONNX and ``torch.export`` (``.pt2``), and running an exported file.

The exported graph is :meth:`asag.modeling.detector.ASAG.detect` of the static model at one fixed batch
size ``B`` and padded input size ``H x W`` (docs/inference.md, "Deployment"):

=============  ===============  =======  ===============================================================
input          shape            dtype    meaning
=============  ===============  =======  ===============================================================
images         ``[B, 3, H, W]`` float32  RGB, values ``(x / 255 - mean) / std`` with the ImageNet mean
                                         and std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225),
                                         resized as the model's evaluation transform does, zero-padded
                                         bottom / right to ``H x W`` (NCHW)
image_sizes    ``[B, 2]``       int64    ``(h, w)`` of each resized, unpadded image (``<= (H, W)``)
orig_sizes     ``[B, 2]``       int64    ``(h, w)`` of each original image: the frame of the boxes
=============  ===============  =======  ===============================================================

Outputs: ``boxes [B, K, 4]`` float32 xyxy in original pixels, ``scores [B, K]`` float32 descending,
``labels [B, K]`` int64 contiguous class indices, ``valid [B, K]`` bool (a prefix of each row); see
:class:`asag.structures.DetectionBatch`. The file also stores the model's configuration and label map
(ONNX metadata / ``.pt2`` extra file ``asag.json``), so :class:`ExportedModel` needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from asag.config import Config
from asag.data import LabelMap
from asag.errors import CheckpointError, ConfigError, DataError
from asag.modeling.detector import ASAG
from asag.modeling.roi_gather import GatherRoIPooling
from asag.structures import DetectionBatch, Detections

EXPORT_FORMATS = ("onnx", "pt2")
INPUT_NAMES = ["images", "image_sizes", "orig_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "valid"]
METADATA_KEY = "asag"  # ONNX metadata_props key / .pt2 extra file "asag.json"
EXTRA_HINT = 'pip install "asag[export]"'
# Sides of the padded input must be multiples of this (the batch padding of the data pipeline, and the
# coarsest FPN stride).
SIZE_DIVISIBILITY = 32
# ONNX opset of the exported graph (the dynamo exporter's default in torch 2.14).
ONNX_OPSET = 18


def require(module: str, purpose: str):
    """Import an optional dependency of the ``export`` extra, or raise a one-line error naming it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: {EXTRA_HINT}") from None


def format_of(path: str | Path) -> str:
    """``"onnx"`` or ``"pt2"`` from a file name, or a :class:`ConfigError`."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in EXPORT_FORMATS:
        raise ConfigError(f"{path}: an exported model ends in .onnx or .pt2")
    return suffix


def check_export_size(size: tuple[int, int], batch_size: int) -> None:
    h, w = size
    if h <= 0 or w <= 0 or h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
        raise ConfigError(f"--size {h}x{w}: both sides must be positive multiples of {SIZE_DIVISIBILITY} "
                          "(an export has one fixed input size; dynamic sizes are not supported)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")


class DeployedDetector(nn.Module):
    """The static model plus post-processing as one function of tensors (the export contract above)."""

    def __init__(self, model: ASAG) -> None:
        super().__init__()
        if model.training or not model.static:
            raise ConfigError("only a static model in evaluation mode can be exported "
                              "(load_model(..., static=True) / model.eval().set_static(True))")
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dets = self.model.detect(images, image_sizes, orig_sizes)
        return dets.boxes, dets.scores, dets.labels, dets.valid


def example_inputs(batch_size: int, size: tuple[int, int], device: torch.device | str = "cpu"
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs of the export trace: zero images filling the whole ``H x W`` canvas."""
    h, w = size
    sizes = torch.tensor([[h, w]] * batch_size, dtype=torch.int64, device=device)
    return torch.zeros(batch_size, 3, h, w, device=device), sizes, sizes.clone()


def _sort_stable_onnx(self, *, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` for ONNX: ``TopK`` over the whole axis keeps the lower index first among
    equal keys (ONNX specification), which is the stable order; non-float keys sort as int64."""
    import onnxscript
    from onnxscript import opset18 as op

    axis = dim % len(self.shape)
    keys = self
    if self.dtype not in (onnxscript.FLOAT.dtype, onnxscript.DOUBLE.dtype, onnxscript.INT64.dtype):
        keys = op.Cast(self, to=onnxscript.INT64.dtype)
    _, indices = op.TopK(keys, op.Shape(self, start=axis, end=axis + 1), axis=axis,
                         largest=1 if descending else 0, sorted=1)
    return op.GatherElements(self, indices, axis=axis), indices


def _where_onnx(condition, self, other):
    """``aten.where.self`` for ONNX: ONNX Runtime has no boolean ``Where``; for boolean operands it is
    ``(condition and self) or (not condition and other)``."""
    import onnxscript
    from onnxscript import opset18 as op

    if self.dtype == onnxscript.BOOL.dtype and other.dtype == onnxscript.BOOL.dtype:
        return op.Or(op.And(condition, self), op.And(op.Not(condition), other))
    return op.Where(condition, self, other)


def export_model(model: ASAG, cfg: Config, label_map: LabelMap, out: str | Path, *, size: tuple[int, int],
                 batch_size: int = 1, fmt: str | None = None) -> Path:
    """Export the static ``model`` for ``batch_size`` images padded to ``size`` ``(H, W)`` to ``out``.

    ``fmt`` (default: from the suffix of ``out``) is ``"onnx"`` (``torch.onnx.export(dynamo=True)``,
    checked with ``onnx.checker``) or ``"pt2"`` (``torch.export.export`` + ``torch.export.save``).
    """
    fmt = fmt or format_of(out)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    check_export_size(size, batch_size)
    deployed = DeployedDetector(model).eval()
    device = next(model.parameters()).device
    inputs = example_inputs(batch_size, size, device)
    metadata = json.dumps({"config": cfg.to_dict(), "label_map": label_map.to_dict(),
                           "size": list(size), "batch_size": batch_size,
                           "inputs": INPUT_NAMES, "outputs": OUTPUT_NAMES})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(deployed, inputs, strict=False)
            torch.export.save(program, out, extra_files={f"{METADATA_KEY}.json": metadata})
        else:
            _export_onnx(deployed, inputs, out, metadata)
    return out


def _export_onnx(deployed: DeployedDetector, inputs: tuple[Tensor, ...], out: Path, metadata: str) -> None:
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    poolers = [m for m in deployed.modules() if isinstance(m, GatherRoIPooling)]
    for pooler in poolers:  # ONNX has no weighted embedding_bag: one gather per sample tap
        pooler.weighted_sum = "index"
    try:
        program = torch.onnx.export(
            deployed, inputs, dynamo=True, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            opset_version=ONNX_OPSET, verbose=False,
            custom_translation_table={torch.ops.aten.sort.stable: _sort_stable_onnx,
                                      torch.ops.aten.where.self: _where_onnx},
        )
    finally:
        for pooler in poolers:
            pooler.weighted_sum = "embedding_bag"
    program.save(str(out))
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(out))


# ---------------------------------------------------------------------------------- exported models


class ExportedModel:
    """An exported file run by ONNX Runtime (``.onnx``) or ``torch.export.load`` (``.pt2``).

    ``predict(images, image_sizes, orig_sizes)`` takes a padded batch as the checkpoint model does
    (``[n, 3, h, w]`` with ``h <= H``, ``w <= W``, any ``n``), pads it to the exported ``B x 3 x H x W``,
    runs it in chunks of ``B`` and returns one :class:`Detections` per image.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: exported model not found")
        self.format = format_of(self.path)
        self.device = torch.device(device)
        meta = self._load_onnx() if self.format == "onnx" else self._load_pt2()
        self.metadata = meta
        self.size = tuple(meta["size"])
        self.batch_size = int(meta["batch_size"])

    def _load_onnx(self) -> dict:
        ort = require("onnxruntime", "running an ONNX model")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError(f"{self.path}: device cuda needs onnxruntime-gpu (CUDAExecutionProvider)")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load it ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        return self._parse_metadata(meta)

    def _load_pt2(self) -> dict:
        extra = {f"{METADATA_KEY}.json": ""}
        try:
            program = torch.export.load(self.path, extra_files=extra)
        except Exception as err:  # a damaged archive raises several exception types
            raise CheckpointError(f"{self.path}: torch.export.load cannot read it ({err})") from None
        self.module = program.module().to(self.device)
        return self._parse_metadata(extra[f"{METADATA_KEY}.json"])

    def _parse_metadata(self, text: str | None) -> dict:
        try:
            meta = json.loads(text or "")
            meta["size"], meta["batch_size"], meta["config"], meta["label_map"]  # noqa: B018
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{self.path}: not exported by `asag export` (no asag metadata)") from None
        return meta

    def run(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> DetectionBatch:
        """One call of the exported graph on exactly ``[B, 3, H, W]`` inputs."""
        if self.format == "pt2":
            with torch.no_grad():
                out = self.module(*(t.to(self.device) for t in (images, image_sizes, orig_sizes)))
            return DetectionBatch(*out)
        feeds = {"images": images.float().cpu().numpy(), "image_sizes": image_sizes.cpu().numpy(),
                 "orig_sizes": orig_sizes.cpu().numpy()}
        outs = [torch.from_numpy(o) for o in self.session.run(OUTPUT_NAMES, feeds)]
        return DetectionBatch(*outs)

    def predict(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> list[Detections]:
        """Detections of a padded batch ``[n, 3, h, w]`` (see the class docstring)."""
        (height, width), b = self.size, self.batch_size
        if images.shape[-2] > height or images.shape[-1] > width:
            raise DataError(f"{self.path}: a resized image of {images.shape[-2]}x{images.shape[-1]} px does "
                            f"not fit the exported input size {height}x{width}; export with a larger --size")
        results: list[Detections] = []
        for start in range(0, len(images), b):
            n = min(b, len(images) - start)
            canvas = images.new_zeros(b, 3, height, width)
            canvas[:n, :, :images.shape[-2], :images.shape[-1]] = images[start:start + n]
            sizes = torch.tensor([[height, width]] * b, dtype=torch.int64)
            orig = sizes.clone()
            sizes[:n], orig[:n] = image_sizes[start:start + n], orig_sizes[start:start + n]
            results += self.run(canvas, sizes, orig).to_list()[:n]
        return results
