"""Recommendations from an exported artifact: raw item IDs in, top-K raw item IDs out.

The item table stays as stored (int8, int4, fp16 or fp32) and memory-mapped. Exact ranking of an
int8 table goes through a compiled kernel (serve.topk) that keeps the few rows that can be in the
top k, rescored exactly here; otherwise ranking walks the table in row blocks: a quantized block
is converted to float codes, multiplied with the queries, and the row-wise scale and offset are
applied to the (queries x block) scores afterwards, so the whole table is never dequantized. fp32
and fp16 blocks are scored by the model's own ``scores``, which makes an fp32 artifact rank
exactly like the training evaluator. An artifact with an approximate item index (serve.index)
ranks through it unless loaded with ``search="exact"``.

A model that generates semantic IDs (``model.semantic_id_head``) scores no item rows: its code
decoder's beam search over the artifact's code trie (model.semantic) gives the top k, the same
search the training evaluator runs, with the same beam width unless the caller sets another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import schema
from model.config import ModelConfig, RecommenderConfig
from model.inference import KVCache, LeanDecoder
from model.modeling import SequenceRecommender
from model.semantic import CodeTrie, TrieError, beam_search
from serve import artifact, topk
from serve.artifact import OFFSET, SCALE
from serve.index import SEARCHES, ItemIndex
from serve.sessions import Session, SessionMiss, SessionStore

RESIDENT_VALUES = 1 << 22  # tables of at most this many values (16 MiB as fp32) are also kept as float rows
BLOCK_ROWS = 1 << 14  # rows scored at a time: a few MiB of float temporaries at common widths
ENCODE_BATCH = 256
STATS_ROWS = 1 << 16  # rows converted at a time for the row norms computed at load


@dataclass
class Recommendation:
    items: list  # raw item IDs, best first
    scores: list[float]
    unknown_items: list = field(default_factory=list)  # history IDs the artifact does not know (dropped)
    truncated: bool = False  # the history was longer than the model's window; its oldest events were dropped
    fallback: str | None = None  # "popularity" when no known history was left
    titles: list | None = None  # of the recommended items, when the artifact has titles
    events: int | None = None  # with a stored session: the user's events applied (the next request's seq)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("titles", "events") or v is not None}


class ItemTable:
    """The stored item table: dequantized rows for model inputs, block-wise scores for ranking.

    A quantized row scores as ``alpha * (query . levels) + beta * sum(query)`` (then divided by the
    temperature when the model normalizes): ``alpha`` and ``beta`` fold the row's scale, offset
    and, for a normalizing model, its inverse norm, computed once from the stored rows."""

    def __init__(
        self,
        tensors: dict[str, np.ndarray],
        quant: str,
        dim: int,
        normalize: bool,
        block_rows: int,
        resident_values: int = RESIDENT_VALUES,
    ):
        self.quant, self.dim, self.normalize, self.block_rows = quant, dim, normalize, block_rows
        self.codes = torch.from_numpy(tensors["items"])
        self.rows = self.codes.shape[0]
        self.scale = torch.from_numpy(tensors["items" + SCALE]) if quant in ("int8", "int4") else None
        self.offset = torch.from_numpy(tensors["items" + OFFSET]) if quant in ("int8", "int4") else None
        self.alpha = self.beta = self.candidates = None
        # A table of at most ``resident_values`` values is also kept as float rows, normalized
        # when the model normalizes: one matrix product scores it (ML-1M's 3,418 x 64: 0.03 ms
        # against 0.25-0.3 ms through the int8 paths, whose fixed costs only pay off on large
        # tables), and the int8 kernel is not built for it.
        self.resident = None
        if self.rows * dim <= resident_values:
            rows = self.dequantize(0, self.rows) if self.scale is not None else self.codes.float()
            self.resident = F.normalize(rows, dim=-1) if normalize else rows
        if self.scale is None:
            return
        self.alpha, self.beta = self.scale.clone(), self._bias(self.scale, self.offset).clone()
        kernel = topk.kernel() if quant == "int8" and self.resident is None else None
        if not normalize and kernel is None:
            return
        # One pass over the codes: each row's sum and sum of squares of levels give its norm
        # (value = level * scale + bias) and, for the int8 kernel's error bounds, the codes' norm.
        code_norms = torch.empty(self.rows) if kernel is not None else None
        for start in range(0, self.rows, STATS_ROWS):
            stop = min(self.rows, start + STATS_ROWS)
            levels = self._levels(self.codes[start:stop])
            squares = (levels * levels).sum(1).double()
            if normalize:
                scale, bias = self.alpha[start:stop].double(), self.beta[start:stop].double()
                norm = scale**2 * squares + 2 * scale * bias * levels.sum(1).double() + dim * bias**2
                inv_norm = (1.0 / norm.clamp(min=0).sqrt().clamp(min=1e-12)).float()
                self.alpha[start:stop] *= inv_norm
                self.beta[start:stop] *= inv_norm
            if code_norms is not None:
                code_norms[start:stop] = squares.sqrt().float()
        if kernel is not None:
            self.candidates = topk.Int8Candidates(
                kernel, tensors["items"], self.alpha.numpy(), self.beta.numpy(), code_norms.numpy(), schema.FIRST_INDEX
            )

    def _levels(self, codes: torch.Tensor) -> torch.Tensor:
        """Float code values: int8 as is, int4 unpacked (low nibble first)."""
        if self.quant == "int8":
            return codes.float()
        levels = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
        return levels[:, : self.dim].float()

    def _bias(self, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # int8 codes are stored shifted by -128 (serve.quant): value = (code + 128) * scale + offset.
        return 128.0 * scale + offset if self.quant == "int8" else offset

    def _rows(self, codes, scale, offset) -> torch.Tensor:
        if self.scale is None:
            return codes.float()
        return self._levels(codes) * scale[:, None] + self._bias(scale, offset)[:, None]

    def dequantize(self, start: int, stop: int) -> torch.Tensor:
        scale = self.scale[start:stop] if self.scale is not None else None
        offset = self.offset[start:stop] if self.offset is not None else None
        return self._rows(self.codes[start:stop], scale, offset)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """fp32 rows of ``indices`` (any shape), shape (*indices.shape, D)."""
        flat = indices.reshape(-1)
        scale = self.scale[flat] if self.scale is not None else None
        offset = self.offset[flat] if self.offset is not None else None
        return self._rows(self.codes[flat], scale, offset).reshape(*indices.shape, self.dim)

    def _query(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(hidden, dim=-1) if self.normalize else hidden

    def scores(self, model: SequenceRecommender, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.resident is not None:
            # model.scores with the candidates' normalization done once
            query = F.normalize(hidden, dim=-1) / model.cfg.temperature if self.normalize else hidden
            return query @ self.resident[start:stop].T
        if self.scale is None:
            return model.scores(hidden, self.codes[start:stop].float())
        query = self._query(hidden)
        raw = (query @ self._levels(self.codes[start:stop]).T) * self.alpha[start:stop]
        raw += query.sum(1, keepdim=True) * self.beta[start:stop]
        return raw / model.cfg.temperature if self.normalize else raw

    def row_scores(self, model: SequenceRecommender, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Scores of each query (B, D) against its own rows (B, M), as ``scores`` computes them."""
        b, m = rows.shape
        if self.scale is None:
            pairs = hidden[:, None, :].expand(b, m, self.dim).reshape(-1, self.dim)
            return model.pair_scores(pairs, self.codes[rows.reshape(-1)].float()).reshape(b, m)
        query = self._query(hidden)
        levels = self._levels(self.codes[rows.reshape(-1)]).reshape(b, m, self.dim)
        raw = (levels @ query[:, :, None])[..., 0] * self.alpha[rows] + query.sum(1, keepdim=True) * self.beta[rows]
        return raw / model.cfg.temperature if self.normalize else raw


class Vocabulary:
    """Raw item ID <-> table index, popularity and titles, from the artifact's vocab.parquet."""

    def __init__(self, table, rows: int):
        raw = table["raw_id"].to_numpy(zero_copy_only=False)
        index = np.array(table["index"].to_numpy())
        self.integer = np.issubdtype(raw.dtype, np.integer)
        if not self.integer:
            raw = raw.astype(str)
        order = np.argsort(raw, kind="stable")
        self._sorted_raw, self._sorted_index = raw[order], index[order]
        self.raw_by_index = np.zeros(rows, dtype=raw.dtype)
        self.raw_by_index[index] = raw
        self.popularity = torch.zeros(rows)
        self.popularity[torch.from_numpy(index)] = torch.tensor(table["count"].to_numpy(), dtype=torch.float32)
        self.popularity[: schema.FIRST_INDEX] = -torch.inf
        self.titles = None
        if "title" in table.column_names:
            self.titles = np.empty(rows, dtype=object)
            self.titles[index] = table["title"].to_numpy(zero_copy_only=False)

    def _coerce(self, raw_id):
        if not self.integer:
            return raw_id if isinstance(raw_id, str) else str(raw_id)
        if isinstance(raw_id, str) and raw_id.strip().lstrip("-").isdigit():
            raw_id = int(raw_id)
        if isinstance(raw_id, (int, np.integer)) and not isinstance(raw_id, bool) and -(2**63) <= raw_id < 2**63:
            return int(raw_id)
        return None

    def indices(self, raw_ids) -> np.ndarray:
        """Index of every raw ID (a list, or a numpy array for bulk lookups); -1 where unknown."""
        if isinstance(raw_ids, np.ndarray) and raw_ids.dtype != object:
            if self.integer and np.issubdtype(raw_ids.dtype, np.integer):
                return self._lookup(raw_ids)
            if not self.integer:
                return self._lookup(raw_ids.astype(str))
        coerced = [self._coerce(r) for r in raw_ids]
        out = np.full(len(coerced), -1, dtype=np.int64)
        known = [i for i, c in enumerate(coerced) if c is not None]
        if known:
            dtype = np.int64 if self.integer else self._sorted_raw.dtype
            out[known] = self._lookup(np.array([coerced[i] for i in known], dtype=dtype))
        return out

    def _lookup(self, values: np.ndarray) -> np.ndarray:
        out = np.full(len(values), -1, dtype=np.int64)
        if not len(self._sorted_raw) or not len(values):
            return out
        at = np.searchsorted(self._sorted_raw, values).clip(max=len(self._sorted_raw) - 1)
        hit = self._sorted_raw[at] == values
        out[hit] = self._sorted_index[at[hit]]
        return out

    def raw(self, indices: np.ndarray) -> list:
        return self.raw_by_index[indices].tolist()


class Recommender:
    def __init__(
        self,
        path: Path,
        manifest: dict,
        config: dict,
        dense: dict,
        items: dict,
        vocab,
        block_rows: int,
        resident_values: int = RESIDENT_VALUES,
        semantic: artifact.SemanticIdTables | None = None,
        beam_width: int | None = None,
    ):
        self.path, self.manifest, self.config = Path(path), manifest, config
        try:
            model_config = RecommenderConfig.build(
                ModelConfig.from_dict(config["model"]), config["vocab"], config.get("text"), config.get("semantic_ids")
            )
        except (TypeError, ValueError) as e:
            raise artifact.ArtifactError(f"{self.path / artifact.CONFIG}: {e}") from None
        self.model = SequenceRecommender(model_config)
        try:
            self.model.load_state_dict({k: torch.from_numpy(v) for k, v in dense.items()})
        except RuntimeError as e:
            raise artifact.ArtifactError(f"{self.path / artifact.MODEL}: does not fit {artifact.CONFIG}: {e}") from None
        self.model.eval()
        self.lean = LeanDecoder(self.model) if LeanDecoder.supports(self.model) else None
        self.quant = config["quant"]
        self.items = ItemTable(
            items, self.quant, config["items"]["dim"], self.model.cfg.normalize, block_rows, resident_values
        )
        self.index = None  # an approximate item index (serve.index) when loaded with one
        self.vocab = Vocabulary(vocab, self.items.rows)
        self.max_len = self.model.cfg.max_len
        self.uses_actions = self.model.action_embeddings is not None
        self.uses_gaps = self.model.gap_embeddings is not None
        self._actions = {str(value): index for value, index in config.get("actions", [])}
        self.semantic, self.trie = semantic, self._trie(semantic)
        self.beam_width = None
        if self.model.code_decoder is not None:
            self.beam_width = int(beam_width if beam_width is not None else config["semantic_ids"].get("beam_width", 0))
            if self.beam_width < 1:
                raise artifact.ArtifactError(f"{self.path}: beam width must be >= 1, got {self.beam_width}")
        elif beam_width is not None:
            raise artifact.ArtifactError(
                f"{self.path}: a beam width is for models that generate semantic IDs; this one scores item vectors"
            )
        digest = hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()
        self.version = digest[:12]

    def _trie(self, semantic: artifact.SemanticIdTables | None) -> CodeTrie | None:
        """The stored code trie, refused unless it is exactly the one the stored codes build and
        the codes cover the vocabulary: a beam search over any other trie returns wrong items."""
        if semantic is None:
            return None
        file = self.path / artifact.SEMANTIC
        if len(semantic.codes) != self.items.rows:
            raise artifact.ArtifactError(
                f"{file}: codes for {len(semantic.codes):,} items, the vocabulary has {self.items.rows:,}"
            )
        codes = torch.from_numpy(semantic.codes)
        try:
            trie = CodeTrie.from_tensors({k: torch.from_numpy(v) for k, v in semantic.trie.items()}, len(codes))
            if trie.level_sizes != self.model.config.level_sizes:
                raise TrieError(f"levels {trie.level_sizes}, {artifact.CONFIG} says {self.model.config.level_sizes}")
            trie.check(codes)
        except (KeyError, IndexError, RuntimeError, TrieError) as e:
            raise artifact.ArtifactError(f"{file}: the code trie does not match the items' codes ({e})") from None
        table = semantic.code_table
        if self.model.cfg.item_semantic_ids and (
            table is None or table.shape != (sum(trie.level_sizes), self.model.cfg.hidden_size)
        ):
            raise artifact.ArtifactError(
                f"{file}: 'code_table' should be ({sum(trie.level_sizes)}, {self.model.cfg.hidden_size}), got "
                f"{None if table is None else table.shape}"
            )
        return trie

    @classmethod
    def load(
        cls,
        path: str | Path,
        verify: bool = True,
        block_rows: int = BLOCK_ROWS,
        search: str = "auto",
        resident_values: int = RESIDENT_VALUES,
        beam_width: int | None = None,
    ) -> Recommender:
        """Checks format version and checksums (``verify``), memory-maps the item table. ``search``:
        ``auto`` ranks with the artifact's approximate item index when it has one, ``index``
        requires one, ``exact`` scores every item. Tables of at most ``resident_values`` values
        are also held as float rows (``ItemTable``). ``beam_width``: for a model that generates
        semantic IDs, instead of the artifact's default (its training evaluation's)."""
        import pyarrow

        if search not in SEARCHES:
            raise artifact.ArtifactError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        path = Path(path)
        manifest, config, dense, items, vocab = artifact.read(path, check=verify)
        semantic = artifact.read_semantic_ids(path, config)
        rec = cls(path, manifest, config, dense, items, vocab, block_rows, resident_values, semantic, beam_width)
        pyarrow.default_memory_pool().release_unused()  # the vocabulary's Parquet decode buffers
        if search == "index" and "index" not in rec.config:
            raise artifact.ArtifactError(f"{rec.path}: has no item index to search (export it with --index)")
        if search != "exact" and "index" in rec.config:
            rec.index = ItemIndex(rec.path, rec.config["index"])
        return rec

    def info(self) -> dict:
        return {
            "version": self.version,
            "path": str(self.path),
            "quant": self.quant,
            "items": int(self.items.rows - schema.FIRST_INDEX),
            "max_len": self.max_len,
            "features": {
                "actions": self.uses_actions,
                "timestamps": self.uses_gaps,
                "text": self.model.cfg.uses_text,
                "semantic_ids": self.trie is not None,
            },
            "semantic_ids": None
            if self.trie is None
            else {"levels": self.trie.levels, "level_sizes": self.trie.level_sizes, "beam_width": self.beam_width},
            "added_items": self.manifest.get("added_items"),
            "created": self.manifest.get("created"),
            "source": self.manifest.get("source"),
            "metrics": self.manifest.get("metrics"),
        }

    # -- index level: used by the raw-ID API, offline scoring and evaluation ------------------

    @torch.inference_mode()
    def encode(self, items: torch.Tensor, lengths: torch.Tensor, actions=None, gaps=None, with_cache: bool = False):
        """Hidden state after each right-padded history's last event, (B, D); with ``with_cache``
        also each history's key/value cache (None without a lean forward for the backbone)."""
        actions = actions if self.uses_actions else None
        gaps = gaps if self.uses_gaps else None
        embeddings = self.items.lookup(items)
        if self.lean is not None:
            return self.lean.encode(self.model.tokens(embeddings, actions, gaps), lengths, with_cache)
        hidden = self.model.last_hidden(self.model(embeddings, lengths, actions, gaps), lengths).float()
        return (hidden, [None] * len(hidden)) if with_cache else hidden

    def warm_up(self) -> None:
        """A few forwards and rankings of the shapes serving meets, before the model is called ready
        (the first calls allocate and pick kernels)."""
        for length in (1, self.max_len // 2, self.max_len):
            for batch in (1, 8):
                items = torch.full((batch, length), schema.FIRST_INDEX, dtype=torch.int64)
                zeros = torch.zeros_like(items)
                hidden = self.encode(items, torch.full((batch,), length), zeros, zeros)
                # With a seen item, as requests have: a beam search then also prunes by it.
                self.top_k(hidden, 10, [np.array([schema.FIRST_INDEX])] * batch)

    @torch.inference_mode()
    def top_k(
        self,
        hidden: torch.Tensor | None,
        k: int,
        exclude: list[np.ndarray] | None = None,
        allow: list[np.ndarray | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each (B, k), best first; -inf scores mark missing results. ``hidden``
        None ranks by popularity instead of the model. ``exclude[b]`` are never returned for row
        b; ``allow[b]``, when given, restricts row b's candidates to those indices. A model that
        generates semantic IDs returns its beam search's items (log-probabilities as scores), with a
        beam of ``beam_width``, or ``k`` where larger."""
        n = len(exclude) if hidden is None else hidden.shape[0]
        exclude = exclude or [np.zeros(0, dtype=np.int64)] * n
        allow = allow or [None] * n
        if hidden is not None and self.model.code_decoder is not None:
            scores, items = beam_search(self.model.code_decoder, self.trie, hidden, self.beam_width, k, exclude, allow)
            return scores, items.clamp(min=0)  # -1 (nothing found) must not index from the end
        best_scores = torch.full((n, k), -torch.inf)
        best_items = torch.zeros((n, k), dtype=torch.int64)
        for b in range(n):
            if allow[b] is not None:
                best_scores[b], best_items[b] = self._top_k_allowed(hidden, b, k, exclude[b], allow[b])
        pending = [b for b in range(n) if allow[b] is None]
        if hidden is not None and pending:
            if self.index is not None:
                pending = self._top_k_index(hidden, k, exclude, pending, best_scores, best_items)
            pending = self._top_k_candidates(hidden, k, exclude, pending, best_scores, best_items)
        if pending:
            self._top_k_blocks(hidden, k, exclude, pending, best_scores, best_items)
        return best_scores, best_items

    def _top_k_index(self, hidden, k: int, exclude: list, pending: list[int], best_scores, best_items) -> list[int]:
        """The approximate index's neighbours, filtered and rescored exactly; returns the rows it
        could not answer (too few neighbours left after the filter)."""
        found = self.index.candidates(self.items._query(hidden[pending]), k, [exclude[b] for b in pending])
        answered = [(b, rows) for b, rows in zip(pending, found, strict=True) if rows is not None]
        if answered:
            self._rescore(hidden, k, answered, best_scores, best_items)
        return [b for b, rows in zip(pending, found, strict=True) if rows is None]

    def _top_k_candidates(
        self, hidden, k: int, exclude: list, pending: list[int], best_scores, best_items
    ) -> list[int]:
        """Exact top-k of an int8 table from the compiled kernel's candidates; returns the rows
        it leaves to the block path (non-finite queries, too many rows too close to call)."""
        if self.items.candidates is None:
            return pending
        finite = [b for b, ok in zip(pending, torch.isfinite(hidden[pending]).all(1).tolist(), strict=True) if ok]
        if not finite:
            return pending
        found = self.items.candidates.candidates(self.items._query(hidden[finite]), k, [exclude[b] for b in finite])
        answered = [(b, rows) for b, rows in zip(finite, found, strict=True) if rows is not None]
        if answered:
            self._rescore(hidden, k, answered, best_scores, best_items)
        done = {b for b, _ in answered}
        return [b for b in pending if b not in done]

    def _rescore(self, hidden, k: int, answered: list[tuple[int, np.ndarray]], best_scores, best_items) -> None:
        """The best k of each query's candidate rows by their exact scores."""
        width = max(k, max(len(rows) for _, rows in answered))
        rows = torch.zeros((len(answered), width), dtype=torch.int64)
        valid = torch.zeros((len(answered), width), dtype=torch.bool)
        for i, (_, found) in enumerate(answered):
            rows[i, : len(found)] = torch.from_numpy(found)
            valid[i, : len(found)] = True
        which = [b for b, _ in answered]
        scores = self.items.row_scores(self.model, hidden[which], rows).nan_to_num(nan=-torch.inf)
        scores[~valid] = -torch.inf
        top, order = scores.topk(k, dim=1)
        best_scores[which], best_items[which] = top, rows.gather(1, order)

    def _top_k_blocks(self, hidden, k: int, exclude: list, pending: list[int], best_scores, best_items) -> None:
        """Every row scored, a block at a time: popularity, tables without the kernel, and the rest."""
        rows = torch.tensor(pending)
        mask_rows = torch.from_numpy(np.concatenate([np.full(len(exclude[b]), i) for i, b in enumerate(pending)]))
        mask_items = torch.from_numpy(np.concatenate([exclude[b] for b in pending]).astype(np.int64))
        scores_open, items_open = best_scores[rows], best_items[rows]
        query = hidden[rows] if hidden is not None else None
        for start in range(0, self.items.rows, self.items.block_rows):
            stop = min(self.items.rows, start + self.items.block_rows)
            if query is None:
                block = self.vocab.popularity[start:stop].expand(len(pending), -1).clone()
            else:
                # A diverged model's NaN scores rank last (the metrics' rule), not first as topk ranks NaN.
                block = self.items.scores(self.model, query, start, stop).nan_to_num(nan=-torch.inf)
            if start < schema.FIRST_INDEX:
                block[:, : schema.FIRST_INDEX - start] = -torch.inf
            inside = (mask_items >= start) & (mask_items < stop)
            block[mask_rows[inside], mask_items[inside] - start] = -torch.inf
            top_scores, top_items = block.topk(min(k, stop - start), dim=1)
            if start == 0 and stop == self.items.rows and k <= stop:  # one block: nothing to merge
                scores_open, items_open = top_scores, top_items
                break
            merged_scores = torch.cat([scores_open, top_scores], dim=1)
            merged_items = torch.cat([items_open, top_items + start], dim=1)
            scores_open, order = merged_scores.topk(k, dim=1)
            items_open = merged_items.gather(1, order)
        best_scores[rows], best_items[rows] = scores_open, items_open

    def _top_k_allowed(self, hidden, b: int, k: int, exclude: np.ndarray, allow: np.ndarray):
        candidates = np.setdiff1d(allow[allow >= schema.FIRST_INDEX], exclude)
        scores = torch.full((k,), -torch.inf)
        items = torch.zeros(k, dtype=torch.int64)
        if not len(candidates):
            return scores, items
        candidates = torch.from_numpy(candidates)
        if hidden is None:
            values = self.vocab.popularity[candidates]
        else:
            values = self.model.scores(hidden[b : b + 1], self.items.lookup(candidates))[0]
        top, order = values.topk(min(k, len(candidates)))
        scores[: len(top)], items[: len(top)] = top, candidates[order]
        return scores, items

    def rank(
        self,
        histories: list[tuple],
        k: int,
        exclude: list[np.ndarray],
        allow: list[np.ndarray | None] | None = None,
        batch_size: int = ENCODE_BATCH,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``top_k`` for index histories ``(items, actions, gaps)`` (actions and gaps may be None):
        the model ranks the non-empty ones, encoded in batches of similar length; popularity ranks
        the empty ones."""
        allow = allow or [None] * len(histories)
        scores = torch.full((len(histories), k), -torch.inf)
        items = torch.zeros((len(histories), k), dtype=torch.int64)
        model_rows = sorted((b for b, h in enumerate(histories) if len(h[0])), key=lambda b: len(histories[b][0]))
        fallback_rows = [b for b, h in enumerate(histories) if not len(h[0])]
        for first in range(0, len(model_rows), batch_size):
            chunk = model_rows[first : first + batch_size]
            hidden = self.encode(*_pad([histories[b] for b in chunk], self.max_len))
            scores[chunk], items[chunk] = self.top_k(hidden, k, [exclude[b] for b in chunk], [allow[b] for b in chunk])
        if fallback_rows:
            rows = [exclude[b] for b in fallback_rows], [allow[b] for b in fallback_rows]
            scores[fallback_rows], items[fallback_rows] = self.top_k(None, k, *rows)
        return scores, items

    # -- raw IDs ---------------------------------------------------------------------------------

    def recommend(
        self,
        histories: list[list],
        k: int = 10,
        exclude_seen: bool = True,
        allow: list | None = None,
        deny: list | None = None,
        actions: list[list] | None = None,
        timestamps: list[list] | None = None,
    ) -> list[Recommendation]:
        """Top-``k`` raw item IDs for each history (raw item IDs, oldest first). ``actions`` and
        ``timestamps`` (seconds), when given, are per history and event. ``allow`` and ``deny`` are
        lists of raw IDs applied to every history, or one list per history."""
        n = len(histories)
        allow_rows, deny_rows = _per_history(allow, n, "allow"), _per_history(deny, n, "deny")
        queries = [
            Query(
                histories[b],
                k,
                exclude_seen,
                allow_rows[b],
                deny_rows[b],
                actions[b] if actions is not None else None,
                timestamps[b] if timestamps is not None else None,
            )
            for b in range(n)
        ]
        return self.answer(queries)

    def answer(self, queries: list[Query], sessions: SessionStore | None = None) -> list[Recommendation]:
        """Recommendations for ``queries``. A query naming a ``user`` and a ``seq`` extends that
        user's stored session in ``sessions`` with its new events and computes only those; its
        answer is a SessionMiss (and its session unchanged) when the store does not hold the events
        before ``seq``."""
        if not queries:
            return []
        users = [q.user for q in queries if q.seq is not None]
        if len(set(users)) != len(users):
            raise ValueError("a user with a seq appears more than once in one request")
        plans = [self._plan(q, sessions) for q in queries]
        # Misses are answered as such; the others go on (a client resends them: seq makes that a retry).
        answered = iter(self._answer([p for p in plans if not p.missing], sessions))
        return [SessionMiss({p.query.user: p.held}) if p.missing else next(answered) for p in plans]

    def _answer(self, plans: list[_Plan], sessions: SessionStore | None) -> list[Recommendation]:
        if not plans:
            return []
        hidden = self._hidden(plans)
        k = max(p.query.k for p in plans)
        exclude, allow = [], []
        for p in plans:
            seen = p.seen if p.query.exclude_seen else _NOTHING  # sorted and unique already
            exclude.append(seen if p.query.deny is None else np.union1d(seen, self.vocab.indices(p.query.deny)))
            allow.append(None if p.query.allow is None else self.vocab.indices(p.query.allow))
        scores = torch.full((len(plans), k), -torch.inf)
        items = torch.zeros((len(plans), k), dtype=torch.int64)

        def rank(rows: list[int], query: torch.Tensor | None) -> None:
            scores[rows], items[rows] = self.top_k(query, k, [exclude[b] for b in rows], [allow[b] for b in rows])

        model_rows = [b for b, h in enumerate(hidden) if h is not None]
        popularity_rows = [b for b, h in enumerate(hidden) if h is None]
        if model_rows:
            rank(model_rows, torch.stack([hidden[b] for b in model_rows]))
        if popularity_rows:
            rank(popularity_rows, None)
        results = []
        for b, p in enumerate(plans):
            found = items[b, : p.query.k][torch.isfinite(scores[b, : p.query.k])].numpy()
            results.append(
                Recommendation(
                    items=self.vocab.raw(found),
                    scores=scores[b][: len(found)].tolist(),
                    unknown_items=p.unknown,
                    truncated=p.known > self.max_len,
                    fallback=None if hidden[b] is not None else "popularity",
                    titles=None if self.vocab.titles is None else self.vocab.titles[found].tolist(),
                    events=p.events if p.query.seq is not None else None,
                )
            )
            if p.query.seq is not None:
                sessions.put(p.query.user, p.session(hidden[b]))
        return results

    def action_index(self, value) -> int:
        """Index of a raw action value (event type or rating); UNK when the artifact does not know it."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return self._actions.get(str(value), schema.UNK)

    def _plan(self, q: Query, sessions: SessionStore | None) -> _Plan:
        """What a query needs computed: its window from scratch, its stored session extended by its
        new events, or (a retry with nothing new) the stored hidden state as it is."""
        for name, values in (("actions", q.actions), ("timestamps", q.timestamps)):
            if values is not None and len(values) != len(q.history):
                raise ValueError(f"{name} has {len(values)} entries for a history of {len(q.history)} items")
        indices = self.vocab.indices(q.history)
        unknown = [q.history[i] for i in np.flatnonzero(indices < 0)]
        stored, skip = None, 0
        if q.seq is not None:
            if sessions is None:
                raise ValueError("a query with a seq needs a session store")
            stored = sessions.get(q.user)
            held = stored.events if stored is not None else 0
            if q.seq > held:
                return _Plan(q, missing=True, held=held)
            skip = min(held - q.seq, len(q.history))  # events of this request already applied: a retry
        new = slice(skip, len(q.history))
        timestamps = np.asarray(
            q.timestamps if q.timestamps is not None else np.full(len(q.history), np.nan), np.float64
        )
        gaps = np.zeros(len(q.history), dtype=np.int64)
        if self.uses_gaps and q.timestamps is not None:
            previous = timestamps[skip - 1] if skip else (stored.last_timestamp if stored is not None else np.nan)
            gaps[new] = schema.gap_buckets(np.diff(timestamps[new], prepend=previous))
            if np.isnan(previous) and skip < len(q.history):
                gaps[skip] = schema.UNK  # the stream's first event (or one after an untimed one) has no gap
        actions = np.zeros(len(q.history), dtype=np.int64)
        if self.uses_actions and q.actions is not None:
            actions[:] = [self.action_index(a) for a in q.actions]
        keep = skip + np.flatnonzero(indices[new] >= 0)
        plan = _Plan(q, unknown=unknown, held=0 if stored is None else stored.events)
        plan.new = (indices[keep], actions[keep], gaps[keep])
        base = stored if stored is not None else _EMPTY
        plan.items, plan.actions, plan.gaps = (
            np.concatenate([getattr(base, f), part])[-self.max_len :]
            for f, part in zip(("items", "actions", "gaps"), plan.new, strict=True)
        )
        plan.seen = np.union1d(base.seen, indices[keep])
        plan.known = base.known + len(keep)
        plan.events = max(base.events, (q.seq or 0) + len(q.history))
        plan.last_timestamp = timestamps[-1] if skip < len(q.history) else base.last_timestamp
        if stored is not None and not len(keep):
            plan.mode, plan.cache, plan.hidden = "current", stored.cache, stored.hidden
        elif stored is not None and stored.cache is not None and len(stored.items) + len(keep) <= self.max_len:
            plan.mode, plan.cache = "extend", stored.cache
        return plan

    def _hidden(self, plans: list[_Plan]) -> list[torch.Tensor | None]:
        """Each plan's hidden state after its last event (None: no known event, popularity)."""
        hidden: list = [p.hidden for p in plans]
        full = sorted(
            (b for b, p in enumerate(plans) if p.mode == "full" and len(p.items)), key=lambda b: len(plans[b].items)
        )
        for first in range(0, len(full), ENCODE_BATCH):
            chunk = full[first : first + ENCODE_BATCH]
            padded = _pad([(plans[b].items, plans[b].actions, plans[b].gaps) for b in chunk], self.max_len)
            stores = any(plans[b].query.seq is not None for b in chunk)
            out, caches = (
                self.encode(*padded, with_cache=True) if stores else (self.encode(*padded), [None] * len(chunk))
            )
            for row, b in enumerate(chunk):
                hidden[b], plans[b].cache = out[row], caches[row]
        for b, p in enumerate(plans):
            if p.mode == "extend":
                items, actions, gaps = (torch.from_numpy(a) for a in p.new)
                tokens = self.model.tokens(
                    self.items.lookup(items), actions if self.uses_actions else None, gaps if self.uses_gaps else None
                )
                hidden[b], p.cache = self.lean.extend(tokens, p.cache)
        return hidden


@dataclass
class Query:
    """One user's request: raw item IDs oldest first; with ``user`` and ``seq`` (the position of
    ``history[0]`` in the user's event stream), a stored session's new events."""

    history: list
    k: int = 10
    exclude_seen: bool = True
    allow: list | None = None
    deny: list | None = None
    actions: list | None = None
    timestamps: list | None = None
    user: object = None
    seq: int | None = None


@dataclass
class _Plan:
    query: Query
    missing: bool = False
    held: int = 0  # events the store held for the user
    unknown: list = field(default_factory=list)
    mode: str = "full"  # "full": encode the window; "extend": the cache by `new`; "current": as stored
    new: tuple = ()  # (items, actions, gaps) of the request's new known events
    items: np.ndarray | None = None  # the window after this request
    actions: np.ndarray | None = None
    gaps: np.ndarray | None = None
    seen: np.ndarray | None = None
    known: int = 0
    events: int = 0
    last_timestamp: float = np.nan
    cache: KVCache | None = None
    hidden: torch.Tensor | None = None

    def session(self, hidden: torch.Tensor | None) -> Session:
        return Session(
            self.items, self.actions, self.gaps, self.seen, self.events, self.known, self.last_timestamp,
            self.cache, hidden,
        )  # fmt: skip


_NOTHING = np.zeros(0, dtype=np.int64)
_EMPTY = Session(
    *(np.zeros(0, dtype=np.int64) for _ in range(4)), events=0, known=0, last_timestamp=np.nan, cache=None, hidden=None
)


def _per_history(values, n: int, name: str) -> list:
    if values is None:
        return [None] * n
    if len(values) and all(isinstance(v, (list, tuple, np.ndarray)) or v is None for v in values):
        if len(values) != n:
            raise ValueError(f"{name}: {len(values)} lists for {n} histories")
        return list(values)
    return [values] * n


def _pad(histories: list[tuple], max_len: int) -> tuple:
    """Right-padded (items, lengths, actions, gaps) tensors of index histories (items, actions,
    gaps), each cut to its newest ``max_len`` events."""
    lengths = torch.tensor([min(len(h[0]), max_len) for h in histories])
    width = int(lengths.max())

    def padded(field):
        if all(h[field] is None for h in histories):
            return None
        out = torch.zeros((len(histories), width), dtype=torch.int64)
        for b, h in enumerate(histories):
            if h[field] is not None:
                tail = np.asarray(h[field], dtype=np.int64)[-max_len:]
                out[b, : len(tail)] = torch.from_numpy(tail)
        return out

    return padded(0), lengths, padded(1), padded(2)
