"""Semantic IDs: every item as a short tuple of codes, so that similar items share prefixes.

An item's vector (its text vector from preparation, optionally joined with its row of a trained
model) is centred and quantised by residual k-means: level 1 picks the nearest of C centroids,
level 2 the nearest centroid to what level 1 left over, and so on for L levels, giving L codes in
[0, C). Items whose L codes collide get one more, last "dedup" code: their rank within the group
of items sharing the L codes, in item-index order (as TIGER does), so every full tuple is unique.

Why residual k-means and not an RQ-VAE: it is deterministic (same vectors and seed, same IDs),
has no training loop and no loss weights, learning rates or codebook-collapse remedies to tune,
and it scales to 10^8 items: each level's k-means is fitted on a seeded sample of at most
``sample_per_code * C`` vectors, and every item is then assigned in blocks by exact nearest-
centroid search. Nor does it seem to cost quality: Snap's GRID study of semantic-ID tokenizers
(Ju et al., 2025, arXiv:2507.22224) found residual k-means competitive with or better than
RQ-VAE on its benchmarks, and Kuaishou's OneRec tokenises its items with residual k-means.

Default depth (``default_levels``): the smallest L >= 2 with one level to spare beyond what
C^L needs to cover the catalog. With C = 256: 10^4 items -> 3 levels (TIGER's 3 x 256),
10^5, 10^6 and 10^7 -> 4, 10^8 -> 5 (up to 256^4 ~ 4.3e9 items).

Files: ``semantic_ids.safetensors`` beside items.parquet, and a ``semantic_ids`` entry in the
manifest. Preparing with ``--vocab-from`` shards that have semantic IDs carries them over: known
items keep their codes, new items are encoded by the same quantizer (``carry_semantic_ids``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from data.errors import DataError
from data.schema import FIRST_INDEX
from data.shards import MANIFEST, load_manifest, sha256_file, write_json_atomic
from data.text import TEXT_FILE, ItemTextFeatures
from data.vocab import ITEMS_FILE

SEMANTIC_FILE = "semantic_ids.safetensors"
METHOD = "residual k-means (faiss)"
KMEANS_ITERATIONS = 20


def default_levels(num_items: int, codes: int = 256) -> int:
    """k-means levels for ``num_items`` items: one more than C^k needs to reach the catalog, so
    the dedup level stays small (256 codes: <= 65,536 items -> 3, <= 16.7 M -> 4, <= 4.3e9 -> 5)."""
    _check_levels(1, codes)
    needed = 0
    # Integer powers, not logarithms: log(65536) / log(256) rounds up past 2.
    while codes**needed < num_items:
        needed += 1
    return max(2, needed + 1)


def _check_levels(levels: int, codes: int) -> None:
    if levels < 1 or codes < 2:
        raise DataError(f"semantic IDs need --levels >= 1 and --codes >= 2, got {levels} and {codes}")


def _nearest(index, block: np.ndarray) -> np.ndarray:
    return index.search(block, 1)[1][:, 0]


@dataclass
class ResidualQuantizer:
    centroids: list[np.ndarray]  # one (C, dim) float32 array per level
    mean: np.ndarray  # (dim,) float32, subtracted before the first level

    @classmethod
    def fit(
        cls, vectors: np.ndarray, levels: int, codes: int, seed: int, sample_per_code: int = 256
    ) -> ResidualQuantizer:
        """Residual k-means on a seeded sample of at most ``sample_per_code * codes`` rows.

        The thread count is left alone: FAISS sums each centroid in one thread in point order, and
        the distance products split rows, not the inner dimension, across threads, so the result
        is bitwise the same on 1 to 16 threads (checked; a test compares 1 and 2)."""
        import faiss

        vectors = np.asarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        _check_levels(levels, codes)
        if n < codes:
            raise DataError(f"{n:,} items cannot fill {codes} codes per level; use --codes of at most {n}")
        mean = vectors.mean(axis=0, dtype=np.float64).astype(np.float32)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, sample_per_code * codes), replace=False))
        residual = vectors[rows] - mean
        centroids = []
        for level in range(levels):
            # max_points_per_centroid at the sample's bound: FAISS must not subsample again.
            kmeans = faiss.Kmeans(
                dim,
                codes,
                niter=KMEANS_ITERATIONS,
                seed=seed + level,
                min_points_per_centroid=1,
                max_points_per_centroid=sample_per_code,
                verbose=False,
            )
            kmeans.train(residual)
            centroids.append(kmeans.centroids.copy())
            residual -= centroids[-1][_nearest(kmeans.index, residual)]
        return cls(centroids, mean)

    def encode(self, vectors: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """(N, L) int32: the nearest centroid of each level to the running residual."""
        import faiss

        indexes = []
        for centroids in self.centroids:
            indexes.append(faiss.IndexFlatL2(centroids.shape[1]))
            indexes[-1].add(centroids)
        out = np.empty((len(vectors), len(self.centroids)), dtype=np.int32)
        for start in range(0, len(vectors), block):
            residual = np.asarray(vectors[start : start + block], dtype=np.float32) - self.mean
            for level, (index, centroids) in enumerate(zip(indexes, self.centroids)):
                chosen = _nearest(index, residual)
                out[start : start + len(residual), level] = chosen
                residual -= centroids[chosen]
        return out


def _groups(prefix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, group, starts): rows sorted by prefix, stably (index order within a group); the
    group number of each sorted row; where each group starts in that order."""
    order = np.lexsort(prefix.T[::-1])
    ordered = prefix[order]
    first = np.ones(len(prefix), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    return order, np.cumsum(first) - 1, np.flatnonzero(first)


def dedup_suffixes(prefix_codes: np.ndarray, width: int) -> np.ndarray:
    """(N,) int32: each item's rank among the items with the same prefix, in index order."""
    prefix = np.asarray(prefix_codes)
    if len(prefix) == 0:
        return np.zeros(0, dtype=np.int32)
    order, group, starts = _groups(prefix)
    sizes = np.diff(np.append(starts, len(prefix)))
    largest = int(np.argmax(sizes))
    if sizes[largest] > width:
        codes = tuple(int(c) for c in prefix[order[starts[largest]]])
        raise DataError(
            f"{int(sizes[largest]):,} items share the semantic ID prefix {codes}, more than the {width} values of "
            "the dedup level; raise --levels or --codes"
        )
    suffix = np.empty(len(prefix), dtype=np.int32)
    suffix[order] = np.arange(len(prefix)) - starts[group]
    return suffix


def _collisions(codes: np.ndarray) -> dict:
    # Suffixes run 0..k-1 within each group, so the largest suffix gives the largest group.
    suffix = codes[codes[:, 0] >= 0, -1]
    return {"max_group": int(suffix.max()) + 1 if len(suffix) else 0, "items_with_suffix": int((suffix > 0).sum())}


@dataclass
class SemanticIds:
    codes: np.ndarray  # (V, L + 1) int32 by item index; padding and unknown rows are -1
    level_sizes: list[int]  # [C] * L + [dedup width]
    quantizer: ResidualQuantizer
    inputs: dict  # {"text": the text encoder's fingerprint, "model": {"path", "dim", "weight", ...} or None}

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {
            "codes": np.ascontiguousarray(self.codes, dtype=np.int32),
            "level_sizes": np.asarray(self.level_sizes, dtype=np.int64),
            "quantizer.mean": self.quantizer.mean,
        }
        tensors |= {f"quantizer.centroids.{level}": c for level, c in enumerate(self.quantizer.centroids)}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"inputs": json.dumps(self.inputs)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SemanticIds:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                stored = {name: f.get_tensor(name) for name in f.keys()}
                inputs = json.loads((f.metadata() or {})["inputs"])
            levels = len(stored["level_sizes"]) - 1
            quantizer = ResidualQuantizer(
                [stored[f"quantizer.centroids.{i}"] for i in range(levels)], stored["quantizer.mean"]
            )
            codes = stored["codes"]
        except (OSError, SafetensorError, KeyError, ValueError) as e:
            raise DataError(f"{path}: not a readable semantic ID file ({type(e).__name__}: {e})") from None
        if codes.ndim != 2 or codes.shape[1] != levels + 1:
            raise DataError(f"{path}: codes of shape {codes.shape}, expected {levels + 1} columns")
        return cls(codes, [int(s) for s in stored["level_sizes"]], quantizer, inputs)

    def assign(self, vectors: np.ndarray, first_index: int) -> np.ndarray:
        """(N, L + 1) codes for new items at indices first_index, first_index + 1, ...: the
        quantizer's codes, then the next free dedup suffix of their group after every item below
        first_index (and the new items before them)."""
        prefix = self.quantizer.encode(vectors)
        levels = prefix.shape[1]
        known = self.codes[:first_index]
        known = known[known[:, 0] >= 0]
        order, group, starts = _groups(np.concatenate([known[:, :levels], prefix]))
        is_new = order >= len(known)
        # The stable sort puts a group's known items first, then its new ones in index order.
        next_free = np.concatenate([known[:, -1].astype(np.int64) + 1, np.zeros(len(prefix), dtype=np.int64)])
        taken = np.maximum.reduceat(next_free[order], starts)
        new_before = np.cumsum(is_new) - is_new
        rank = new_before - new_before[starts][group]
        suffix = np.empty(len(prefix), dtype=np.int64)
        suffix[order[is_new] - len(known)] = (taken[group] + rank)[is_new]
        full = self.level_sizes[-1]
        if (over := np.flatnonzero(suffix >= full)).size:
            item = first_index + int(over[0])
            raise DataError(
                f"item {item}: semantic ID prefix {tuple(int(c) for c in prefix[over[0]])} has no dedup value left "
                f"(all {full} taken); re-run lmrec data semantic-ids with more --levels or --codes"
            )
        return np.concatenate([prefix, suffix[:, None].astype(np.int32)], axis=1)


def _model_part(model_vectors: np.ndarray, trained: np.ndarray, weight: float) -> np.ndarray:
    """The model's rows centred over the items with training events, unit length, times
    ``weight``; zero for every other item, which is what an item that arrives later with text
    only gets too."""
    vectors = np.asarray(model_vectors, dtype=np.float32)
    part = np.zeros_like(vectors)
    rows = vectors[trained] - vectors[trained].mean(axis=0, dtype=np.float64).astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    part[trained] = weight * rows / np.maximum(norms, 1e-12)
    return part


def _trained_items(shards: Path, size: int) -> np.ndarray:
    table = pl.read_parquet(shards / ITEMS_FILE, columns=["index", "count"])
    trained = np.zeros(size, dtype=bool)
    trained[table["index"].to_numpy()] = table["count"].to_numpy() > 0
    return trained


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_semantic_ids(
    shards: Path,
    levels: int | None = None,
    codes: int = 256,
    seed: int = 0,
    model_vectors: np.ndarray | None = None,
    model_info: dict | None = None,
    model_weight: float = 1.0,
    overwrite: bool = False,
) -> dict:
    """Fits and writes the shards' semantic IDs (``SEMANTIC_FILE`` and the manifest's entry,
    which is returned). ``model_vectors``: (V, D) item rows of a model trained on these shards."""
    shards = Path(shards)
    manifest = load_manifest(shards)
    if manifest.get("semantic_ids") and not overwrite:
        raise DataError(f"{shards}: already has semantic IDs ({SEMANTIC_FILE}); pass --overwrite to replace them")
    text = manifest.get("text")
    if not text:
        raise DataError(
            f"{shards}: prepared without --item-text; semantic IDs are built from item text vectors, "
            "so prepare the data with --item-text"
        )
    size = manifest["vocab"]["items"]
    vectors = ItemTextFeatures.load(shards / text["file"]).vectors
    if len(vectors) != size:
        raise DataError(f"{shards / text['file']}: {len(vectors):,} vectors for {size:,} item indices")
    model = None
    if model_vectors is not None:
        if model_vectors.ndim != 2 or len(model_vectors) != size:
            raise DataError(f"model item vectors of shape {model_vectors.shape}, expected ({size:,}, dim)")
        trained = _trained_items(shards, size)
        if not trained.any():
            raise DataError(f"{shards / ITEMS_FILE}: no item has training events (count > 0)")
        vectors = np.concatenate([vectors, _model_part(model_vectors, trained, model_weight)], axis=1)
        model = (model_info or {}) | {"dim": int(model_vectors.shape[1]), "weight": model_weight}
    real = vectors[FIRST_INDEX:]
    n = len(real)
    levels = default_levels(n, codes) if levels is None else levels
    _check_levels(levels, codes)
    if codes**levels <= n:
        raise DataError(
            f"--codes {codes} and --levels {levels} give {codes**levels:,} tuples for {n:,} items; raise either"
        )
    blank = int((~real.any(axis=1)).sum())
    if blank > codes:
        raise DataError(
            f"{shards}: {blank:,} items have neither text nor (with --from-model) training events, so nothing tells "
            f"them apart, and the dedup level has {codes} values"
        )
    quantizer = ResidualQuantizer.fit(real, levels, codes, seed)
    prefix = quantizer.encode(real)
    full = np.full((size, levels + 1), -1, dtype=np.int32)
    full[FIRST_INDEX:, :levels] = prefix
    full[FIRST_INDEX:, levels] = dedup_suffixes(prefix, codes)
    inputs = {"text": text["encoder"], "model": model}
    SemanticIds(full, [codes] * levels + [codes], quantizer, inputs).save(shards / SEMANTIC_FILE)
    entry = {
        "file": SEMANTIC_FILE,
        "method": METHOD,
        "levels": levels,
        "codes": codes,
        "level_sizes": [codes] * levels + [codes],
        "seed": seed,
        "inputs": inputs,
        "collisions": _collisions(full),
        "created": _now(),
    }
    manifest["semantic_ids"] = entry
    manifest["files"][SEMANTIC_FILE] = sha256_file(shards / SEMANTIC_FILE)
    write_json_atomic(shards / MANIFEST, manifest)
    return entry


def load_semantic_ids(shards: Path) -> SemanticIds | None:
    """The shards' semantic IDs, or None when they have none."""
    shards = Path(shards)
    manifest = load_manifest(shards)
    entry = manifest.get("semantic_ids")
    if not entry:
        return None
    path = shards / entry["file"]
    ids = SemanticIds.load(path)
    if len(ids.codes) != manifest["vocab"]["items"]:
        raise DataError(
            f"{path}: codes for {len(ids.codes):,} items, the manifest's vocabulary has {manifest['vocab']['items']:,}; "
            "run lmrec data semantic-ids --overwrite"
        )
    return ids


def carry_semantic_ids(previous: Path, out: Path, size: int, text: dict | None) -> dict | None:
    """For preparation with --vocab-from ``previous``: when it has semantic IDs, writes ``out``'s
    (vocabulary of ``size`` indices; ``text``: the new manifest's text entry, its vectors already
    in ``out``) and returns the manifest entry. Known items keep their codes; new items get theirs
    from the same quantizer and their text, with a zero model part (they have no trained row)."""
    previous = Path(previous)
    if not (previous / MANIFEST).exists():
        return None
    old = load_semantic_ids(previous)
    if old is None:
        return None
    first = len(old.codes)
    codes = np.full((size, old.codes.shape[1]), -1, dtype=np.int32)
    codes[:first] = old.codes
    if size > first:
        if text is None:
            raise DataError(
                f"--vocab-from {previous} has semantic IDs; giving the {size - first:,} new items theirs needs their "
                "text vectors: prepare with --item-text"
            )
        if text["encoder"]["fingerprint"] != old.inputs["text"]["fingerprint"]:
            raise DataError(
                f"--vocab-from {previous}: its semantic IDs were built from another text encoder "
                f"({old.inputs['text']['name']}, {old.inputs['text']['fingerprint']}) than this data's "
                f"({text['encoder']['name']}, {text['encoder']['fingerprint']})"
            )
        from safetensors import safe_open

        with safe_open(str(out / TEXT_FILE), framework="numpy") as f:
            vectors = f.get_slice("vectors")[first:size]
        model_dim = (old.inputs["model"] or {}).get("dim", 0)
        vectors = np.concatenate([vectors, np.zeros((len(vectors), model_dim), dtype=np.float32)], axis=1)
        codes[first:] = old.assign(vectors, first)
    SemanticIds(codes, old.level_sizes, old.quantizer, old.inputs).save(out / SEMANTIC_FILE)
    entry = load_manifest(previous)["semantic_ids"]
    return entry | {
        "collisions": _collisions(codes),
        "created": _now(),
        "carried_from": {"path": str(previous), "items": first, "new_items": size - first},
    }
