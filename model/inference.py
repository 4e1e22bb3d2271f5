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
# Histories per forward pass: their activations stay in the caches. Measured with the ML-1M recipe
# (hidden 64, 200 events, 2 threads): 0.62 ms per history at 16-32 rows, 0.81 at 256.
ROWS_PER_PASS = 32


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


@dataclass
class _Layer:
    """A decoder layer's weights as the lean forward uses them: query, key and value projections
    as one matrix, gate and up projections as another (the modules' parameters become views of
    them, so nothing is held twice)."""

    norm1: torch.Tensor
    eps1: float
    qkv: tuple  # (weight, bias or None)
    out: tuple
    norm2: torch.Tensor
    eps2: float
    gate_up: tuple
    down: tuple
    act: object

    @classmethod
    def fuse(cls, layer) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm.weight,
            layer.input_layernorm.variance_epsilon,
            _fused(attention.q_proj, attention.k_proj, attention.v_proj),
            (attention.o_proj.weight, attention.o_proj.bias),
            layer.post_attention_layernorm.weight,
            layer.post_attention_layernorm.variance_epsilon,
            _fused(mlp.gate_proj, mlp.up_proj),
            (mlp.down_proj.weight, mlp.down_proj.bias),
            mlp.act_fn,
        )


def _fused(*linears) -> tuple:
    """(weight, bias) of linear layers stacked by output rows; each layer's own parameters are
    made views of the stacked ones."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biased = [lin.bias is not None for lin in linears]
    if any(biased) and not all(biased):
        raise ValueError("cannot fuse projections where only some have a bias")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(biased) else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start : start + rows]
        if bias is not None:
            lin.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' RMSNorm in three passes over x instead of five (serving runs in fp32)
    squares = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_() / x.shape[-1]
    return x * squares.add_(eps).rsqrt_() * weight


def _rows(linear: tuple, start: int, stop: int | None = None) -> tuple:
    weight, bias = linear
    return weight[start:stop], None if bias is None else bias[start:stop]


class LeanDecoder:
    """Last-position inference over a ``SequenceRecommender``'s backbone (eval mode, no grad).

    Fusing the projections and norms into fewer, larger calls is measured in
    benchmarks/serve.py (``latency``): at the ML-1M recipe's size each forward is a few dozen
    small operations, so their count, not their FLOPs, sets the time."""

    def __init__(self, model: SequenceRecommender):
        if not self.supports(model):
            raise ValueError(f"no lean forward for backbone {model.cfg.backbone!r} (have: {LEAN_BACKBONES})")
        self.model = model
        backbone = model.backbone
        with torch.no_grad():
            self.layers = [_Layer.fuse(layer) for layer in backbone.layers]
        self.final_norm = (backbone.norm.weight, backbone.norm.variance_epsilon)
        self.head_dim = backbone.layers[0].self_attn.head_dim
        self.heads = backbone.config.num_attention_heads
        self.kv_heads = backbone.config.num_key_value_heads
        self.q_rows = self.heads * self.head_dim
        positions = torch.arange(model.cfg.max_len).unsqueeze(0)
        probe = torch.zeros(1, dtype=model.input_norm.weight.dtype)
        cos, sin = backbone.rotary_emb(probe, positions)
        half = self.head_dim // 2
        # rotate_half(x) * sin == swap_halves(x) * (-sin, +sin): one copy instead of a negation and a copy.
        self.cos = cos[0].view(-1, 1, self.head_dim)  # (max_len, 1, head_dim): broadcast over heads
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).view(-1, 1, self.head_dim)

    @staticmethod
    def supports(model: SequenceRecommender) -> bool:
        backbone = model.backbone
        if model.cfg.backbone not in LEAN_BACKBONES or not hasattr(backbone, "rotary_emb"):
            return False
        attention = backbone.layers[0].self_attn
        # Families with per-head query/key norms or sliding windows need more than this forward does.
        return not hasattr(attention, "q_norm") and getattr(backbone.config, "sliding_window", None) is None

    def _rotate(self, x: torch.Tensor, positions) -> torch.Tensor:
        """Rotary embedding of (B, T, H, hd) states (heads not yet moved before positions, so the
        elementwise passes run over contiguous rows); ``positions`` index the T positions (a
        slice), or each row's one position (B,)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if isinstance(positions, torch.Tensor):
            cos, sin = cos[:, None], sin[:, None]
        b, t, h, d = x.shape
        swapped = x.view(b, t, h, 2, d // 2).flip(3).view(b, t, h, d)
        return torch.addcmul(x * cos, swapped, sin)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        return x.view(b, t, width // self.head_dim, self.head_dim)

    def _attend(self, layer: _Layer, q, k, v, mask=None, causal=False) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        b, _, t, _ = out.shape
        return F.linear(out.transpose(1, 2).reshape(b, t, -1), *layer.out)

    @staticmethod
    def _feed_forward(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(_norm(x, layer.norm2, layer.eps2), *layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(layer.act(gate) * up, *layer.down)

    def _qkv(self, layer: _Layer, h: torch.Tensor, positions) -> tuple:
        """Rotated queries and keys, and values, (B, H, T, hd) each, of (B, T, D) normed states at
        ``positions``."""
        qkv = self._split(F.linear(h, *layer.qkv))
        qk = self._rotate(qkv[:, :, : self.heads + self.kv_heads], positions).transpose(1, 2)
        return qk[:, : self.heads], qk[:, self.heads :], qkv[:, :, self.heads + self.kv_heads :].transpose(1, 2)

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor, with_cache: bool = False):
        """Hidden state after each right-padded history's last event, (B, D), from backbone
        inputs (B, T, D); with ``with_cache``, also each history's ``KVCache``."""
        if len(tokens) <= ROWS_PER_PASS:
            return self._encode(tokens, lengths, with_cache)
        parts = [
            self._encode(tokens[i : i + ROWS_PER_PASS], lengths[i : i + ROWS_PER_PASS], with_cache)
            for i in range(0, len(tokens), ROWS_PER_PASS)
        ]
        if not with_cache:
            return torch.cat(parts)
        return torch.cat([h for h, _ in parts]), [c for _, caches in parts for c in caches]

    def _encode(self, tokens: torch.Tensor, lengths: torch.Tensor, with_cache: bool):
        b, t, _ = tokens.shape
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(b)
        x = tokens
        keys, values = [], []
        for layer in self.layers[:-1]:
            h = _norm(x, layer.norm1, layer.eps1)
            q, k, v = self._qkv(layer, h, slice(0, t))
            keys.append(k)
            values.append(v)
            # Right padding needs no mask under causal attention: real positions only see real ones.
            x = self._feed_forward(layer, x + self._attend(layer, q, k, v, causal=True))
        layer = self.layers[-1]
        h = _norm(x, layer.norm1, layer.eps1)
        kv = self._split(F.linear(h, *_rows(layer.qkv, self.q_rows)))
        k = self._rotate(kv[:, :, : self.kv_heads], slice(0, t)).transpose(1, 2)
        v = kv[:, :, self.kv_heads :].transpose(1, 2)
        keys.append(k)
        values.append(v)
        q = self._split(F.linear(h[rows, last].unsqueeze(1), *_rows(layer.qkv, 0, self.q_rows)))
        q = self._rotate(q, last).transpose(1, 2)
        visible = (torch.arange(t) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
        x = self._feed_forward(layer, x[rows, last].unsqueeze(1) + self._attend(layer, q, k, v, mask=visible))
        hidden = _norm(x, *self.final_norm)[:, 0].float()
        if not with_cache:
            return hidden
        caches = [
            KVCache([k[r, :, : int(n)].clone() for k in keys], [v[r, :, : int(n)].clone() for v in values])
            for r, n in enumerate(lengths.tolist())
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
        mask = torch.arange(n + m)[None, :] <= (n + torch.arange(m))[:, None] if m > 1 else None
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            h = _norm(x, layer.norm1, layer.eps1)
            q, k, v = self._qkv(layer, h, slice(n, n + m))
            k, v = torch.cat((cache.keys[i], k[0]), dim=1), torch.cat((cache.values[i], v[0]), dim=1)
            keys.append(k)
            values.append(v)
            if i == len(self.layers) - 1:  # the last layer: the last new position only
                x = x[:, -1:] + self._attend(layer, q[:, :, -1:], k[None], v[None])
            else:
                x = x + self._attend(layer, q, k[None], v[None], mask=mask)
            x = self._feed_forward(layer, x)
        return _norm(x, *self.final_norm)[0, -1].float(), KVCache(keys, values)
