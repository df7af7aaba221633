"""Learning-rate schedule of the release: linear warm-up per iteration, then multi-step decay per epoch.

The release (spec section 9, "Scheduler mechanics") uses one multi-step scheduler with milestones
``[500 + 8, 500 + 11]`` that is stepped once per iteration during the first 500 iterations of epoch 0
and once at the end of every epoch. Its single counter mixes iterations and epochs; we keep the two
counters apart, which gives exactly the same learning rates whenever epoch 0 has at least
``warmup_iters`` iterations (the release's setting):

* iteration ``i`` of the warm-up runs at ``lr * (f * (1 - i / W) + i / W)`` with ``f = 1/3``,
  ``W = warmup_iters``;
* during epoch ``e`` the learning rate is multiplied by ``gamma ** (number of milestones <= e)``, i.e.
  the decay applies from the *start* of each milestone epoch.

Warm-up longer than epoch 0: :meth:`WarmupMultiStepLR.step_iteration` keeps advancing the warm-up
through the following epochs until ``warmup_iters`` iterations have been done, and the milestone
decay still happens at the start of the milestone epochs (both factors multiply). The release's single
counter would instead freeze the warm-up factor after epoch 0 and shift every milestone late by the
missing iterations; we do not reproduce that.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# Spec section 9: 500 warm-up iterations, starting factor 1/3, decay by 0.1 at each milestone.
DEFAULT_WARMUP_ITERS = 500
DEFAULT_WARMUP_FACTOR = 1.0 / 3.0
DEFAULT_GAMMA = 0.1


@dataclass(frozen=True)
class ScheduleLength:
    """Number of epochs and the (0-based) epochs at whose start the learning rate drops."""

    epochs: int
    milestones: tuple[int, ...]


# Spec section 9: the authors' training schedules.
SCHEDULE_1X = ScheduleLength(epochs=12, milestones=(8, 11))
SCHEDULE_3X = ScheduleLength(epochs=36, milestones=(24, 33))
SCHEDULE_50_EPOCHS = ScheduleLength(epochs=50, milestones=(40, 46))  # the authors' CrowdHuman recipe


def warmup_factor(iteration: int, *, warmup_iters: int, start_factor: float) -> float:
    """Linear warm-up factor at ``iteration`` (0-based): ``start_factor`` at 0, 1 from ``warmup_iters`` on."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return start_factor * (1.0 - alpha) + alpha


def decay_factor(epoch: int, *, milestones: Sequence[int], gamma: float) -> float:
    """``gamma ** k`` where ``k`` is the number of milestones ``<= epoch`` (0-based epochs)."""
    return gamma ** bisect.bisect_right(sorted(milestones), epoch)


def evaluates(epoch: int, epochs: int, eval_every: int) -> bool:
    """Whether a run of ``epochs`` evaluates after ``epoch`` (0-based): every ``eval_every`` epochs and
    after the last one (``eval_every <= 0``: never)."""
    return eval_every > 0 and ((epoch + 1) % eval_every == 0 or epoch == epochs - 1)


class WarmupMultiStepFactor:
    """The multiplicative lr factor as a callable :class:`LambdaLR` can save in its state dict.

    It holds the two counters (warm-up iterations done, epochs done) as plain attributes, so
    ``LambdaLR.state_dict`` stores them and ``load_state_dict`` restores them. The argument LambdaLR
    passes (its own step count) is ignored.
    """

    def __init__(self, *, milestones: Sequence[int], gamma: float, warmup_iters: int, start_factor: float):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.start_factor = float(start_factor)
        self.warmup_done = 0
        self.epoch = 0

    def __call__(self, _step_count: int) -> float:
        warm = warmup_factor(self.warmup_done, warmup_iters=self.warmup_iters, start_factor=self.start_factor)
        return warm * decay_factor(self.epoch, milestones=self.milestones, gamma=self.gamma)


class WarmupMultiStepLR(LambdaLR):
    """Warm-up per iteration plus multi-step decay per epoch, for every parameter group.

    Call :meth:`step_iteration` after every optimizer step (a no-op once warm-up is over) and
    :meth:`step_epoch` at the end of every epoch. ``state_dict`` / ``load_state_dict`` hold both
    counters as plain data (``torch.load(weights_only=True)`` compatible).

    Args:
        optimizer: the optimizer whose groups' ``lr`` (set at construction) are the base lrs.
        milestones: 0-based epochs at whose start the lr is multiplied by ``gamma``.
        gamma: decay factor per milestone.
        warmup_iters: number of warm-up iterations (0 disables warm-up).
        warmup_start_factor: lr factor at iteration 0 of the warm-up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        milestones: Sequence[int],
        gamma: float = DEFAULT_GAMMA,
        warmup_iters: int = DEFAULT_WARMUP_ITERS,
        warmup_start_factor: float = DEFAULT_WARMUP_FACTOR,
    ):
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        factor = WarmupMultiStepFactor(
            milestones=milestones, gamma=gamma, warmup_iters=warmup_iters, start_factor=warmup_start_factor
        )
        super().__init__(optimizer, lr_lambda=[factor] * len(optimizer.param_groups))

    @property
    def factor(self) -> WarmupMultiStepFactor:
        return self.lr_lambdas[0]

    @property
    def warmup_done(self) -> int:
        """Warm-up iterations done so far (saturates at ``warmup_iters``)."""
        return self.factor.warmup_done

    @property
    def epoch(self) -> int:
        """Epochs completed so far (the 0-based index of the epoch being trained)."""
        return self.factor.epoch

    @property
    def in_warmup(self) -> bool:
        return self.factor.warmup_done < self.factor.warmup_iters

    def step_iteration(self) -> None:
        """Advance the warm-up by one iteration; does nothing once the warm-up is over."""
        if not self.in_warmup:
            return
        for factor in self._unique_factors():
            factor.warmup_done += 1
        self.step()

    def step_epoch(self) -> None:
        """Mark the end of an epoch: the next epoch's milestone decay takes effect."""
        for factor in self._unique_factors():
            factor.epoch += 1
        self.step()

    def _unique_factors(self) -> list[WarmupMultiStepFactor]:
        # After load_state_dict the groups may hold distinct (but equal) factor objects.
        return list({id(f): f for f in self.lr_lambdas}.values())
