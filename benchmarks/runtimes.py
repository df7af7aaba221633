"""Shared helper of the deployment benchmarks: the runtime that runs an exported file, and the CPU it runs on.

:func:`load_exported` is the one place that picks the runtime of a file of ``asag export``:

* ``onnxruntime`` (``.onnx``) and ``torch`` (``.pt2``): :class:`asag.export.ExportedModel` as it is;
* ``openvino`` (``.onnx``): :class:`ExportedModel` with ``runtime="openvino"`` at ``fp32`` or ``bf16``.

:func:`openvino_model` compiles other ONNX files (FCOS) with the same OpenVINO settings.
:func:`cpu_description` names the CPU and its bfloat16 support
(the flags, PyTorch's oneDNN check, OpenVINO's capabilities) for the benchmarks' first line.

    from runtimes import cpu_description, load_exported, openvino_model
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from asag.engine.benchmark import cpu_name
from asag.errors import ConfigError
from asag.export import ExportedModel, format_of, openvino_config
from asag.extras import require
from asag.modeling.fast import cpu_supports_bf16

RUNTIMES = ("onnxruntime", "openvino", "torch")
PRECISIONS = ("fp32", "bf16")
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
    """An ONNX file that is not an asag export (FCOS) compiled by OpenVINO's CPU plugin with the settings
    :class:`ExportedModel` uses (:func:`asag.export.openvino_config`), ``threads`` intra-op threads
    (default: PyTorch's count). ``bf16`` where the plugin reports no BF16 capability is a ConfigError."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: OpenVINO runs one of {', '.join(PRECISIONS)}")
    openvino = require("openvino", "running a model with OpenVINO", "openvino")
    if precision == "bf16" and not has_native_bf16("openvino"):
        raise ConfigError("precision bf16: OpenVINO's CPU plugin reports no native bfloat16 on this CPU "
                          "(AVX512-BF16 / AMX); use fp32")
    with torch_threads(threads):
        config = openvino_config(precision)
    return openvino.Core().compile_model(str(path), "CPU", config)


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
    with torch_threads(threads):
        if runtime == "openvino":
            return ExportedModel(path, runtime="openvino", precision=precision)
        if precision != "fp32":
            raise ConfigError(f"precision {precision}: runtime {runtime} runs exported files in fp32 only")
        return ExportedModel(path)
