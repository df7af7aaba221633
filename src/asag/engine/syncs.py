"""Host-device synchronisations: counted on any device (:class:`SyncAudit`) or reported by CUDA
(:class:`CudaSyncCount`).

A CUDA host waits for the device whenever a value or a size is read back (``.item()``, ``.tolist()``,
unsized ``nonzero``, boolean-mask indexing, ...). :class:`SyncAudit` counts the torch calls that would do
so, with the asag source line that asked for them, so that the eager stages can be reviewed on a CPU;
the static mode's forward must have none (``tests/modeling/test_static*.py``).
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

# Tensor operations that make the host wait for a CUDA device (values or sizes read back).
SYNC_METHODS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
    "argwhere", "masked_select", "unique", "unique_consecutive", "nms", "bincount",
})
INDEXING_METHODS = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_"})
# Tensors built from Python data: a blocking copy from pageable host memory when made on a CUDA device.
HOST_DATA_FACTORIES = frozenset({"tensor", "as_tensor", "new_tensor"})
PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
THIS_FILE = str(Path(__file__).resolve())


def _has_bool_index(index: object) -> bool:
    items = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call of torch function ``name`` synchronises a CUDA device."""
    if name in SYNC_METHODS:
        return True
    if name in INDEXING_METHODS:
        return len(args) > 1 and _has_bool_index(args[1])
    if name in HOST_DATA_FACTORIES:
        data = args[1] if name == "new_tensor" and len(args) > 1 else (args[0] if args else None)
        return not isinstance(data, Tensor)
    if name == "where":
        return len(args) + len(kwargs) == 1  # torch.where(condition) == nonzero
    if name == "repeat_interleave":
        return "output_size" not in kwargs and len(args) > 1 and isinstance(args[1], Tensor)
    return False


def _caller() -> str:
    """``file:line`` of the innermost asag frame outside this module (where the sync was asked for)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(PACKAGE_DIR) and frame.filename != THIS_FILE:
            return f"{Path(frame.filename).relative_to(PACKAGE_DIR)}:{frame.lineno}"
    return "<outside asag>"


class CudaSyncCount:
    """Count the host-device synchronisations that CUDA reports inside a ``with`` block.

    Turns on ``torch.cuda.set_sync_debug_mode("warn")`` and records its warnings; :attr:`total` is the
    number so far (readable inside the block too). The ground truth that :class:`SyncAudit` stands in
    for on the CPU; the first block of a process counts one more (PyTorch's own first-call sync).

    >>> with CudaSyncCount() as syncs:
    ...     model.detect(images, sizes, sizes)
    >>> syncs.total
    """

    def __enter__(self) -> CudaSyncCount:
        torch.cuda.set_sync_debug_mode("warn")  # raises without CUDA, before any state is changed
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum("synchroniz" in str(w.message).lower() for w in self._caught)


class SyncAudit(TorchFunctionMode):
    """Count the operations that would synchronise host and CUDA device, on any device.

    A torch-function mode sees every Python-level torch call; those in :data:`SYNC_METHODS`, boolean-mask
    indexing, one-argument ``torch.where``, ``repeat_interleave`` without ``output_size`` and tensors
    built from Python data (a blocking host-to-device copy on CUDA) are counted by ``op`` and by the
    asag source line that made them (``sites``). Syncs inside C++ kernels called once (e.g. inside
    ``nms``) count as that one call. On CUDA,
    ``torch.cuda.set_sync_debug_mode`` is the ground truth; this audit lets the CPU build check that
    the count stays small and does not grow with the number of images or patches.

    >>> with SyncAudit() as audit:
    ...     model(images, image_sizes)
    >>> audit.total, audit.sites.most_common(3)
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_sync(name, args, kwargs):
            self.ops[name] += 1
            self.sites[_caller()] += 1
        return func(*args, **kwargs)
