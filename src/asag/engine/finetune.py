"""Fine-tuning: start a training run from a trained detector (``asag train --init CKPT``) and freeze parts.

The starting checkpoint is one of ``asag train`` or ``asag convert``, or an authors' release file as
downloaded (recognised by its layout, converted in memory, with the COCO label map). Its tensors are
matched to the new model by name and shape, and sorted into four groups:

* **loaded**: same name and shape, copied.
* **remapped**: tensors with an axis over the classes (each head's classifier weight and bias, found by
  :func:`class_axes`, never by name). Rows are matched **by category name** (case-insensitive, spaces
  at the ends ignored) between the checkpoint's label map and the new data set's categories: rows of
  shared classes are copied, rows of new classes keep the new model's own initialisation (the prior
  probability bias of a fresh model), classes the data set lacks are dropped. A checkpoint without a
  label map is matched by position when the class counts agree, else not at all.
* **fresh**: tensors the checkpoint lacks (or that do not fit, with ``allow_partial``): initialised as a
  fresh model initialises them.
* **unused**: tensors of the checkpoint the model has no place for.

A multi-head checkpoint loads into a one-head model through its used head (as ``asag convert
--keep-head`` does). Anything else that does not fit (another decoder type, width or backbone depth) is
refused in one line naming the first mismatched tensors, unless ``allow_partial``.

This is not a resume: optimiser, schedule and epoch counter start afresh.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from asag.convert.official import convert_state_dict, head_index, infer_architecture
from asag.data.coco_categories import default_label_map
from asag.data.labels import LabelMap
from asag.engine.checkpoint import CHECKPOINT_FORMAT, read_torch_file, weights_for_inference
from asag.errors import CheckpointError
from asag.modeling.decoders.parallel import select_head

HEAD_EMBEDDING = "decoder.head_embedding"
# The report of --init, saved in the run folder.
INIT_REPORT = "init_report.txt"
# Parts of the detector by attribute name, and what each ``freeze`` choice leaves untrained. The "heads"
# are the stages with a classifier: the proposal stage and the decoder heads.
FREEZE_CHOICES: dict[str, tuple[str, ...]] = {
    "none": (),
    "backbone": ("backbone",),
    "backbone_neck": ("backbone", "neck"),
    "all_but_heads": ("backbone", "neck", "anchor_generator"),
}
# Lines of a mismatch message that name tensors.
_SHOWN = 3


@dataclass(frozen=True)
class InitSource:
    """A starting checkpoint, read and converted to our names.

    ``state``: tensors by our parameter names; ``label_map``: its classes (None: unnamed);
    ``num_heads`` / ``used_head``: its parallel decoder heads and the one it predicts with.
    """

    path: Path
    kind: str  # "asag" (asag train / asag convert) or "release" (the authors' layout)
    state: dict[str, Tensor]
    label_map: LabelMap | None
    num_heads: int
    used_head: int

    def describe(self) -> str:
        kind = "asag checkpoint" if self.kind == "asag" else "authors' release checkpoint, converted"
        classes = f"{len(self.label_map)} named classes" if self.label_map else "unnamed classes"
        return f"{self.path} ({kind}, {classes}, {self.num_heads} head(s))"


@dataclass
class InitReport:
    """What :func:`initialize_from` did with every tensor (names are the model's)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    remapped: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    # (new class name, checkpoint class name) for every copied class row, in the new order.
    class_pairs: list[tuple[str, str]] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    dropped_classes: list[str] = field(default_factory=list)
    matched_by: str = "name"  # "name", "position" or "none"
    head_note: str = ""

    def table(self) -> str:
        """The report as printed at the start of a run and saved beside its checkpoints."""
        lines = [f"init from {self.source}"]
        if self.head_note:
            lines.append(f"  {self.head_note}")
        lines.append(f"  loaded    {len(self.loaded):5d} tensors ({_by_part(self.loaded)})")
        shared = ", ".join(a if a.casefold() == b.casefold() else f"{a}<-{b}" for a, b in self.class_pairs)
        lines.append(f"  remapped  {len(self.remapped):5d} tensors ({', '.join(self.remapped) or '-'})")
        lines.append(f"            classes copied by {self.matched_by}: {shared or 'none'}")
        lines.append(f"            new classes (fresh rows): {', '.join(self.new_classes) or 'none'}")
        lines.append(f"            checkpoint classes dropped: {', '.join(self.dropped_classes) or 'none'}")
        lines.append(f"  fresh     {len(self.fresh):5d} tensors ({', '.join(self.fresh) or '-'})")
        lines.append(f"  unused    {len(self.unused):5d} tensors ({', '.join(self.unused) or '-'})")
        return "\n".join(lines)


def read_init_source(path: str | Path) -> InitSource:
    """Read a starting checkpoint: ours (``asag train`` / ``asag convert``) or an authors' release file.

    Raises CheckpointError naming the file when it is missing, unreadable, holds pickled code, or is
    neither of the two layouts.
    """
    path = Path(path)
    data = read_torch_file(path, allow=[argparse.Namespace])  # release files store their arguments
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        return _asag_source(path, data)
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: neither an asag checkpoint nor an authors' release checkpoint "
                              "(no 'asag.checkpoint' marker, no state dict of tensors under 'model')")
    try:
        arch = infer_architecture(state)
    except KeyError as err:
        raise CheckpointError(f"{path}: a state dict, but not of an ASAG detector ({err.args[0]})") from None
    return InitSource(path, "release", convert_state_dict(state), default_label_map(arch.num_classes),
                      arch.num_heads, arch.num_heads - 1)


def _asag_source(path: Path, ckpt: dict) -> InitSource:
    state = weights_for_inference(ckpt)  # the EMA weights of a run that kept an average
    if not isinstance(state, dict) or HEAD_EMBEDDING not in state:
        raise CheckpointError(f"{path}: holds no detector weights")
    num_heads = int(state[HEAD_EMBEDDING].shape[0])
    try:
        used = ckpt["config"]["model"]["decoder"]["used_head"]
        used_head = head_index(used, num_heads)
    except (KeyError, TypeError, ValueError):
        used_head = num_heads - 1
    label_map = None
    if ckpt.get("label_map"):
        try:
            label_map = LabelMap.from_dict(ckpt["label_map"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: the stored label map is malformed ({err})") from None
    return InitSource(path, "asag", dict(state), label_map, num_heads, used_head)


def class_axes(build: Callable[[int], nn.Module], num_classes: int) -> dict[str, int]:
    """The tensors of the model ``build(num_classes)`` with an axis over the classes, and that axis.

    Found by building the model for ``num_classes`` and ``num_classes + 1`` classes on the meta device
    (no memory, no initialisation cost) and comparing shapes, so every class-dependent tensor is found,
    whatever its name.
    """
    with torch.device("meta"):
        a, b = build(num_classes).state_dict(), build(num_classes + 1).state_dict()
    axes = {}
    for name, tensor in a.items():
        differ = [i for i, (x, y) in enumerate(zip(tensor.shape, b[name].shape)) if x != y]
        if differ:
            axes[name] = differ[0]
    return axes


def _key(name: str) -> str:
    return name.strip().casefold()


def class_pairs(source: LabelMap | None, target: LabelMap) -> tuple[list[tuple[int, int]], str]:
    """``[(target index, source index)]`` of the classes to copy, and how they were matched.

    By name (case-insensitive) when the checkpoint names its classes, else by position when the counts
    agree, else none. Ambiguous names (two classes of one label map with the same name) are refused.
    """
    if source is None:
        return [], "none"
    for labels, what in ((source, "checkpoint"), (target, "data set")):
        repeated = [n for n, c in Counter(_key(n) for n in labels.names).items() if c > 1]
        if repeated:
            raise CheckpointError(f"the {what}'s classes name {repeated[0]!r} more than once: classes "
                                  "cannot be matched by name")
    index = {_key(n): i for i, n in enumerate(source.names)}
    return [(t, index[_key(n)]) for t, n in enumerate(target.names) if _key(n) in index], "name"


def initialize_from(model: nn.Module, source: InitSource, label_map: LabelMap, axes: Mapping[str, int], *,
                    allow_partial: bool = False) -> InitReport:
    """Load ``source`` into the freshly initialised ``model`` (module docstring for the rules).

    Args:
        model: the new detector, randomly initialised (its values stay where nothing is copied).
        source: the starting checkpoint (:func:`read_init_source`).
        label_map: the new data set's classes (the model's contiguous class order).
        axes: class-dependent tensors and their class axis (:func:`class_axes`).
        allow_partial: load what fits and initialise the rest afresh instead of refusing.

    Returns the :class:`InitReport`. Raises CheckpointError (naming the file) on a mismatch.
    """
    target = model.state_dict()
    state, head_note = _adapt_heads(source, target)
    if source.label_map is None and source.kind == "asag":
        sizes = {state[n].shape[a] for n, a in axes.items() if n in state}
        pairs, by = ([(i, i) for i in range(len(label_map))], "position") if sizes == {len(label_map)} \
            else ([], "none")
    else:
        pairs, by = class_pairs(source.label_map, label_map)
    report = InitReport(source.describe(), matched_by=by, head_note=head_note)
    source_names = source.label_map.names if source.label_map else ()
    report.class_pairs = [(label_map.names[t], source_names[s] if source_names else f"#{s}")
                          for t, s in pairs]
    copied = {t for t, _ in pairs}
    report.new_classes = [n for i, n in enumerate(label_map.names) if i not in copied]
    used_sources = {s for _, s in pairs}
    report.dropped_classes = [n for i, n in enumerate(source_names) if i not in used_sources]
    mismatched: list[str] = []
    new_state = {}
    for name, fresh in target.items():
        value = state.get(name)
        if value is None:
            report.fresh.append(name)
            mismatched.append(f"{name} missing")
            new_state[name] = fresh
        elif name in axes:
            remapped = _remap(fresh, value, axes[name], pairs)
            if remapped is None:
                mismatched.append(f"{name} {tuple(value.shape)} vs {tuple(fresh.shape)}")
                report.fresh.append(name)
                new_state[name] = fresh
            else:
                report.remapped.append(name)
                new_state[name] = remapped
        elif value.shape != fresh.shape:
            mismatched.append(f"{name} {tuple(value.shape)} vs {tuple(fresh.shape)}")
            report.fresh.append(name)
            new_state[name] = fresh
        else:
            report.loaded.append(name)
            new_state[name] = value.to(fresh.dtype)
    report.unused = [name for name in state if name not in target]
    mismatched += [f"{name} unused" for name in report.unused]
    if mismatched and not allow_partial:
        shown = "; ".join(mismatched[:_SHOWN]) + (f"; ... ({len(mismatched)} in all)"
                                                   if len(mismatched) > _SHOWN else "")
        raise CheckpointError(
            f"{source.path}: its architecture does not fit the model ({shown}); choose the preset and "
            f"model.* settings it was trained with, or set finetune.allow_partial=true to load what fits "
            f"and initialise the rest afresh")
    model.load_state_dict(new_state)
    return report


def _remap(fresh: Tensor, value: Tensor, axis: int, pairs: Sequence[tuple[int, int]]) -> Tensor | None:
    """``fresh`` with the class rows of ``pairs`` copied from ``value`` along ``axis`` (None: the other
    axes differ)."""
    others = [i for i in range(fresh.ndim) if i != axis]
    if value.ndim != fresh.ndim or any(value.shape[i] != fresh.shape[i] for i in others):
        return None
    out = fresh.clone()
    if pairs:
        t_idx = torch.tensor([t for t, _ in pairs])
        s_idx = torch.tensor([s for _, s in pairs])
        out.index_copy_(axis, t_idx, value.index_select(axis, s_idx).to(out.dtype))
    return out


_HEAD_KEY = re.compile(r"^decoder\.heads\.\d+\.")


def _adapt_heads(source: InitSource, target: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """The source state for the model's head count: a one-head model takes the checkpoint's used head."""
    model_heads = int(target[HEAD_EMBEDDING].shape[0]) if HEAD_EMBEDDING in target else source.num_heads
    if model_heads == 1 and source.num_heads > 1:
        kept = select_head(source.state, source.used_head, source.num_heads)
        return kept, f"one-head model: head {source.used_head} of the checkpoint's {source.num_heads} loaded"
    return source.state, ""


def _by_part(names: Sequence[str]) -> str:
    counts = Counter(name.split(".")[0] for name in names)
    return ", ".join(f"{part} {n}" for part, n in counts.items()) or "-"


# ------------------------------------------------------------------------------------------ freezing


def describe_trainable(model: nn.Module, choice: str) -> str:
    """One line: what ``finetune.freeze`` froze and how many parameter values train."""
    trainable, total = trainable_count(model)
    parts = ", ".join(FREEZE_CHOICES[choice]) or "nothing"
    return (f"finetune.freeze={choice}: {parts} frozen; {trainable / 1e6:.2f} M of {total / 1e6:.2f} M "
            f"parameters train")


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter values of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
