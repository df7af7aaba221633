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

Safety. The metadata holds ``sha256``, a checksum of the whole file but the metadata's own record
(:func:`file_checksum`), which :class:`ExportedModel` verifies before anything runs: a damaged file is
refused as corrupted (a checksum detects damage; it is no signature). A ``.pt2`` archive is inspected
before ``torch.export.load`` reads it (:meth:`ExportedModel._check_pt2_archive`): it may hold only the
records ``asag export`` writes, none of them pickled, and a graph of ATen operators without the guard
code and symbolic expressions that torch would run as Python. Files are written atomically
(:func:`asag.outputs.atomic_write`), from bytes built in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asag import extras
from asag.api import check_label_map, parse_label_map
from asag.config import Config, config_from_dict
from asag.data import LabelMap
from asag.engine.checkpoint import EXPORTED_SUFFIXES, one_line
from asag.errors import CheckpointError, ConfigError, DataError
from asag.modeling.detector import ASAG
from asag.outputs import atomic_write
from asag.portable import check_portable
from asag.structures import DetectionBatch, Detections

EXPORT_FORMATS = tuple(suffix.lstrip(".") for suffix in EXPORTED_SUFFIXES)  # ("onnx", "pt2")
INPUT_NAMES = ["images", "image_sizes", "orig_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "valid"]
METADATA_KEY = "asag"  # ONNX metadata_props key / .pt2 extra file "asag.json"
METADATA_FILE = f"{METADATA_KEY}.json"
# Entries of the metadata (JSON object) and their types; "sha256" (CHECKSUM_KEY) is absent from files
# exported before the checksum existed.
METADATA_TYPES = {"config": dict, "label_map": dict, "size": list, "batch_size": int}
CHECKSUM_KEY = "sha256"
CHECKSUM_PATTERN = re.compile(r"[0-9a-f]{64}")
ONNX_RECORD = "model.onnx"  # name of the ONNX model's record in its checksum (file_checksum)
EXPORT_EXTRA = "export"
EXTRA_HINT = extras.install_hint(EXPORT_EXTRA)
# Runtimes of an .onnx file (ExportedModel's ``runtime``); OpenVINO comes with its own extra.
RUNTIMES = ("onnxruntime", "openvino")
OPENVINO_EXTRA = "openvino"
# ``precision`` of an exported model -> OpenVINO's INFERENCE_PRECISION_HINT; ONNX Runtime and torch run
# the float32 graph as it is (fp32 only).
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
OPENVINO_DEVICE = "CPU"
# Sides of the padded input must be multiples of this (the batch padding of the data pipeline, and the
# coarsest FPN stride).
SIZE_DIVISIBILITY = 32
# Largest padded input ``B x 3 x H x W`` (float32) an export accepts: 1 GiB, e.g. one image up to about
# 9400 x 9400 px or eight of 3328 x 3328; larger sizes are typos that would exhaust the memory.
MAX_INPUT_BYTES = 2**30
FLOAT32_BYTES = 4
# ONNX opset of the exported graph (the dynamo exporter's default in torch 2.14).
ONNX_OPSET = 18

# A .pt2 archive of `asag export` (torch.export.save, archive version 0): its records below the root
# folder. Anything else (legacy pickled weights or constants, torchbind or opaque objects, AOTInductor
# libraries, other extra files) is refused before torch reads the archive.
PT2_ENTRY = re.compile("|".join([
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    r"models/model\.json", r"data/sample_inputs/model\.pt",
    r"data/weights/model_weights_config\.json", r"data/weights/weight_\d+",
    r"data/constants/model_constants_config\.json", r"data/constants/tensor_\d+",
    rf"extra/{re.escape(METADATA_FILE)}",
]))
PT2_MODEL = "models/model.json"
PT2_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
PT2_METADATA = f"extra/{METADATA_FILE}"
# Payload configurations: (config record, folder of its payloads, name pattern of a payload).
PT2_PAYLOADS = (("data/weights/model_weights_config.json", "data/weights/", re.compile(r"weight_\d+")),
                ("data/constants/model_constants_config.json", "data/constants/", re.compile(r"tensor_\d+")))
PT2_REQUIRED = ("archive_version", PT2_MODEL, *(config for config, _, _ in PT2_PAYLOADS))
# Records outside the checksum: the metadata that holds it, and the random id of each write.
PT2_UNHASHED = (PT2_METADATA, ".data/serialization_id")
# Operators a graph of `asag export` calls: ATen operators, getitem on their tuple results, and
# while_loop (the graph loop of asag.ops.nms.repeat_steps), whose condition and body are nested graphs
# held by the archive and checked like the rest. torch resolves any other name under ``torch`` too
# (e.g. torch.ops.load_library) and calls it.
PT2_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.getitem|torch\.ops\.higher_order\.while_loop")
# Parts of a serialised program that torch runs as Python when loading it: guard code (exec) and
# symbolic expressions (sympy, i.e. eval); a static export has neither.
PT2_CODE_KEYS = {"guards_code": "guard code", "range_constraints": "symbolic shape constraints",
                 "expr_str": "symbolic expressions", "as_operator": "operator arguments"}


class ExportWarning(UserWarning):
    """An exported file that loads but cannot be fully checked (exported before the checksum existed)."""


def require(module: str, purpose: str):
    """Import an optional dependency of the ``export`` extra, or raise a one-line error naming it."""
    return extras.require(module, purpose, EXPORT_EXTRA)


def format_of(path: str | Path) -> str:
    """``"onnx"`` or ``"pt2"`` from a file name, or a :class:`ConfigError`."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in EXPORT_FORMATS:
        raise ConfigError(f"{path}: an exported model ends in .onnx or .pt2")
    return suffix


def check_export_size(size: tuple[int, int], batch_size: int) -> None:
    """Positive sides that are multiples of :data:`SIZE_DIVISIBILITY`, a batch of at least one, and a
    padded input ``[B, 3, H, W]`` float32 of at most :data:`MAX_INPUT_BYTES`; ConfigError otherwise."""
    h, w = size
    if h <= 0 or w <= 0 or h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
        raise ConfigError(f"--size {h}x{w}: both sides must be positive multiples of {SIZE_DIVISIBILITY} "
                          "(an export has one fixed input size; dynamic sizes are not supported)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    nbytes = batch_size * 3 * h * w * FLOAT32_BYTES
    if nbytes > MAX_INPUT_BYTES:
        raise ConfigError(f"--size {h}x{w} --batch-size {batch_size}: the padded input [B, 3, H, W] would "
                          f"take {nbytes / 2**30:.1f} GiB; an export allows at most "
                          f"{MAX_INPUT_BYTES / 2**30:.0f} GiB (choose a smaller --size or --batch-size)")


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


def export_metadata(cfg: Config, label_map: LabelMap, size: tuple[int, int], batch_size: int) -> dict:
    """The metadata an exported file stores (without its checksum): configuration, label map, the fixed
    size ``[H, W]`` and batch size, and the input / output names."""
    return {"config": cfg.to_dict(), "label_map": label_map.to_dict(), "size": list(size),
            "batch_size": batch_size, "inputs": INPUT_NAMES, "outputs": OUTPUT_NAMES}


def _stable_order_onnx(self, axis: int, descending: bool):
    """ONNX indices that sort ``self`` along ``axis`` stably (equal keys keep their index order), without
    relying on how a runtime breaks ties.

    The ONNX specification has ``TopK`` order equal keys by index, but OpenVINO (2026.4) does not: a sort
    written as one ``TopK`` comes back with ties in any order there. So ties are broken explicitly: a
    first ``TopK`` over the whole axis orders the keys (ties in any order); ``group`` numbers the runs of
    equal sorted keys (``CumSum`` of "differs from the previous key"); a second ``TopK`` (ascending) over
    the distinct integer keys ``group * n + index`` puts each run in index order. Non-float keys sort as
    int64. Returns ``[..., n, ...]`` int64 indices, as ``torch.sort(stable=True)`` gives them."""
    import onnxscript
    from onnxscript import opset18 as op

    keys = self
    if self.dtype not in (onnxscript.FLOAT.dtype, onnxscript.DOUBLE.dtype, onnxscript.INT64.dtype):
        keys = op.Cast(self, to=onnxscript.INT64.dtype)
    length = op.Shape(self, start=axis, end=axis + 1)  # [1] n
    values, first = op.TopK(keys, length, axis=axis, largest=1 if descending else 0, sorted=1)
    axes = op.Constant(value_ints=[axis])
    previous = op.Concat(op.Slice(values, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), axes),
                         op.Slice(values, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]), axes),
                         axis=axis)  # each key's predecessor in sorted order (the first: itself)
    starts = op.Cast(op.Not(op.Equal(values, previous)), to=onnxscript.INT64.dtype)
    group = op.CumSum(starts, op.Constant(value_int=axis))  # [..., n, ...] 0, 0, 1, 1, 1, 2, ...
    distinct = op.Add(op.Mul(group, length), first)  # unique per position: no ties left for TopK
    _, within = op.TopK(distinct, length, axis=axis, largest=0, sorted=1)
    return op.GatherElements(first, within, axis=axis)


def _sort_onnx(self, dim: int = -1, descending: bool = False, stable=None):
    """``aten.sort.default`` for ONNX: the stable sort of :func:`_stable_order_onnx` (one valid result of
    an unstable sort, and the one every runtime gives)."""
    from onnxscript import opset18 as op

    axis = dim % len(self.shape)
    indices = _stable_order_onnx(self, axis, descending)
    return op.GatherElements(self, indices, axis=axis), indices


def _sort_stable_onnx(self, *, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` for ONNX: :func:`_stable_order_onnx`."""
    return _sort_onnx(self, dim, descending)


def _topk_onnx(self, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``aten.topk.default`` for ONNX: the first ``k`` of the stable sort (:func:`_stable_order_onnx`), so
    that among equal values the lower indices are taken, in index order, in every runtime (the ONNX
    ``TopK``'s own rule, which OpenVINO does not follow). Always sorted (``sorted=False`` leaves the
    order unspecified, so sorted is one valid answer)."""
    from onnxscript import opset18 as op

    axis = dim % len(self.shape)
    order = _stable_order_onnx(self, axis, largest)
    indices = op.Slice(order, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]),
                       op.Constant(value_ints=[axis]))
    return op.GatherElements(self, indices, axis=axis), indices


def _where_onnx(condition, self, other):
    """``aten.where.self`` for ONNX: ONNX Runtime has no boolean ``Where``; for boolean operands it is
    ``(condition and self) or (not condition and other)``."""
    import onnxscript
    from onnxscript import opset18 as op

    if self.dtype == onnxscript.BOOL.dtype and other.dtype == onnxscript.BOOL.dtype:
        return op.Or(op.And(condition, self), op.And(op.Not(condition), other))
    return op.Where(condition, self, other)


# ATen operators that the ONNX export writes with asag's translations instead of the exporter's own.
ONNX_TRANSLATIONS = {torch.ops.aten.sort.stable: _sort_stable_onnx, torch.ops.aten.sort.default: _sort_onnx,
                     torch.ops.aten.topk.default: _topk_onnx, torch.ops.aten.where.self: _where_onnx}


def export_model(model: ASAG, cfg: Config, label_map: LabelMap, out: str | Path, *, size: tuple[int, int],
                 batch_size: int = 1, fmt: str | None = None) -> Path:
    """Export the static ``model`` for ``batch_size`` images padded to ``size`` ``(H, W)`` to ``out``.

    ``fmt`` (default: from the suffix of ``out``) is ``"onnx"`` (``torch.onnx.export(dynamo=True)``,
    checked with ``onnx.checker``) or ``"pt2"`` (``torch.export.export`` + ``torch.export.save``). An
    existing ``out`` is replaced (atomically); see :func:`write_exported`.
    """
    fmt = fmt or format_of(out)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    check_export_size(size, batch_size)
    deployed = DeployedDetector(model).eval()
    device = next(model.parameters()).device
    inputs = example_inputs(batch_size, size, device)
    return write_exported(deployed, inputs, out, export_metadata(cfg, label_map, size, batch_size), fmt)


def write_exported(module: nn.Module, inputs: tuple[Tensor, ...], out: str | Path, metadata: dict,
                   fmt: str) -> Path:
    """Trace ``module`` on ``inputs`` and write it to ``out`` as ``fmt`` with ``metadata`` plus its checksum.

    The file is built in memory and written by :func:`asag.outputs.atomic_write`: ``out`` is
    never left half-written (a full disk or Ctrl-C leaves the earlier file, or none). Running out of
    memory while tracing is a one-line ConfigError.
    """
    out = Path(out)
    try:
        with torch.no_grad():
            serialise = _pt2_bytes if fmt == "pt2" else _onnx_bytes
            data = serialise(module, inputs, metadata)
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        raise ConfigError(f"{out}: out of memory while exporting ({one_line(err)}); choose a smaller --size "
                          "or --batch-size") from None
    return atomic_write(out, lambda handle: handle.write(data))


def _out_of_memory(err: BaseException) -> bool:
    """An allocation failure: MemoryError, CUDA out of memory, or the CPU allocator's RuntimeError."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def _pt2_bytes(module: nn.Module, inputs: tuple[Tensor, ...], metadata: dict) -> bytes:
    """A ``.pt2`` archive of ``module`` with ``extra/asag.json`` = ``metadata`` plus its checksum.

    The archive holds no pickle: the example inputs are dropped (``torch.export.save`` would pickle them
    into ``data/sample_inputs/model.pt``), and weights and constants are plain tensors, which torch
    stores as raw bytes.
    """
    program = torch.export.export(module, inputs, strict=False)
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer, "a") as archive:  # appended records keep the others' offsets (alignment)
        root = _pt2_root(archive)
        checksum = file_checksum(metadata, _pt2_records(archive, root))
        archive.writestr(f"{root}/{PT2_METADATA}", json.dumps({**metadata, CHECKSUM_KEY: checksum}))
    return buffer.getvalue()


def _onnx_bytes(module: nn.Module, inputs: tuple[Tensor, ...], metadata: dict) -> bytes:
    """An ONNX model of ``module`` (weights inside the file, never external data) with the metadata
    property ``asag`` = ``metadata`` plus its checksum, checked with ``onnx.checker`` and for portability
    (:func:`asag.portable.check_portable`).

    The model must be traced by ``torch.export`` in non-strict mode, the mode its export-time branches
    are written for (``torch.onnx.is_in_onnx_export()`` in the RoI pooling, the graph loops of the NMS):
    ``torch.onnx.export`` silently falls back to tracing with TorchDynamo when that fails, and the graph
    it then writes differs (a weighted ``embedding_bag`` became a loop over tensor sequences that
    OpenVINO cannot load), so a fallback is refused."""
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    program = torch.onnx.export(
        module, inputs, dynamo=True, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
        opset_version=ONNX_OPSET, verbose=False,
        custom_translation_table=ONNX_TRANSLATIONS,
    )
    strategy = getattr(program, "_capture_strategy", None)
    if strategy is not None and "NonStrict" not in strategy:
        raise ConfigError(f"the model could not be traced as written (torch.export non-strict failed; the "
                          f"exporter fell back to {strategy}, whose graph differs) — an asag bug: please "
                          f"report it")
    proto = program.model_proto
    del proto.metadata_props[:]
    try:
        checksum = file_checksum(metadata, [(ONNX_RECORD, proto.SerializeToString())])
    except ValueError as err:  # protobuf refuses messages over 2 GB
        raise ConfigError(f"the model is too large for one ONNX file ({one_line(err)}); export it as .pt2"
                          ) from None
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps({**metadata, CHECKSUM_KEY: checksum})})
    onnx.checker.check_model(proto, full_check=True)
    check_portable(proto, "asag export")
    return proto.SerializeToString()


# -------------------------------------------------------------------------------------------- checksum


def file_checksum(metadata: dict, records: Iterable[tuple[str, bytes]]) -> str:
    """The checksum stored as ``metadata["sha256"]``: SHA-256 (hex) of the metadata without that entry and
    of the file's ``records``.

    Fed in order: the metadata as record ``asag.json`` (canonical JSON: keys sorted, separators ``,`` and
    ``:``, UTF-8), then each ``(name, data)`` of ``records``; a record is its name (UTF-8), a NUL byte,
    its length (8 bytes, little-endian) and its data. The records of an ONNX file: one, ``model.onnx`` =
    the serialised ``ModelProto`` without the ``asag`` metadata property. Of a ``.pt2`` archive: every
    record but ``extra/asag.json`` and ``.data/serialization_id``, named relative to the archive's root
    folder, sorted by name (:func:`_pt2_records`).
    """
    digest = hashlib.sha256()
    plain = {key: value for key, value in metadata.items() if key != CHECKSUM_KEY}
    canonical = json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()
    for name, data in itertools.chain([(METADATA_FILE, canonical)], records):
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _pt2_root(archive: zipfile.ZipFile) -> str:
    """The root folder of a ``.pt2`` archive (torch names it after the file or ``archive``)."""
    names = archive.namelist()
    return names[0].split("/", 1)[0] if names else ""


def _pt2_records(archive: zipfile.ZipFile, root: str) -> Iterator[tuple[str, bytes]]:
    """``(name below the root, data)`` of the records in the checksum, sorted by name, read one by one."""
    names = sorted(info.filename[len(root) + 1:] for info in archive.infolist())
    for name in names:
        if name not in PT2_UNHASHED:
            yield name, archive.read(f"{root}/{name}")


def metadata_problem(meta: object) -> str | None:
    """What is wrong with a loaded metadata object (a phrase: "has no 'size' entry"), or None."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    for key, kind in METADATA_TYPES.items():
        if key not in meta:
            return f"has no {key!r} entry"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"entry {key!r} is not a {kind.__name__}"
    size = meta["size"]
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        return f"entry 'size' is not [height, width] in pixels: {str(size)[:40]}"
    if meta["batch_size"] < 1:
        return f"entry 'batch_size' is not positive: {meta['batch_size']}"
    checksum = meta.get(CHECKSUM_KEY)
    if checksum is not None and not (isinstance(checksum, str) and CHECKSUM_PATTERN.fullmatch(checksum)):
        return f"entry {CHECKSUM_KEY!r} is not a SHA-256 hex digest"
    return None


def _onnx_signature(proto: Any) -> tuple[dict[str, tuple], list[str]]:
    """``({input name: shape}, [output names])`` of an ONNX model (unknown dimensions are 0)."""
    inputs = {value.name: tuple(dim.dim_value for dim in value.type.tensor_type.shape.dim)
              for value in proto.graph.input}
    return inputs, [value.name for value in proto.graph.output]


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Logger ``name`` silent (above CRITICAL) inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------- exported models


def check_runtime(path: Path, fmt: str, runtime: str, precision: str, device: torch.device) -> None:
    """The ``runtime`` and ``precision`` that run an exported file of format ``fmt`` on ``device``: an
    ``.onnx`` file with ``onnxruntime`` (fp32, CPU or CUDA) or ``openvino`` (fp32 or bf16, CPU), a
    ``.pt2`` file with torch (fp32; ``runtime`` left at its default). One ConfigError otherwise."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    if precision not in OPENVINO_PRECISIONS:
        choices = " or ".join(OPENVINO_PRECISIONS)
        raise ConfigError(f"precision {precision!r}: an exported model runs in {choices} (bf16 with runtime "
                          "openvino)")
    if runtime == "openvino" and fmt != "onnx":
        raise ConfigError(f"{path}: runtime openvino runs .onnx files; a .{fmt} file runs with torch "
                          "(export an .onnx file for OpenVINO)")
    if precision != "fp32" and runtime != "openvino":
        engine = "ONNX Runtime" if fmt == "onnx" else "torch"
        raise ConfigError(f"{path}: precision {precision} needs runtime openvino ({engine} runs the exported "
                          "float32 graph as it is)")
    if runtime == "openvino" and device.type != "cpu":
        raise ConfigError(f"{path}: runtime openvino runs on the CPU, not on device {device}")


def openvino_native_bf16(core: Any) -> bool:
    """Whether OpenVINO reports native bfloat16 kernels on this CPU (``BF16`` among the CPU device's
    ``OPTIMIZATION_CAPABILITIES``: AVX512-BF16 or AMX)."""
    return "BF16" in core.get_property(OPENVINO_DEVICE, "OPTIMIZATION_CAPABILITIES")


def openvino_config(precision: str = "fp32") -> dict:
    """OpenVINO's CPU settings for an exported model: ``precision`` (``fp32`` / ``bf16``) as its inference
    precision (always explicit: OpenVINO's own default is bf16 on CPUs that have it),
    ``torch.get_num_threads()`` threads, latency hint."""
    return {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}


class ExportedModel:
    """An exported file run by ONNX Runtime or OpenVINO (``.onnx``) or ``torch.export.load`` (``.pt2``).

    ``predict(images, image_sizes, orig_sizes)`` takes a padded batch as the checkpoint model does
    (``[n, 3, h, w]`` with ``h <= H``, ``w <= W``, any ``n``), pads it to the exported ``B x 3 x H x W``,
    runs it in chunks of ``B`` and returns one :class:`Detections` per image.

    Loading checks, in this order, each failure one CheckpointError naming the file: (``.pt2``) the
    archive holds only what ``asag export`` writes and nothing that could run code
    (:meth:`_check_pt2_archive`); the metadata is a JSON object with the entries of
    :data:`METADATA_TYPES`; the checksum matches (``FILE: corrupted (checksum mismatch) — re-export it``;
    a file without one, exported before it existed, loads with an :class:`ExportWarning`); the stored
    configuration and label map are valid; the graph's inputs and outputs match the metadata. The file
    is read once: the checked bytes are the ones that run.

    ``runtime`` (``.onnx`` only): ``"onnxruntime"`` (CPU, or CUDA with onnxruntime-gpu) or ``"openvino"``
    (CPU; ``INFERENCE_NUM_THREADS`` = ``torch.get_num_threads()``, ``PERFORMANCE_HINT`` LATENCY).
    ``precision``: ``"fp32"``, or ``"bf16"`` with OpenVINO (its ``INFERENCE_PRECISION_HINT``; refused on a
    CPU without native bfloat16). Wrong combinations are refused before the file is read
    (:func:`check_runtime`).
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", runtime: str = "onnxruntime",
                 precision: str = "fp32") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: exported model not found")
        self.format = format_of(self.path)
        self.device = torch.device(device)
        check_runtime(self.path, self.format, runtime, precision, self.device)
        self.runtime = runtime if self.format == "onnx" else "torch"
        self.precision = precision
        data = self.path.read_bytes()
        meta = self._load_onnx(data) if self.format == "onnx" else self._load_pt2(data)
        self.metadata = meta

    # ------------------------------------------------------------------------------------ loading

    def _load_onnx(self, data: bytes) -> dict:
        onnx = require("onnx", "checking an ONNX model")
        if self.runtime == "openvino":
            engine = extras.require("openvino", "running an ONNX model with OpenVINO", OPENVINO_EXTRA)
        else:
            engine = require("onnxruntime", "running an ONNX model")
        try:
            proto = onnx.ModelProto.FromString(data)
        except Exception as err:  # google.protobuf.message.DecodeError, RuntimeWarning ...
            raise self._corrupted(f"not a readable ONNX model: {one_line(err)}") from None
        entries = [entry for entry in proto.metadata_props if entry.key == METADATA_KEY]
        if len(entries) > 1:
            raise self._corrupted(f"{len(entries)} '{METADATA_KEY}' metadata entries")
        meta = self._read_metadata(entries[0].value if entries else None)
        for entry in entries:
            proto.metadata_props.remove(entry)
        self._verify(meta, [(ONNX_RECORD, proto.SerializeToString())])
        self._configure(meta)
        if self.runtime == "openvino":
            self._check_signature(*_onnx_signature(proto))
            del proto
            self._compile_openvino(engine, data)
        else:
            del proto
            self._start_onnxruntime(engine, data)
        return meta

    def _start_onnxruntime(self, ort: Any, data: bytes) -> None:
        """An ONNX Runtime session of the checked bytes ``data`` (CUDA first when the device is CUDA)."""
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError(f"{self.path}: device cuda needs onnxruntime-gpu (CUDAExecutionProvider)")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(data, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load it ({one_line(err)})") from None
        inputs = {node.name: tuple(node.shape) for node in self.session.get_inputs()}
        self._check_signature(inputs, [node.name for node in self.session.get_outputs()])

    def _compile_openvino(self, ov: Any, data: bytes) -> None:
        """The checked bytes ``data`` compiled by OpenVINO for the CPU: ``precision`` as its inference
        precision, ``torch.get_num_threads()`` threads, latency hint. (The signature is checked on the
        ONNX graph: OpenVINO drops inputs that the graph does not use, and :meth:`run` feeds only the
        inputs it kept.)"""
        core = ov.Core()
        if self.precision == "bf16" and not openvino_native_bf16(core):
            raise ConfigError(f"{self.path}: precision bf16: this CPU has no native bfloat16 support "
                              "(AVX512-BF16/AMX), OpenVINO would emulate it; use fp32")
        try:
            model = core.read_model(data)
            compiled = core.compile_model(model, OPENVINO_DEVICE, openvino_config(self.precision))
        except Exception as err:  # OpenVINO raises RuntimeError and its own exception types
            raise CheckpointError(f"{self.path}: OpenVINO cannot load it ({one_line(err)})") from None
        if [port.get_any_name() for port in compiled.outputs] != OUTPUT_NAMES:
            raise CheckpointError(f"{self.path}: OpenVINO compiled it with the outputs "
                                  f"{[port.get_any_name() for port in compiled.outputs]}, not {OUTPUT_NAMES}")
        self.openvino_inputs = [port.get_any_name() for port in compiled.inputs]
        self.request = compiled.create_infer_request()

    def _load_pt2(self, data: bytes) -> dict:
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as err:
            raise self._corrupted(f"not a .pt2 archive: {one_line(err)}") from None
        with archive:
            root = self._check_pt2_archive(archive)
            names = set(archive.namelist())
            text = archive.read(f"{root}/{PT2_METADATA}") if f"{root}/{PT2_METADATA}" in names else None
            meta = self._read_metadata(text)
            self._verify(meta, _pt2_records(archive, root))
        self._configure(meta)
        extra = {METADATA_FILE: ""}
        try:
            with _quiet_logger("torch.export"):  # it logs a traceback before its legacy-format fallback
                program = torch.export.load(io.BytesIO(data), extra_files=extra)
        except Exception as err:  # a damaged archive raises several exception types
            reason = one_line(err)
            raise CheckpointError(f"{self.path}: torch.export.load cannot read it ({reason})") from None
        placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
        inputs = {name: tuple(placeholders[name].meta["val"].shape)
                  for name in program.graph_signature.user_inputs if name in placeholders}
        self._check_signature(inputs, OUTPUT_NAMES[:len(program.graph_signature.user_outputs)])
        self.module = program.module().to(self.device)
        return meta

    def _corrupted(self, reason: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupted ({reason}) — re-export it")

    def _refused(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: refused: the archive holds {what}, which can run code when "
                               "loaded and which asag export never writes")

    def _check_pt2_archive(self, archive: zipfile.ZipFile) -> str:
        """Refuse, before anything is unpickled, an archive that is not what ``asag export`` writes: records
        outside :data:`PT2_ENTRY` (one root folder, each name once, stored uncompressed), pickled weights or
        constants, sample inputs that are not plain tensors (``torch.load(weights_only=True)``; torch
        would retry them with ``weights_only=False``), operators outside :data:`PT2_TARGET`, and the parts
        of :data:`PT2_CODE_KEYS`. Returns the root folder."""
        root = _pt2_root(archive)
        infos = archive.infolist()
        if len({info.filename for info in infos}) != len(infos):
            raise self._refused("records with the same name")
        for info in infos:
            name = info.filename[len(root) + 1:] if info.filename.startswith(f"{root}/") else info.filename
            if not info.filename.startswith(f"{root}/") or not PT2_ENTRY.fullmatch(name):
                raise self._refused(f"an unexpected record {info.filename!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise self._refused(f"a compressed record {info.filename!r}")
        present = {info.filename[len(root) + 1:] for info in infos}
        missing = [name for name in PT2_REQUIRED if name not in present]
        if missing:
            raise self._corrupted(f"no {missing[0]} record")
        for config_name, folder, pattern in PT2_PAYLOADS:
            config = self._archive_json(archive, f"{root}/{config_name}")
            entries = config.get("config") if isinstance(config, dict) else None
            if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
                raise self._corrupted(f"{config_name} is not a payload configuration")
            for fqn, entry in entries.items():
                if entry.get("use_pickle", False) is not False:
                    raise self._refused(f"a pickled payload ({fqn!r} in {config_name})")
                name = entry.get("path_name")
                if not isinstance(name, str) or not pattern.fullmatch(name) or folder + name not in present:
                    raise self._corrupted(f"{config_name} names a payload {name!r} it does not hold")
        if PT2_SAMPLE_INPUTS in present:
            self._check_sample_inputs(archive.read(f"{root}/{PT2_SAMPLE_INPUTS}"))
        self._check_program(self._archive_json(archive, f"{root}/{PT2_MODEL}"))
        return root

    def _archive_json(self, archive: zipfile.ZipFile, name: str) -> Any:
        try:
            return json.loads(archive.read(name))
        except (ValueError, zipfile.BadZipFile) as err:  # invalid JSON / UTF-8, bad CRC
            raise self._corrupted(f"{name}: {one_line(err)}") from None

    def _check_sample_inputs(self, data: bytes) -> None:
        """Empty (what ``asag export`` writes), or plain tensors that ``torch.load(weights_only=True)`` reads
        (``.pt2`` files exported before the pickle check), else refused."""
        if not data:
            return
        try:
            with warnings.catch_warnings():  # e.g. about the pickle protocol of a crafted record
                warnings.simplefilter("ignore")
                inputs = torch.load(io.BytesIO(data), weights_only=True)
        except Exception:  # pickle.UnpicklingError for anything but plain data, or a damaged record
            inputs = None
        if not isinstance(inputs, (tuple, dict)):
            raise self._refused(f"pickled sample inputs ({PT2_SAMPLE_INPUTS}) that are not plain tensors")

    def _check_program(self, program: Any) -> None:
        """The serialised program: only :data:`PT2_TARGET` operators, none of :data:`PT2_CODE_KEYS`."""
        if not isinstance(program, dict) or "graph_module" not in program:
            raise self._corrupted(f"{PT2_MODEL} is not a serialised program")
        stack: list[Any] = [program]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(item)
                continue
            if not isinstance(item, dict):
                continue
            for key, what in PT2_CODE_KEYS.items():
                if item.get(key):
                    raise self._refused(f"{what} ({key!r} in {PT2_MODEL})")
            target = item.get("target")
            is_node = "inputs" in item and "outputs" in item and target is not None
            if is_node and not (isinstance(target, str) and PT2_TARGET.fullmatch(target)):
                raise self._refused(f"a call of {str(target)[:80]!r}, not an ATen operator")
            stack.extend(value for value in item.values() if isinstance(value, (dict, list)))

    def _read_metadata(self, text: str | bytes | None) -> dict:
        """The metadata JSON object, checked against :data:`METADATA_TYPES` (and the checksum's form)."""
        if not text:
            raise CheckpointError(f"{self.path}: not exported by `asag export` (no asag metadata)")
        try:
            meta = json.loads(text)
        except ValueError as err:  # invalid JSON or UTF-8
            raise self._corrupted(f"its asag metadata is not valid JSON: {one_line(err)}") from None
        problem = metadata_problem(meta)
        if problem:
            raise self._corrupted(f"its asag metadata {problem}")
        return meta

    def _verify(self, meta: dict, records: Iterable[tuple[str, bytes]]) -> None:
        """Compare the stored checksum with :func:`file_checksum`; warn when there is none."""
        expected = meta.get(CHECKSUM_KEY)
        if expected is None:
            warnings.warn(f"{self.path}: no checksum (exported before asag stored one), so damage cannot be "
                          "detected; re-export it", ExportWarning, stacklevel=4)
            return
        try:
            actual = file_checksum(meta, records)
        except (zipfile.BadZipFile, EOFError, ValueError) as err:  # a record that fails its CRC ...
            raise self._corrupted(one_line(err)) from None
        if actual != expected:
            raise self._corrupted("checksum mismatch")

    def _configure(self, meta: dict) -> None:
        """``cfg``, ``label_map``, ``size`` and ``batch_size`` from the checked metadata."""
        try:
            self.cfg = config_from_dict(meta["config"])
        except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as err:
            reason = one_line(err)
            raise CheckpointError(f"{self.path}: the stored configuration is invalid: {reason}") from None
        self.label_map = parse_label_map(meta["label_map"], self.path)
        check_label_map(self.label_map, self.cfg.model.num_classes, self.path)
        self.size = tuple(meta["size"])
        self.batch_size = meta["batch_size"]

    def _check_signature(self, inputs: dict[str, tuple], outputs: list[str]) -> None:
        """The graph's input shapes and output names must be those of the metadata's size and batch size."""
        (h, w), b = self.size, self.batch_size
        expected = {"images": (b, 3, h, w), "image_sizes": (b, 2), "orig_sizes": (b, 2)}
        if inputs != expected or outputs != OUTPUT_NAMES:
            raise CheckpointError(f"{self.path}: its graph (inputs {inputs}, outputs {outputs}) does not "
                                  f"match its asag metadata (batch {b}, size {h}x{w}) — re-export it")

    # ------------------------------------------------------------------------------------ running

    def run(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> DetectionBatch:
        """One call of the exported graph on exactly ``[B, 3, H, W]`` inputs."""
        if self.format == "pt2":
            with torch.no_grad():
                out = self.module(*(t.to(self.device) for t in (images, image_sizes, orig_sizes)))
            return DetectionBatch(*out)
        feeds = {"images": images.float().cpu().numpy(), "image_sizes": image_sizes.cpu().numpy(),
                 "orig_sizes": orig_sizes.cpu().numpy()}
        if self.runtime == "openvino":
            results = self.request.infer({name: feeds[name] for name in self.openvino_inputs})  # copies
            return DetectionBatch(*(torch.from_numpy(results[name]) for name in OUTPUT_NAMES))
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
