"""The item representation: how an item index becomes a vector, defined once.

An item vector is the sum of the parts the model config enables: its ID row, a learned projection
of its pretrained text vector, the mean of its text-token rows, the mean of its semantic-ID code
rows. The same vector is an input token and a scoring target. Summing keeps one space for items
with and without a part: an item with no training events has no trained ID row, so where a
content part (text, semantic ID) exists its ID part is left out and its content alone places it,
a cold item included.

The learned rows live in tables that this module declares (``item_tables``) but does not own:
training shards them with TorchRec (train.embeddings), everything else reads them as plain
tensors (``PlainItemTables``). ``ItemEncoder`` composes a vector from either, so training,
evaluation, consolidation, export and serving build items the same way. The per-item facts that
are not learned (training-event counts, text vectors, text tokens) are an ``ItemCatalog``.

Adding an item feature means: its part in ``ItemEncoder``, its table in ``item_tables`` (which
train.embeddings shards whatever it is), its data in ``ItemCatalog``, and their tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, RecommenderConfig

# Item indices below this are padding (0) and unknown (1), never items; data.schema defines the
# same two (model/ does not import data/).
RESERVED = 2
ID_TABLE = "item_table"  # not "items": that name is taken by ModuleDict.items
TOKEN_TABLE = "text_token_table"
SEMANTIC_TABLE = "semantic_code_table"  # every level's codes, level l's rows after level l - 1's


@dataclass(frozen=True)
class TableSpec:
    """A learned table the item representation reads. ``pooled``: rows are looked up in bags and
    mean-pooled to one vector per bag; otherwise one row per index."""

    name: str
    rows: int
    dim: int
    pooled: bool = False


def item_tables(config: RecommenderConfig) -> list[TableSpec]:
    """The tables a model's items are built from, in a fixed order (their initial values are
    seeded by position). A model without ID rows has no table of the catalog's size."""
    cfg = config.architecture
    tables = [TableSpec(ID_TABLE, config.num_items, cfg.hidden_size)] if cfg.item_id else []
    if cfg.item_text_tokens:
        buckets = int(config.text["tokenizer"]["buckets"])
        tables.append(TableSpec(TOKEN_TABLE, buckets, cfg.hidden_size, pooled=True))
    if cfg.item_semantic_ids:
        tables.append(TableSpec(SEMANTIC_TABLE, sum(config.level_sizes), cfg.hidden_size, pooled=True))
    return tables


class ItemTables(Protocol):
    """Where learned rows come from: TorchRec's sharded tables in training (collective: every
    rank calls), plain tensors elsewhere."""

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """(N, D) rows of 1-D indices ``ids``."""

    def pool(self, table: str, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(N, D) means of the rows of ``values`` split into N bags by ``lengths`` (an empty bag gives zeros)."""


class PlainItemTables:
    """Tables as tensors in one process. A table may be a block of rows starting at
    ``first_rows[name]`` (consolidation and export stream a large ID table block by block)."""

    def __init__(self, tables: dict[str, torch.Tensor], first_rows: dict[str, int] | None = None):
        self.tables, self.first_rows = tables, first_rows or {}

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return self.tables[table][ids - self.first_rows.get(table, 0)].float()

    def pool(self, table: str, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # The same mean TorchRec's mean-pooled EmbeddingBagCollection computes, empty bags zero.
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths.to(torch.int64), 0)
        rows = self.tables[table].float()
        return F.embedding_bag(
            values - self.first_rows.get(table, 0), rows, offsets, mode="mean", include_last_offset=True
        )


@dataclass
class ItemCatalog:
    """What is known of every item besides its learned rows (rows = item indices)."""

    counts: torch.Tensor  # (V,) integer training-event counts (popularity; 0: no trained ID row)
    text_vectors: torch.Tensor | None = None  # (V, text_dim) pretrained sentence-encoder vectors
    token_offsets: torch.Tensor | None = None  # (V + 1,) CSR offsets into token_ids
    token_ids: torch.Tensor | None = None  # hashed text-token indices (rows of TOKEN_TABLE)
    # (V, L) semantic-ID codes per level, -1 rows for items without (padding, unknown)
    semantic_codes: torch.Tensor | None = None
    # Items without training events (held out, or added later) have no trained ID row, and are
    # no training candidates: the catalog being learned is the items seen in training.
    has_id: torch.Tensor = field(init=False)  # (V,) bool

    def __post_init__(self):
        self.has_id = self.counts > 0

    def token_bags(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, lengths) of items ``ids``: one bag per item."""
        starts, lengths = self.token_offsets[ids], self.token_offsets[ids + 1] - self.token_offsets[ids]
        shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
        return self.token_ids[torch.arange(int(lengths.sum())) + shift], lengths

    def code_bags(self, ids: torch.Tensor, level_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of SEMANTIC_TABLE, lengths) of items ``ids``: one bag of L codes per item, each
        level's code offset past the levels before it; items without codes get an empty bag."""
        codes = self.semantic_codes[ids].to(torch.int64)
        offsets = torch.cumsum(torch.tensor([0, *level_sizes[:-1]]), 0)
        coded = codes[:, 0] >= 0
        lengths = coded.to(torch.int64) * codes.shape[1]
        return (codes[coded] + offsets).reshape(-1), lengths


class ItemEncoder(nn.Module):
    """Item vectors from their enabled parts. Its own parameter (the text projection) is dense and
    trained with the model; the tables are handed in."""

    def __init__(self, cfg: ModelConfig, text_dim: int = 0, level_sizes: list[int] | None = None):
        super().__init__()
        self.cfg, self.level_sizes = cfg, list(level_sizes or [])
        if cfg.item_text and text_dim < 1:
            raise ValueError("model.item_text needs text vectors (shards prepared with --item-text)")
        self.text_projection = nn.Linear(text_dim, cfg.hidden_size, bias=False) if cfg.item_text else None

    def forward(self, ids: torch.Tensor, tables: ItemTables, catalog: ItemCatalog) -> torch.Tensor:
        """(N, D) vectors of 1-D item indices ``ids`` (collective when ``tables`` are sharded)."""
        cfg = self.cfg
        if not cfg.composed:
            return tables.lookup(ID_TABLE, ids)
        host_ids = ids.cpu()  # the catalog stays in host memory, whatever the training device
        parts = []
        if cfg.item_id:
            id_rows, has_id = tables.lookup(ID_TABLE, ids), catalog.has_id[host_ids]
            if cfg.item_id_dropout and self.training and torch.is_grad_enabled():
                # The global generator: its state is in every checkpoint, so resuming stays exact.
                has_id = has_id & (torch.rand(len(host_ids)) >= cfg.item_id_dropout)
            parts.append(id_rows * has_id.unsqueeze(-1).to(id_rows.device, id_rows.dtype))
        if self.text_projection is not None:
            weight = self.text_projection.weight
            text = catalog.text_vectors[host_ids].to(weight.device, weight.dtype)
            parts.append(self.text_projection(text).float())
        if cfg.item_text_tokens:
            parts.append(tables.pool(TOKEN_TABLE, *catalog.token_bags(host_ids)))
        if cfg.item_semantic_ids:
            parts.append(tables.pool(SEMANTIC_TABLE, *catalog.code_bags(host_ids, self.level_sizes)))
        return torch.stack([p.float() for p in parts]).sum(0)
