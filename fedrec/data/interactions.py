"""The interactions table and item catalogue every loader produces."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "text")


class DataError(ValueError):
    """A data file or table is unusable; the message names the file, row or column."""


@dataclass(frozen=True)
class InteractionData:
    """Raw interactions plus the item catalogue, as loaded from disk.

    ``interactions`` has columns ``user_id`` (str), ``item_id`` (str), ``rating``
    (float32) and ``timestamp`` (int64), in file order. ``items`` has one row per
    item with ``item_id`` (str), ``title`` (str) and ``text`` (str: the text the
    encoder embeds, e.g. "Toy Story (1995). Genres: Animation, Children's, Comedy").
    Every item referenced by ``interactions`` is in ``items``.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame

    def __post_init__(self) -> None:
        for frame, columns, what in (
            (self.interactions, INTERACTION_COLUMNS, "interactions"),
            (self.items, ITEM_COLUMNS, "items"),
        ):
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise DataError(f"{self.name}: {what} table lacks columns {missing}")
        if self.interactions.empty:
            raise DataError(f"{self.name}: no interactions")
        known = self.interactions["item_id"].isin(self.items["item_id"])
        if not known.all():
            unknown = self.interactions.loc[~known, "item_id"].unique()
            sample = sorted(unknown)[:5]
            raise DataError(
                f"{self.name}: {len(unknown)} interacted items have no catalogue entry "
                f"(e.g. {sample}); add them to the item table"
            )
