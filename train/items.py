"""The catalog's per-item data as prepared shards hold it: training-event counts, text features
and which actions count as positive. Training, evaluation and consolidation read it here."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from data.shards import load_manifest
from model.items import ItemCatalog


def load_counts(shards: str | Path, num_items: int) -> torch.Tensor:
    """Training-event count of every item index: int32, or int64 where a count needs it.

    Read in record batches straight into the tensor: a whole-file read of a 10^8-item vocabulary
    left 2.4 GB of freed-but-resident allocator memory per process beside the 0.8 GB of float64
    counts it returned (benchmarks/catalog_scale.py: the ranks' unattributed excess)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(shards) / "items.parquet"
    parquet = pq.ParquetFile(path)
    stats = [parquet.metadata.row_group(i).column(parquet.schema_arrow.get_field_index("count")).statistics
             for i in range(parquet.metadata.num_row_groups)]  # fmt: skip
    wide = any(s is None or not s.has_min_max or s.max > torch.iinfo(torch.int32).max for s in stats)
    counts = torch.zeros(num_items, dtype=torch.int64 if wide else torch.int32)
    for batch in parquet.iter_batches(batch_size=1 << 20, columns=["index", "count"]):
        index = torch.tensor(batch.column("index").to_numpy())
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= num_items):
            raise ValueError(f"{path}: an item index outside the vocabulary of {num_items}")
        counts[index] = torch.tensor(batch.column("count").to_numpy()).to(counts.dtype)
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise
    return counts


def load_semantic_codes(shards: str | Path, num_items: int) -> torch.Tensor:
    """Every item's semantic-ID codes (V, L), as `lmrec data semantic-ids` gave them."""
    from data.semantic_ids import load_semantic_ids

    semantic = load_semantic_ids(shards)
    if semantic is None:
        raise ValueError(f"{shards}: no semantic IDs; give the items codes with `lmrec data semantic-ids {shards}`")
    if len(semantic.codes) != num_items:
        raise ValueError(f"{shards}: semantic IDs for {len(semantic.codes)} items, the vocabulary has {num_items}")
    return torch.from_numpy(semantic.codes)


def load_catalog(shards: str | Path, num_items: int, with_text: bool, with_semantic: bool = False) -> ItemCatalog:
    """The catalog of ``shards``; ``with_text``: also the item text features (--item-text);
    ``with_semantic``: also the items' semantic IDs."""
    counts = load_counts(shards, num_items)
    codes = load_semantic_codes(shards, num_items) if with_semantic else None
    if not with_text:
        return ItemCatalog(counts, semantic_codes=codes)
    from data.text import ItemTextFeatures

    spec = load_manifest(shards).get("text")
    if not spec:
        raise ValueError(
            f"{shards}: no item text features; prepare the shards with --item-text for model.item_text / item_text_tokens"
        )
    features = ItemTextFeatures.load(Path(shards) / spec["file"])
    if len(features.vectors) != num_items:
        raise ValueError(f"{shards}: text features for {len(features.vectors)} items, the vocabulary has {num_items}")
    return ItemCatalog(
        counts,
        torch.from_numpy(features.vectors),
        torch.from_numpy(features.token_offsets),
        torch.from_numpy(features.token_ids),
        semantic_codes=codes,
    )


def positive_actions(shards: str | Path, num_actions: int, minimum: float) -> torch.Tensor:
    """Which action indices count as positive for the action head: numeric values >= minimum
    (a rating of 4 or 5, say); non-numeric event types are negative."""
    positive = torch.zeros(max(num_actions, 1), dtype=torch.bool)
    path = Path(shards) / "actions.parquet"
    if num_actions and path.exists():
        import polars as pl

        for index, value in pl.read_parquet(path).select("index", "value").iter_rows():
            with contextlib.suppress(ValueError):
                positive[index] = float(value) >= minimum
    return positive


def model_vocab(manifest: dict, model) -> dict:
    """The vocabulary sizes ``model`` (a ModelConfig) is built for, from a shard manifest."""
    vocab, features = manifest["vocab"], manifest["features"]
    text = manifest.get("text") if model.uses_text else None
    return {
        "items": vocab["items"],
        "actions": vocab["actions"] if "action" in features else 0,
        "gaps": vocab["gaps"] if "gap" in features else 0,
        "text_dim": int(text["encoder"]["dim"]) if text else 0,
    }
