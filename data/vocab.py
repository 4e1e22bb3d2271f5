"""Vocabularies: raw IDs <-> dense indices, saved as Parquet next to the shards.

Item indices come from a seeded random permutation of the sorted raw IDs, never from order of
first appearance: consecutive indices in time order let a model learn "last seen + 1" (P5 leaked
test items that way). Index 0 is padding and 1 unknown (data.schema). Preparing new data against
an existing vocabulary keeps every known index and appends new entries, again in seeded random
order, so retraining, fine-tuning and scoring never silently reshuffle indices.

Files: ``items.parquet`` (index, raw_id, count = training events, text columns),
``actions.parquet`` (index, value), ``users.parquet`` (index, raw_id, events).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from data.errors import DataError
from data.schema import FIRST_INDEX

ITEMS_FILE = "items.parquet"
ACTIONS_FILE = "actions.parquet"
USERS_FILE = "users.parquet"


@dataclass
class VocabChange:
    kept: int
    added: int
    unused: int  # entries of the previous vocabulary that the new data never mentions

    def __str__(self) -> str:
        return f"{self.kept} kept, {self.added} new (appended), {self.unused} known but absent from this data"


def _same_kind(raw: pl.Series, previous: pl.Series, what: str) -> pl.Series:
    if raw.dtype == previous.dtype:
        return raw
    raise DataError(
        f"{what} IDs are {raw.dtype} in this data but {previous.dtype} in the --vocab-from vocabulary; "
        "the two do not describe the same catalog"
    )


def build_index(
    values: pl.Series, seed: int, previous: pl.DataFrame | None = None, shuffle: bool = True, what: str = "item"
) -> tuple[pl.DataFrame, VocabChange | None]:
    """A frame (index, raw_id) covering ``values``. New values get indices after ``previous``'s,
    permuted with ``seed`` when ``shuffle`` (items), in sorted order otherwise (actions)."""
    unique = unique_sorted(values).alias("raw_id")
    start, change = FIRST_INDEX, None
    known = None
    if previous is not None:
        unique = _same_kind(unique, previous["raw_id"], what)
        known = previous.select("index", "raw_id")
        is_new = ~unique.is_in(known["raw_id"].implode())
        new = unique.filter(is_new)
        unused = known.height - (unique.len() - new.len())
        change = VocabChange(kept=unique.len() - new.len(), added=new.len(), unused=unused)
        unique = new
        start = int(known["index"].max()) + 1 if known.height else FIRST_INDEX
    order = np.random.default_rng(seed).permutation(len(unique)) if shuffle else np.arange(len(unique))
    fresh = pl.DataFrame({"index": (start + np.arange(len(unique))).astype(np.int64), "raw_id": unique.gather(order)})
    table = fresh if known is None else pl.concat([known, fresh.cast(known.schema)])
    return table, change


def _dense_int_range(values: pl.Series) -> tuple[int, int] | None:
    """(min, max) when integer IDs span a range small enough for a numpy lookup table."""
    if not values.dtype.is_integer() or values.len() == 0:
        return None
    low, high = int(values.min()), int(values.max())
    return (low, high) if high - low < max(4 * values.len(), 1 << 20) else None


def unique_sorted(values: pl.Series) -> pl.Series:
    """The distinct values, sorted; integer IDs in a compact range by counting (several times
    faster than hashing 10^8 events)."""
    dense = _dense_int_range(values)
    if dense is None:
        return values.unique().sort()
    low, _ = dense
    present = np.flatnonzero(np.bincount(values.to_numpy() - low))
    return pl.Series(values.name, present + low, dtype=values.dtype)


def lookup(values: pl.Series, table: pl.DataFrame) -> np.ndarray:
    """Index of every raw ID in ``values`` under the vocabulary ``table`` (index, raw_id).
    Integer IDs in a compact range go through a numpy lookup table, several times faster than
    hashing on 10^8 events; everything else through Polars."""
    dense = _dense_int_range(values)
    if dense is None:
        return values.replace_strict(table["raw_id"], table["index"], return_dtype=pl.Int64).to_numpy()
    low, high = dense
    raw = table["raw_id"].to_numpy()
    inside = (raw >= low) & (raw <= high)
    lut = np.full(high - low + 1, -1, dtype=np.int64)
    lut[raw[inside] - low] = table["index"].to_numpy()[inside]
    indices = lut[values.to_numpy() - low]
    if (indices < 0).any():
        raise DataError(f"{int((indices < 0).sum())} IDs are missing from the vocabulary")
    return indices


def load_previous(directory: Path) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Item and action vocabularies of an earlier preparation (``--vocab-from``)."""
    directory = Path(directory)
    items_path = directory / ITEMS_FILE
    if not items_path.exists():
        raise DataError(f"--vocab-from {directory}: no {ITEMS_FILE} there (is it a prepared shard directory?)")
    items = pl.read_parquet(items_path)
    actions_path = directory / ACTIONS_FILE
    actions = pl.read_parquet(actions_path).rename({"value": "raw_id"}) if actions_path.exists() else None
    return items, actions
