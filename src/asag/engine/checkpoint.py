"""Training checkpoints: atomic writes, safe loading, RNG state capture and restore.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` reads: tensors, numbers,
strings, lists, tuples and dicts only. Keys:

``format``/``format_version`` (identify the file), ``model``, ``optimizer``, ``scheduler``, ``scaler``
(state dicts, ``None`` when absent), ``epoch`` (the last *completed* epoch, 0-based), ``iteration``
(optimizer steps done), ``rng`` (a list with one :func:`capture_rng_state` dict per rank),
``config`` (the resolved configuration), ``label_map`` and ``extra`` (caller data, e.g. the best AP);
with an EMA of the weights also ``ema`` (its state dict: the weights to predict with,
:func:`weights_for_inference`) and ``ema_updates``.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from asag.errors import CheckpointError
from asag.outputs import atomic_write

# Suffixes of the model files of ``asag export`` (asag.export), which load_checkpoint refuses.
EXPORTED_SUFFIXES = (".onnx", ".pt2")
PT2_FORMAT_RECORD = "archive_format"  # record of a torch.export archive that holds "pt2"
CHECKPOINT_FORMAT = "asag.checkpoint"
CHECKPOINT_VERSION = 1
_PLAIN_SCALARS = (str, int, float, bool, type(None))
# How torch.save words a write that did not reach the file (PyTorchStreamWriter).
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def to_plain_data(value: Any, *, where: str = "value") -> Any:
    """``value`` as plain data (dict/list/str/int/float/bool/None/tensor); tuples become lists and
    paths strings. Raises TypeError naming the offending entry for anything else."""
    if isinstance(value, (*_PLAIN_SCALARS, torch.Tensor)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: to_plain_data(v, where=f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain_data(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where} has type {type(value).__name__}, which a checkpoint cannot store as plain data")


# ------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, and this process's current CUDA device once CUDA is in use), numpy
    and ``random``.

    Stored as tensors and plain numbers so that ``weights_only`` loading works. Only the current CUDA
    device is captured: in DDP each process owns one GPU, and touching the others would create
    contexts on them.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if cuda_in_use else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),  # [624] MT19937 words
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),  # [625] MT words + position
            "gauss_next": py_gauss,
        },
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture_rng_state`.

    The CUDA state (if one was captured) goes to the current CUDA device when CUDA is available.
    """
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_states[0].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"].tolist()), py_state["gauss_next"]))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` with ``seed``.

    The release seeds each process with ``42 + rank`` (spec section 9); the caller adds the rank.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# cuBLAS needs a fixed workspace for deterministic matrix products on CUDA (set before its first use).
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def configure_determinism(deterministic: bool) -> None:
    """``runtime.deterministic``: True asks torch for deterministic algorithms (a warning, not an error,
    where an op has none, e.g. some CUDA backward kernels), deterministic cuDNN without autotuning and a
    fixed cuBLAS workspace; False restores torch's defaults with cuDNN autotuning on. Uninitialised
    memory is not filled (asag never reads it; filling would cost time on every allocation)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


# --------------------------------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    scaler: Any | None,
    epoch: int,
    iteration: int,
    config: dict,
    label_map: dict,
    extra: dict | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    ema: Any | None = None,
) -> Path:
    """Write a training checkpoint atomically and return its path.

    The data go to a temporary file in the same folder, which is flushed, synced and then renamed
    over ``path`` (``os.replace``), so ``path`` is never left half-written: after a failure it holds
    the previous checkpoint (or does not exist) and the temporary file is removed.

    Args:
        path: destination file (its folder is created).
        model: the model (a DDP wrapper is unwrapped: keys never carry ``module.``).
        optimizer, scheduler, scaler: objects with ``state_dict()``, or None.
        epoch: last completed epoch (0-based). iteration: optimizer steps done in total.
        config: the resolved configuration as plain data. label_map: plain data (e.g. label -> id).
        extra: further plain data (best AP, metrics ...).
        rng_states: RNG states of every rank, in rank order (gathered by the caller in distributed
            training); default: this process's state only.
        ema: the moving average of the weights (:class:`~asag.engine.ema.ModelEma`), stored as ``ema``
            (its state dict: the weights prediction uses) and ``ema_updates``; None: no EMA.
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "rng": list(rng_states) if rng_states is not None else [capture_rng_state()],
        "config": to_plain_data(config, where="config"),
        "label_map": to_plain_data(label_map, where="label_map"),
        "extra": to_plain_data(extra or {}, where="extra"),
    }
    if ema is not None:
        payload["ema"], payload["ema_updates"] = ema.state_dict(), int(ema.updates)
    return atomic_write(path, lambda handle: _torch_save(payload, handle))


def _torch_save(payload: dict, handle: BinaryIO) -> None:
    """``torch.save`` with a failed write (a full disk) raised as the OSError it is (:func:`_write_error`)."""
    try:
        torch.save(payload, handle)
    except RuntimeError as err:
        raise _write_error(err) from None


def _write_error(err: RuntimeError) -> BaseException:
    """What a RuntimeError of ``torch.save`` means: torch reports a failed write (a full disk) as
    ``RuntimeError("[enforce fail at inline_container.cc] . unexpected pos ...")`` raised while handling
    the OSError of the write; that OSError, or an EIO error quoting torch when the write failed out of
    sight (:data:`TORCH_WRITE_FAILURES`); any other RuntimeError is returned unchanged."""
    seen: set[int] = set()
    cause = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if any(marker in str(err) for marker in TORCH_WRITE_FAILURES):
        return OSError(errno.EIO, f"writing failed ({_first_line(err)})")
    return err


def read_torch_file(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    allow: Sequence[type] = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file (``mmap``: tensors
    memory-mapped, read from disk only when used).

    ``allow``: further classes the file may hold (e.g. ``argparse.Namespace``, a plain attribute
    container the authors' release files store); nothing else but tensors and plain data is unpickled.

    Raises:
        CheckpointError: when the file is missing, empty, truncated or corrupt, holds other Python
            objects (it cannot be loaded safely), or is a model written by ``asag export``
            (:func:`is_exported_model`; only ``asag predict`` runs those).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    if is_exported_model(path):
        raise CheckpointError(f"{path} is an exported model (ONNX/.pt2): use asag predict")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is not an asag training checkpoint: it holds Python objects other than tensors and "
            f"plain data and cannot be loaded safely ({_first_line(err)})"
        ) from err
    except Exception as err:  # damaged files raise many types (RuntimeError, EOFError, KeyError ...)
        reason = _first_line(err)
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({reason})") from err


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True`` (``mmap``: tensors
    memory-mapped, read from disk only when used).

    Raises:
        CheckpointError: naming the file, as :func:`read_torch_file`, or when it is a PyTorch file that
            is not an asag training checkpoint.
    """
    path = Path(path)
    data = read_torch_file(path, map_location=map_location, mmap=mmap)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an asag training checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if data.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {data['format_version']}; this asag reads up to "
            f"{CHECKPOINT_VERSION}"
        )
    return data


def weights_for_inference(checkpoint: dict[str, Any]) -> Any:
    """The state dict to evaluate or predict with: the EMA weights when the run kept an average, else
    the trained weights (``model``)."""
    ema = checkpoint.get("ema")
    return ema if ema is not None else checkpoint.get("model")


def is_exported_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model file of ``asag export``: named ``*.onnx`` / ``*.pt2``
    (:data:`EXPORTED_SUFFIXES`), or a ``torch.export`` archive under another name (a zip file whose
    ``archive_format`` record says ``pt2``)."""
    path = Path(path)
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name.split("/", 1)[-1] == PT2_FORMAT_RECORD]
            return bool(names) and archive.read(names[0]).strip() == b"pt2"
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):  # not a (readable) zip file
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(err: BaseException) -> str:
    """The whole message of ``err`` on one line (its lines joined by ``"; "``)."""
    lines = [line.strip().rstrip(".:") for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def restore_training_state(
    checkpoint: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
    rank: int = 0,
    source: str | os.PathLike = "checkpoint",
) -> None:
    """Load model, optimizer, scheduler, scaler and (optionally) RNG states from ``checkpoint``.

    The model is loaded strictly (a DDP wrapper is unwrapped). ``rank`` picks this process's RNG
    state; a checkpoint written by fewer ranks gives the extra ranks rank 0's state. Raises
    CheckpointError, naming ``source`` (the file) and the whole reason, when the model, optimizer,
    scheduler or scaler does not fit the checkpoint or a requested state is missing.
    """
    try:
        unwrap_model(model).load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{source}: the weights do not fit the model: {one_line(err)}") from None
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is None:
            continue
        if checkpoint.get(name) is None:
            raise CheckpointError(f"{source}: holds no {name} state")
        try:
            target.load_state_dict(checkpoint[name])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
            raise CheckpointError(
                f"{source}: its {name} state does not fit this run ({one_line(err)}); was it written with "
                f"other model or schedule settings?"
            ) from None
    if restore_rng:
        try:
            states = checkpoint["rng"]
            restore_rng_state(states[rank] if rank < len(states) else states[0])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{source}: its RNG states are malformed ({one_line(err)})") from None
