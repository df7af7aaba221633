"""Host-device synchronisations of one training step, counted by stage.

:class:`~asag.engine.syncs.SyncAudit` records every torch call that would make the host wait for a CUDA
device, with the asag source line that asked for it. :func:`count_step_syncs` runs one
:meth:`~asag.engine.trainer.Trainer.train_step` under the audit and sorts the calls into the stages of
:data:`SYNC_STAGES` by the part of the step (forward, loss, backward, optimizer) and the source file.
The audit works on any device, so the counts can be reviewed on a CPU; on CUDA
``torch.cuda.set_sync_debug_mode`` is the ground truth (``benchmarks/train_gpu.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import Tensor

from asag.engine.syncs import SyncAudit
from asag.structures import ImageTargets

SYNC_STAGES = ("backbone/FPN", "anchor generator", "proposal/decoder", "matching", "loss", "backward",
               "optimizer")
# Source files (relative to the package) -> stage, for syncs asked for during the forward or the loss.
_FILE_STAGES = {
    "modeling/backbone.py": "backbone/FPN", "modeling/neck.py": "backbone/FPN",
    "modeling/deformable_encoder.py": "backbone/FPN",
    "modeling/anchor_generator.py": "anchor generator", "modeling/anchor_selection.py": "anchor generator",
    "modeling/patches.py": "anchor generator", "ops/nms.py": "anchor generator",
    "training/patch_sampling.py": "anchor generator", "training/matcher.py": "matching",
}


def stage_of(part: str, site: str) -> str:
    """The stage of a sync asked for at ``site`` (``file:line``) during step part ``part``."""
    if part in ("backward", "optimizer"):
        return part
    path = site.rsplit(":", 1)[0]
    if path in _FILE_STAGES:
        return _FILE_STAGES[path]
    return "loss" if part == "loss" else "proposal/decoder"


class _StageAudit:
    """A ``wrap`` for :func:`~asag.engine.trainer.train_step`: audits each part, sorts sites by stage."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({stage: 0 for stage in SYNC_STAGES})
        self.sites: Counter[str] = Counter()

    def __call__(self, part: str, fn: Callable[[], Any]) -> Any:
        with SyncAudit() as audit:
            out = fn()
        for site, n in audit.sites.items():
            self.counts[stage_of(part, site)] += n
            self.sites[f"{part} {site}"] += n
        return out


def count_step_syncs(trainer, images: Tensor, image_sizes: Tensor, targets: list[ImageTargets],
                     epoch: int = 0) -> tuple[Counter[str], Counter[str]]:
    """Syncs of one ``trainer.train_step(images, image_sizes, targets, epoch=epoch)``: counts by stage
    (every stage of :data:`SYNC_STAGES` present) and by ``"part file:line"``."""
    audit = _StageAudit()
    trainer.train_step(images, image_sizes, targets, epoch=epoch, wrap=audit)
    return audit.counts, audit.sites
