"""How the process's C allocator treats the large blocks that CPU tensors live in.

A detector's step allocates and frees the same large tensors every iteration: feature maps, the
decoder's sampled points, their gradients (tens of megabytes each). glibc's ``malloc`` serves a block
above its mmap threshold (128 KiB, rising to at most 32 MiB as such blocks are freed) with a fresh
``mmap`` and returns it to the kernel on ``free``, so every iteration touches new pages: the kernel
zeroes each 4 KiB page on its first write. On the CPU that page-fault work can cost more than the
arithmetic of an elementwise operation: a GELU over a ``[400, 4, 128, 64]`` float32 tensor took 19 ms
into a fresh tensor against 6 ms with the memory kept (2-core AMD EPYC Zen 4).

:func:`keep_freed_memory` makes ``malloc`` serve every block from its heap (no ``mmap``) and never trim
the heap, so a freed tensor's pages are reused by the next allocation of that size without faults.
The numbers computed are the same bits: only where the memory comes from changes. The price is that
the process keeps its peak memory until it exits (the peak of a training step recurs every step
anyway). ``runtime.host_memory`` chooses (:func:`configure_host_memory`): ``auto`` keeps freed memory
when the run's device is the CPU, ``reuse`` always, ``system`` leaves the allocator as it is. Only
glibc (Linux) has these controls; elsewhere every choice leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import typing
from dataclasses import dataclass
from typing import Literal

import torch

HostMemory = Literal["auto", "reuse", "system"]
HOST_MEMORY_CHOICES: tuple[str, ...] = typing.get_args(HostMemory)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = -1  # read by glibc as SIZE_MAX: the heap is never trimmed


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (which has ``mallopt`` / ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Serve every block from malloc's heap and never return freed memory to the kernel (process-wide,
    for the rest of the process). Returns False (and changes nothing) without glibc."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def return_free_memory() -> bool:
    """Hand the heap's free memory back to the kernel now (``malloc_trim(0)``), whatever the policy:
    a measurement of resident memory growth starts from here, so that memory kept from earlier work
    cannot hide part of it. False (nothing done) without glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@dataclass(frozen=True)
class HostMemoryChoice:
    """What :func:`configure_host_memory` did: ``kept`` is True when freed memory is now kept."""

    choice: HostMemory
    kept: bool
    reason: str

    def line(self) -> str:
        what = "freed CPU memory kept for reuse" if self.kept else "system allocator unchanged"
        return f"runtime.host_memory={self.choice}: {what} ({self.reason})"


def configure_host_memory(choice: HostMemory, device: torch.device | str) -> HostMemoryChoice:
    """Apply ``runtime.host_memory`` for a process that computes on ``device`` (see the module
    docstring). Process-wide: the commands call it once at their start."""
    if choice not in HOST_MEMORY_CHOICES:
        raise ValueError(f"runtime.host_memory must be auto, reuse or system, not {choice!r}")
    device = torch.device(device)
    if choice == "system":
        return HostMemoryChoice(choice, False, "as asked")
    if choice == "auto" and device.type != "cpu":
        return HostMemoryChoice(choice, False, f"tensors live on {device.type}")
    if not keep_freed_memory():
        return HostMemoryChoice(choice, False, "the C library is not glibc")
    return HostMemoryChoice(choice, True, "glibc: heap only, never trimmed")
