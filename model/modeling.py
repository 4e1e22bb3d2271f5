"""The network: a transformers causal decoder over behavior tokens, as a transformers
``PreTrainedModel`` (``save_pretrained`` / ``from_pretrained``, ``AutoModel`` for model type
``lmrec``).

A token is the item's vector plus, where configured and present, an action embedding and a
time-gap-bucket embedding. Item vectors are *given* to the model (model.items builds them from
tables the model does not own): training looks the rows up in TorchRec's sharded tables, which
DeepSpeed must never see, serving in a plain quantized table. The same vectors are the scoring
targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from model.config import MODEL_TYPE, RecommenderConfig
from model.items import ItemEncoder
from model.semantic import CodeDecoder


class SequenceRecommender(PreTrainedModel):
    config_class = RecommenderConfig
    base_model_prefix = MODEL_TYPE
    _no_split_modules = []

    def __init__(self, config: RecommenderConfig):
        super().__init__(config)
        cfg = self.cfg = config.architecture
        self.item_encoder = ItemEncoder(cfg, config.text_dim, config.level_sizes)
        self.backbone = AutoModel.from_config(cfg.backbone_config())
        d = cfg.hidden_size
        num_actions = config.num_actions if cfg.use_actions else 0
        num_gaps = config.num_gaps if cfg.use_gaps else 0
        self.action_embeddings = nn.Embedding(num_actions, d, padding_idx=0) if num_actions else None
        self.gap_embeddings = nn.Embedding(num_gaps, d, padding_idx=0) if num_gaps else None
        self.input_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        # Action head: [hidden state at t ; embedding of the item at t+1] -> P(positive action).
        self.action_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1)) if cfg.action_head else None
        # Generates the next item's semantic ID instead of scoring item vectors (model.semantic).
        self.code_decoder = CodeDecoder(d, config.level_sizes) if cfg.semantic_id_head else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone initialises itself; linear layers and norms keep torch's initialisation.
        if module is self.action_embeddings or module is self.gap_embeddings:
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.weight[0])

    def forward(
        self,
        item_embeddings: torch.Tensor,
        lengths: torch.Tensor,
        actions: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden state after each position, (B, T, D). ``item_embeddings`` is (B, T, D) for
        right-padded histories of ``lengths``; position t sees positions <= t only."""
        tokens = self.dropout(self.tokens(item_embeddings, actions, gaps))
        # No padding mask on purpose: histories are right-padded, so under causal attention a real
        # position only ever sees real positions. Without a mask the backbone keeps the fused
        # causal attention kernel instead of materialising a (B, T, T) mask (about 3x faster here).
        # use_cache=False: the key/value cache would be filled and thrown away (and, a Python
        # object per layer, it makes torch.compile recompile every block).
        return self.backbone(inputs_embeds=tokens, use_cache=False).last_hidden_state

    def tokens(
        self, item_embeddings: torch.Tensor, actions: torch.Tensor | None = None, gaps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The backbone's input: each event's item vector plus its action and gap embeddings, normed."""
        # The lookup may hand fp32 rows to a bf16 model (TorchRec tables stay fp32).
        tokens = item_embeddings.to(self.input_norm.weight.dtype)
        if self.action_embeddings is not None and actions is not None:
            tokens = tokens + self.action_embeddings(actions)
        if self.gap_embeddings is not None and gaps is not None:
            tokens = tokens + self.gap_embeddings(gaps)
        return self.input_norm(tokens)

    def scores(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states (N, D) against candidate item embeddings (C, D)."""
        if self.cfg.normalize:
            # The temperature scales the (N, D) side, not the (N, C) product: one pass less over
            # the biggest tensor, forward and backward.
            return (F.normalize(hidden, dim=-1) / self.cfg.temperature) @ F.normalize(candidates, dim=-1).T
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


AutoConfig.register(MODEL_TYPE, RecommenderConfig)
AutoModel.register(RecommenderConfig, SequenceRecommender)
