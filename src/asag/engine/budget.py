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
from dataclasses import dataclass

# The plan uses this fraction of the budget: later iterations can be slower than the measured first ones
# (the anchor generator probes more patches as it learns), and checkpoints and logs take time too.
BUDGET_SAFETY = 0.95
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
    if eval_every <= 0:
        return 0
    return len({e for e in range(epochs) if (e + 1) % eval_every == 0 or e == epochs - 1})


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
