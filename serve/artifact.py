"""The serving artifact: what ``lmrec export`` writes and ``Recommender.load`` reads. serve/ owns
the format, its writer and its reader; training imports the writer.

An artifact is a directory:

- ``config.json``: format and version, the model config, vocabulary sizes, the action vocabulary
  (raw value -> index), the input features and the quantization.
- ``model.safetensors``: dense weights. In int8 and int4 artifacts every 2-D weight (linear
  layers, the small action and gap tables) is int8 per output row, its fp32 scale beside it as
  ``<name>.scale``; 1-D tensors (norms, biases) stay fp32. fp16 stores everything in fp16.
- ``items.safetensors``: the item table. ``items`` holds int8 codes (int8), two 4-bit codes per
  byte (int4), fp16 or fp32 rows; quantized tables add ``items.scale`` and ``items.offset``
  (row-wise, see serve.quant).
- ``vocab.parquet``: index, raw_id, count (training events: the popularity fallback) and the
  item's title where the data had one.
- ``text.safetensors`` (text-aware models only): the text-token table, quantized like the dense
  weights. With the projection in ``model.safetensors`` and the encoder and tokenizer named in
  ``config.json`` (``text``), it is what builds the vector of an item added from text alone.
- ``semantic_ids.safetensors`` (models with semantic IDs only, data.semantic_ids): ``codes``,
  every item's code tuple (V, L) int32, -1 rows for padding and unknown; the prefix trie of those
  tuples that beam search walks (``trie.*``, model.semantic.CodeTrie.tensors), stored so that
  loading checks it against the codes instead of sorting 10^8 tuples; the residual quantizer
  (``quantizer.mean``, ``quantizer.centroids.<level>``), so that an item added later gets its codes
  the way the catalog's items got theirs; and for ``item_semantic_ids`` models ``code_table``, the
  learned code rows (fp32: L x C rows are few), from which an added item's vector is pooled.
  ``config.json`` has ``semantic_ids``: the level sizes, the default beam width (the training
  evaluation's), and the quantizer's inputs (text encoder fingerprint, model part or None).
- ``index.faiss`` (artifacts exported with ``--index`` only): an approximate nearest-neighbour
  index of the stored rows (serve.index); ``config.json`` names it and its parameters (``index``).
- ``manifest.json``: format version, size and sha256 of every other file, the source checkpoint,
  and the evaluation metrics measured on this artifact at export time.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.schema import FIRST_INDEX
from data.shards import atomic_output_dir, sha256_file, write_json_atomic
from serve import quant
from serve.tensorfile import BlockWriter, map_tensors

FORMAT = "lmrec-artifact"
FORMAT_VERSION = 1
CONFIG = "config.json"
MODEL = "model.safetensors"
ITEMS = "items.safetensors"
VOCAB = "vocab.parquet"
TEXT = "text.safetensors"
SEMANTIC = "semantic_ids.safetensors"
MANIFEST = "manifest.json"
QUANTS = ("int8", "int4", "fp16", "fp32")
SCALE, OFFSET = ".scale", ".offset"


class ArtifactError(ValueError):
    """An artifact that is missing, altered, or of another format version."""


@dataclass
class SemanticIdTables:
    """The contents of ``semantic_ids.safetensors``, as numpy arrays."""

    codes: np.ndarray  # (V, L) int32 by item index, -1 rows for items without codes
    trie: dict[str, np.ndarray]  # model.semantic.CodeTrie.tensors() of ``codes``
    mean: np.ndarray  # the residual quantizer's (dim,) centre
    centroids: list[np.ndarray]  # its (C, dim) centroids, one array per k-means level
    code_table: np.ndarray | None = None  # (sum of level sizes, D) fp32, for item_semantic_ids models


def item_tensors(quant: str, rows: int, dim: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    if quant == "fp32":
        return {"items": (np.float32, (rows, dim))}
    if quant == "fp16":
        return {"items": (np.float16, (rows, dim))}
    width = dim if quant == "int8" else (dim + 1) // 2
    return {
        "items": (np.int8 if quant == "int8" else np.uint8, (rows, width)),
        "items" + SCALE: (np.float32, (rows,)),
        "items" + OFFSET: (np.float32, (rows,)),
    }


def dequantize_dense(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        if name.endswith(SCALE):
            continue
        if name + SCALE in tensors:
            out[name] = quant.dequantize_channels_int8(value, tensors[name + SCALE])
        else:
            out[name] = np.asarray(value, dtype=np.float32)
    return out


class ArtifactWriter:
    """Writes an artifact into a temporary directory that replaces ``out`` only when the ``with``
    block succeeds. The item table is written a row block at a time (``write_items``), so a table
    larger than memory exports in bounded memory. ``seal()`` writes the manifest early so that the
    unfinished artifact can be loaded and evaluated before it is published."""

    def __init__(self, out: Path, quant_name: str, config: dict, num_items: int, dim: int, overwrite: bool = False):
        if quant_name not in QUANTS:
            raise ArtifactError(f"quantization must be one of {QUANTS}, got {quant_name!r}")
        self.out, self.quant, self.num_items, self.dim = Path(out), quant_name, num_items, dim
        self.config = {"format": FORMAT, "format_version": FORMAT_VERSION, "quant": quant_name, **config}
        self.config["items"] = {"rows": num_items, "dim": dim}
        self.manifest: dict = {"format": FORMAT, "format_version": FORMAT_VERSION, "quant": quant_name}
        self._stack = contextlib.ExitStack()
        self.dir = self._stack.enter_context(atomic_output_dir(self.out, overwrite))
        self._items = BlockWriter(self.dir / ITEMS, item_tensors(quant_name, num_items, dim), {"quant": quant_name})

    def write_dense(self, state: dict[str, np.ndarray]) -> None:
        self._write_weights(MODEL, state)

    def write_text_tokens(self, table: np.ndarray) -> None:
        self._write_weights(TEXT, {"text_tokens": table})

    def write_semantic_ids(
        self, codes: np.ndarray, level_sizes: list[int], quantizer, code_table: np.ndarray | None = None
    ) -> None:
        """The items' codes (V, L), their trie (built here, so it always matches them), the
        quantizer (``mean`` and ``centroids``, data.semantic_ids.ResidualQuantizer) and the code
        table of an item_semantic_ids model."""
        import torch
        from safetensors.numpy import save_file

        from model.semantic import CodeTrie, TrieError

        codes = np.ascontiguousarray(codes, dtype=np.int32)
        if codes.shape != (self.num_items, len(level_sizes)):
            raise ArtifactError(
                f"semantic IDs of shape {codes.shape}, expected ({self.num_items}, {len(level_sizes)}) for the item table"
            )
        try:
            trie = CodeTrie.build(torch.from_numpy(codes), level_sizes)
        except TrieError as e:
            raise ArtifactError(f"semantic IDs: {e}") from None
        tensors = {"codes": codes, "quantizer.mean": np.ascontiguousarray(quantizer.mean, dtype=np.float32)}
        tensors |= {k: v.numpy() for k, v in trie.tensors().items()}
        for level, centroids in enumerate(quantizer.centroids):
            tensors[f"quantizer.centroids.{level}"] = np.ascontiguousarray(centroids, dtype=np.float32)
        if code_table is not None:
            tensors["code_table"] = np.ascontiguousarray(code_table, dtype=np.float32)
        save_file(tensors, str(self.dir / SEMANTIC))

    def copy_file(self, source: Path) -> None:
        """A file of another artifact, unchanged (the dense weights when only items are added)."""
        import shutil

        shutil.copyfile(source, self.dir / Path(source).name)

    def write_item_codes(self, start: int, tensors: dict[str, np.ndarray]) -> None:
        """Rows of the stored item tensors (codes, scales, offsets) as they are, not re-quantized."""
        for name, block in tensors.items():
            self._items.write(name, start, np.asarray(block))

    def _write_weights(self, file: str, state: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for name, value in state.items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            if self.quant == "fp16":
                tensors[name] = value.astype(np.float16)
            elif self.quant in ("int8", "int4") and value.ndim == 2:
                tensors[name], tensors[name + SCALE] = quant.quantize_channels_int8(value)
            else:
                tensors[name] = value
        save_file(tensors, str(self.dir / file), metadata={"quant": self.quant})

    def write_items(self, start: int, block: np.ndarray) -> None:
        """fp32 rows [start, start + len(block)) of the item table."""
        block = np.asarray(block, dtype=np.float32)
        if self.quant == "fp32":
            self._items.write("items", start, block)
            return
        if self.quant == "fp16":
            self._items.write("items", start, block.astype(np.float16))
            return
        rows = quant.quantize_rows_int8 if self.quant == "int8" else quant.quantize_rows_int4
        codes, scale, offset = rows(block)
        self._items.write("items", start, codes)
        self._items.write("items" + SCALE, start, scale)
        self._items.write("items" + OFFSET, start, offset)

    def write_vocab(self, batches) -> None:
        """The item vocabulary: a pyarrow table or record batches with index, raw_id, count and
        optionally title, streamed so that a catalog of any size fits."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if isinstance(batches, pa.Table):
            batches = batches.to_batches()
        writer = None
        try:
            for batch in batches:
                missing = {"index", "raw_id", "count"} - set(batch.schema.names)
                if missing:
                    raise ArtifactError(f"the item vocabulary lacks the columns {sorted(missing)}")
                batch = batch.select([c for c in ("index", "raw_id", "count", "title") if c in batch.schema.names])
                index = batch.column("index").to_numpy()
                if len(index) and (index.min() < FIRST_INDEX or index.max() >= self.num_items):
                    raise ArtifactError(
                        f"the item vocabulary has indices outside [{FIRST_INDEX}, {self.num_items}) of the item table"
                    )
                writer = writer or pq.ParquetWriter(self.dir / VOCAB, batch.schema)
                writer.write_batch(batch)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ArtifactError("the item vocabulary is empty")

    def seal(self) -> Path:
        """Closes the data files and writes config and manifest; returns the temporary directory.
        Sealing again after adding a file (the item index) lists it too."""
        if self._items is not None:
            self._items.close()
            self._items = None
        write_json_atomic(self.dir / CONFIG, self.config)
        files = sorted(p.name for p in self.dir.iterdir() if p.name != MANIFEST and not p.name.startswith("."))
        for required in (CONFIG, MODEL, ITEMS, VOCAB) + ((SEMANTIC,) if self.config.get("semantic_ids") else ()):
            if required not in files:
                raise ArtifactError(f"{self.out}: {required} was never written")
        self.manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.manifest["files"] = {
            name: {"bytes": (self.dir / name).stat().st_size, "sha256": sha256_file(self.dir / name)} for name in files
        }
        write_json_atomic(self.dir / MANIFEST, self.manifest)
        return self.dir

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                if self._items is not None:
                    self.seal()
                else:
                    write_json_atomic(self.dir / MANIFEST, self.manifest)
            elif self._items is not None:
                self._items.__exit__(kind, value, traceback)
        finally:
            self._stack.__exit__(kind, value, traceback)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ArtifactError(f"{path}: missing; {path.parent} is not a complete lmrec artifact")
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return value


def verify(path: Path) -> dict:
    """The manifest, after checking format, version and every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path / MANIFEST}: not an lmrec artifact (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path / MANIFEST}: artifact format version {manifest.get('format_version')}, this lmrec reads "
            f"version {FORMAT_VERSION}; export the checkpoint again with this version"
        )
    files = manifest.get("files") or {}
    for required in (CONFIG, MODEL, ITEMS, VOCAB):
        if required not in files:
            raise ArtifactError(f"{path / MANIFEST}: lists no {required}")
    for name, expected in files.items():
        file = path / name
        if not file.exists():
            raise ArtifactError(f"{file}: missing")
        if file.stat().st_size != expected["bytes"]:
            raise ArtifactError(f"{file}: {file.stat().st_size} bytes, the manifest says {expected['bytes']}")
        if sha256_file(file) != expected["sha256"]:
            raise ArtifactError(f"{file}: checksum mismatch; the file was altered or damaged after export")
    return manifest


def read(path: Path, check: bool = True) -> tuple[dict, dict, dict[str, np.ndarray], dict[str, np.ndarray], object]:
    """(manifest, config, dense fp32 weights, memory-mapped item tensors, vocabulary table)."""
    import pyarrow.parquet as pq

    path = Path(path)
    manifest = verify(path) if check else _read_json(path / MANIFEST)
    config = _read_json(path / CONFIG)
    if config.get("quant") not in QUANTS or "model" not in config or "items" not in config:
        raise ArtifactError(f"{path / CONFIG}: missing or invalid 'quant', 'model' or 'items'")
    index = config.get("index")
    if index is not None and check and index.get("file") not in manifest.get("files", {}):
        raise ArtifactError(f"{path / MANIFEST}: lists no {index.get('file')}, the item index {CONFIG} names")
    if config.get("semantic_ids") is not None and check and SEMANTIC not in manifest.get("files", {}):
        raise ArtifactError(f"{path / MANIFEST}: lists no {SEMANTIC}, the semantic IDs {CONFIG} names")
    try:
        dense = dequantize_dense(map_tensors(path / MODEL))
        items = map_tensors(path / ITEMS)
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    expected = item_tensors(config["quant"], config["items"]["rows"], config["items"]["dim"])
    for name, (dtype, shape) in expected.items():
        if name not in items or items[name].dtype != np.dtype(dtype) or items[name].shape != shape:
            raise ArtifactError(f"{path / ITEMS}: tensor {name!r} should be {np.dtype(dtype)} {shape}")
    try:
        vocab = pq.read_table(path / VOCAB)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ArtifactError(f"{path / VOCAB}: cannot be read ({e})") from None
    return manifest, config, dense, items, vocab


def read_text_tokens(path: Path) -> np.ndarray | None:
    """The text-token table (fp32) of a text-aware artifact; None for an ID-only one."""
    path = Path(path)
    if not (path / TEXT).exists():
        return None
    try:
        return dequantize_dense(map_tensors(path / TEXT))["text_tokens"]
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{path / TEXT}: cannot be read ({e})") from None


def read_semantic_ids(path: Path, config: dict) -> SemanticIdTables | None:
    """The semantic IDs of an artifact whose ``config`` names them (memory-mapped); None otherwise.
    Shapes are checked here; whether the trie matches the codes, by the loader."""
    path = Path(path)
    entry = config.get("semantic_ids")
    if entry is None:
        return None
    file = path / SEMANTIC
    if not file.exists():
        raise ArtifactError(f"{file}: missing; {CONFIG} names semantic IDs")
    try:
        tensors = map_tensors(file)
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    level_sizes = entry.get("level_sizes") or []
    codes = tensors.get("codes")
    if codes is None or codes.ndim != 2 or codes.dtype != np.int32 or codes.shape[1] != len(level_sizes):
        raise ArtifactError(
            f"{file}: 'codes' should be int32 (items, {len(level_sizes)}), the levels {CONFIG} names, "
            f"got {None if codes is None else (codes.dtype, codes.shape)}"
        )
    levels = sum(1 for name in tensors if name.startswith("quantizer.centroids."))
    try:
        centroids = [tensors[f"quantizer.centroids.{level}"] for level in range(levels)]
        mean = tensors["quantizer.mean"]
    except KeyError as e:
        raise ArtifactError(f"{file}: no tensor {e}") from None
    trie = {name: value for name, value in tensors.items() if name.startswith("trie.")}
    return SemanticIdTables(codes, trie, mean, centroids, tensors.get("code_table"))
