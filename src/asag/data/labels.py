"""Contiguous class indices <-> a data set's category ids and names.

The model predicts contiguous indices ``0..C-1``; COCO-format files use arbitrary category ids (COCO:
80 ids between 1 and 90 with gaps, spec 9.1). The map is derived from the ``categories`` list sorted by
id, is stored in checkpoints as plain data, and maps predictions back to the original ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asag.errors import DataError


@dataclass(frozen=True)
class LabelMap:
    """Category ids (ascending) and names; the position in the tuples is the contiguous index.

    category_ids: ``(C,)`` the data set's category ids, strictly increasing.
    names: ``(C,)`` category names in the same order.
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names):
            raise DataError(
                f"label map: {len(self.category_ids)} category ids but {len(self.names)} names"
            )
        if any(b <= a for a, b in zip(self.category_ids, self.category_ids[1:])):
            raise DataError(f"label map: category ids must be unique and sorted, got {self.category_ids}")

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping[str, Any]], source: str = "categories") -> LabelMap:
        """Build from a COCO ``categories`` list (``{"id": int, "name": str, ...}``), sorted by id.

        ``source`` names the file in error messages.
        """
        entries = []
        for pos, cat in enumerate(categories):
            if not isinstance(cat, Mapping) or "id" not in cat or not isinstance(cat["id"], int):
                raise DataError(f"{source}: category #{pos} has no integer 'id': {cat!r}")
            entries.append((cat["id"], str(cat.get("name", cat["id"]))))
        entries.sort()
        ids = [cid for cid, _ in entries]
        duplicates = sorted(cid for cid, n in Counter(ids).items() if n > 1)
        if duplicates:
            raise DataError(f"{source}: duplicate category ids {duplicates}")
        if not entries:
            raise DataError(f"{source}: the 'categories' list is empty")
        return cls(tuple(ids), tuple(name for _, name in entries))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(int(i) for i in data["category_ids"]), tuple(str(n) for n in data["names"]))

    def to_dict(self) -> dict[str, list]:
        """Plain data (lists of ints and strings) for checkpoints and JSON."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    # ----------------------------------------------------------------------------------- queries

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return self.num_classes

    def index_of(self, category_id: int) -> int:
        """Contiguous index of one category id (``KeyError`` if unknown)."""
        return self._index[category_id]

    def name_of(self, label: int) -> str:
        """Name of one contiguous index."""
        return self.names[label]

    def to_category_ids(self, labels: Tensor) -> Tensor:
        """Map contiguous indices ``[...]`` int64 in ``0..C-1`` to category ids ``[...]`` int64."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        table = torch.tensor(self.category_ids, dtype=torch.int64, device=labels.device)
        return table[labels.long()]

    def to_labels(self, category_ids: Tensor) -> Tensor:
        """Map category ids ``[...]`` to contiguous indices ``[...]`` int64 (``ValueError`` if unknown)."""
        table = torch.tensor(self.category_ids, dtype=torch.int64, device=category_ids.device)
        ids = category_ids.long()
        pos = torch.searchsorted(table, ids).clamp(max=self.num_classes - 1)
        if not bool((table[pos] == ids).all()):
            unknown = sorted(set(ids[table[pos] != ids].tolist()))
            raise ValueError(f"unknown category ids {unknown}")
        return pos

    @property
    def _index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.category_ids)}

    def describe(self) -> Sequence[str]:
        """``"index: id name"`` lines, for logs."""
        return [f"{i}: {cid} {name}" for i, (cid, name) in enumerate(zip(self.category_ids, self.names))]
