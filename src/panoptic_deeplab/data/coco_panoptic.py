"""COCO panoptic format: PNG ids, JSON annotations, category metadata and label maps.

See docs/ARCHITECTURE.md for the label-map representation shared by every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

LABEL_DIVISOR = 1000
IGNORE_LABEL = 255
VOID_LABEL = IGNORE_LABEL * LABEL_DIVISOR


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Panoptic PNG colors ``[H, W, 3]`` -> segment ids ``R + 256 G + 256^2 B`` (int32)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB array, got shape {tuple(rgb.shape)}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids ``[H, W]`` -> panoptic PNG colors ``[H, W, 3]`` (uint8)."""
    ids = np.asarray(ids)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("segment ids must lie in [0, 256^3) to be stored in a panoptic PNG")
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


@dataclass(frozen=True)
class CategoryInfo:
    """One category as declared in a COCO panoptic JSON."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)
    supercategory: str = ""

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "CategoryInfo":
        missing = [k for k in ("id", "name", "isthing") if k not in entry]
        if missing:
            raise ValueError(f"category {entry!r} lacks the field(s) {missing}")
        color = tuple(int(c) for c in entry.get("color", (0, 0, 0)))
        if len(color) != 3:
            raise ValueError(f"category {entry['id']} has color {entry.get('color')!r}, expected [r, g, b]")
        return cls(
            id=int(entry["id"]),
            name=str(entry["name"]),
            isthing=bool(entry["isthing"]),
            color=color,  # type: ignore[arg-type]
            supercategory=str(entry.get("supercategory", "")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "isthing": int(self.isthing),
            "color": list(self.color),
        }
        if self.supercategory:
            out["supercategory"] = self.supercategory
        return out


@dataclass
class DatasetMeta:
    """Categories of a dataset and the mapping between dataset category ids and train ids.

    Train ids are contiguous ``0 .. num_classes-1`` in the order of increasing category id.
    """

    categories: list[CategoryInfo]
    label_divisor: int = LABEL_DIVISOR
    ignore_label: int = IGNORE_LABEL
    category_to_train: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.categories = sorted(self.categories, key=lambda c: c.id)
        ids = [c.id for c in self.categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids in {ids}")
        if not self.categories:
            raise ValueError("a dataset needs at least one category")
        if len(self.categories) >= self.ignore_label:
            raise ValueError(
                f"{len(self.categories)} categories: at most {self.ignore_label - 1} are supported "
                f"because train id {self.ignore_label} means void"
            )
        self.category_to_train = {c.id: i for i, c in enumerate(self.categories)}

    @classmethod
    def from_json(cls, categories: Iterable[dict[str, Any]]) -> "DatasetMeta":
        return cls([CategoryInfo.from_json(c) for c in categories])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def thing_train_ids(self) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c.isthing]

    @property
    def stuff_train_ids(self) -> list[int]:
        return [i for i, c in enumerate(self.categories) if not c.isthing]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.categories]

    @property
    def void_label(self) -> int:
        return self.ignore_label * self.label_divisor

    def train_id(self, category_id: int, context: str = "") -> int:
        """Train id of a dataset category id; unknown ids raise naming ``context`` (a file, a segment)."""
        try:
            return self.category_to_train[int(category_id)]
        except KeyError:
            where = f"{context}: " if context else ""
            raise ValueError(
                f"{where}unknown category id {category_id}; known ids are {sorted(self.category_to_train)}"
            ) from None

    def category_id(self, train_id: int) -> int:
        if not 0 <= train_id < self.num_classes:
            raise ValueError(f"train id {train_id} outside 0..{self.num_classes - 1}")
        return self.categories[train_id].id

    def is_thing_train_id(self, train_id: int) -> bool:
        return self.categories[train_id].isthing

    def to_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.categories]


def thing_mask_lookup(thing_ids: Sequence[int], num_entries: int = IGNORE_LABEL + 1) -> np.ndarray:
    """Boolean lookup table ``is_thing[train_id]`` (void included, False)."""
    table = np.zeros(num_entries, dtype=bool)
    table[list(thing_ids)] = True
    return table
