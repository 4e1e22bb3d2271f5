"""``lmrec export``: a training checkpoint (or a consolidated model) into a serving artifact.

The item table is streamed a row block at a time from the checkpoint's sparse blocks (or the
consolidated file) through serve's writer, so memory stays at a block whatever the table's size.
When the shards the model was trained on are at hand, the artifact is evaluated on their test
split through the serving code itself before it is published, and the metrics go into its
manifest: what is served is what was measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve.artifact import ArtifactError, ArtifactWriter
from train.checkpoint import (
    BLOCK_ROWS,
    DENSE,
    CheckpointError,
    _load_safetensors,
    checkpoint_items,
    list_checkpoints,
    resolve,
    verify,
)
from train.evaluate import SAVED_DENSE, SAVED_ITEMS, SAVED_META


class ExportError(ValueError):
    pass


def _source(path: Path, shards: Path | None):
    """(meta, dense fp32 numpy state, rows(start, stop) -> fp32 numpy, text-token table or None,
    description, valid NDCG@10)."""
    if path.name == "latest" and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / DENSE).exists() and list_checkpoints(path):
        path = resolve(str(path), path)[0]  # a checkpoint directory: its newest good checkpoint
    if (path / DENSE).exists():
        meta = verify(path)
        dense = {k: v.float().numpy() for k, v in _load_safetensors(path / DENSE, prefix="weight/").items()}
        step, valid = meta["progress"]["step"], meta["progress"]["best_ndcg"]
        rows_of, tokens = checkpoint_items(path, meta, shards)
        return (
            meta,
            dense,
            lambda a, b: rows_of(a, b).numpy(),
            None if tokens is None else tokens.numpy(),
            {"checkpoint": str(path), "step": step},
            valid,
        )
    if (path / SAVED_ITEMS).exists() and (path / SAVED_META).exists():
        import json

        from serve.tensorfile import read_rows

        meta = json.loads((path / SAVED_META).read_text())
        dense = {k: v.float().numpy() for k, v in _load_safetensors(path / SAVED_DENSE).items()}
        source = {"model": str(path), "step": meta.get("step")}
        rows = lambda a, b: read_rows(path / SAVED_ITEMS, "items", a, b).astype(np.float32)  # noqa: E731
        tokens = None
        if meta["config"]["model"].get("item_text_tokens"):
            tokens = _load_safetensors(path / SAVED_ITEMS)["text_tokens"].float().numpy()
        return meta, dense, rows, tokens, source, meta.get("best_valid_ndcg10")
    raise ExportError(
        f"{path}: neither a training checkpoint (no {DENSE}) nor a consolidated model (no {SAVED_ITEMS} and "
        f"{SAVED_META}); pass a checkpoint directory such as RUN/checkpoints/step_000000120"
    )


def _vocabulary(shards: Path, rows: int):
    """Item vocabulary batches (index, raw_id, count, title) and the action vocabulary."""
    import pyarrow.parquet as pq

    from data.vocab import ACTIONS_FILE, ITEMS_FILE

    path = shards / ITEMS_FILE
    if not path.exists():
        raise ExportError(
            f"{path}: missing; the export needs the item vocabulary of the shards the model was trained on "
            "(pass --shards DIR)"
        )
    items = pq.ParquetFile(path)
    columns = [c for c in ("index", "raw_id", "count", "title") if c in items.schema_arrow.names]
    if items.metadata.num_rows > rows:
        raise ExportError(f"{path}: {items.metadata.num_rows} items, the model's table has {rows} rows")
    actions = []
    if (shards / ACTIONS_FILE).exists():
        actions = [[str(r["value"]), int(r["index"])] for r in pq.read_table(shards / ACTIONS_FILE).to_pylist()]
    return (lambda: _row_groups(items, columns)), actions


def _row_groups(items, columns: list[str]):
    # Row group by row group: ParquetFile.iter_batches keeps its decode buffers until the file
    # object goes away (about 10 MB per million rows), which a 10^8-item catalog cannot afford.
    for group in range(items.num_row_groups):
        yield from items.read_row_group(group, columns=columns).to_batches(max_chunksize=1 << 20)


def export(
    source: Path,
    out: Path,
    quant: str = "int8",
    shards: Path | None = None,
    evaluate: bool = True,
    overwrite: bool = False,
    block_rows: int = BLOCK_ROWS,
    log=print,
) -> Path:
    source, out = Path(source), Path(out)
    try:
        meta, dense, rows_of, tokens, origin, valid_ndcg = _source(source, shards)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    config = meta["config"]
    model_cfg = config["model"]
    rows, dim = meta["vocab"]["items"], model_cfg["hidden_size"]
    shards = Path(shards or config["data"]["shards"])
    vocab_batches, actions = _vocabulary(shards, rows)
    artifact_config = {
        "model": model_cfg,
        "vocab": meta["vocab"],
        "text": meta.get("text"),
        "actions": actions,
        "shards": str(shards),
        "evaluation": {
            "ks": config["eval"]["ks"],
            "filter_seen": config["eval"]["filter_seen"],
            "batch_size": config["data"]["eval_batch_size"],
        },
    }
    try:
        with ArtifactWriter(out, quant, artifact_config, rows, dim, overwrite=overwrite) as writer:
            writer.write_dense(dense)
            if tokens is not None:
                writer.write_text_tokens(tokens)
            for start in range(0, rows, block_rows):
                writer.write_items(start, rows_of(start, min(rows, start + block_rows)))
            writer.write_vocab(vocab_batches())
            writer.manifest["source"] = origin
            writer.manifest["metrics"] = {"best_valid_NDCG@10": valid_ndcg}
            staged = writer.seal()
            if evaluate:
                from serve.offline import evaluate_artifact
                from serve.recommender import Recommender

                result = evaluate_artifact(Recommender.load(staged), shards, "test")
                writer.manifest["metrics"]["test"] = result
                log(
                    f"serving-path test metrics of the {quant} artifact: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if "@10" in k)
                )
    except ArtifactError as e:
        raise ExportError(str(e)) from None
    log(f"exported {source} as a {quant} artifact into {out} ({rows:,} x {dim} item table)")
    return out
