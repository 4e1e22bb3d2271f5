"""The serving forward: the hidden state after a history's last event, and only that.

Training needs the hidden state after every position; a recommendation needs the one after the
last event. ``LeanDecoder`` runs the backbone's own weights with that in mind:

- every layer but the last runs over all positions (their outputs are the next layer's keys and
  values); the last layer computes keys and values for all positions but the query, attention
  output, feed-forward and final norm for the last position only;
- a key/value cache (``KVCache``, per layer, positions 0..n-1 of one history) lets a history
  that grew by m events compute only those m positions: their tokens attend to the cached keys
  and values, exactly the attention a full recomputation does (HSTU's cached-KV inference).

It covers the pre-norm rotary decoders of transformers (``llama``, ``qwen2``): the layer
structure is checked when it is built, and other backbones keep ``SequenceRecommender.forward``
(``LeanDecoder.supports``). Results equal the full forward up to float rounding (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.modeling import SequenceRecommender

LEAN_BACKBONES = ("llama", "qwen2")


@dataclass
class KVCache:
    """Keys and values of one history's positions 0..n-1: per layer a (heads, n, head_dim) pair,
    keys after the rotary embedding."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class LeanDecoder:
    """Last-position inference over a ``SequenceRecommender``'s backbone (eval mode, no grad)."""

    def __init__(self, model: SequenceRecommender):
        if not self.supports(model):
            raise ValueError(f"no lean forward for backbone {model.cfg.backbone!r} (have: {LEAN_BACKBONES})")
        self.model = model
        backbone = model.backbone
        self.layers = list(backbone.layers)
        self.final_norm = backbone.norm
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.heads = backbone.config.num_attention_heads
        self.kv_heads = backbone.config.num_key_value_heads
        positions = torch.arange(model.cfg.max_len).unsqueeze(0)
        probe = torch.zeros(1, dtype=model.input_norm.weight.dtype)
        cos, sin = backbone.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)

    @staticmethod
    def supports(model: SequenceRecommender) -> bool:
        backbone = model.backbone
        if model.cfg.backbone not in LEAN_BACKBONES or not hasattr(backbone, "rotary_emb"):
            return False
        attention = backbone.layers[0].self_attn
        # Families with per-head query/key norms or sliding windows need more than this forward does.
        return not hasattr(attention, "q_norm") and getattr(backbone.config, "sliding_window", None) is None

    def _rotate(self, x: torch.Tensor, positions) -> torch.Tensor:
        """Rotary embedding of (B, H, T, hd) states; ``positions`` index the T positions (a slice),
        or each row's one position (B,)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if isinstance(positions, torch.Tensor):
            cos, sin = cos[:, None, None], sin[:, None, None]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def _attend(self, layer, q, k, v, mask=None, causal=False) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        b, _, t, _ = out.shape
        return layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor, with_cache: bool = False):
        """Hidden state after each right-padded history's last event, (B, D), from backbone
        inputs (B, T, D); with ``with_cache``, also each history's ``KVCache``."""
        b, t, _ = tokens.shape
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(b)
        x = tokens
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            k = self._rotate(self._split(attention.k_proj(h), self.kv_heads), slice(0, t))
            v = self._split(attention.v_proj(h), self.kv_heads)
            if with_cache:
                keys.append(k)
                values.append(v)
            if i < len(self.layers) - 1:
                q = self._rotate(self._split(attention.q_proj(h), self.heads), slice(0, t))
                # Right padding needs no mask under causal attention: real positions only see real ones.
                x = x + self._attend(layer, q, k, v, causal=True)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                continue
            h_last = h[rows, last].unsqueeze(1)  # (B, 1, D)
            q = self._rotate(self._split(attention.q_proj(h_last), self.heads), last)
            visible = (torch.arange(t) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
            x = x[rows, last].unsqueeze(1) + self._attend(layer, q, k, v, mask=visible)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.final_norm(x)[:, 0].float()
        if not with_cache:
            return hidden
        caches = [
            KVCache(
                [k[r, :, : int(lengths[r])].clone() for k in keys], [v[r, :, : int(lengths[r])].clone() for v in values]
            )
            for r in range(b)
        ]
        return hidden, caches

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Hidden state (D,) after the last of m new events (tokens (m, D)) of a history whose
        first n positions are ``cache``; the cache of all n + m positions. Needs n + m <= max_len."""
        n, m = cache.length, tokens.shape[0]
        if n + m > self.cos.shape[0]:
            raise ValueError(f"{n} cached + {m} new positions pass the model's window of {self.cos.shape[0]}")
        x = tokens.unsqueeze(0)
        # New position n + j sees cached positions and new ones up to itself.
        mask = None
        if m > 1:
            mask = torch.arange(n + m)[None, :] <= (n + torch.arange(m))[:, None]
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            k = torch.cat(
                (cache.keys[i], self._rotate(self._split(attention.k_proj(h), self.kv_heads), slice(n, n + m))[0]),
                dim=1,
            )
            v = torch.cat((cache.values[i], self._split(attention.v_proj(h), self.kv_heads)[0]), dim=1)
            keys.append(k)
            values.append(v)
            if i == len(self.layers) - 1:  # the last layer: the last new position only
                h, x = h[:, -1:], x[:, -1:]
                q = self._rotate(self._split(attention.q_proj(h), self.heads), slice(n + m - 1, n + m))
                x = x + self._attend(layer, q, k[None], v[None])
            else:
                q = self._rotate(self._split(attention.q_proj(h), self.heads), slice(n, n + m))
                x = x + self._attend(layer, q, k[None], v[None], mask=mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.final_norm(x)[0, -1].float(), KVCache(keys, values)
