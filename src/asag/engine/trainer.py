"""The training loop: one epoch (:func:`train_one_epoch`) and the whole run (:func:`fit`).

The engine owns time, precision and devices (STYLE rule 8): the epoch is passed explicitly to the
model, autocast wraps the model's forward here (never inside it), and the loss is computed in fp32.
Per iteration: forward (autocast) -> criterion (fp32) -> backward (scaled for fp16) -> unscale ->
clip the global gradient norm -> optimizer step -> warm-up step of the scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from asag.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    one_line,
    restore_training_state,
    save_checkpoint,
    unwrap_model,
)
from asag.engine.distributed import all_gather_object, all_reduce_mean, barrier, get_rank, set_sampler_epoch
from asag.engine.ema import ModelEma
from asag.engine.logger import RunLogger
from asag.engine.memory_format import RECORD_KEY, choose_memory_format, layout_name
from asag.engine.schedule import WarmupMultiStepLR, evaluates
from asag.errors import CheckpointError, ConfigError, NonFiniteError
from asag.structures import Batch, ImageTargets

# Spec section 9: global gradient-norm clipping threshold of the release.
DEFAULT_CLIP_MAX_NORM = 0.1
DEFAULT_LOG_EVERY = 20
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# runtime.amp_scope: what autocast covers (set_amp_scope).
AMP_SCOPES = ("backbone", "heads")
LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pth", "best.pth"


class NonFiniteLossError(NonFiniteError):
    """The total loss became NaN or infinite, or the criterion met NaN/inf predictions (the release stops
    training in this case too). An :class:`~asag.errors.AsagError`: the CLI prints its one line, exit 2."""


class LossLike(Protocol):
    """What the criterion returns (``asag.training.criterion.LossResult``)."""

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]
    stats: dict[str, float]


class EvalLike(Protocol):
    """What an evaluation callback returns (``asag.engine.evaluator.EvalResult``)."""

    ap: float


# --------------------------------------------------------------------------------------- precision


def check_amp(amp: str | None, device: torch.device) -> None:
    """Validate the precision option: None (fp32), "bf16" (CPU or CUDA) or "fp16" (CUDA only)."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ConfigError("amp 'fp16' needs a CUDA device; use 'bf16' (or no amp) on CPU")


def autocast_context(device: torch.device | str, amp: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` on ``device``'s type, or a no-op context for fp32."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])


def set_amp_scope(model: nn.Module, scope: str) -> None:
    """Apply ``runtime.amp_scope`` to ``model`` (a DDP wrapper is unwrapped): ``"backbone"`` (the
    release: autocast covers backbone and FPN) or ``"heads"`` (the decoder heads follow the forward's
    autocast too, :attr:`asag.modeling.detector.ASAG.autocast_heads`). Without autocast (fp32) neither
    changes anything."""
    if scope not in AMP_SCOPES:
        raise ConfigError(f"runtime.amp_scope must be one of {list(AMP_SCOPES)}, got {scope!r}")
    target = unwrap_model(model)
    if not hasattr(target, "autocast_heads"):
        if scope == "heads":
            raise ConfigError(f"runtime.amp_scope=heads: {type(target).__name__} has no decoder heads to "
                              f"autocast")
        return
    target.autocast_heads = scope == "heads"


def use_channels_last(memory_format: str, device: torch.device | str, amp: str | None = None) -> bool:
    """``runtime.memory_format`` -> whether training images enter the backbone channels-last when training
    in ``amp`` on ``device``, without a probe or a resumed checkpoint
    (:func:`asag.engine.memory_format.choose_memory_format`; ``asag train`` also passes those)."""
    return choose_memory_format(memory_format, device, amp=amp).channels_last


def make_grad_scaler(amp: str | None, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler (default settings, as in the release) for fp16 training; None otherwise."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def to_float32(value: Any) -> Any:
    """``value`` with every floating-point tensor cast to fp32 (dataclasses, lists, tuples and dicts
    are rebuilt; integer and bool tensors are left alone)."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_float32(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------- metrics


@dataclass
class EpochMetrics:
    """Means over one epoch's iterations (and over ranks in distributed training).

    loss: weighted total loss. terms: raw (unweighted) loss terms by name. stats: criterion statistics.
    grad_norm: global gradient norm before clipping (after AMP unscale). lr: learning rate of the
    first parameter group at the last iteration. images: images seen by this rank.
    """

    epoch: int
    iterations: int
    images: int
    loss: float
    terms: dict[str, float]
    stats: dict[str, float]
    grad_norm: float
    lr: float
    seconds: float


class _Means:
    """Running sums of scalars; tensors stay on their device until :meth:`means` (one sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor | float]) -> None:
        for key, value in values.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        return {k: float(v) / self.count for k, v in self.sums.items()}


def _split_prefixed(values: dict[str, float], prefix: str) -> dict[str, float]:
    n = len(prefix)
    return {k[n:]: v for k, v in values.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------- one epoch


# Names of the four timed parts of a training step (``train_step(..., wrap=...)``).
STEP_PARTS = ("forward", "loss", "backward", "optimizer")


def _no_wrap(name: str, fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass
class StepResult:
    """What one training step did.

    loss: the criterion's result (``total``, raw ``terms``, their ``weights``, ``stats``), computed in fp32.
    grad_norm: 0-d global gradient norm before clipping (after the fp16 unscale).
    """

    loss: LossLike
    grad_norm: Tensor

    @property
    def total(self) -> Tensor:
        return self.loss.total

    @property
    def terms(self) -> dict[str, Tensor]:
        return self.loss.terms

    def floats(self) -> dict[str, float]:
        """``loss``, ``grad_norm`` and every term as Python floats (one host sync each)."""
        return _floats({"loss": self.loss.total, "grad_norm": self.grad_norm, **self.loss.terms})


def train_step(
    model: nn.Module,
    criterion: Callable[..., LossLike],
    batch: Batch | Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    device: torch.device,
    amp: str | None,
    scaler: torch.amp.GradScaler | None,
    clip_max_norm: float,
    channels_last: bool = False,
    wrap: Callable[[str, Callable[[], Any]], Any] = _no_wrap,
) -> StepResult:
    """One optimisation step on ``batch`` (already on ``device``); the scheduler is not stepped.

    forward (autocast) -> criterion (fp32) -> backward (scaled for fp16) -> unscale -> clip -> step.
    ``batch`` may be a sequence of micro-batches (gradient accumulation): each is forwarded and
    backpropagated in turn, its loss normalised over all of them
    (:class:`~asag.training.criterion.BatchShare`: the matched-box count of the whole accumulated batch),
    and one optimiser step follows, on the summed gradients; the returned terms are the sums over the
    micro-batches (the accumulated batch's terms), the statistics their means.
    ``channels_last``: the images enter the backbone in the channels-last memory format (every
    convolution of the backbone and FPN follows it; the same numbers up to float rounding).
    ``wrap(name, fn)`` runs each part of :data:`STEP_PARTS` (e.g. an
    :class:`~asag.engine.benchmark.StageTimer`).
    Raises :class:`NonFiniteLossError` (before any update) when the loss is NaN or infinite, or the
    criterion raised an :class:`~asag.errors.NonFiniteError` on non-finite predictions.
    """
    micro = [batch] if isinstance(batch, Batch) else list(batch)
    share = None
    if len(micro) > 1:
        from asag.training.criterion import BatchShare, num_boxes_normaliser

        targets = [t for b in micro for t in b.targets]
        share = BatchShare(num_boxes_normaliser(targets, micro[0].images.device), len(micro))
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for part in micro:
        images = part.images.contiguous(memory_format=torch.channels_last) if channels_last else part.images
        output = wrap("forward", lambda: _forward(model, images, part, epoch, device, amp))  # noqa: B023
        loss = wrap("loss", lambda: _loss(criterion, output, part, share))  # noqa: B023
        if not torch.isfinite(loss.total):
            value = float(loss.total.detach())
            raise NonFiniteLossError(f"loss is {value} (terms: {_floats(loss.terms)}); stopping")
        wrap("backward", lambda: _backward(loss.total, scaler))  # noqa: B023
        losses.append(loss)
    grad_norm = wrap("optimizer", lambda: _optimizer_step(model, optimizer, scaler, clip_max_norm))
    return StepResult(loss=losses[0] if len(losses) == 1 else _summed(losses), grad_norm=grad_norm)


def _loss(criterion: Callable[..., LossLike], output: Any, batch: Batch, share: Any) -> LossLike:
    """The criterion on one (micro-)batch; a NonFiniteError of the criterion ends the step."""
    try:
        if share is None:
            return criterion(output, batch.targets, batch.image_sizes)
        return criterion(output, batch.targets, batch.image_sizes, share=share)
    except NonFiniteError as err:  # e.g. the matcher met NaN predictions before the loss was summed
        raise NonFiniteLossError(f"loss is not finite: {err}; stopping") from None


@dataclass
class _AccumulatedLoss:
    """The loss of an accumulated batch: totals and terms summed over its micro-batches, stats averaged."""

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]
    stats: dict[str, float]


def _summed(losses: list[LossLike]) -> _AccumulatedLoss:
    terms = {key: torch.stack([loss.terms[key].detach() for loss in losses]).sum() for key in losses[0].terms}
    stats = {key: sum(loss.stats[key] for loss in losses) / len(losses) for key in losses[0].stats}
    total = torch.stack([loss.total.detach() for loss in losses]).sum()
    return _AccumulatedLoss(total, terms, dict(losses[0].weights), stats)


def _forward(model: nn.Module, images: Tensor, batch: Batch, epoch: int, device: torch.device,
             amp: str | None) -> Any:
    with autocast_context(device, amp):
        output = model(images, batch.image_sizes, batch.targets, epoch=epoch)
    return to_float32(output) if amp is not None else output


def _backward(total: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Backpropagate ``total``, adding to the gradients already there (scaled for fp16)."""
    if scaler is not None:
        scaler.scale(total).backward()
    else:
        total.backward()


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    clip_max_norm: float) -> Tensor:
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = clip_max_norm if clip_max_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


class Trainer:
    """One training step at a time, for tests, notebooks and benchmarks (``asag.build.build_trainer``
    makes one from a configuration).

    Holds the model, criterion, optimizer, optional warm-up scheduler (stepped after every step, as in
    :func:`train_one_epoch`) and the step settings of :func:`train_step`; ``amp="fp16"`` without a
    ``scaler`` gets a default GradScaler.

    >>> trainer = build_trainer(cfg)
    >>> result = trainer.train_step(images, image_sizes, targets)
    >>> result.total, result.terms["loss_ce"], result.grad_norm
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., LossLike],
        optimizer: torch.optim.Optimizer,
        scheduler: WarmupMultiStepLR | None = None,
        *,
        device: torch.device | str = "cpu",
        amp: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        clip_max_norm: float = DEFAULT_CLIP_MAX_NORM,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        check_amp(amp, self.device)
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.amp, self.scaler = amp, scaler if scaler is not None else make_grad_scaler(amp, self.device)
        self.clip_max_norm, self.channels_last = clip_max_norm, channels_last

    def train_step(
        self,
        images: Tensor,
        image_sizes: Tensor,
        targets: list[ImageTargets],
        *,
        epoch: int = 0,
        wrap: Callable[[str, Callable[[], Any]], Any] = _no_wrap,
    ) -> StepResult:
        """One step on a batch: ``images`` ``[B, 3, Hp, Wp]`` normalised and zero-padded, ``image_sizes``
        ``[B, 2]`` int64 ``(h, w)``, one :class:`ImageTargets` per image (normalised cxcywh boxes).
        ``epoch`` (0-based) drives teacher forcing and the denoising noise; ``wrap`` as in
        :func:`train_step`."""
        batch = Batch(images, image_sizes, image_sizes, list(targets), list(range(len(targets))))
        return self.train_batch(batch, epoch=epoch, wrap=wrap)

    def train_batch(self, batch: Batch, *, epoch: int = 0,
                    wrap: Callable[[str, Callable[[], Any]], Any] = _no_wrap) -> StepResult:
        """:meth:`train_step` on a collated :class:`~asag.structures.Batch` (moved to the device here)."""
        self.model.train()
        if isinstance(self.criterion, nn.Module):
            self.criterion.train()
        result = train_step(
            self.model, self.criterion, batch.to(self.device), self.optimizer, epoch=epoch,
            device=self.device, amp=self.amp, scaler=self.scaler, clip_max_norm=self.clip_max_norm,
            channels_last=self.channels_last, wrap=wrap,
        )
        if self.scheduler is not None:
            self.scheduler.step_iteration()
        return result


def _floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}


def _step_values(step: StepResult) -> dict[str, Tensor | float]:
    values: dict[str, Tensor | float] = {"loss": step.loss.total, "grad_norm": step.grad_norm}
    values.update({f"terms/{k}": v for k, v in step.loss.terms.items()})
    values.update({f"stats/{k}": v for k, v in step.loss.stats.items()})
    return values


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[..., LossLike],
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupMultiStepLR,
    *,
    epoch: int,
    device: torch.device | str,
    clip_max_norm: float = DEFAULT_CLIP_MAX_NORM,
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    logger: RunLogger | None = None,
    max_iters: int | None = None,
    global_step: int = 0,
    log_every: int = DEFAULT_LOG_EVERY,
    channels_last: bool = False,
    accumulate_steps: int = 1,
    ema: ModelEma | None = None,
) -> EpochMetrics:
    """Train for one pass over ``loader`` (or ``max_iters`` iterations).

    An iteration is one optimiser step on ``accumulate_steps`` consecutive batches (gradient
    accumulation, see :func:`train_step`; a last incomplete group of the pass is left out), after which
    the scheduler steps and ``ema`` (when given) is updated.

    Args:
        model: ``model(images [B,3,H,W], image_sizes [B,2] (h,w), targets, epoch=epoch) -> ModelOutput``
            (possibly wrapped in DDP). criterion: ``criterion(output, targets, image_sizes) -> LossResult``.
        loader: yields :class:`asag.structures.Batch` (moved to ``device`` here).
        scheduler: :meth:`~WarmupMultiStepLR.step_iteration` is called after every optimizer step;
            the caller calls ``step_epoch()`` after the epoch (``fit`` does).
        epoch: 0-based epoch, passed to the model (teacher forcing, denoising noise).
        clip_max_norm: global gradient-norm clip (<= 0: no clipping; the norm is still reported).
        amp: None (fp32), "bf16" or "fp16" (CUDA, needs ``scaler``): autocast around the forward.
        logger: receives a "train" record every ``log_every`` iterations at step ``global_step + i``.
        max_iters: stop after this many iterations (optimiser steps).
        channels_last: images enter the backbone channels-last (see :func:`train_step`).
        accumulate_steps: batches per optimiser step. ema: the weights' moving average to update.
    Returns:
        the epoch's mean metrics (averaged over ranks).
    """
    device = torch.device(device)
    check_amp(amp, device)
    if amp == "fp16" and scaler is None:
        raise ConfigError("amp 'fp16' needs a GradScaler (see make_grad_scaler)")
    logger = logger or RunLogger(None, tensorboard=False, progress=False, enabled=False)
    model.train()
    if isinstance(criterion, nn.Module):
        criterion.train()
    means, images, start = _Means(), 0, time.perf_counter()
    length = _epoch_length(loader, max_iters, accumulate_steps)
    bar = logger.progress(_groups(loader, accumulate_steps), total=length, desc=f"epoch {epoch}")
    for it, group in enumerate(bar):
        if max_iters is not None and it >= max_iters:
            break
        group = [batch.to(device) for batch in group]
        step = train_step(
            model, criterion, group[0] if accumulate_steps == 1 else group, optimizer, epoch=epoch,
            device=device, amp=amp, scaler=scaler, clip_max_norm=clip_max_norm, channels_last=channels_last,
        )
        scheduler.step_iteration()
        if ema is not None:
            ema.update(model)
        values = _step_values(step)
        means.add(values)
        images += sum(len(batch) for batch in group)
        if log_every > 0 and it % log_every == 0:
            scalars = _floats(values)
            logger.log("train", global_step + it, {"epoch": epoch, "lr": _lr(optimizer), **scalars})
            if logger.plain_progress:
                logger.info(_progress_line(epoch, it, length, scalars["loss"], _lr(optimizer), images,
                                           time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return _epoch_metrics(means, epoch=epoch, images=images, lr=_lr(optimizer), seconds=seconds)


def _progress_line(epoch: int, it: int, length: int | None, loss: float, lr: float, images: int,
                   seconds: float) -> str:
    """The plain progress line printed instead of a bar when stderr is not a terminal."""
    rate = images / seconds if seconds > 0 else math.nan
    done = it + 1
    line = f"epoch {epoch} iter {done}" + (f"/{length}" if length else "")
    line += f": loss {loss:.4f}, lr {lr:.3g}, {rate:.2f} images/s"
    if length:
        line += f", epoch ETA {_duration(seconds / done * (length - done))}"
    return line


def _duration(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"`` or ``"12.3s"``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


def _groups(loader: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of ``size`` batches (a last incomplete group is dropped)."""
    group: list[Batch] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _epoch_length(loader: Iterable, max_iters: int | None, accumulate_steps: int = 1) -> int | None:
    """Optimiser steps of one pass (at most ``max_iters``), None when the loader has no length."""
    try:
        length = len(loader) // accumulate_steps  # type: ignore[arg-type]
    except TypeError:
        return max_iters
    return length if max_iters is None else min(length, max_iters)


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _epoch_metrics(means: _Means, *, epoch: int, images: int, lr: float, seconds: float) -> EpochMetrics:
    averaged = all_reduce_mean(means.means())
    return EpochMetrics(
        epoch=epoch,
        iterations=means.count,
        images=images,
        loss=averaged.get("loss", math.nan),
        terms=_split_prefixed(averaged, "terms/"),
        stats=_split_prefixed(averaged, "stats/"),
        grad_norm=averaged.get("grad_norm", math.nan),
        lr=lr,
        seconds=seconds,
    )


# ------------------------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    """What :func:`fit` did in this call.

    epochs: metrics of the epochs trained in this call. evaluations: epoch -> evaluation result.
    best_ap / best_epoch: best AP over the whole run (including before a resume); -inf / -1 if none.
    iteration: optimizer steps done in the whole run. last_checkpoint / best_checkpoint: paths.
    """

    epochs: list[EpochMetrics] = field(default_factory=list)
    evaluations: dict[int, Any] = field(default_factory=dict)
    best_ap: float = -math.inf
    best_epoch: int = -1
    iteration: int = 0
    start_epoch: int = 0
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None


@dataclass
class _TrainingObjects:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupMultiStepLR
    scaler: torch.amp.GradScaler | None
    ema: ModelEma | None = None

    @property
    def evaluated(self) -> nn.Module:
        """The model that evaluation (and ``best.pth``'s choice) uses: the EMA when on."""
        return self.ema.module if self.ema is not None else self.model


def _resume(path: str | Path, objects: _TrainingObjects, result: FitResult) -> None:
    """Restore weights, optimizer, scheduler, scaler and RNG; continue after the stored epoch."""
    checkpoint = load_checkpoint(path)
    restore_training_state(
        checkpoint,
        model=objects.model,
        optimizer=objects.optimizer,
        scheduler=objects.scheduler,
        scaler=objects.scaler,
        rank=get_rank(),
        source=path,
    )
    try:
        extra = checkpoint.get("extra") or {}
        result.start_epoch = int(checkpoint["epoch"]) + 1
        result.iteration = int(checkpoint["iteration"])
        best_ap = extra.get("best_ap")
        result.best_ap = -math.inf if best_ap is None else float(best_ap)
        result.best_epoch = int(extra.get("best_epoch", -1))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: its training progress (epoch, iteration, best AP) is malformed "
                              f"({err!r})") from None
    if objects.ema is not None:
        _resume_ema(path, checkpoint, objects)


def _resume_ema(path: str | Path, checkpoint: dict, objects: _TrainingObjects) -> None:
    """The EMA weights and update count of ``checkpoint``; a checkpoint written without EMA starts the
    average from its trained weights (said in the log by the caller)."""
    state = checkpoint.get("ema")
    if state is None:
        objects.ema.load_state_dict(unwrap_model(objects.model).state_dict(), updates=0)
        return
    try:
        objects.ema.load_state_dict(state, updates=int(checkpoint.get("ema_updates", 0)))
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its EMA weights do not fit the model: {one_line(err)}") from None


def _checkpoint_names(epoch: int, checkpoint_every: int, *, improved: bool) -> list[str]:
    """last.pth every epoch, best.pth when AP improved, checkpoint_EEEE.pth every ``checkpoint_every``."""
    names = [LAST_CHECKPOINT]
    if improved:
        names.append(BEST_CHECKPOINT)
    if checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0:
        names.append(f"checkpoint_{epoch:04d}.pth")
    return names


def _save_epoch(
    output_dir: Path,
    objects: _TrainingObjects,
    result: FitResult,
    *,
    epoch: int,
    names: list[str],
    config: dict,
    label_map: dict,
    extra: dict,
) -> None:
    """Write the checkpoints ``names`` of ``epoch``. Collective: every rank must call it (RNG states are
    gathered); rank 0 writes."""
    rng_states = all_gather_object(capture_rng_state())
    improved = BEST_CHECKPOINT in names
    if get_rank() == 0:
        for name in names:
            save_checkpoint(
                output_dir / name,
                model=objects.model, optimizer=objects.optimizer, scheduler=objects.scheduler,
                scaler=objects.scaler, epoch=epoch, iteration=result.iteration,
                config=config, label_map=label_map, extra=extra, rng_states=rng_states, ema=objects.ema,
            )
    barrier()
    result.last_checkpoint = output_dir / LAST_CHECKPOINT
    if improved:
        result.best_checkpoint = output_dir / BEST_CHECKPOINT


def fit(
    model: nn.Module,
    criterion: Callable[..., LossLike],
    train_loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupMultiStepLR,
    *,
    epochs: int,
    device: torch.device | str,
    output_dir: str | Path,
    config: dict,
    label_map: dict,
    evaluate_fn: Callable[[nn.Module], EvalLike] | None = None,
    eval_every: int = 1,
    checkpoint_every: int = 0,
    clip_max_norm: float = DEFAULT_CLIP_MAX_NORM,
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    logger: RunLogger | None = None,
    resume: str | Path | None = None,
    max_iters: int | None = None,
    epoch_iters: Callable[[int], int | None] | None = None,
    log_every: int = DEFAULT_LOG_EVERY,
    channels_last: bool = False,
    accumulate_steps: int = 1,
    ema: ModelEma | None = None,
) -> FitResult:
    """Train epochs ``start .. epochs-1``, evaluating and checkpointing along the way.

    Per epoch: set the sampler's epoch, :func:`train_one_epoch`, ``scheduler.step_epoch()``,
    ``last.pth`` (and ``checkpoint_EEEE.pth`` every ``checkpoint_every`` epochs) in ``output_dir``, then
    evaluation every ``eval_every`` epochs and after the last one (``evaluate_fn(model)`` returning an
    object with ``ap``; 0 disables), after which those checkpoints are written again with its result
    (and ``best.pth`` when AP improved); finally one summary line through ``logger.info``.

    ``resume``: a checkpoint written by this function. Weights, optimizer, scheduler, scaler, RNG
    states, iteration count and best AP are restored and training continues with the next epoch (an
    epoch interrupted part way is trained again from its start). The loader's only state is the epoch
    set here: with :func:`~asag.engine.distributed.build_train_loader` the samples' order and
    augmentation depend only on its seed, the epoch and their position, so on a fixed seed the result
    equals an uninterrupted run bit for bit, with any number of DataLoader workers (and the same
    ``channels_last``: every checkpoint records the layout, which ``runtime.memory_format=auto`` reuses,
    :mod:`asag.engine.memory_format`). ``config`` and ``label_map`` (plain data) are stored in every
    checkpoint.
    ``epoch_iters(epoch)``: called before each epoch, its result replaces ``max_iters`` for that epoch
    (e.g. a :class:`~asag.engine.budget.BudgetPacer`). ``ema``: the moving average of the weights
    (:class:`~asag.engine.ema.ModelEma`), updated after every optimiser step, evaluated instead of the
    trained weights, and stored and restored with them. Other arguments as in :func:`train_one_epoch`.
    """
    output_dir = Path(output_dir)
    logger = logger or RunLogger(None, tensorboard=False, progress=True)
    objects = _TrainingObjects(model, optimizer, scheduler, scaler, ema)
    result = FitResult()
    if resume is not None:
        _resume(resume, objects, result)
        logger.info(f"resumed from {resume}: continuing at epoch {result.start_epoch}")
    start = time.perf_counter()
    for epoch in range(result.start_epoch, epochs):
        set_sampler_epoch(train_loader, epoch)
        epoch_max_iters = epoch_iters(epoch) if epoch_iters is not None else max_iters
        metrics = train_one_epoch(
            model, criterion, train_loader, optimizer, scheduler,
            epoch=epoch, device=device, clip_max_norm=clip_max_norm, amp=amp, scaler=scaler,
            logger=logger, max_iters=epoch_max_iters, global_step=result.iteration, log_every=log_every,
            channels_last=channels_last, accumulate_steps=accumulate_steps, ema=ema,
        )
        if metrics.iterations == 0:  # an empty loader or max_iters <= 0: nothing trained, nothing to save
            raise ConfigError(f"epoch {epoch} ran no training iteration (the training loader yielded no "
                              f"batch{'' if epoch_max_iters is None else f'; max_iters={epoch_max_iters}'}); "
                              f"stopping")
        scheduler.step_epoch()
        result.iteration += metrics.iterations
        result.epochs.append(metrics)
        logger.log("epoch", result.iteration, dataclasses.asdict(metrics))
        save = functools.partial(_save_epoch, output_dir, objects, result, epoch=epoch, config=config,
                                 label_map=label_map)
        due = evaluate_fn is not None and evaluates(epoch, epochs, eval_every)
        # The epoch's weights are on disk before evaluating: a failing evaluation loses no training;
        # they are written again after it, with its result, so that a resume sees the same best AP.
        extra = functools.partial(_extra, result, metrics, channels_last=channels_last)
        save(names=_checkpoint_names(epoch, checkpoint_every, improved=False), extra=extra())
        evaluation = _evaluate_epoch(evaluate_fn, objects.evaluated, result, epoch, logger) if due else None
        if evaluation is not None:  # last.pth again, now with the evaluation (and best.pth)
            names = _checkpoint_names(epoch, checkpoint_every, improved=result.best_epoch == epoch)
            save(names=names, extra=extra(evaluation))
        done, left = epoch + 1 - result.start_epoch, epochs - epoch - 1
        eta = (time.perf_counter() - start) / done * left  # epochs so far, evaluations and checkpoints too
        logger.info(epoch_summary(metrics, evaluation, epochs, eta_seconds=eta))
    return result


def _extra(result: FitResult, metrics: EpochMetrics, evaluation: EvalLike | None = None, *,
           channels_last: bool = False) -> dict:
    """The checkpoint's ``extra``: best AP and epoch, the epoch's metrics, its evaluation, and the memory
    layout trained in (a resume with ``runtime.memory_format=auto`` keeps it)."""
    extra = {"best_ap": result.best_ap, "best_epoch": result.best_epoch, "train": dataclasses.asdict(metrics),
             RECORD_KEY: layout_name(channels_last)}
    if evaluation is not None:
        extra["eval"] = _plain_eval(evaluation)
    return extra


def epoch_summary(metrics: EpochMetrics, evaluation: EvalLike | None, epochs: int,
                  eta_seconds: float | None = None) -> str:
    """One line per epoch (0-based, as in checkpoint names): loss, AP when evaluated, time, and the
    estimated time to the end of the run while epochs remain."""
    ap = f", AP {evaluation.ap:.4f}" if evaluation is not None else ""
    line = (f"epoch {metrics.epoch} of {epochs} done: loss {metrics.loss:.4f}{ap}, {metrics.iterations} "
            f"iterations in {_duration(metrics.seconds)}")
    if eta_seconds is not None and metrics.epoch < epochs - 1:
        line += f"; run ETA {_duration(eta_seconds)}"
    return line


def _evaluate_epoch(
    evaluate_fn: Callable[[nn.Module], EvalLike],
    model: nn.Module,
    result: FitResult,
    epoch: int,
    logger: RunLogger,
) -> EvalLike:
    """Run the evaluation callback and update the best AP."""
    evaluation = evaluate_fn(model)
    result.evaluations[epoch] = evaluation
    logger.log("eval", result.iteration, {"epoch": epoch, **_plain_eval(evaluation)})
    if evaluation.ap > result.best_ap:
        result.best_ap, result.best_epoch = float(evaluation.ap), epoch
    return evaluation


def _plain_eval(evaluation: EvalLike) -> dict:
    if dataclasses.is_dataclass(evaluation):
        return {k: v for k, v in dataclasses.asdict(evaluation).items() if not isinstance(v, Path)}
    return {"ap": float(evaluation.ap)}
