"""The "parallel decoders" of ASAG (spec section 7.1).

``L`` independent single-stage heads all refine the *same* proposal-stage output; head k adds a learned
vector (row k of ``head_embedding``) to the query content first. Nothing passes from head to head:
this is not a cascade. The last head is the main head; heads ``0 .. L-2`` are ``aux_0 .. aux_{L-2}``.

Official checkpoints name the heads ``decoder.bbox_head.k.*`` (AdaMixer) or ``decoder.head_series.k.*``
(Sparse R-CNN) and the embedding ``decoder.decoder_embedding.weight``; here they are ``heads.k.*`` and
``head_embedding`` (the parameter names inside a head are the authors').
:func:`select_head` keeps one head of a multi-head state dict so that it loads into a 1-head model
(spec section 15, item 25).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from asag.modeling.roi_pooling import LevelTable, RoIPooling
from asag.structures import HeadOutput, ProposalOutput

# Head containers and embedding names, ours first, then the authors' (spec 7.1, Appendix B).
HEAD_CONTAINER_NAMES = ("heads", "bbox_head", "head_series")
HEAD_EMBEDDING_NAMES = ("head_embedding", "decoder_embedding.weight")
_HEAD_KEY = re.compile(r"(^|\.)(" + "|".join(HEAD_CONTAINER_NAMES) + r")\.(\d+)\.")


class ParallelHeads(nn.Module):
    """``L`` parallel single-stage decoder heads fed with the same proposals (spec 7.1).

    Args:
        heads: the stages (e.g. :class:`~asag.modeling.decoders.adamixer.AdaMixerStage` or
            :class:`~asag.modeling.decoders.sparse_rcnn.SparseRCNNStage`), all taking ``(proposals,
            features, image_sizes, attn_mask, level_table)`` and returning a :class:`HeadOutput`.
        hidden_dim: content width ``d``.

    Heads without RoI pooling sample the levels with ``grid_sample`` (AdaMixer, deformable attention), which
    reads a level as ``[B * G, C / G, H, W]``: they get the levels in the default layout, converted once for
    all heads (a no-op unless the neck ran channels-last, :func:`asag.modeling.fast.optimize_for_inference`);
    RoI-pooling heads gather channel vectors and read any layout as it is.

    ``head_embedding`` is an ``[L, d]`` parameter initialised N(0, 1), like the weight of the authors'
    ``nn.Embedding`` ``decoder_embedding``, which is not re-initialised (spec 7.1 / section 13, quirk 5).
    """

    def __init__(self, heads: Sequence[nn.Module], hidden_dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.head_embedding = nn.Parameter(torch.randn(len(self.heads), hidden_dim))
        self.contiguous_features = not any(isinstance(m, RoIPooling) for m in self.heads.modules())

    def __len__(self) -> int:
        return len(self.heads)

    def forward(
        self,
        proposals: ProposalOutput,
        features: Sequence[Tensor],
        image_sizes: Tensor,
        attn_mask: Tensor | None = None,
        level_table: LevelTable | None = None,
    ) -> list[HeadOutput]:
        """Run every head on the same proposals.

        Args:
            proposals: ``content`` ``[B, L, d]``, ``xyzr`` ``[B, L, 4]`` (stride-4 units) and
                ``prediction.boxes`` ``[B, L, 4]`` normalised cxcywh; boxes are detached by the heads.
            features: P2..P5, ``[B, d, H_l, W_l]`` of the padded batch.
            image_sizes: ``[B, 2]`` ``(h, w)`` of the unpadded images.
            attn_mask: ``[B*heads, L, L]`` bool, True = blocked (batch-major); None = no mask.
            level_table: the levels as one table, for RoI-pooling heads (fixed budgets).

        Returns:
            one :class:`HeadOutput` per head (logits ``[B, L, C]``, boxes ``[B, L, 4]`` normalised
            cxcywh), ordered ``aux_0 .. aux_{L-2}``, main (last).
        """
        if self.contiguous_features:
            features = [f.contiguous() for f in features]
        outputs = []
        for k, head in enumerate(self.heads):
            head_input = replace(proposals, content=proposals.content + self.head_embedding[k])
            outputs.append(head(head_input, features, image_sizes, attn_mask, level_table))
        return outputs


def _is_head_embedding(key: str) -> bool:
    return any(key == name or key.endswith("." + name) for name in HEAD_EMBEDDING_NAMES)


def select_head(state_dict: Mapping[str, Tensor], head_index: int, num_heads: int) -> dict[str, Tensor]:
    """Keep one head of a multi-head decoder state dict, renumbered as head 0 (spec 7.1, section 15.25).

    Works on our names (``heads.k.*``, ``head_embedding``) and the authors' (``bbox_head.k.*``,
    ``head_series.k.*``, ``decoder_embedding.weight``), with any prefix (e.g. ``decoder.``). Keys of other
    heads are dropped, keys outside the heads are kept unchanged, and the embedding keeps row
    ``head_index`` only (shape ``[1, d]``).

    Args:
        state_dict: a model or decoder state dict with ``num_heads`` heads.
        head_index: the head to keep (``num_heads - 1`` is the main head).
        num_heads: number of heads in ``state_dict`` (checked against the embedding).

    Returns:
        a new state dict that loads into the same model built with one head.
    """
    if not 0 <= head_index < num_heads:
        raise ValueError(f"head_index {head_index} is outside 0..{num_heads - 1}")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _HEAD_KEY.search(key)
        if match is not None:
            if int(match.group(3)) == head_index:
                renamed = f"{match.group(1)}{match.group(2)}.0."
                out[key[: match.start()] + renamed + key[match.end() :]] = value
        elif _is_head_embedding(key):
            if value.shape[0] != num_heads:
                raise ValueError(f"{key} has {value.shape[0]} rows, expected {num_heads} heads")
            out[key] = value[head_index : head_index + 1].clone()
        else:
            out[key] = value
    return out
