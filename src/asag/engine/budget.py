"""Fit a training schedule into a wall-clock budget (``asag demo --budget-minutes``).

The speed of the machine is measured on the first iterations of the actual run (model, data, precision
and threads as configured), then :func:`plan_schedule` shrinks the preset's schedule to the budget while
keeping its shape: the same number of epochs, learning-rate milestones at the same epochs, warm-up over
the same fraction of the iterations, and the same evaluation cadence. Only the iterations per epoch
change (each epoch then trains on a random part of the training set: the sampler reshuffles every
epoch). A budget the preset already fits leaves it unchanged; the budget never lengthens a schedule.
When evaluations would eat more than :data:`MAX_EVAL_SHARE` of the budget, only the last epoch is
evaluated; when not even one iteration per epoch fits, fewer epochs of one iteration are trained, with
the milestones scaled to the new length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from asag.engine.schedule import evaluates

# The plan uses this fraction of the budget: the last epoch can be slower than the one before it (its
# length is planned from that one's speed), and checkpoints and logs take time too.
BUDGET_SAFETY = 0.98
# Evaluating on the preset's cadence may use at most this share of the budget; else only at the end.
MAX_EVAL_SHARE = 0.25


@dataclass(frozen=True)
class SchedulePlan:
    """A training schedule in the units of the configuration.

    epochs: ``schedule.epochs``; iters_per_epoch: iterations of each epoch (``schedule.max_iters_per_epoch``
    when below a full pass); milestones: ``schedule.milestones`` (0-based epochs); warmup_iters:
    ``schedule.warmup_iters``; eval_every: ``runtime.eval_every`` (the last epoch is always evaluated).
    """

    epochs: int
    iters_per_epoch: int
    milestones: tuple[int, ...]
    warmup_iters: int
    eval_every: int

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def num_evals(self) -> int:
        return num_evaluations(self.epochs, self.eval_every)

    def seconds(self, iter_seconds: float, eval_seconds: float) -> float:
        """Predicted training time: iterations plus evaluations."""
        return self.total_iters * iter_seconds + self.num_evals * eval_seconds

    def describe(self) -> str:
        drops = ", ".join(str(m) for m in self.milestones) or "none"
        evals = "after the last epoch only" if self.num_evals == 1 else f"every {self.eval_every} epochs"
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        return (f"{epochs} x {self.iters_per_epoch} iterations = {self.total_iters} iterations, "
                f"lr x gamma at epochs {drops}, warm-up {self.warmup_iters} iterations, evaluation {evals}")


def num_evaluations(epochs: int, eval_every: int) -> int:
    """Evaluations in a run: every ``eval_every`` epochs and after the last one (0: none)."""
    return sum(evaluates(e, epochs, eval_every) for e in range(epochs))


def plan_schedule(preset: SchedulePlan, *, budget_seconds: float, iter_seconds: float,
                  eval_seconds: float) -> SchedulePlan:
    """The longest schedule of ``preset``'s shape whose predicted time fits ``budget_seconds`` (module
    docstring). ``iter_seconds``: measured seconds per training iteration; ``eval_seconds``: per
    evaluation. The budget passed here is used in full (apply :data:`BUDGET_SAFETY` before)."""
    if iter_seconds <= 0 or eval_seconds < 0 or budget_seconds < 0:
        raise ValueError("iteration seconds must be > 0, evaluation seconds and the budget >= 0")
    if preset.seconds(iter_seconds, eval_seconds) <= budget_seconds:
        return preset
    eval_every = preset.eval_every
    if num_evaluations(preset.epochs, eval_every) * eval_seconds > MAX_EVAL_SHARE * budget_seconds:
        eval_every = preset.epochs if eval_every > 0 else 0  # the last epoch only
    evals_seconds = num_evaluations(preset.epochs, eval_every) * eval_seconds
    iterations = max(1, math.floor((budget_seconds - evals_seconds) / iter_seconds))
    per_epoch = min(preset.iters_per_epoch, iterations // preset.epochs)
    if per_epoch >= 1:
        scale = per_epoch / preset.iters_per_epoch
        return SchedulePlan(preset.epochs, per_epoch, preset.milestones,
                            round(preset.warmup_iters * scale), eval_every)
    epochs = iterations  # fewer epochs than the preset, one iteration each
    scaled = {round(m * epochs / preset.epochs) for m in preset.milestones}
    milestones = tuple(sorted(m for m in scaled if m < epochs))  # a milestone at the end changes nothing
    warmup = round(preset.warmup_iters * epochs / preset.total_iters)
    return SchedulePlan(epochs, 1, milestones, warmup, epochs if eval_every > 0 else 0)


def paced_iterations(plan: SchedulePlan, *, epoch: int, seconds_left: float, iter_seconds: float,
                     eval_seconds: float, max_iters_per_epoch: int) -> int:
    """Iterations for each of the epochs ``epoch .. plan.epochs - 1`` such that they and their
    evaluations take ``seconds_left``: at least 1, at most ``max_iters_per_epoch`` (the preset's)."""
    epochs_left = plan.epochs - epoch
    evals_left = sum(evaluates(e, plan.epochs, plan.eval_every) for e in range(epoch, plan.epochs))
    if epochs_left <= 0 or iter_seconds <= 0:
        raise ValueError("no epoch left to pace, or a non-positive iteration time")
    fitting = math.floor((seconds_left - evals_left * eval_seconds) / (epochs_left * iter_seconds))
    return max(1, min(max_iters_per_epoch, fitting))


class BudgetPacer:
    """Re-plans the length of every epoch from the speed measured on the previous one, so that a
    planned run ends at ``deadline`` even when the first measurement was off (a busy machine, a model
    that gets faster or slower as it learns).

    Called with the 0-based epoch before each epoch (``fit(epoch_iters=...)``), it returns that epoch's
    number of iterations: ``plan.iters_per_epoch`` for the first one, then :func:`paced_iterations`
    with the seconds per iteration of the previous epoch (its wall-clock time, less ``eval_seconds``
    if it was evaluated). The warm-up and the milestones stay those of ``plan``.

    Args:
        plan: the schedule chosen from the speed probe.
        deadline: ``clock()`` value by which training should end.
        eval_seconds: the estimated seconds of one evaluation.
        max_iters_per_epoch: the preset's iterations per epoch (never exceeded).
        log: receives one line whenever the epoch length changes.
        clock: the time source (seconds).
    """

    def __init__(self, plan: SchedulePlan, *, deadline: float, eval_seconds: float, max_iters_per_epoch: int,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> None:
        self.plan, self.deadline, self.eval_seconds = plan, deadline, eval_seconds
        self.max_iters_per_epoch, self.log, self.clock = max_iters_per_epoch, log, clock
        self._previous: tuple[int, float, int] | None = None  # (epoch, start time, iterations)

    def __call__(self, epoch: int) -> int:
        now = self.clock()
        iterations = self.plan.iters_per_epoch
        if self._previous is not None and self._previous[0] == epoch - 1:
            last_epoch, start, last_iters = self._previous
            evaluated = evaluates(last_epoch, self.plan.epochs, self.plan.eval_every)
            iter_seconds = max(now - start - (self.eval_seconds if evaluated else 0.0), 1e-3) / last_iters
            iterations = paced_iterations(self.plan, epoch=epoch, seconds_left=self.deadline - now,
                                          iter_seconds=iter_seconds, eval_seconds=self.eval_seconds,
                                          max_iters_per_epoch=self.max_iters_per_epoch)
            if iterations != last_iters:
                epochs = (f"epoch {epoch} trains {iterations} iterations" if epoch == self.plan.epochs - 1
                          else f"epochs {epoch}-{self.plan.epochs - 1} train {iterations} iterations each")
                self.log(f"budget: {iter_seconds:.2f} s per iteration in epoch {last_epoch}; {epochs} "
                         f"({(self.deadline - now) / 60:.1f} min left)")
        self._previous = (epoch, now, iterations)
        return iterations
