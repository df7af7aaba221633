"""Shared helper of the deployment benchmarks: the runtime that runs an exported file, and the CPU it runs on.

:func:`load_exported` is the one place that picks the runtime of a file of ``asag export``:

* ``onnxruntime`` (``.onnx``) and ``torch`` (``.pt2``): :class:`asag.export.ExportedModel` as it is;
* ``openvino`` (``.onnx``): :class:`OpenVINOExported`, the same checked file, compiled by OpenVINO's CPU
  plugin (:func:`openvino_model`) at ``fp32`` or ``bf16``.

OpenVINO is not yet a runtime of :class:`~asag.export.ExportedModel`; once it is
(``ExportedModel(path, runtime="openvino", precision=...)``), :func:`load_exported` calls it instead
and :class:`OpenVINOExported` goes. :func:`cpu_description` names the CPU and its bfloat16 support
(the flags, PyTorch's oneDNN check, OpenVINO's capabilities) for the benchmarks' first line.

    from runtimes import cpu_description, load_exported, openvino_model
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from coco_eval_speed import cpu_name
from torch import Tensor

from asag.errors import ConfigError
from asag.export import OUTPUT_NAMES, ExportedModel, format_of
from asag.modeling.fast import cpu_supports_bf16
from asag.structures import DetectionBatch

RUNTIMES = ("onnxruntime", "openvino", "torch")
PRECISIONS = ("fp32", "bf16")
# --precision names -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}
OPENVINO_BF16 = "BF16"  # OpenVINO's CPU capability of native bfloat16 kernels
# /proc/cpuinfo flags that mean native bfloat16 arithmetic (AVX512-BF16 dot products, AMX tiles)
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The first processor's flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def openvino_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU plugin (empty without openvino)."""
    try:
        import openvino
    except ImportError:
        return []
    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def cpu_description() -> str:
    """One line: CPU model name, logical CPUs, bfloat16 flags present / absent, PyTorch's and OpenVINO's
    verdict on native bfloat16."""
    flags = cpu_flags()
    present = [f for f in BF16_FLAGS if f in flags] or ["none"]
    missing = [f for f in BF16_FLAGS if f not in flags] or ["none"]
    ov = openvino_capabilities()
    ov_text = f"{'yes' if OPENVINO_BF16 in ov else 'no'} ({', '.join(ov)})" if ov else "no openvino"
    cpus = len(os.sched_getaffinity(0))
    return (f"CPU: {cpu_name()}, {torch.get_num_threads()} threads of {cpus} logical CPUs; "
            f"bf16 flags present {', '.join(present)}, absent {', '.join(missing)}; native bf16 in PyTorch "
            f"(oneDNN) {'yes' if cpu_supports_bf16() else 'no'}, in OpenVINO {ov_text}")


def has_native_bf16(runtime: str) -> bool:
    """Whether ``runtime`` (``torch`` / ``onnxruntime`` / ``openvino``) runs bfloat16 natively here."""
    if runtime == "openvino":
        return OPENVINO_BF16 in openvino_capabilities()
    return cpu_supports_bf16()


def openvino_model(path: str | Path, precision: str = "fp32", threads: int | None = None):
    """An ONNX file compiled by OpenVINO's CPU plugin for latency: ``INFERENCE_PRECISION_HINT`` from
    ``precision`` (``fp32`` -> ``f32``, ``bf16``), ``INFERENCE_NUM_THREADS`` = ``threads`` (default:
    PyTorch's thread count). ``bf16`` on a CPU whose plugin reports no BF16 capability is a ConfigError
    (OpenVINO would silently run float32)."""
    if precision not in OPENVINO_PRECISION:
        raise ConfigError(f"precision {precision!r}: OpenVINO runs one of {', '.join(OPENVINO_PRECISION)}")
    try:
        import openvino
    except ImportError:
        raise ConfigError("runtime openvino needs the openvino package (pip install openvino)") from None
    if precision == "bf16" and not has_native_bf16("openvino"):
        raise ConfigError("precision bf16: OpenVINO's CPU plugin reports no native bfloat16 on this CPU "
                          "(AVX512-BF16 / AMX); use fp32")
    config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
              "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    return openvino.Core().compile_model(str(path), "CPU", config)


class OpenVINOExported(ExportedModel):
    """A file of ``asag export`` (``.onnx``), checked as by :class:`ExportedModel`, run by OpenVINO.

    Same ``cfg``, ``label_map``, ``size``, ``batch_size``, :meth:`run` and :meth:`predict` contract as
    :class:`ExportedModel`; the ONNX Runtime session the check builds is dropped.
    """

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        if format_of(path) != "onnx":
            raise ConfigError(f"{path}: runtime openvino runs .onnx files")
        super().__init__(path)
        del self.session
        self.precision = precision
        self.compiled = openvino_model(self.path, precision, threads)
        self.request = self.compiled.create_infer_request()

    def run(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> DetectionBatch:
        """One call of the compiled graph on exactly ``[B, 3, H, W]`` inputs (outputs copied out of
        OpenVINO's buffers)."""
        feeds = {"images": images.float().cpu().numpy(), "image_sizes": image_sizes.cpu().numpy(),
                 "orig_sizes": orig_sizes.cpu().numpy()}
        results = self.request.infer(feeds)
        return DetectionBatch(*(torch.from_numpy(results[self.compiled.output(name)].copy())
                                for name in OUTPUT_NAMES))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` inside the block (ONNX Runtime sessions of
    :class:`ExportedModel` take theirs from it)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_exported(path: str | Path, runtime: str | None = None, precision: str = "fp32",
                  threads: int | None = None) -> ExportedModel:
    """A file of ``asag export`` ready to :meth:`~ExportedModel.run`, on the CPU.

    ``runtime``: ``onnxruntime`` or ``openvino`` for ``.onnx``, ``torch`` for ``.pt2`` (default: the
    file's own, ONNX Runtime / torch). ``precision``: ``fp32``, or ``bf16`` with OpenVINO.
    ``threads``: intra-op threads (default: PyTorch's count). Raises :class:`ConfigError` for a
    combination that does not exist.
    """
    fmt = format_of(path)
    runtime = runtime or ("onnxruntime" if fmt == "onnx" else "torch")
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if (runtime == "torch") != (fmt == "pt2"):
        raise ConfigError(f"{path}: runtime {runtime} does not run .{fmt} files")
    if runtime == "openvino":
        return OpenVINOExported(path, precision, threads)
    if precision != "fp32":
        raise ConfigError(f"precision {precision}: runtime {runtime} runs exported files in fp32 only")
    with torch_threads(threads):
        return ExportedModel(path)
