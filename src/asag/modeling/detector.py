"""The ASAG detector: backbone -> FPN (ASAG-D: deformable encoder) -> anchor generator -> proposal stage ->
parallel decoder heads."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from asag.errors import ConfigError
from asag.modeling.anchor_generator import STATIC_TRAINING_ERROR
from asag.modeling.budgets import DATA_BUDGETS, STATIC_PATCHES_PER_LEVEL, Budgets
from asag.modeling.queries import build_queries
from asag.modeling.roi_pooling import LevelTable
from asag.structures import DetectionBatch, Detections, ImageTargets, ModelOutput


@dataclass(frozen=True)
class FeatureFormat:
    """How the backbone and the neck compute: the images are converted to this before the backbone, and
    the levels come out as float32 in whatever layout the neck produced.

    dtype: the backbone's and neck's dtype (None: the images' own, float32); memory_format: the images'
    layout (``torch.preserve_format``: as given, e.g. the trainer's channels-last batches).
    The default converts nothing. :func:`asag.modeling.fast.optimize_for_inference` sets it to the
    layout and precision it cast the backbone and neck to.
    """

    dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.preserve_format


class ASAG(nn.Module):
    """One-decoder-layer sparse detector with Adaptive Sparse Anchor Generation.

    Args:
        backbone: returns ``C2..C5`` from ``[B, 3, H, W]`` images.
        neck: FPN returning ``[P2, P3, P4, P5]`` (ASAG-A/S), or the ASAG-D deformable encoder returning
            ``[P3, P4, P5, P6]``.
        anchor_generator: P3..P5 -> :class:`~asag.structures.AnchorOutput`.
        proposal: the proposal stage (the release's "RPN").
        decoder: the parallel single-stage heads.
        postprocessor: head output -> per-image detections.
        attention_heads: heads of the query self-attention (sets the mask layout).
        num_dn: denoising queries prepended in training (0 = off).
        dn_noise_scale: box-noise scale at epoch 0; ``dn_noise_decay`` is subtracted per epoch
            (0 keeps it fixed, the release's ``--fix_noise_scale`` recipe; the release's other rule is
            0.8 - 0.04 * epoch).
        used_head: index of the head whose predictions are post-processed (-1 = main).
        anchor_levels: indices of P3, P4, P5 in the neck's output: ``(1, 2, 3)`` for the FPN's
            ``[P2..P5]``, ``(0, 1, 2)`` for the ASAG-D encoder's ``[P3..P6]``.
        neck_uses_image_sizes: call the neck as ``neck(features, image_sizes)`` (the ASAG-D encoder masks
            the padded cells of every level); the FPN takes the backbone features only.
        frozen_parts: names of parts that never train (fine-tuning, e.g. ``("backbone", "neck")``):
            their parameters get no gradient and the parts stay in evaluation mode (batch-norm statistics
            fixed, dropout off) when the model trains.
        static_budgets: the fixed budgets of the static mode (``model.anchor_generator.
            static_patches_per_level`` patch slots, ``max_anchors`` query slots); default: 15 patch slots
            and the anchor generator's ``max_anchors``.
        static: start in static mode (``budgets = static_budgets``; evaluation only).

    :attr:`budgets` (:class:`~asag.modeling.budgets.Budgets`) is what :meth:`forward` passes to the
    data-dependent steps unless a call passes its own: from the data (the default, the release's
    results) or fixed (static mode). :attr:`feature_format` (:class:`FeatureFormat`) is the dtype and
    layout the backbone and the neck run in (default: the input's). :attr:`inference_settings` is set on
    the copies that
    :func:`asag.modeling.fast.optimize_for_inference` makes (None otherwise): such a copy runs every
    :meth:`forward` under ``torch.inference_mode`` and cannot train (its batch norms are folded).

    The same :class:`~asag.structures.ModelOutput` is returned in training and evaluation; losses live
    in :mod:`asag.training`. The engine may run the forward under autocast: backbone and FPN follow it,
    everything after them runs in float32 (as in the release), unless the engine sets
    :attr:`autocast_heads` (``runtime.amp_scope=heads``): then the decoder heads follow it too (anchor
    generator and proposal stage stay float32).

    **Static mode** (fixed budgets: :meth:`set_static`, ``static=True`` of :func:`asag.api.load_model`,
    ``--static``, ``model.static``; inference only) fixes every shape by the input size and the budgets,
    and reads nothing back from the device between the input and the post-processed detections (no
    ``.item()``, ``.tolist()``, unsized ``nonzero`` or boolean-mask indexing), so the forward can be
    exported or captured in a CUDA graph. :meth:`detect` is that forward; for a padded batch
    ``[B, 3, Hp, Wp]`` it returns a :class:`~asag.structures.DetectionBatch`:

    ========  =================  =======  ======================================================
    name      shape              dtype    meaning
    ========  =================  =======  ======================================================
    boxes     ``[B, K, 4]``      float32  xyxy in original-image pixels (``orig_sizes``)
    scores    ``[B, K]``         float32  sigmoid class scores, descending over the valid entries
    labels    ``[B, K]``         int64    contiguous class indices ``0..C-1``
    valid     ``[B, K]``         bool     True for a detection; a prefix of each row; the padding
                                          after it holds zeros
    ========  =================  =======  ======================================================

    with ``K = min(postprocess.topk, max_anchors * C)`` (100 for COCO presets). Inside, the anchor
    generator keeps ``static_budgets.patches_per_level`` patch slots per image and probed level and
    ``Q = static_budgets.queries`` query slots (``AnchorOutput.valid_mask`` marks the real ones), RoI
    pooling is one gather from one table of all levels (:class:`~asag.modeling.roi_pooling.LevelTable`,
    equal to RoIAlign up to rounding) and ``AnchorOutput.budget_bound`` tells, per image, whether a
    budget bound. Where none binds, the detections equal those of the data-sized budgets up to float
    rounding (docs/inference.md).
    """

    # The parts of the detector, in the order the forward runs them.
    PARTS = ("backbone", "neck", "anchor_generator", "proposal", "decoder")

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        anchor_generator: nn.Module,
        proposal: nn.Module,
        decoder: nn.Module,
        postprocessor: nn.Module,
        attention_heads: int = 8,
        num_dn: int = 0,
        dn_noise_scale: float = 0.4,
        dn_noise_decay: float = 0.0,
        used_head: int = -1,
        anchor_levels: tuple[int, int, int] = (1, 2, 3),
        neck_uses_image_sizes: bool = False,
        frozen_parts: tuple[str, ...] = (),
        static_budgets: Budgets | None = None,
        static: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.anchor_generator = anchor_generator
        self.proposal = proposal
        self.decoder = decoder
        self.postprocessor = postprocessor
        self.attention_heads = attention_heads
        self.num_dn = num_dn
        self.dn_noise_scale = dn_noise_scale
        self.dn_noise_decay = dn_noise_decay
        self.used_head = used_head
        self.anchor_levels = tuple(anchor_levels)
        self.neck_uses_image_sizes = neck_uses_image_sizes
        unknown = [part for part in frozen_parts if part not in self.PARTS]
        if unknown:
            raise ValueError(f"frozen_parts {unknown}: choose from {self.PARTS}")
        self.frozen_parts = tuple(frozen_parts)
        for part in self.frozen_parts:
            getattr(self, part).requires_grad_(False)
        default = Budgets(STATIC_PATCHES_PER_LEVEL, anchor_generator.max_anchors)
        self.static_budgets = static_budgets or default
        if not self.static_budgets.static:
            raise ValueError(f"static_budgets must fix both budgets, got {self.static_budgets}")
        self.budgets = DATA_BUDGETS
        self.feature_format = FeatureFormat()
        self.inference_settings: dict | None = None
        self.autocast_heads = False
        if static:
            self.eval().set_static(True)

    def extract_features(self, images: Tensor, image_sizes: Tensor | None = None) -> list[Tensor]:
        """``[B, 3, Hp, Wp]`` -> the neck's levels as float32: FPN ``[P2, P3, P4, P5]`` or ASAG-D encoder
        ``[P3, P4, P5, P6]``. ``image_sizes`` ``[B, 2]`` ``(h, w)`` tells a size-aware neck which cells are
        padding (None: the whole padded batch is image); the FPN ignores it. The images are first converted
        to :attr:`feature_format`."""
        fmt = self.feature_format
        backbone_features = self.backbone(images.to(dtype=fmt.dtype or images.dtype,
                                                    memory_format=fmt.memory_format))
        if self.neck_uses_image_sizes:
            return [p.float() for p in self.neck(backbone_features, image_sizes)]
        return [p.float() for p in self.neck(backbone_features)]

    @property
    def static(self) -> bool:
        """True in static mode: :attr:`budgets` fix every size (no host reads; see the class docstring)."""
        return self.budgets.static

    def with_budgets(self, budgets: Budgets) -> ASAG:
        """Use ``budgets`` for every later forward (fixed budgets need evaluation mode). Returns ``self``."""
        if self.training and not budgets.from_data:
            raise ConfigError(STATIC_TRAINING_ERROR)
        self.budgets = budgets
        return self

    def set_static(self, enabled: bool = True) -> ASAG:
        """Static mode on (:attr:`static_budgets`) or off (budgets from the data); see
        :meth:`with_budgets`. Returns ``self``."""
        return self.with_budgets(self.static_budgets if enabled else DATA_BUDGETS)

    def train(self, mode: bool = True) -> ASAG:
        if mode and self.inference_settings is not None:
            raise RuntimeError("an inference-optimised model cannot be trained (its batch norms are folded); "
                               "train the plain model and optimise a copy")
        if mode and self.static:
            raise ConfigError(STATIC_TRAINING_ERROR)
        super().train(mode)
        for part in self.frozen_parts:
            getattr(self, part).train(False)
        return self

    def anchor_features(self, features: list[Tensor]) -> list[Tensor]:
        """The ``[P3, P4, P5]`` levels the anchor generator reads, from :meth:`extract_features`' output."""
        return [features[i] for i in self.anchor_levels]

    def forward(
        self,
        images: Tensor,
        image_sizes: Tensor,
        targets: list[ImageTargets] | None = None,
        epoch: int = 0,
        inference_level: str | None = None,
        budgets: Budgets | None = None,
    ) -> ModelOutput:
        """Run the detector.

        Args:
            images: ``[B, 3, Hp, Wp]`` normalised, zero-padded images.
            image_sizes: ``[B, 2]`` int64 ``(h, w)`` of the unpadded images.
            targets: ground truth (training only: GT-derived patches and denoising queries).
            epoch: current epoch, for the anchor generator's teacher forcing and the noise schedule.
            inference_level: ``P3P6 | P4P6 | P5P6`` override of the probing depth.
            budgets: this call's budgets (default: :attr:`budgets`).
        """
        with torch.inference_mode() if self.inference_settings is not None else nullcontext():
            return self.forward_features(self.extract_features(images, image_sizes), image_sizes, targets,
                                         epoch, inference_level, budgets)

    def forward_features(
        self,
        features: list[Tensor],
        image_sizes: Tensor,
        targets: list[ImageTargets] | None = None,
        epoch: int = 0,
        inference_level: str | None = None,
        budgets: Budgets | None = None,
    ) -> ModelOutput:
        """Everything after the neck, from :meth:`extract_features`' levels; float32 (the decoder heads
        under the caller's autocast when :attr:`autocast_heads` is set)."""
        train_targets = targets if self.training else None
        budgets = budgets or self.budgets
        # fixed shapes: RoI pooling reads one table of all levels, built once for all its calls
        level_table = LevelTable.of(features) if budgets.static else None
        device = features[0].device.type
        # leave autocast only where it is on: an autocast region is an export graph node that .pt2 files
        # cannot serialise
        autocast_on = torch.is_autocast_enabled(device)
        float32 = torch.autocast(device, enabled=False) if autocast_on else nullcontext()
        with float32:
            anchors = self.anchor_generator(
                self.anchor_features(features), image_sizes, targets=train_targets, epoch=epoch,
                inference_level=inference_level, budgets=budgets,
            )
            noise = max(self.dn_noise_scale - self.dn_noise_decay * epoch, 0.0)
            queries = build_queries(
                anchors, image_sizes, train_targets, num_dn=self.num_dn if train_targets else 0,
                noise_scale=noise, num_heads=self.attention_heads,
            )
            proposals = self.proposal(queries, features, image_sizes, level_table)
        with nullcontext() if self.autocast_heads else float32:
            heads = self.decoder(proposals, features, image_sizes, queries.attn_mask, level_table)
        return ModelOutput(anchors=anchors, queries=queries, proposals=proposals.prediction, heads=heads)

    def postprocess(self, output: ModelOutput, orig_sizes: Tensor) -> list[Detections]:
        """Detections of the selected head in original-image pixels (``orig_sizes`` ``[B, 2]`` (h, w))."""
        head = output.heads[self.used_head]
        return self.postprocessor(head, output.valid_mask, orig_sizes, num_dn=output.num_dn)

    def postprocess_fixed(self, output: ModelOutput, orig_sizes: Tensor) -> DetectionBatch:
        """:meth:`postprocess` with fixed shapes and no host reads (a :class:`DetectionBatch`)."""
        head = output.heads[self.used_head]
        return self.postprocessor.fixed(head, output.valid_mask, orig_sizes, num_dn=output.num_dn)

    def detect(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor,
               inference_level: str | None = None) -> DetectionBatch:
        """Forward plus fixed-shape post-processing: the static mode's whole computation (see the class
        docstring for the output contract; in the dynamic mode the shapes still depend on the data).

        Args:
            images: ``[B, 3, Hp, Wp]`` normalised, zero-padded images.
            image_sizes: ``[B, 2]`` int64 ``(h, w)`` of the unpadded (resized) images.
            orig_sizes: ``[B, 2]`` int64 ``(h, w)`` of the original images (the boxes' frame).
        """
        output = self(images, image_sizes, inference_level=inference_level)
        return self.postprocess_fixed(output, orig_sizes)

    @torch.inference_mode()
    def predict(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor,
                inference_level: str | None = None) -> list[Detections]:
        """Evaluation-mode forward plus post-processing."""
        was_training = self.training
        self.eval()
        try:
            output = self(images, image_sizes, inference_level=inference_level)
            return self.postprocess(output, orig_sizes)
        finally:
            self.train(was_training)
