"""Budgets: where the sizes of the model's data-dependent steps come from.

Every data-dependent step (refinement candidates, patch NMS, early stop, packing of the output anchors,
RoI pooling, post-processing) has one implementation written with fixed shapes and validity masks. Two
sizes are left open, and a :class:`Budgets` value, passed to the forward, fixes them:

* **from the data** (``None``, the default and training): one host read per probed level sizes the patch
  slots to the patches the patch NMS keeps, and one sizes the query slots to the longest image's output;
  nothing binds, so the result is exactly the release's;
* **from the configuration** (a number; ``model.static``, ``--static``, ``static=True``): no host read,
  every shape fixed by the input size and the budgets (exportable, CUDA-graph capturable); where a
  budget binds, ``AnchorOutput.budget_bound`` says so (docs/inference.md).
"""

from __future__ import annotations

from dataclasses import dataclass

# Default patch slots per image and probed level of the static mode (the release's speed path kept at
# most 15 patches per level; measured in docs/inference.md).
STATIC_PATCHES_PER_LEVEL = 15


@dataclass(frozen=True)
class Budgets:
    """Sizes of the data-dependent steps of one forward (module docstring).

    patches_per_level: patch slots per image and probed level (P4, P3), further capped by the anchor
        generator's ``max_patches_per_image`` / ``max_patches_per_level``; None: from the data.
    queries: query slots ``Q`` per image (the most confident output anchors of an image that has more
        are kept); None: from the data (the longest image's output, capped at ``max_anchors``).
    """

    patches_per_level: int | None = None
    queries: int | None = None

    def __post_init__(self) -> None:
        for name in ("patches_per_level", "queries"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Budgets.{name} must be a positive int or None, got {value!r}")

    @property
    def static(self) -> bool:
        """Both sizes fixed: a forward without host reads (fixed shapes throughout)."""
        return self.patches_per_level is not None and self.queries is not None

    @property
    def from_data(self) -> bool:
        """Both sizes from the data (the release's behaviour)."""
        return self.patches_per_level is None and self.queries is None


# The budgets of a default forward and of training.
DATA_BUDGETS = Budgets()
