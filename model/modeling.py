"""The network: a transformers causal decoder over behavior tokens.

A token is the item's embedding plus, where configured and present, an action embedding and a
time-gap-bucket embedding. Item embeddings are *given* to the model, not owned by it: training
looks them up in TorchRec's sharded tables (which DeepSpeed must never see), serving in a plain
quantized table. The same embeddings are the scoring targets.

An item's embedding is built from parts by ``ItemEncoder``: its ID embedding, a projection of its
pretrained text vector and the mean of its text-token embeddings (the ID and token tables live
outside, like the item table; the projection is dense and lives here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class ItemEncoder(nn.Module):
    """Item vector = sum of its enabled parts. Summing keeps one space for items with and without
    a part: an item with no training events has no trained ID embedding, so where text parts exist
    its ID part is left out (``has_id``) and its text alone places it, a cold item included."""

    def __init__(self, cfg: ModelConfig, text_dim: int = 0):
        super().__init__()
        self.cfg = cfg
        if cfg.item_text and text_dim < 1:
            raise ValueError("model.item_text needs text vectors (shards prepared with --item-text)")
        self.text_projection = nn.Linear(text_dim, cfg.hidden_size, bias=False) if cfg.item_text else None

    def forward(
        self,
        id_part: torch.Tensor | None = None,
        text_vectors: torch.Tensor | None = None,
        token_part: torch.Tensor | None = None,
        has_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = []
        if self.cfg.item_id:
            if has_id is not None and self.cfg.uses_text:
                id_part = id_part * has_id.unsqueeze(-1).to(id_part.dtype)
            parts.append(id_part)
        if self.text_projection is not None:
            parts.append(self.text_projection(text_vectors.to(self.text_projection.weight.dtype)).float())
        if self.cfg.item_text_tokens:
            parts.append(token_part)
        return torch.stack([p.float() for p in parts]).sum(0)

    def from_tables(
        self,
        id_rows: torch.Tensor,
        text_vectors: torch.Tensor | None,
        token_table: torch.Tensor | None,
        token_ids: torch.Tensor | None,
        token_offsets: torch.Tensor | None,
        has_id: torch.Tensor,
    ) -> torch.Tensor:
        """Item vectors without TorchRec (export, serving): the token part pooled from a plain table."""
        tokens = pool_tokens(token_table, token_ids, token_offsets) if self.cfg.item_text_tokens else None
        return self(id_rows, text_vectors, tokens, has_id)


def pool_tokens(table: torch.Tensor, token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Mean of each bag's rows of ``table``; bag i is token_ids[offsets[i]:offsets[i + 1]] (offsets
    may be a slice of a longer CSR array) and an empty bag gives zeros, as TorchRec's mean-pooled
    EmbeddingBagCollection does."""
    first, last = int(offsets[0]), int(offsets[-1])
    return F.embedding_bag(token_ids[first:last], table.float(), offsets - first, mode="mean", include_last_offset=True)


class SequenceRecommender(nn.Module):
    def __init__(self, cfg: ModelConfig, num_actions: int = 0, num_gaps: int = 0, text_dim: int = 0):
        super().__init__()
        from transformers import AutoModel

        self.cfg = cfg
        self.item_encoder = ItemEncoder(cfg, text_dim)
        self.backbone = AutoModel.from_config(cfg.backbone_config())
        d = cfg.hidden_size
        self.action_embeddings = (
            nn.Embedding(num_actions, d, padding_idx=0) if cfg.use_actions and num_actions else None
        )
        self.gap_embeddings = nn.Embedding(num_gaps, d, padding_idx=0) if cfg.use_gaps and num_gaps else None
        self.input_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        # Action head: [hidden state at t ; embedding of the item at t+1] -> P(positive action).
        self.action_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1)) if cfg.action_head else None
        for table in (self.action_embeddings, self.gap_embeddings):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
                with torch.no_grad():
                    table.weight[0].zero_()

    def forward(
        self,
        item_embeddings: torch.Tensor,
        lengths: torch.Tensor,
        actions: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden state after each position, (B, T, D). ``item_embeddings`` is (B, T, D) for
        right-padded histories of ``lengths``; position t sees positions <= t only."""
        # The lookup may hand fp32 rows to a bf16 model (TorchRec tables stay fp32).
        tokens = item_embeddings.to(self.input_norm.weight.dtype)
        if self.action_embeddings is not None and actions is not None:
            tokens = tokens + self.action_embeddings(actions)
        if self.gap_embeddings is not None and gaps is not None:
            tokens = tokens + self.gap_embeddings(gaps)
        tokens = self.dropout(self.input_norm(tokens))
        # No padding mask on purpose: histories are right-padded, so under causal attention a real
        # position only ever sees real positions. Without a mask the backbone keeps the fused
        # causal attention kernel instead of materialising a (B, T, T) mask (about 3x faster here).
        return self.backbone(inputs_embeds=tokens).last_hidden_state

    def item_vectors(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings as scoring targets."""
        return F.normalize(embeddings, dim=-1) if self.cfg.normalize else embeddings

    def scores(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states (N, D) against candidate item embeddings (C, D)."""
        if self.cfg.normalize:
            return F.normalize(hidden, dim=-1) @ F.normalize(candidates, dim=-1).T / self.cfg.temperature
        return hidden @ candidates.T

    def pair_scores(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logit of each hidden state (N, D) against its own item (N, D)."""
        if self.cfg.normalize:
            return (F.normalize(hidden, dim=-1) * F.normalize(items, dim=-1)).sum(-1) / self.cfg.temperature
        return (hidden * items).sum(-1)

    def action_logits(self, hidden: torch.Tensor, next_item_embeddings: torch.Tensor) -> torch.Tensor:
        """Logit that the event with this next item has a positive action (e.g. rating >= 4)."""
        features = torch.cat([hidden, next_item_embeddings], dim=-1).to(self.input_norm.weight.dtype)
        return self.action_head(features).squeeze(-1).float()

    def last_hidden(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The hidden state after each history's last real event, (B, D)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), (lengths - 1).clamp(min=0)]
