"""Exponential moving average (EMA) of a model's weights (``schedule.ema_decay``).

After every optimiser step the averaged copy moves towards the trained weights:
``ema = d * ema + (1 - d) * weights`` for every floating-point parameter and buffer (batch-norm
statistics included), integer buffers are copied. The decay warms up as in timm's ``ModelEma``:
``d_t = min(decay, (1 + t) / (10 + t))`` after ``t`` earlier updates, so that the early average is not
dominated by the random initialisation (0.1 at the first update, 0.5 at the ninth, ``decay`` once
``t >= (10 * decay - 1) / (1 - decay)``, e.g. after 8,991 updates for 0.999).

When on, the averaged model is what evaluation, ``best.pth`` and prediction use; checkpoints store it
beside the trained weights (``ema``, ``ema_updates``) so that ``--resume`` continues it bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

# timm's warm-up: d_t = min(decay, (1 + t) / (WARMUP_OFFSET + t)).
WARMUP_OFFSET = 10


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates + 1`` (``updates`` done before it)."""
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


class ModelEma:
    """An averaged copy of ``model`` (a DDP wrapper is unwrapped), in evaluation mode and without
    gradients; ``module`` is that copy, ``updates`` the number of :meth:`update` calls so far."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.module = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights."""
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        source = getattr(model, "module", model).state_dict()
        for name, value in self.module.state_dict().items():  # tensors sharing the module's storage
            if value.is_floating_point():
                value.lerp_(source[name].to(value.dtype), weight)
            else:
                value.copy_(source[name])
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)

    def to(self, device: torch.device | str) -> ModelEma:
        self.module.to(device)
        return self
