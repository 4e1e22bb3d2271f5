"""``lmrec export``: a training checkpoint (or a consolidated model) into a serving artifact.

The item table is streamed a row block at a time from the checkpoint's sparse blocks (or the
consolidated file) through serve's writer, so memory stays at a block whatever the table's size.
When the shards the model was trained on are at hand, the artifact is evaluated on their test
split through the serving code itself before it is published, and the metrics go into its
manifest: what is served is what was measured.
"""

from __future__ import annotations

from pathlib import Path

from serve.artifact import ArtifactError, ArtifactWriter
from serve.index import IndexSpec
from train.checkpoint import CheckpointError
from train.saved_model import ARTIFACT, BLOCK_ROWS, SourceError, load_source


class ExportError(ValueError):
    pass


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


def _semantic_ids(trained, shards: Path):
    """The shards' semantic IDs for a model trained with them (None for one without), checked
    against the model's vocabulary and levels."""
    from data.errors import DataError
    from data.semantic_ids import SEMANTIC_FILE, load_semantic_ids

    if not trained.config.architecture.uses_semantic_ids:
        return None
    try:
        semantic = load_semantic_ids(shards)
    except DataError as e:
        raise ExportError(str(e)) from None
    if semantic is None:
        raise ExportError(f"{shards}: no semantic IDs, and the model was trained with them (pass the shards it was)")
    if len(semantic.codes) != trained.num_items or semantic.level_sizes != trained.config.level_sizes:
        raise ExportError(
            f"{shards / SEMANTIC_FILE}: {len(semantic.codes)} items with levels {semantic.level_sizes}, the model was "
            f"trained with {trained.num_items} items and levels {trained.config.level_sizes}"
        )
    return semantic


def export(
    source: Path,
    out: Path,
    quant: str = "int8",
    shards: Path | None = None,
    evaluate: bool = True,
    overwrite: bool = False,
    block_rows: int = BLOCK_ROWS,
    log=print,
    index: str | None = None,
) -> Path:
    """A checkpoint, checkpoint directory or saved model (train.saved_model.resolve_source) into a
    serving artifact; with ``index`` (a serve.index spec such as ``ivf-sq8``) it carries an
    approximate item index of its stored rows."""
    source, out = Path(source), Path(out)
    try:
        spec = IndexSpec.parse(index) if index is not None else None
    except ArtifactError as e:
        raise ExportError(str(e)) from None
    try:
        trained = load_source(source, shards)
    except (CheckpointError, SourceError) as e:
        raise ExportError(str(e)) from None
    if trained.kind == ARTIFACT:
        raise ExportError(
            f"{trained.source}: already a serving artifact; export a checkpoint or saved model (or use --add-items)"
        )
    config = trained.training["config"]
    rows, dim = trained.num_items, trained.config.architecture.hidden_size
    if spec is not None and trained.config.architecture.semantic_id_head:
        raise ExportError("--index: a semantic-ID model ranks by beam search over its codes, not by item vectors")
    shards = Path(shards or config["data"]["shards"])
    vocab_batches, actions = _vocabulary(shards, rows)
    semantic = _semantic_ids(trained, shards)
    artifact_config = {
        "model": trained.config.model,
        "vocab": trained.config.vocab,
        "text": trained.config.text,
        "actions": actions,
        "shards": str(shards),
        "evaluation": {
            "ks": config["eval"]["ks"],
            "filter_seen": config["eval"]["filter_seen"],
            "batch_size": config["data"]["eval_batch_size"],
        },
    }
    if semantic is not None:
        artifact_config["semantic_ids"] = {
            "level_sizes": semantic.level_sizes,
            "beam_width": config["eval"]["beam_width"],
            "inputs": semantic.inputs,
        }
    origin = {trained.kind.replace(" ", "_"): str(trained.source), "step": trained.training["step"]}
    try:
        with ArtifactWriter(out, quant, artifact_config, rows, dim, overwrite=overwrite) as writer:
            writer.write_dense({k: v.float().numpy() for k, v in trained.dense.items()})
            if trained.text_tokens is not None:
                writer.write_text_tokens(trained.text_tokens.numpy())
            if semantic is not None:
                table = None if trained.code_table is None else trained.code_table.float().numpy()
                writer.write_semantic_ids(semantic.codes, semantic.level_sizes, semantic.quantizer, table)
            for start in range(0, rows, block_rows):
                writer.write_items(start, trained.rows(start, min(rows, start + block_rows)).float().numpy())
            writer.write_vocab(vocab_batches())
            writer.manifest["source"] = origin
            writer.manifest["metrics"] = {"best_valid_NDCG@10": trained.training["best_valid_ndcg10"]}
            staged = writer.seal()
            if spec is not None:
                from serve import index as item_index
                from serve.recommender import Recommender

                table = Recommender.load(staged, verify=False, search="exact").items
                writer.config["index"] = item_index.build(table, spec, staged, log)
                del table
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
