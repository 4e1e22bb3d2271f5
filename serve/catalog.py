"""Items added to an artifact from their text alone: ``lmrec export ARTIFACT --add-items FILE``.

A text-aware model places any item by its text: the new item's vector is the projection of its
sentence-encoder vector plus its pooled text-token embeddings, with no ID part (it has no
training events), exactly as training and evaluation treat an item without training events. A
model with semantic IDs gives the new item its codes from the artifact's own quantizer and the
item's text vector (with a zero model part where the quantizer also read a model's rows: the
new item has none), as ``lmrec data prepare --vocab-from`` gives a new item in the shards; its
vector is then its pooled code rows (plus its text parts where the model has them), and the
code trie is rebuilt with it, so that beam search can return it. The existing rows, dense
weights, text table and codes are copied unchanged, so the old items score as before; the
result is a new artifact, verified and published atomically, that ``lmrec serve`` loads or
reloads like any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.text import TEXT_COLUMNS, YEAR_COLUMNS, HashedTokenizer, SentenceEncoder, TextVectorCache, item_text
from model.items import ID_TABLE, SEMANTIC_TABLE, TOKEN_TABLE, ItemCatalog, PlainItemTables
from serve import artifact
from serve.artifact import ArtifactError, ArtifactWriter
from serve.recommender import Recommender

ID_COLUMNS = ("item", "item_id", "raw_id")
BLOCK_ROWS = 1 << 16


def read_new_items(path: Path) -> tuple[list, list[str], list[str]]:
    """(raw IDs, texts, titles) from a Parquet, CSV or JSON-lines file with an ``item`` (or
    ``item_id`` / ``raw_id``) column and text columns (title, genres, description)."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"--add-items {path}: no such file")
    readers = {".parquet": pq.read_table, ".csv": pyarrow.csv.read_csv, ".jsonl": pyarrow.json.read_json}
    if path.suffix not in readers:
        raise ArtifactError(f"--add-items {path}: expected .parquet, .csv or .jsonl")
    try:
        table = readers[path.suffix](path)
    except Exception as e:  # pyarrow raises several types for malformed files
        raise ArtifactError(f"--add-items {path}: cannot be read ({e})") from None
    id_column = next((c for c in ID_COLUMNS if c in table.column_names), None)
    text_columns = [c for c in TEXT_COLUMNS if c in table.column_names]
    if id_column is None or not text_columns:
        raise ArtifactError(
            f"--add-items {path}: needs an item ID column ({' or '.join(ID_COLUMNS)}) and text "
            f"({', '.join(TEXT_COLUMNS)}); it has {table.column_names}"
        )
    years = [c for c in YEAR_COLUMNS if c in table.column_names]
    rows = table.select([id_column, *text_columns, *years]).to_pylist()
    ids, texts = [], []
    for line, row in enumerate(rows, start=1):
        if row[id_column] is None:
            raise ArtifactError(f"--add-items {path}: row {line} has no {id_column}")
        text = item_text(row)
        if not text:
            raise ArtifactError(f"--add-items {path}: row {line} (item {row[id_column]!r}) has no text")
        ids.append(row[id_column])
        texts.append(text)
    if not ids:
        raise ArtifactError(f"--add-items {path}: no items")
    titles = [str(row.get("title") or "") for row in rows]
    return ids, texts, titles


def _check_encoder(rec: Recommender, encoder: SentenceEncoder, spec: dict, what: str) -> None:
    if encoder.fingerprint != spec["fingerprint"]:
        raise ArtifactError(
            f"{rec.path}: {what} text encoder {spec.get('name')} ({spec['fingerprint']}), the installed "
            f"one is {encoder.name} ({encoder.fingerprint})"
        )


def new_item_codes(rec: Recommender, text_vectors: np.ndarray, items_file: Path) -> np.ndarray:
    """Every item's codes (V + N, L): the artifact's, then the new items' from its quantizer."""
    from data.errors import DataError
    from data.semantic_ids import ResidualQuantizer, SemanticIds

    stored, entry = rec.semantic, rec.config["semantic_ids"]
    model_dim = (entry["inputs"].get("model") or {}).get("dim", 0)
    # The new items have no trained row: their model part is zero, as the quantizer expects.
    vectors = np.concatenate([text_vectors, np.zeros((len(text_vectors), model_dim), dtype=np.float32)], axis=1)
    codes = np.asarray(stored.codes)
    ids = SemanticIds(codes, entry["level_sizes"], ResidualQuantizer(stored.centroids, stored.mean), entry["inputs"])
    try:
        new = ids.assign(vectors, len(codes))
    except DataError as e:
        raise ArtifactError(f"--add-items {items_file}: {e}") from None
    return np.concatenate([codes, new])


@torch.no_grad()
def new_item_vectors(
    rec: Recommender, texts: list[str], items_file: Path, token_table: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(vectors, every item's codes or None) of items known by their text alone, in the
    artifact's model: no ID part (no training events), their text parts and pooled code rows."""
    model, n = rec.model, len(texts)
    encoder = SentenceEncoder()
    if model.cfg.uses_text:
        _check_encoder(rec, encoder, rec.config["text"]["encoder"], "the model was trained with")
    if rec.semantic is not None:
        _check_encoder(rec, encoder, rec.config["semantic_ids"]["inputs"]["text"], "its semantic IDs were built with")
    text_vectors, _ = TextVectorCache().vectors(encoder, texts)
    codes = None if rec.semantic is None else new_item_codes(rec, text_vectors, items_file)
    tables, offsets, tokens = {ID_TABLE: torch.zeros(n, model.cfg.hidden_size)}, None, None
    if token_table is not None:
        offsets, tokens = map(
            torch.from_numpy, HashedTokenizer.from_dict(rec.config["text"]["tokenizer"]).encode_many(texts)
        )
        tables[TOKEN_TABLE] = torch.from_numpy(token_table)
    if model.cfg.item_semantic_ids:
        tables[SEMANTIC_TABLE] = torch.from_numpy(np.asarray(rec.semantic.code_table))
    catalog = ItemCatalog(
        torch.zeros(n, dtype=torch.float64),
        torch.from_numpy(text_vectors),
        offsets,
        tokens,
        None if codes is None else torch.from_numpy(codes[-n:]),
    )
    return model.item_encoder(torch.arange(n), PlainItemTables(tables), catalog).numpy(), codes


def add_items(source: Path, items_file: Path, out: Path, overwrite: bool = False, log=print) -> Path:
    import pyarrow as pa

    source, out = Path(source), Path(out)
    rec = Recommender.load(source, search="exact")  # its index, if any, is extended below, not searched
    if not (rec.model.cfg.uses_text or rec.semantic is not None):
        raise ArtifactError(
            f"{source}: an ID-only model cannot place an item it was not trained on; train with model.item_text, "
            "model.item_text_tokens or semantic IDs to add items from text"
        )
    ids, texts, titles = read_new_items(items_file)
    known = rec.vocab.indices(ids)
    if (known >= 0).any():
        repeated = [ids[i] for i in np.flatnonzero(known >= 0)[:5]]
        raise ArtifactError(f"--add-items {items_file}: items already in {source}: {repeated}")
    if len(set(map(str, ids))) != len(ids):
        raise ArtifactError(f"--add-items {items_file}: an item ID appears more than once")
    vectors, codes = new_item_vectors(rec, texts, items_file, artifact.read_text_tokens(source))
    _, config, _, stored, vocab = artifact.read(source, check=False)
    old_rows, dim = config["items"]["rows"], config["items"]["dim"]
    rows = old_rows + len(ids)
    kept = {k: v for k, v in config.items() if k not in ("format", "format_version", "quant", "items")}
    kept["vocab"] = {**config["vocab"], "items": rows}
    raw_type = vocab.schema.field("raw_id").type
    try:
        new_vocab = pa.table(
            {
                "index": pa.array(np.arange(old_rows, rows), vocab.schema.field("index").type),
                "raw_id": pa.array([int(i) if pa.types.is_integer(raw_type) else str(i) for i in ids], raw_type),
                "count": pa.array(np.zeros(len(ids)), vocab.schema.field("count").type),
            }
            | ({"title": pa.array(titles, vocab.schema.field("title").type)} if "title" in vocab.column_names else {})
        )
    except (ValueError, pa.ArrowInvalid) as e:
        raise ArtifactError(
            f"--add-items {items_file}: item IDs do not match the artifact's ({raw_type}): {e}"
        ) from None
    with ArtifactWriter(out, config["quant"], kept, rows, dim, overwrite=overwrite) as writer:
        for name in (artifact.MODEL, artifact.TEXT):
            if (source / name).exists():
                writer.copy_file(source / name)
        for start in range(0, old_rows, BLOCK_ROWS):
            writer.write_item_codes(start, {k: v[start : start + BLOCK_ROWS] for k, v in stored.items()})
        writer.write_items(old_rows, vectors)
        if codes is not None:
            writer.write_semantic_ids(
                codes, config["semantic_ids"]["level_sizes"], rec.semantic, rec.semantic.code_table
            )
        writer.write_vocab(pa.concat_tables([vocab.select(new_vocab.column_names), new_vocab]))
        writer.manifest["source"] = {**(rec.manifest.get("source") or {}), "added_to": str(source)}
        writer.manifest["metrics"] = rec.manifest.get("metrics")
        writer.manifest["added_items"] = {"file": str(items_file), "items": len(ids)}
        if "index" in config:
            # The new rows go into the source's index as stored (quantized), like every other row.
            from serve import index as item_index

            staged = writer.seal()
            table = Recommender.load(staged, verify=False, search="exact").items
            writer.config["index"] = item_index.extend(source, table, old_rows, staged, config["index"])
            del table
            writer.seal()
    log(f"added {len(ids):,} items from text to {source} as {out} ({rows:,} rows)")
    return out
