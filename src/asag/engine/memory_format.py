"""Memory layout of the training images (``runtime.memory_format``): given, or chosen per machine.

The layout of the images entering the backbone decides the layout of every backbone and FPN
convolution (channels-last inputs give channels-last outputs). Both layouts compute the same numbers
up to float rounding (different convolution algorithms: the loss bits differ), but which one is faster
depends on the machine and the precision (docs/training.md, "Training speed on the CPU").

``runtime.memory_format`` resolves (:func:`choose_memory_format`) as follows:

* ``channels_last`` / ``contiguous``: that layout;
* ``auto`` and ``probe`` first keep the layout recorded in the checkpoint a run resumes
  (``extra["memory_format"]``, written by :func:`~asag.engine.trainer.fit`), so that a continuation
  computes what the interrupted run would have, bit for bit; on CUDA both are ``channels_last``
  (tensor-core convolutions);
* ``auto`` on the CPU is a fixed rule (:func:`cpu_layout_rule`: the same machine and precision always
  give the same layout, so two runs of one configuration compute the same numbers): ``channels_last``
  for bf16 autocast (native bf16: oneDNN's bf16 convolutions want channels-last) and for fp32 on a CPU
  with AMX; ``contiguous`` for fp32 elsewhere. Measured: fp32 channels-last was 1.21x the contiguous
  step on a Zen 2 (AVX2), about equal on a Zen 4 (AVX-512), 0.80x on a Xeon with AMX; bf16 channels-last
  was faster on the Zen 4 and on the Xeon;
* ``probe`` on the CPU measures instead (:func:`probe_layouts`): forward + backward of a copy of the
  backbone and FPN on a synthetic batch of the training size, in both layouts, alternating, under the
  run's autocast; the layout with the smaller median time wins (a tie keeps ``contiguous``, the
  release's). Timing makes the choice vary between runs where the layouts are close: a resumed run
  keeps the recorded one.

The choice and its reason (with the probe's times) are one line of the training log; in distributed
training every rank takes rank 0's choice.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from asag.engine.distributed import broadcast_object
from asag.modeling.fast import cpu_has_amx

CHANNELS_LAST, CONTIGUOUS = "channels_last", "contiguous"
LAYOUTS = (CONTIGUOUS, CHANNELS_LAST)
# Timed forward + backward passes per layout in the probe, after one untimed pass each (allocations,
# oneDNN primitive creation).
PROBE_PASSES = 2
# The probe's images: the longer side of a training image relative to its shorter one (4:3, the most
# common photo shape) -- the shorter side is the largest training scale.
PROBE_ASPECT = 4 / 3
# Padded image sides are multiples of the coarsest stride (as the collate pads them).
PAD_MULTIPLE = 32
PROBE_SEED = 0
# Key of the layout in the ``extra`` entry of training checkpoints.
RECORD_KEY = "memory_format"

Probe = Callable[[], dict[str, list[float]]]


def layout_name(channels_last: bool) -> str:
    """``"channels_last"`` or ``"contiguous"``."""
    return CHANNELS_LAST if channels_last else CONTIGUOUS


@dataclass(frozen=True)
class LayoutChoice:
    """The layout training uses and why. ``reason``: one line for the training log."""

    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        return layout_name(self.channels_last)

    def line(self) -> str:
        return f"runtime.memory_format: {self.name} ({self.reason})"


def faster_layout(seconds: dict[str, list[float]]) -> str:
    """The layout whose median time in ``seconds`` (layout -> per-pass seconds) is smaller; a tie keeps
    ``contiguous``. Pure: the same times always give the same answer."""
    medians = {name: statistics.median(seconds[name]) for name in LAYOUTS}
    return CHANNELS_LAST if medians[CHANNELS_LAST] < medians[CONTIGUOUS] else CONTIGUOUS


def describe_probe(seconds: dict[str, list[float]]) -> str:
    """``"probe: contiguous 812 ms, channels_last 705 ms (median of 2 forward+backward passes of
    backbone+FPN)"``."""
    times = ", ".join(f"{name} {statistics.median(seconds[name]) * 1e3:.0f} ms" for name in LAYOUTS)
    return f"probe: {times} (median of {len(seconds[CONTIGUOUS])} forward+backward passes of backbone+FPN)"


def cpu_layout_rule(amp: str | None, amx: bool) -> LayoutChoice:
    """``auto`` on the CPU: channels-last for bf16 autocast, and for fp32 on a CPU with AMX; contiguous
    otherwise (the measurements behind it are in the module docstring)."""
    if amp == "bf16":
        return LayoutChoice(True, "auto: bf16 on the CPU")
    if amx:
        return LayoutChoice(True, "auto: fp32 on a CPU with AMX")
    return LayoutChoice(False, "auto: fp32 on a CPU without AMX")


def choose_memory_format(memory_format: str, device: torch.device | str, *, amp: str | None = None,
                         recorded: str | None = None, probe: Probe | None = None,
                         amx: bool | None = None) -> LayoutChoice:
    """Resolve ``runtime.memory_format`` (``auto``, ``probe``, ``channels_last`` or ``contiguous``; see
    the module docstring) for training on ``device`` in precision ``amp`` (None: fp32).

    ``recorded``: the layout of the checkpoint a run resumes (None: a new run, or a checkpoint written
    before layouts were recorded). ``probe()``: layout -> per-pass seconds, called only when ``probe``
    has to measure (CPU, nothing recorded); without one ``probe`` follows ``auto``'s rule. ``amx``:
    whether the CPU has AMX (None: ask the processor). An explicit layout that differs from the
    recorded one is used, and the reason says that the continuation is not bit-exact.
    """
    device = torch.device(device)
    if memory_format in LAYOUTS:
        reason = "set in the configuration"
        if recorded is not None and recorded != memory_format:
            reason += (f"; the resumed checkpoint was trained {recorded}, so the continuation equals it "
                       f"only up to float rounding")
        return LayoutChoice(memory_format == CHANNELS_LAST, reason)
    if recorded in LAYOUTS:
        return LayoutChoice(recorded == CHANNELS_LAST, f"{memory_format}: the layout recorded in the "
                                                       f"resumed checkpoint")
    if device.type == "cuda":
        return LayoutChoice(True, f"{memory_format}: CUDA")
    if memory_format == "probe" and probe is not None:
        seconds = probe()
        return LayoutChoice(faster_layout(seconds) == CHANNELS_LAST, describe_probe(seconds))
    return cpu_layout_rule(amp, cpu_has_amx() if amx is None else amx)


def probe_images(batch_size: int, shorter_side: int, max_size: int, device: torch.device | str) -> Tensor:
    """``[batch_size, 3, H, W]`` standard-normal images (a fixed seed; the global RNGs are untouched):
    ``H = shorter_side``, ``W = min(max_size, H * 4/3)``, both padded to a multiple of 32."""
    h = shorter_side
    w = min(max_size, round(shorter_side * PROBE_ASPECT))
    hp, wp = (-(-s // PAD_MULTIPLE) * PAD_MULTIPLE for s in (h, w))
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(batch_size, 3, hp, wp, generator=generator).to(device)


class _Features(nn.Module):
    """Backbone + neck of a detector: ``images -> levels`` (as its ``extract_features``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone, self.neck = model.backbone, model.neck
        self.uses_sizes = getattr(model, "neck_uses_image_sizes", False)

    def forward(self, images: Tensor) -> list[Tensor]:
        levels = self.backbone(images)
        if self.uses_sizes:
            sizes = torch.tensor([images.shape[-2:]] * len(images), device=images.device)
            return list(self.neck(levels, sizes))
        return list(self.neck(levels))


def probe_layouts(model: nn.Module, images: Tensor, *, autocast: Callable[[], object],
                  passes: int = PROBE_PASSES, timer: Callable[[], float] = time.perf_counter
                  ) -> dict[str, list[float]]:
    """Seconds of ``passes`` forward + backward passes of ``model``'s backbone and neck on ``images`` in
    each layout (layout -> list), alternating layouts, after one untimed pass of each.

    Runs on a deep copy in training mode (batch-norm statistics, gradients and weights of ``model``
    are untouched; no RNG is drawn). ``autocast()``: the run's precision context (e.g.
    :func:`~asag.engine.trainer.autocast_context`)."""
    features = copy.deepcopy(_Features(model)).train()
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for i in range(passes + 1):
        for name in LAYOUTS:
            x = images.contiguous(memory_format=torch.channels_last if name == CHANNELS_LAST
                                  else torch.contiguous_format)
            start = timer()
            with autocast():
                levels = features(x)
            torch.stack([level.float().mean() for level in levels]).sum().backward()
            features.zero_grad(set_to_none=True)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            elapsed = timer() - start
            if i > 0:
                seconds[name].append(elapsed)
    return seconds


def recorded_layout(checkpoint: dict) -> str | None:
    """The layout a checkpoint written by :func:`~asag.engine.trainer.fit` was trained in (None: not
    recorded, e.g. a checkpoint of an earlier version)."""
    extra = checkpoint.get("extra")
    layout = extra.get(RECORD_KEY) if isinstance(extra, dict) else None
    return layout if layout in LAYOUTS else None


def agree_across_ranks(choice: LayoutChoice) -> LayoutChoice:
    """Rank 0's choice on every rank (only rank 0 needs to probe; the others wait for its answer)."""
    return broadcast_object(choice)
