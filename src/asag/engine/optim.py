"""AdamW with the release's two parameter groups (spec section 9).

Parameters whose name contains ``"backbone"`` train at the backbone learning rate, all others at the
base learning rate; weight decay applies to every parameter (norms, biases and embeddings included);
frozen parameters (``requires_grad`` False) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.optim import AdamW

# Spec section 9 (the authors' defaults).
DEFAULT_LR = 2e-4
DEFAULT_BACKBONE_LR = 2e-5
DEFAULT_WEIGHT_DECAY = 1e-4
BACKBONE_KEY = "backbone"
# ``kernel`` names -> torch.optim.AdamW implementation flags.
OPTIMIZER_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


@dataclass
class ParamGroupSummary:
    """Names of the trainable parameters in each group (for logging and tests)."""

    base: list[str]
    backbone: list[str]


def split_parameters(model: nn.Module, *, backbone_key: str = BACKBONE_KEY) -> ParamGroupSummary:
    """Names of trainable parameters, split by whether the name contains ``backbone_key``.

    ``model`` may be wrapped in DistributedDataParallel; names are taken from the wrapped module.
    """
    module = getattr(model, "module", model)
    base, backbone = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (backbone if backbone_key in name else base).append(name)
    return ParamGroupSummary(base=base, backbone=backbone)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float = DEFAULT_LR,
    backbone_lr: float = DEFAULT_BACKBONE_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    backbone_key: str = BACKBONE_KEY,
    kernel: str = "for_loop",
) -> AdamW:
    """AdamW over the trainable parameters of ``model``.

    Group 0 (``name="base"``) holds every parameter whose name lacks ``backbone_key`` at ``lr``;
    group 1 (``name="backbone"``) the others at ``backbone_lr``. Empty groups are omitted, so a model
    without a backbone gets a single group. ``weight_decay`` applies to both groups. ``kernel``: one of
    :data:`OPTIMIZER_KERNELS` (``fused``, ``foreach``, ``for_loop``; the same update up to float rounding).
    """
    if kernel not in OPTIMIZER_KERNELS:
        raise ValueError(f"optimizer kernel must be one of {sorted(OPTIMIZER_KERNELS)}, got {kernel!r}")
    module = getattr(model, "module", model)
    params = dict(module.named_parameters())
    split = split_parameters(module, backbone_key=backbone_key)
    groups = [
        {"name": "base", "params": [params[n] for n in split.base], "lr": lr},
        {"name": "backbone", "params": [params[n] for n in split.backbone], "lr": backbone_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return AdamW(groups, lr=lr, weight_decay=weight_decay, **OPTIMIZER_KERNELS[kernel])
