"""``lmrec train --init-from SOURCE``: start from a trained model, continuing it or transferring it.

Which case applies follows from the item vocabularies (``item_lineage``), and the log says which:

- **Continuing** (the daily retrain): SOURCE's items are this run's first rows, raw ID for raw ID,
  as when the new shards were prepared with ``--vocab-from`` the shards SOURCE was trained on
  (``data.vocab`` keeps every known index and appends new items). Everything carries over: the
  dense weights (task heads included), the text-token table, the ID rows of the known items and,
  when SOURCE is a training checkpoint, their fused sparse optimizer state (row-wise Adagrad's
  accumulators), so known items keep the step sizes they had reached while new items learn at
  the full rate. New items' ID rows start from the initialiser, or at zero when the model uses
  item text (each starts as its text vector, like the known items the source never trained), with
  fresh optimizer state. A saved model has no optimizer state: it gives the rows only. A serving
  artifact (quantized rows) is always used as in the transfer case.
- **Transfer** (another catalog, or a task pretrained elsewhere): what does not depend on the
  catalog carries over: the backbone, the input norm, the text projection, the text-token table
  (hashed word n-grams mean the same on any catalog), and the action and gap embeddings where
  their vocabularies have the same size. ID rows belong to the old catalog: they start from the
  initialiser, or at zero when the model uses item text (each item starts as its text). Task
  heads start fresh.

In both cases the dense optimizer (AdamW) starts fresh and the learning-rate schedule restarts at
step 0 with its warm-up, as when fine-tuning (torchtitan's ``initial_load_model_only`` does the
same): the source's schedule had decayed over its own run, and its AdamW moments were estimated
at that end-of-run learning rate, so resuming them at the peak rate would make the first steps
the largest; warm-up with fresh moments lets them settle first. The sparse rows differ: Adagrad's
accumulator has no schedule, and it is what says how much each known row has already learned.

SOURCE is anything train.saved_model.resolve_source knows: a saved model (RUN/best), a training
checkpoint (or a checkpoint directory) or a serving artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data.vocab import ITEMS_FILE
from model.items import ID_TABLE, RESERVED, SEMANTIC_TABLE, TOKEN_TABLE, ItemCatalog, PlainItemTables
from train.checkpoint import BLOCK_ROWS, SparseReader, optimizer_key, read_meta
from train.config import Config, ConfigError
from train.saved_model import ARTIFACT, CHECKPOINT, SourceError, TrainedModel, item_encoder, load_source

# Settings that give the backbone's weights their shapes and meaning.
BACKBONE = ("backbone", "hidden_size", "num_layers", "num_heads", "intermediate_size", "backbone_options", "normalize")
CATALOG_SPECIFIC = ("action_head.",)  # a task head is trained for its catalog and task: transfer leaves it
MAX_VOCAB_HOPS = 10_000  # --vocab-from links followed back (one a day is 27 years)


@dataclass(frozen=True)
class Lineage:
    """SOURCE's item vocabulary is the first ``known`` rows of this run's, raw ID for raw ID."""

    known: int  # the source's table rows (padding and unknown included)
    untrained: torch.Tensor  # (known,) bool: items without training events in the source's data
    source_shards: Path


@dataclass(frozen=True)
class Pretrained:
    """What ``--init-from`` starts from: the trained model, and how its items relate to this run's."""

    trained: TrainedModel
    lineage: Lineage | None  # None: another catalog (transfer)
    why: str  # which case applies and why, for the log


def load_pretrained(path, cfg: Config, manifest: dict) -> Pretrained:
    """Opens SOURCE, checks that it fits ``cfg`` and tells continuation from transfer; every
    problem is a ConfigError, before any process group exists."""
    try:
        trained = load_source(path)
    except SourceError as e:
        raise ConfigError(f"--init-from {e}") from None
    check_pretrained(trained, cfg, manifest.get("text"))
    lineage, why = item_lineage(trained, Path(cfg.data.shards), manifest)
    return Pretrained(trained, lineage, why)


def check_pretrained(pretrained: TrainedModel, cfg: Config, text_spec: dict | None) -> None:
    """Refuses, with every difference named, a source whose backbone or text paths do not fit."""
    source_model = pretrained.config.model
    problems = [
        f"model.{key}: {source_model.get(key)!r} in the source, {getattr(cfg.model, key)!r} here"
        for key in BACKBONE
        if source_model.get(key) != getattr(cfg.model, key)
    ]
    for part in ("item_text", "item_text_tokens"):
        if getattr(cfg.model, part) and source_model.get(part):
            source, here = pretrained.config.text or {}, text_spec or {}
            what = "encoder" if part == "item_text" else "tokenizer"
            if source.get(what) != here.get(what):
                problems.append(f"{what} of the item text: {source.get(what)} in the source, {here.get(what)} here")
    if problems:
        raise ConfigError(
            f"--init-from {pretrained.source}: the model does not fit this config: " + "; ".join(problems)
        )


# -- continuation or transfer ---------------------------------------------------------------------


def _vocab_ancestors(shards: Path) -> list[Path]:
    """The shard directories whose vocabulary ``shards``' extends: its ``--vocab-from``, that
    one's, and so on (as their manifests record them), resolved."""
    chain, seen = [], {shards.resolve()}
    current = shards
    for _ in range(MAX_VOCAB_HOPS):
        try:
            parent = json.loads((current / "manifest.json").read_text()).get("vocab", {}).get("from")
        except (OSError, ValueError):
            break
        if not parent or Path(parent).resolve() in seen:
            break
        current = Path(parent)
        seen.add(current.resolve())
        chain.append(current.resolve())
    return chain


def _prefix_problem(source, here, known: int, source_file: Path, here_file: Path) -> str | None:
    """Why the vocabulary ``source`` (index, raw_id; from ``source_file``) is not the first
    ``known`` rows of ``here``, or None when it is."""
    real = known - RESERVED
    if source.height != real or (real and (source["index"][0], source["index"][-1]) != (RESERVED, known - 1)):
        return (
            f"{source_file} holds {source.height:,} items (indices {source['index'].min()}..{source['index'].max()}), "
            f"the source's item table {real:,}: it is no longer the vocabulary the source was trained on"
        )
    prefix = here.filter(here["index"] < known)
    if prefix.height != real:
        return f"{here_file} has {prefix.height:,} of the source's {real:,} item indices"
    if source["raw_id"].dtype != prefix["raw_id"].dtype:
        return f"field raw_id is {source['raw_id'].dtype} in {source_file} and {prefix['raw_id'].dtype} in {here_file}"
    differs = (source["raw_id"] != prefix["raw_id"]).arg_true()
    if len(differs):
        i = int(differs[0])
        return (
            f"item index {source['index'][i]} is raw_id {source['raw_id'][i]!r} in {source_file} and "
            f"{prefix['raw_id'][i]!r} in {here_file} ({len(differs):,} of {real:,} indices differ)"
        )
    return None


def item_lineage(trained: TrainedModel, shards: Path, manifest: dict) -> tuple[Lineage | None, str]:
    """Whether ``trained``'s items are the first rows of the vocabulary of ``shards`` (a Lineage)
    or another catalog's (None), with the reason for the log. Raises when ``shards`` were prepared
    against the source's vocabulary (``--vocab-from``, followed back through the manifests) and
    yet disagree with it: same index, another raw ID."""
    import polars as pl

    if trained.kind == ARTIFACT:
        return None, "a serving artifact (quantized rows): transfer, as for another catalog"
    if not trained.shards:
        return None, "the source does not record its training data: transfer, as for another catalog"
    source = Path(trained.shards)
    claimed = source.resolve() == shards.resolve() or source.resolve() in _vocab_ancestors(shards)
    source_file, here_file = source / ITEMS_FILE, shards / ITEMS_FILE
    if not source_file.exists():
        if claimed:
            raise ConfigError(
                f"--init-from {trained.source}: {shards} continue the vocabulary of {source} (--vocab-from), but the "
                f"source's {source_file} is missing, so its item rows cannot be matched to this vocabulary"
            )
        return None, f"its vocabulary {source_file} is missing: transfer, as for another catalog"
    try:
        before = pl.read_parquet(source_file, columns=["index", "raw_id", "count"]).sort("index")
        now = pl.read_parquet(here_file, columns=["index", "raw_id"]).sort("index")
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ConfigError(f"--init-from {trained.source}: cannot read the item vocabularies: {e}") from None
    problem = _prefix_problem(before, now, trained.num_items, source_file, here_file)
    if problem and claimed:
        raise ConfigError(
            f"--init-from {trained.source}: the item vocabularies conflict, though {shards} were prepared from "
            f"{source}'s (--vocab-from): {problem}"
        )
    if problem:
        return None, f"another catalog ({problem}): transfer"
    untrained = torch.zeros(trained.num_items, dtype=torch.bool)
    untrained[before.filter(before["count"] == 0)["index"].to_list()] = True
    new = manifest["vocab"]["items"] - trained.num_items
    return Lineage(trained.num_items, untrained, source), (
        f"continuing: its {trained.num_items - RESERVED:,} items are this vocabulary's first rows "
        f"(checked against {source_file}), {new:,} new"
    )


# -- initialising the model ------------------------------------------------------------------------


@torch.no_grad()
def init_model(model: torch.nn.Module, tables, pretrained: Pretrained, cfg: Config, log=print) -> None:
    """Copies what carries over into ``model`` and the sharded ``tables`` (before DeepSpeed sees
    the model); every rank sets its own shards."""
    trained, lineage = pretrained.trained, pretrained.lineage
    state = model.state_dict()
    copied, skipped = [], []
    for name, value in trained.dense.items():
        if (lineage is None and name.startswith(CATALOG_SPECIFIC)) or name not in state:
            skipped.append(name)
        elif state[name].shape != value.shape:
            skipped.append(f"{name} {tuple(value.shape)} -> {tuple(state[name].shape)}")
        else:
            state[name].copy_(value)
            copied.append(name)
    if model.cfg.item_text_tokens and trained.text_tokens is not None:
        tables.set_rows(TOKEN_TABLE, trained.text_tokens)
        copied.append("text-token table")
    codes = trained.code_table
    if model.cfg.item_semantic_ids and codes is not None and codes.shape[0] == tables.specs[SEMANTIC_TABLE].rows:
        tables.set_rows(SEMANTIC_TABLE, codes)  # codes keep their meaning: --vocab-from carries the quantiser
        copied.append("semantic-ID code table")
    if lineage is not None and model.cfg.item_id:
        items = _continue_items(model.cfg, tables, trained, lineage, cfg.optim.sparse_optimizer)
    elif not model.cfg.item_id:
        items = "the model has no item ID rows"
    elif model.cfg.composed:
        tables.set_rows(ID_TABLE, None)
        items = "item ID rows start at zero (items start as their text)"
    else:
        items = "item ID rows start from the initialiser"
    log(
        f"initialised from {trained.source} ({pretrained.why}): {len(copied)} tensors carried over"
        + (f", not carried over: {', '.join(skipped)}" if skipped else "")
        + f"; {items}; the dense optimizer starts fresh and the learning-rate schedule restarts at step 0 "
        f"(warm-up {cfg.optim.warmup_steps} steps)"
    )


def _continue_items(model_cfg, tables, trained: TrainedModel, lineage: Lineage, sparse_optimizer: str) -> str:
    """Known items' ID rows (and, from a checkpoint, their optimizer state) from the source; new
    rows as a fresh run starts them. Returns what happened, for the log."""
    known, uses_text = lineage.known, model_cfg.uses_text
    weight = tables.weights()[ID_TABLE]
    reader = SparseReader(trained.source) if trained.kind == CHECKPOINT else None
    source_text = trained.config.architecture.uses_text
    if reader is not None and (uses_text or not source_text):
        # The stored ID rows are what this model's ID rows mean.
        def read(part: int, start: int, columns: int, out: torch.Tensor) -> None:
            reader.read(ID_TABLE, [start, columns], out)
    else:
        rows = _source_rows(trained, lineage, uses_text)

        def read(part: int, start: int, columns: int, out: torch.Tensor) -> None:
            out.copy_(rows(start, start + len(out))[:, columns : columns + out.shape[1]])

    def known_rows(part: int, start: int, columns: int, out: torch.Tensor) -> None:
        read(part, start, columns, out)
        if uses_text:  # an item the source never trained starts as its text, like a new one
            out[lineage.untrained[start : start + len(out)]] = 0

    tables.overwrite_rows(weight, ID_TABLE, 0, known, known_rows, BLOCK_ROWS)
    if uses_text:
        tables.overwrite_rows(weight, ID_TABLE, known, tables.specs[ID_TABLE].rows, _zeros, BLOCK_ROWS)
    news = "at zero (each starts as its text)" if uses_text else "from the initialiser"
    carried = f"ID rows of the {known - RESERVED:,} known items carried over, new items' rows {news}"
    source_optimizer = ((trained.training.get("config") or {}).get("optim") or {}).get("sparse_optimizer")
    if reader is None:
        return carried + f"; no sparse optimizer state in a {trained.kind}: it starts fresh for every row"
    if source_optimizer != sparse_optimizer:
        return (
            carried + f"; the source trained with {source_optimizer}, this run {sparse_optimizer}: state starts fresh"
        )
    version = read_meta(trained.source)["format_version"]
    carry = [(ID_TABLE, known)]
    if model_cfg.item_text_tokens and trained.config.architecture.item_text_tokens:
        carry.append((TOKEN_TABLE, tables.specs[TOKEN_TABLE].rows))
    fresh = [name for table, rows in carry for name in _carry_state(tables, table, rows, reader, version)]
    # Named from the checkpoint: a rank may hold none of a table (table-wise sharding).
    prefix = optimizer_key(ID_TABLE, "", version)
    names = sorted(key.removeprefix(prefix) for key in reader.sizes if key.startswith(prefix) and key not in fresh)
    if names:
        carried += f"; their {sparse_optimizer} state ({', '.join(names)}) carried over, new rows' fresh"
    if fresh:
        carried += f"; {', '.join(fresh)} starts fresh for every row (the checkpoint holds it for another sharding)"
    return carried


def _zeros(part: int, start: int, columns: int, out: torch.Tensor) -> None:
    out.zero_()


def _carry_state(tables, table: str, known: int, reader: SparseReader, version: int) -> list[str]:
    """Copies the fused optimizer state of ``table``'s rows [0, known) from the checkpoint into
    this rank's shards; the other rows keep the fresh state. Returns the states left fresh."""
    rows = tables.specs[table].rows
    fresh = []
    for name, tensor in tables.optimizer_state(table).items():
        key = optimizer_key(table, name, version)
        size = tensor.metadata().size  # (not .size(): it warns of its deprecation on every call)
        parts, rest = size[0] // rows, list(size[1:])
        stored = reader.sizes.get(key)
        # Row-wise state under column-wise sharding stacks one block of rows per column shard;
        # the source's stacking must match to mean the same rows (the layout is the same on
        # every rank, so rank 0's log says what all did).
        if stored is None or list(stored) != [parts * known, *rest]:
            fresh.append(key)
            continue

        def read(part: int, start: int, columns: int, out: torch.Tensor, key=key) -> None:
            reader.read(key, [part * known + start, *([columns] if out.dim() > 1 else [])], out)

        tables.overwrite_rows(tensor, table, 0, known, read, BLOCK_ROWS)
    return fresh


def _source_rows(trained: TrainedModel, lineage: Lineage, uses_text: bool):
    """rows(start, stop): the source's rows in the meaning of this model's ID rows. A saved model
    stores composed item vectors: where both models use text, the ID row is the vector less its
    text parts, composed as the source composed them, from the source's catalog."""
    if not (uses_text and trained.config.architecture.uses_text):
        return trained.rows
    from train.items import load_catalog

    return id_rows_of_vectors(trained, load_catalog(lineage.source_shards, trained.num_items, with_text=True))


def id_rows_of_vectors(trained: TrainedModel, catalog: ItemCatalog):
    """rows(start, stop): a text-aware model's ID rows, recovered from its composed item vectors
    (``trained.rows``) by taking away the text parts its own encoder and token table give the
    items of ``catalog``. Equal to the trained rows up to float rounding, for the items that had
    training events (the others were composed without their ID row)."""
    encoder = item_encoder(trained.config, trained.dense)
    width = trained.config.architecture.hidden_size

    @torch.no_grad()
    def rows(start: int, stop: int) -> torch.Tensor:
        learned = {ID_TABLE: torch.zeros(stop - start, width)}
        if trained.text_tokens is not None:
            learned[TOKEN_TABLE] = trained.text_tokens
        text = encoder(torch.arange(start, stop), PlainItemTables(learned, {ID_TABLE: start}), catalog)
        return trained.rows(start, stop).float() - text

    return rows
