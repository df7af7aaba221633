"""Measuring a detector: latency, per-stage times, FLOPs, parameters, peak memory, queries and patches.

:func:`run_stages` runs ``ASAG.forward`` and ``ASAG.postprocess`` with forward hooks on the stage modules
(backbone, FPN ``neck``, anchor generator, proposal stage, decoder heads, post-processing): per-stage times
and FLOPs come from the one forward, not from a copy of it. Optionally a hook replaces the anchor
generator's output by a fixed number of queries (``num_queries``) so that the proposal stage and the
decoder run at a chosen, documented query count (the paper counts FLOPs at its average of about 312).

Random inputs give a randomly initialised anchor generator no reason to probe (spec Appendix C), so
:func:`craft_probing_biases` sets the biases of its two last linears so that every anchor slot has a
role (refinement candidate, confident, low, tiny, large) and Adaptive Probing really runs, in the
spirit of the official fixtures (``fixtures/official/README.md``, "Weights").
"""

from __future__ import annotations

import contextlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from asag.engine.flops import FlopCount, FlopCounter
from asag.engine.host_memory import return_free_memory
from asag.engine.recall import RecallEvaluator, RecallResult
from asag.modeling.detector import ASAG
from asag.structures import AnchorOutput, Batch, Detections, ModelOutput

T = TypeVar("T")

# The detector's pieces in execution order (the names of its submodules, plus post-processing).
STAGES = ("backbone", "neck", "anchor_generator", "proposal", "decoder", "postprocess")
MODULE_STAGES = STAGES[:-1]
# Stages whose submodule has another name.
STAGE_MODULES = {"postprocess": "postprocessor"}
# Levels Adaptive Probing can reach (spec 3.4).
PROBED_LEVELS = ("P4", "P3")
# The collate pads every batch to a multiple of the coarsest stride (spec section 0).
PAD_MULTIPLE = 32
MS_PER_S = 1e3
BYTES_PER_MIB = 2**20
# ru_maxrss is reported in KiB on Linux and in bytes on macOS (getrusage(2)).
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024
# Writing "5" to /proc/self/clear_refs resets the peak RSS to the current RSS (proc(5), Linux >= 4.0).
CLEAR_REFS = "/proc/self/clear_refs"
PROC_STATUS = "/proc/self/status"
RESET_PEAK_RSS = "5"
# Fixed queries (``num_queries``): box sides drawn log-uniformly between these fractions of the image.
FIXED_QUERY_SIDE_RANGE = (0.02, 0.5)


# ------------------------------------------------------------------------------------- crafting

# (low, high) logit ranges of the (w, h) and of the confidence of each anchor-slot role. Coarse sizes
# keep candidates between 3 px and 120 px from 512x512 to 1333x1333 images; patch sizes keep P4
# candidates below the 60 px P3 limit (spec 3.4 step 2). Every range stays >= 0.3 logits away from the
# 0.1 / 0.7 confidence window, more than the inputs move an output of the official initialisation.
COARSE_ROLES = {
    "cand": ((-3.5, -2.5), (-1.2, 0.2)),  # small, mid confidence: a refinement candidate
    "hi": ((-3.0, -1.0), (2.0, 3.0)),  # confident: output directly
    "low": ((-3.0, -1.0), (-5.0, -3.5)),  # below the output threshold
    "tiny": ((-9.0, -8.0), (2.0, 3.0)),  # confident but under 3 px: zeroed
    "large": ((0.5, 1.5), (-1.0, 0.0)),  # mid confidence but too large to probe
}
PATCH_ROLES = {**COARSE_ROLES, "cand": ((-2.5, -1.5), (-1.2, 0.2))}
ROLE_CYCLE = ("cand", "hi", "low", "cand", "tiny", "low", "hi", "large", "cand", "low")
# Centre logits are drawn uniformly in this range (centres spread over the patch).
CENTRE_LOGIT_RANGE = (-2.0, 2.0)
ANCHOR_FIELDS = 5  # (cx, cy, w, h, confidence logit), spec 3.2


def _uniform(bounds: tuple[float, float], u: Tensor) -> Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def craft_slot_biases(bias: Tensor, roles: dict, generator: torch.Generator) -> None:
    """Overwrite a last-layer bias ``[K * 5]`` in place: slot k gets role ``ROLE_CYCLE[k % 10]``."""
    slots = bias.view(-1, ANCHOR_FIELDS)  # [K, 5] (cx, cy, w, h, confidence)
    for k in range(slots.shape[0]):
        size, conf = roles[ROLE_CYCLE[k % len(ROLE_CYCLE)]]
        u = torch.rand(ANCHOR_FIELDS, generator=generator)
        slots[k, 0:2] = _uniform(CENTRE_LOGIT_RANGE, u[:2])
        slots[k, 2:4] = _uniform(size, u[2:4])
        slots[k, 4] = _uniform(conf, u[4])


@torch.no_grad()
def craft_probing_biases(anchor_generator: nn.Module, seed: int = 0) -> None:
    """Make Adaptive Probing happen on any input: craft the biases of ``proj_all`` and ``proj_patch``'s
    last linears (the only parameters changed)."""
    generator = torch.Generator().manual_seed(seed)
    craft_slot_biases(anchor_generator.proj_all.layers[-1].bias, COARSE_ROLES, generator)
    craft_slot_biases(anchor_generator.proj_patch.layers[-1].bias, PATCH_ROLES, generator)


# ----------------------------------------------------------------------------------- inputs


@dataclass
class BenchmarkInputs:
    """A batch of random images.

    images: ``[B, 3, Hp, Wp]`` (``Hp, Wp`` = size rounded up to a multiple of 32, zeros beyond the image).
    image_sizes / orig_sizes: ``[B, 2]`` int64 ``(h, w)``; the "original" size equals the input size.
    """

    images: Tensor
    image_sizes: Tensor
    orig_sizes: Tensor

    @property
    def padded_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])


def random_inputs(batch_size: int, size: tuple[int, int], device: torch.device | str = "cpu",
                  seed: int = 0) -> BenchmarkInputs:
    """Standard-normal images of ``size`` ``(h, w)`` padded to a multiple of 32."""
    h, w = size
    hp, wp = (-(-s // PAD_MULTIPLE) * PAD_MULTIPLE for s in size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch_size, 3, hp, wp)
    images[..., :h, :w] = torch.randn(batch_size, 3, h, w, generator=generator)
    sizes = torch.tensor([[h, w]] * batch_size, dtype=torch.int64)
    return BenchmarkInputs(images.to(device), sizes.to(device), sizes.clone().to(device))


def fixed_anchors(image_sizes: Tensor, num_queries: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``num_queries`` deterministic anchors per image: ``[B, n, 4]`` pixel cxcywh and an all-true mask.

    Centres are uniform over the image, sides log-uniform in :data:`FIXED_QUERY_SIDE_RANGE` of the image
    side. FLOPs do not depend on where the boxes are; only their number matters.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = len(image_sizes)
    u = torch.rand(batch, num_queries, 4, generator=generator)
    low, high = (torch.tensor(v).log() for v in FIXED_QUERY_SIDE_RANGE)
    sides = (low + u[..., 2:] * (high - low)).exp()  # [B, n, 2] fraction of (w, h)
    wh = image_sizes.flip(-1).float().cpu()[:, None, :]  # [B, 1, 2]
    boxes = torch.cat([u[..., :2] * wh, sides * wh], dim=-1).to(image_sizes.device)  # [B, n, 4]
    return boxes, torch.ones(batch, num_queries, dtype=torch.bool, device=image_sizes.device)


# ----------------------------------------------------------------------------------- stages

Wrap = Callable[[str, Callable[[], Any]], Any]


class StageProbe(Protocol):
    """Sees every stage of :func:`run_stages` begin and end (timing, FLOP counting)."""

    def begin(self, name: str) -> None: ...

    def end(self, name: str) -> None: ...


@dataclass
class StagedRun:
    """Result of :func:`run_stages`.

    output: the model output (with the fixed anchors when ``num_queries`` was given).
    detections: the post-processed detections.
    generated_queries: ``[B]`` valid anchors the anchor generator itself produced per image.
    """

    output: ModelOutput
    detections: list[Detections]
    generated_queries: Tensor


def stage_modules(model: ASAG) -> dict[str, nn.Module]:
    """The submodule of every :data:`STAGES` entry (post-processing: ``postprocessor``)."""
    return {stage: getattr(model, STAGE_MODULES.get(stage, stage)) for stage in STAGES}


@contextlib.contextmanager
def stage_hooks(model: ASAG, probe: StageProbe | None = None,
                anchor_hook: Callable[[AnchorOutput], AnchorOutput | None] | None = None) -> Iterator[None]:
    """Forward hooks on the stage modules of ``model`` while the block runs: ``probe.begin`` /
    ``probe.end`` around every stage call; ``anchor_hook(anchors)`` sees the anchor generator's output
    and may replace it (returns None to keep it)."""
    handles = []
    try:
        if anchor_hook is not None:
            handles.append(model.anchor_generator.register_forward_hook(lambda m, a, out: anchor_hook(out)))
        for stage, module in stage_modules(model).items() if probe is not None else ():
            handles.append(module.register_forward_pre_hook(lambda m, a, s=stage: probe.begin(s)))
            handles.append(module.register_forward_hook(lambda m, a, o, s=stage: probe.end(s)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_stages(
    model: ASAG,
    inputs: BenchmarkInputs,
    *,
    probe: StageProbe | None = None,
    inference_level: str | None = None,
    num_queries: int | None = None,
    amp_context: Callable[[], Any] | None = None,
) -> StagedRun:
    """One evaluation forward (``ASAG.forward``) plus ``ASAG.postprocess``, watched by module hooks.

    Args:
        model: the detector in eval mode.
        inputs: images and sizes.
        probe: sees each :data:`STAGES` call begin and end (:func:`stage_hooks`); the work between two
            stages (query preparation, casts) belongs to none.
        inference_level: probing depth override (``P3P6 | P4P6 | P5P6``).
        num_queries: replace the anchor generator's anchors by this many fixed anchors per image
            (:func:`fixed_anchors`); ``None`` keeps the generated ones.
        amp_context: factory of the autocast context of backbone and FPN (None: fp32; the forward runs
            everything after the FPN in float32).
    """
    generated: list[Tensor] = []

    def record_anchors(anchors: AnchorOutput) -> AnchorOutput | None:
        generated.append(anchors.valid_mask.sum(dim=1))
        if num_queries is None:
            return None
        boxes, valid = fixed_anchors(inputs.image_sizes, num_queries)
        return replace(anchors, boxes=boxes, valid_mask=valid)

    with stage_hooks(model, probe, record_anchors):
        with (amp_context or contextlib.nullcontext)():
            output = model(inputs.images, inputs.image_sizes, inference_level=inference_level)
        detections = model.postprocess(output, inputs.orig_sizes)
    return StagedRun(output, detections, generated[-1])


# ------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimingStats:
    """Milliseconds over repeated runs: median and spread (quartiles, extremes, standard deviation)."""

    median: float
    mean: float
    std: float
    min: float
    max: float
    q1: float
    q3: float
    runs: int


def timing_stats(seconds: list[float]) -> TimingStats:
    ms = [s * MS_PER_S for s in seconds]
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return TimingStats(
        median=statistics.median(ms), mean=statistics.fmean(ms),
        std=statistics.stdev(ms) if len(ms) > 1 else 0.0,
        min=min(ms), max=max(ms), q1=q1, q3=q3, runs=len(ms),
    )


@dataclass
class StageTimer:
    """Records the synchronised wall time of every stage call: as a :data:`Wrap` (``timer(name, fn)``,
    the training step's parts) or as a :class:`StageProbe` (``begin`` / ``end``, :func:`run_stages`).
    ``clock``: :func:`time.perf_counter` (wall time), or e.g. :func:`time.process_time` (CPU time of all
    the process's threads: the work done, insensitive to other processes sharing the cores)."""

    device: torch.device
    seconds: dict[str, list[float]] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter

    def begin(self, name: str) -> None:
        synchronize(self.device)
        self._started[name] = self.clock()

    def end(self, name: str) -> None:
        synchronize(self.device)
        self.seconds.setdefault(name, []).append(self.clock() - self._started.pop(name))

    def __call__(self, name: str, fn: Callable[[], T]) -> T:
        self.begin(name)
        out = fn()
        self.end(name)
        return out


def time_call(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its synchronised wall time in seconds."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------ FLOPs, params


@dataclass
class FlopReport:
    """FLOPs of one staged run (the whole batch). ``stages``: stage -> count; ``total``: their sum."""

    stages: dict[str, FlopCount]
    total: FlopCount
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        per_image = self.total.gmacs / self.batch_size
        return {"total": self.total.to_dict(), "gmacs_per_image": per_image,
                "stages": {name: count.to_dict() for name, count in self.stages.items()}}


class FlopRecorder:
    """A :class:`StageProbe` that counts the FLOPs of every stage separately."""

    def __init__(self) -> None:
        self.stages: dict[str, FlopCount] = {}
        self._counting: dict[str, FlopCounter] = {}

    def begin(self, name: str) -> None:
        self._counting[name] = FlopCounter().__enter__()

    def end(self, name: str) -> None:
        counter = self._counting.pop(name)
        counter.__exit__(None, None, None)
        self.stages[name] = self.stages.get(name, FlopCount()) + counter.count


def count_flops(model: ASAG, inputs: BenchmarkInputs, **stage_kwargs) -> tuple[FlopReport, StagedRun]:
    """FLOPs per stage of one evaluation run (``stage_kwargs`` as for :func:`run_stages`)."""
    recorder = FlopRecorder()
    with torch.inference_mode():
        run = run_stages(model, inputs, probe=recorder, **stage_kwargs)
    total = sum(recorder.stages.values(), FlopCount())
    return FlopReport(recorder.stages, total, len(inputs.images)), run


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per detector stage (submodules named like :data:`MODULE_STAGES`), total and trainable."""
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in MODULE_STAGES if hasattr(model, name)}
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


# ------------------------------------------------------------------------------------ memory


def _max_rss_bytes() -> int:
    """The process' peak resident set size. On Linux the memory map's own high-water mark (``VmHWM``),
    which :func:`_reset_peak_rss` resets; ``getrusage`` also counts, after an ``exec``, the peak of the
    parent process it was forked from, which no reset clears."""
    try:
        with open(PROC_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES


def _reset_peak_rss() -> bool:
    """Reset the process' peak RSS to its current RSS (Linux >= 4.0, ``/proc/self/clear_refs``)."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


@dataclass
class MemoryProbe:
    """Peak memory of the code run between :meth:`start` and :meth:`stop`.

    CUDA: ``torch.cuda.max_memory_allocated`` (weights and inputs included). CPU: growth of the process'
    peak resident set size (``VmHWM`` on Linux, else ``getrusage``) over the resident size at
    :meth:`start`, which first returns the heap's free memory to the kernel
    (:func:`asag.engine.host_memory.return_free_memory`); where the peak cannot be reset (not Linux) the
    growth over the previous peak, a lower bound.
    """

    device: torch.device
    _before: int = 0
    _reset: bool = False

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda_max_allocated"
        return "cpu_peak_rss_growth" if self._reset else "cpu_max_rss_growth_lower_bound"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        return_free_memory()  # memory kept by runtime.host_memory=reuse would hide part of the growth
        self._reset = _reset_peak_rss()
        self._before = _max_rss_bytes()

    def stop(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _max_rss_bytes() - self._before


# ------------------------------------------------------------------------------- data statistics


def count_patches(anchors: AnchorOutput, batch_size: int) -> dict[str, int]:
    """Probed (not loss-only) patches per level in a batch (static mode: the used patch slots)."""
    counts = dict.fromkeys(PROBED_LEVELS, 0)
    for prediction in anchors.patch_predictions:
        if prediction.level in counts:
            real = prediction.batch_idx < batch_size
            if prediction.loss_only is not None:
                real &= ~prediction.loss_only
            if prediction.valid is not None:
                real &= prediction.valid
            counts[prediction.level] += int(real.sum())
    return counts


def count_budget_bound(anchors: AnchorOutput) -> dict[str, int] | None:
    """Static mode: budget (``P4``, ``P3`` patches, ``queries``) -> images of the batch where it bound;
    ``None`` in the dynamic mode."""
    if anchors.budget_bound is None:
        return None
    return {key: int(bound.sum()) for key, bound in anchors.budget_bound.items()}


@dataclass
class DatasetScan:
    """Queries and probed patches per image over a data set (and recall, if requested).

    mean_queries / min_queries / max_queries: real (valid) anchors per image.
    mean_patches: level -> mean probed patches per image.
    recall: ``anchors`` / ``proposals`` -> :class:`RecallResult` (None unless requested).
    budget_bound: static mode: budget -> fraction of the images where it bound (None: dynamic mode).
    """

    num_images: int
    mean_queries: float
    min_queries: int
    max_queries: int
    mean_patches: dict[str, float]
    recall: dict[str, RecallResult] | None = None
    budget_bound: dict[str, float] | None = None


@torch.inference_mode()
def scan_dataset(
    model: ASAG,
    loader: Iterable[Batch],
    device: torch.device,
    max_images: int | None = None,
    inference_level: str | None = None,
    recall: bool = False,
    amp_context: Callable[[], Any] | None = None,
) -> DatasetScan:
    """Run ``model`` (eval mode) over ``loader``; count queries and patches, optionally recall."""
    queries: list[int] = []
    patches = dict.fromkeys(PROBED_LEVELS, 0)
    bound: dict[str, int] | None = None
    evaluator = RecallEvaluator() if recall else None
    for batch in loader:
        if max_images is not None and len(queries) >= max_images:
            break
        batch = batch.to(device)
        with (amp_context or contextlib.nullcontext)():
            output = model(batch.images, batch.image_sizes, inference_level=inference_level)
        queries += output.valid_mask.sum(dim=1).tolist()
        for level, n in count_patches(output.anchors, len(batch)).items():
            patches[level] += n
        batch_bound = count_budget_bound(output.anchors)
        if batch_bound is not None:
            bound = {k: (bound or {}).get(k, 0) + v for k, v in batch_bound.items()}
        if evaluator is not None:
            evaluator.update(output, batch.targets, batch.image_sizes, batch.orig_sizes)
    n = max(len(queries), 1)
    return DatasetScan(
        num_images=len(queries), mean_queries=sum(queries) / n, min_queries=min(queries, default=0),
        max_queries=max(queries, default=0), mean_patches={k: v / n for k, v in patches.items()},
        recall=evaluator.result() if evaluator is not None else None,
        budget_bound=None if bound is None else {k: v / n for k, v in bound.items()},
    )


# --------------------------------------------------------------------------------- benchmark


@dataclass
class BenchmarkSettings:
    """What to measure. ``size`` is ``(h, w)`` of the unpadded input; ``num_queries`` fixes the query count
    of proposal stage and decoder (None: the anchor generator's); ``amp``: None, ``fp16`` or ``bf16``."""

    size: tuple[int, int] = (800, 1216)
    batch_size: int = 1
    warmup: int = 2
    repeats: int = 10
    inference_level: str | None = None
    num_queries: int | None = None
    amp: str | None = None
    count_flops: bool = True
    seed: int = 0


@dataclass
class BenchmarkResult:
    """Everything :func:`benchmark` measured (times in ms, memory in MiB, FLOPs for the whole batch).

    queries_per_image: queries entering the proposal stage (= ``fixed_queries`` when that is set);
    generated_queries_per_image: valid anchors the anchor generator produced; patches_per_image: probed
    patches per level; latency_ms: end-to-end (forward + post-processing) per batch; stage_ms / stage_share:
    per-stage times and their share of the sum of stage medians; memory_kind: see :class:`MemoryProbe`;
    static: the model ran in static mode; budget_bound: then, budget -> fraction of the timed batch's
    images where it bound (``P4`` / ``P3`` patch slots, ``queries``).
    """

    model: str
    device: str
    device_name: str
    threads: int
    torch_version: str
    amp: str | None
    batch_size: int
    image_size: list[int]
    padded_size: list[int]
    inference_level: str | None
    fixed_queries: int | None
    crafted: bool
    queries_per_image: float
    generated_queries_per_image: float
    patches_per_image: dict[str, float]
    latency_ms: TimingStats
    fps: float
    stage_ms: dict[str, TimingStats]
    stage_share: dict[str, float]
    flops: FlopReport | None
    parameters: dict[str, int]
    peak_memory_mib: float
    memory_kind: str
    dataset: DatasetScan | None = None
    static: bool = False
    budget_bound: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data["flops"] = self.flops.to_dict() if self.flops is not None else None
        for key in ("latency_ms", "dataset"):
            data[key] = asdict(data[key]) if data[key] is not None else None
        data["stage_ms"] = {k: asdict(v) for k, v in self.stage_ms.items()}
        return data


def cpu_name() -> str:
    """The processor's model name (``lscpu``'s "Model name"; ``platform`` where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor() or platform.machine() or "cpu"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _timed_runs(model: ASAG, inputs: BenchmarkInputs, settings: BenchmarkSettings, device: torch.device,
                amp_context) -> tuple[list[float], StageTimer, StagedRun]:
    """Warm-up, then ``repeats`` rounds of (end-to-end run, staged run), interleaved."""
    kwargs = dict(inference_level=settings.inference_level, num_queries=settings.num_queries,
                  amp_context=amp_context)
    timer = StageTimer(device)
    total: list[float] = []
    with torch.inference_mode():
        for _ in range(settings.warmup):
            run = run_stages(model, inputs, **kwargs)
        for _ in range(settings.repeats):
            run, seconds = time_call(lambda: run_stages(model, inputs, **kwargs), device)
            total.append(seconds)
            run_stages(model, inputs, probe=timer, **kwargs)
    return total, timer, run


def benchmark(model: ASAG, settings: BenchmarkSettings, *, device: torch.device, name: str = "",
              crafted: bool = False, amp_context: Callable[[], Any] | None = None) -> BenchmarkResult:
    """Latency, FPS, per-stage times, FLOPs, parameters and peak memory on random inputs."""
    if settings.repeats < 1:
        raise ValueError("repeats must be >= 1")
    model = model.to(device).eval()
    inputs = random_inputs(settings.batch_size, settings.size, device, settings.seed)
    memory = MemoryProbe(device)
    memory.start()
    total, timer, run = _timed_runs(model, inputs, settings, device, amp_context)
    peak = memory.stop()
    flops = None
    if settings.count_flops:
        flops, _ = count_flops(model, inputs, inference_level=settings.inference_level,
                               num_queries=settings.num_queries, amp_context=amp_context)
    stage_ms = {stage: timing_stats(timer.seconds[stage]) for stage in STAGES}
    stage_sum = sum(s.median for s in stage_ms.values())
    latency = timing_stats(total)
    batch = settings.batch_size
    bound = count_budget_bound(run.output.anchors)
    return BenchmarkResult(
        model=name, device=str(device), device_name=_device_name(device), threads=torch.get_num_threads(),
        torch_version=torch.__version__, amp=settings.amp, batch_size=batch,
        image_size=list(settings.size), padded_size=list(inputs.padded_size),
        inference_level=settings.inference_level, fixed_queries=settings.num_queries, crafted=crafted,
        queries_per_image=float(run.output.valid_mask.sum()) / batch,
        generated_queries_per_image=float(run.generated_queries.sum()) / batch,
        patches_per_image={k: v / batch for k, v in count_patches(run.output.anchors, batch).items()},
        latency_ms=latency, fps=batch * MS_PER_S / latency.median, stage_ms=stage_ms,
        stage_share={k: v.median / stage_sum for k, v in stage_ms.items()},
        flops=flops, parameters=count_parameters(model), peak_memory_mib=peak / BYTES_PER_MIB,
        memory_kind=memory.kind, static=model.static,
        budget_bound=None if bound is None else {k: v / batch for k, v in bound.items()},
    )


# ------------------------------------------------------------------------------------ report


def format_result(result: BenchmarkResult) -> str:
    """Human-readable summary of a :class:`BenchmarkResult`."""
    r = result
    lat = r.latency_ms
    made = r.generated_queries_per_image
    fixed = f" (fixed; the anchor generator made {made:.1f})" if r.fixed_queries else ""
    lines = [
        f"model {r.model} on {r.device} ({r.device_name}, {r.threads} threads, torch {r.torch_version}, "
        f"amp {r.amp or 'fp32'})",
        f"input {r.batch_size} x {r.image_size[0]}x{r.image_size[1]} (padded {r.padded_size[0]}x"
        f"{r.padded_size[1]}), inference level {r.inference_level or 'model default'}, "
        f"crafted anchor biases: {'yes' if r.crafted else 'no'}",
        f"queries per image {r.queries_per_image:.1f}{fixed}, probed patches per image: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r.patches_per_image.items()),
        f"latency median {lat.median:.2f} ms (q1 {lat.q1:.2f}, q3 {lat.q3:.2f}, min {lat.min:.2f}, "
        f"max {lat.max:.2f}, {lat.runs} runs) -> {r.fps:.2f} images/s",
        f"{'stage':>17} {'median ms':>10} {'share':>7} {'GMACs':>9}",
    ]
    for stage, stats in r.stage_ms.items():
        gmacs = f"{r.flops.stages[stage].gmacs:>9.3f}" if r.flops and stage in r.flops.stages else ""
        lines.append(f"{stage:>17} {stats.median:>10.2f} {r.stage_share[stage]:>7.1%} {gmacs}")
    if r.flops is not None:
        t = r.flops.total
        lines.append(f"FLOPs {t.gflops:.2f} G = {t.gmacs:.2f} GMACs (the papers' 'GFLOPs') for the batch; "
                     f"hand-counted: grid_sample {t.by_op.get('grid_sample', 0) / 1e9:.3f} GFLOPs, "
                     f"roi_align {t.by_op.get('roi_align', 0) / 1e9:.3f} GFLOPs")
    if r.budget_bound is not None:
        lines.append("static mode; budget bound in " + _format_bound(r.budget_bound) + " of the images")
    p = r.parameters
    lines.append(f"parameters {p['total']:,} (trainable {p['trainable']:,}); "
                 f"peak memory {r.peak_memory_mib:.1f} MiB ({r.memory_kind})")
    if r.dataset is not None:
        d = r.dataset
        lines.append(f"data set: {d.num_images} images, queries per image mean {d.mean_queries:.1f} "
                     f"(min {d.min_queries}, max {d.max_queries}), probed patches per image "
                     + ", ".join(f"{k} {v:.2f}" for k, v in d.mean_patches.items()))
        if d.budget_bound is not None:
            lines.append("data set, static mode: budget bound in " + _format_bound(d.budget_bound)
                         + " of the images")
    return "\n".join(lines)


def _format_bound(bound: dict[str, float]) -> str:
    """``{"P4": 0.0, "P3": 0.02, "queries": 0.0}`` -> ``"P4 patches 0.0%, P3 patches 2.0%, queries 0.0%"``."""
    return ", ".join(f"{k} {'patches ' if k != 'queries' else ''}{v:.1%}" for k, v in bound.items())
