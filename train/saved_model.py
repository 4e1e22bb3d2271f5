"""Trained models on disk, and one way to open any of them.

A *saved model* (a run's ``best/``, or ``lmrec checkpoint consolidate``'s output) is a directory:

- ``config.json`` and ``model.safetensors``: ``SequenceRecommender.save_pretrained`` (the
  transformers ``PreTrainedConfig``, model type ``lmrec``, and the dense weights in fp32);
- ``items.safetensors``: ``items``, every item's scoring vector (its parts composed, text parts
  included), and for text-aware models ``text_tokens``, the text-token table;
- ``training.json``: the resolved training config, the step, and the metrics measured then.

``write_saved_model`` is its only writer and ``read_saved_model`` its only reader. A saved model
written before the transformers form (a ``meta.json`` beside the weights) is converted on read.

``resolve_source`` tells what a path is (a checkpoint directory, a checkpoint, a saved model, a
serving artifact, or a run directory with a ``best/``); ``load_source`` opens any of them as a
``TrainedModel``, the one form ``lmrec eval``, ``lmrec export``, ``lmrec checkpoint consolidate``
and ``--init-from`` work with. Item vectors are composed by model.items wherever they come from.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from data.shards import atomic_output_dir, write_json_atomic
from model.config import ModelConfig, RecommenderConfig
from model.items import ID_TABLE, SEMANTIC_TABLE, TOKEN_TABLE, ItemEncoder, PlainItemTables
from model.modeling import SequenceRecommender
from serve.tensorfile import BlockWriter, read_rows
from train import checkpoint

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ITEMS = "items.safetensors"
TRAINING = "training.json"
LEGACY_META = "meta.json"  # saved models before the transformers form
BLOCK_ROWS = checkpoint.BLOCK_ROWS

CHECKPOINT, SAVED_MODEL, ARTIFACT = "checkpoint", "saved model", "artifact"


class SourceError(ValueError):
    """A path that is not a trained model of any kind, or one that cannot serve this purpose."""


def _quiet_transformers() -> None:
    # save_pretrained / from_pretrained draw progress bars for what takes milliseconds here.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass
class TrainedModel:
    """A trained model in one form, whatever was on disk."""

    source: Path
    kind: str  # CHECKPOINT, SAVED_MODEL or ARTIFACT
    config: RecommenderConfig
    training: dict  # {"config": resolved training config or None, "step", "best_valid_ndcg10"}
    dense: dict[str, torch.Tensor]  # fp32 state dict of the dense model
    text_tokens: torch.Tensor | None
    # rows(start, stop): items' scoring vectors, fp32, or fp16 where the table was trained in fp16
    rows: Callable[[int, int], torch.Tensor]
    code_table: torch.Tensor | None = None  # the semantic-ID code table (model.item_semantic_ids)

    @property
    def num_items(self) -> int:
        return self.config.num_items

    def model(self) -> SequenceRecommender:
        model = SequenceRecommender(self.config)
        model.load_state_dict(self.dense)
        return model.eval()

    def table(self) -> torch.Tensor:
        return self.rows(0, self.num_items).float()

    @property
    def shards(self) -> str | None:
        """The shards it was trained on, when known."""
        return (self.training.get("config") or {}).get("data", {}).get("shards")


# -- the saved model ------------------------------------------------------------------------------


def write_saved_model(
    directory: Path,
    config: RecommenderConfig,
    dense: dict[str, torch.Tensor],
    rows: Callable[[int, int], torch.Tensor],
    text_tokens: torch.Tensor | None,
    training: dict,
    block_rows: int = BLOCK_ROWS,
    code_table: torch.Tensor | None = None,
) -> Path:
    """Writes a saved model into a temporary directory that replaces ``directory`` when complete.
    ``rows(start, stop)`` gives the items' scoring vectors a block at a time, so memory stays at a
    block whatever the catalog's size; they are stored in fp16 when they come in fp16."""
    _quiet_transformers()
    rows_total, dim = config.num_items, config.architecture.hidden_size
    first = rows(0, min(rows_total, block_rows))
    tables = {"items": (np.float16 if first.dtype == torch.float16 else np.float32, (rows_total, dim))}
    if text_tokens is not None:
        tables["text_tokens"] = (np.float32, tuple(text_tokens.shape))
    if code_table is not None:
        tables["code_table"] = (np.float32, tuple(code_table.shape))
    with atomic_output_dir(Path(directory), overwrite=True) as tmp:
        # A meta-device model: save_pretrained writes the given weights, so none are allocated.
        with torch.device("meta"):
            shell = SequenceRecommender(config)
        shell.save_pretrained(tmp, state_dict={k: v.detach().float().contiguous().cpu() for k, v in dense.items()})
        with BlockWriter(tmp / ITEMS, tables, {"format": "pt"}) as writer:
            for start in range(0, rows_total, block_rows):
                block = first if start == 0 else rows(start, min(rows_total, start + block_rows))
                writer.write("items", start, block.detach().cpu().numpy())
            if text_tokens is not None:
                writer.write("text_tokens", 0, text_tokens.detach().float().cpu().numpy())
            if code_table is not None:
                writer.write("code_table", 0, code_table.detach().float().cpu().numpy())
        write_json_atomic(tmp / TRAINING, training)
    return Path(directory)


def read_saved_model(directory: Path) -> TrainedModel:
    directory = Path(directory)
    if (directory / CONFIG).exists():
        _quiet_transformers()
        config = RecommenderConfig.from_pretrained(directory)
        training = json.loads((directory / TRAINING).read_text()) if (directory / TRAINING).exists() else {}
    elif (directory / LEGACY_META).exists():
        from train.config import upgrade_saved_config

        meta = json.loads((directory / LEGACY_META).read_text())
        training = {**meta, "config": upgrade_saved_config(meta["config"])}
        model = ModelConfig.from_dict(meta["config"]["model"])
        config = RecommenderConfig.build(model, meta["vocab"], meta.get("text"))
    else:
        raise SourceError(f"{directory}: no {CONFIG}; not a saved lmrec model")
    dense = load_file(str(directory / WEIGHTS))
    tokens = None
    if config.architecture.item_text_tokens:
        tokens = torch.from_numpy(read_rows(directory / ITEMS, "text_tokens", 0, sys.maxsize).astype(np.float32))
    code_table = None
    if config.architecture.item_semantic_ids:
        code_table = torch.from_numpy(read_rows(directory / ITEMS, "code_table", 0, sys.maxsize).astype(np.float32))

    def rows(start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(read_rows(directory / ITEMS, "items", start, stop).astype(np.float32))

    training.setdefault("step", None)
    training.setdefault("best_valid_ndcg10", None)
    return TrainedModel(directory, SAVED_MODEL, config, training, dense, tokens, rows, code_table)


# -- any source -----------------------------------------------------------------------------------


def resolve_source(path: str | Path) -> tuple[str, Path]:
    """(kind, path) of a trained model: a checkpoint directory resolves to its newest checkpoint
    that verifies, a run directory to its saved best model."""
    from serve import artifact

    path = Path(path)
    if path.name == checkpoint.LATEST and path.is_file():
        path = path.parent
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if (path / checkpoint.META).exists() and (path / checkpoint.DENSE).exists():
        return CHECKPOINT, path
    if (path / artifact.MANIFEST).exists():
        return ARTIFACT, path
    if (path / ITEMS).exists() and ((path / CONFIG).exists() or (path / LEGACY_META).exists()):
        return SAVED_MODEL, path
    if path.is_dir() and checkpoint.list_checkpoints(path):
        found = checkpoint.resolve(str(path), path)
        return CHECKPOINT, found[0]
    if (path / "best").is_dir():
        return resolve_source(path / "best")
    raise SourceError(
        f"{path}: not a trained model: expected a checkpoint ({checkpoint.META} and {checkpoint.DENSE}), a "
        f"directory of checkpoints, a saved model ({CONFIG} and {ITEMS}), a serving artifact "
        f"({artifact.MANIFEST}) or a run directory with best/"
    )


def load_source(path: str | Path, shards: str | Path | None = None) -> TrainedModel:
    """Any trained model as a TrainedModel. ``shards``: the data whose item text a text-aware
    checkpoint's vectors are composed with (default: the shards it was trained on)."""
    kind, path = resolve_source(path)
    if kind == CHECKPOINT:
        return _from_checkpoint(path, shards)
    if kind == SAVED_MODEL:
        return read_saved_model(path)
    return _from_artifact(path)


def item_encoder(config: RecommenderConfig, dense: dict[str, torch.Tensor]) -> ItemEncoder:
    """The trained item encoder (its text projection) of a model's dense weights, in eval mode."""
    encoder = ItemEncoder(config.architecture, config.text_dim, config.level_sizes)
    encoder.load_state_dict(
        {k.removeprefix("item_encoder."): v for k, v in dense.items() if k.startswith("item_encoder.")}
    )
    return encoder.eval()


def _from_checkpoint(path: Path, shards) -> TrainedModel:
    from train.items import load_catalog

    meta = checkpoint.verify(path)
    config = RecommenderConfig.build(
        ModelConfig.from_dict(meta["config"]["model"]), meta["vocab"], meta.get("text"), meta.get("semantic_ids")
    )
    dense = checkpoint._load_safetensors(path / checkpoint.DENSE, prefix="weight/")
    progress = meta["progress"]
    training = {"config": meta["config"], "step": progress["step"], "best_valid_ndcg10": progress["best_ndcg"]}
    cfg = config.architecture
    tokens = checkpoint.read_table_rows(path, TOKEN_TABLE).float() if cfg.item_text_tokens else None
    code_table = checkpoint.read_table_rows(path, SEMANTIC_TABLE).float() if cfg.item_semantic_ids else None
    if not cfg.composed:

        def rows(start: int, stop: int) -> torch.Tensor:
            return checkpoint.read_table_rows(path, ID_TABLE, start, stop)

        return TrainedModel(path, CHECKPOINT, config, training, dense, tokens, rows)
    # A composed model's vectors are built from the ID rows, the dense projection, the token and
    # code tables and the items' text and codes, block by block.
    encoder = item_encoder(config, dense)
    catalogs = []  # read on first use: --init-from needs no vectors, so no source shards either

    @torch.no_grad()
    def composed(start: int, stop: int) -> torch.Tensor:
        if not catalogs:
            catalogs.append(
                load_catalog(
                    shards or meta["config"]["data"]["shards"], config.num_items, with_text=cfg.uses_text,
                    with_semantic=cfg.item_semantic_ids,
                )
            )  # fmt: skip
        tables = {ID_TABLE: checkpoint.read_table_rows(path, ID_TABLE, start, stop)} if cfg.item_id else {}
        if tokens is not None:
            tables[TOKEN_TABLE] = tokens
        if code_table is not None:
            tables[SEMANTIC_TABLE] = code_table
        return encoder(torch.arange(start, stop), PlainItemTables(tables, {ID_TABLE: start}), catalogs[0])

    return TrainedModel(path, CHECKPOINT, config, training, dense, tokens, composed, code_table)


def _from_artifact(path: Path) -> TrainedModel:
    from serve.artifact import ArtifactError, read_text_tokens
    from serve.recommender import Recommender

    try:
        rec = Recommender.load(path)
        tokens = read_text_tokens(path)
    except ArtifactError as e:
        raise SourceError(str(e)) from None
    dense = {k: v.detach().float().clone() for k, v in rec.model.state_dict().items()}
    metrics = rec.manifest.get("metrics") or {}
    training = {"config": None, "step": (rec.manifest.get("source") or {}).get("step"),
                "best_valid_ndcg10": metrics.get("best_valid_NDCG@10")}  # fmt: skip
    return TrainedModel(
        path,
        ARTIFACT,
        rec.model.config,
        training,
        dense,
        None if tokens is None else torch.from_numpy(np.array(tokens, dtype=np.float32)),
        lambda start, stop: rec.items.dequantize(start, stop),
        None if rec.semantic is None or rec.semantic.code_table is None
        else torch.from_numpy(np.array(rec.semantic.code_table, dtype=np.float32)),
    )  # fmt: skip


def consolidate(source: Path, out: Path, block_rows: int = BLOCK_ROWS, log=print) -> Path:
    """``lmrec checkpoint consolidate``: a checkpoint as a saved model (``lmrec eval OUT`` reads
    it). The table is streamed in row blocks: memory stays at a block, whatever its size."""
    trained = load_source(source)
    if trained.kind != CHECKPOINT:
        raise SourceError(f"{trained.source}: a {trained.kind}, not a training checkpoint; nothing to consolidate")
    training = {**trained.training, "source_checkpoint": str(trained.source)}
    write_saved_model(
        out, trained.config, trained.dense, trained.rows, trained.text_tokens, training, block_rows, trained.code_table
    )
    log(
        f"consolidated {trained.source} (step {training['step']}) into {out}: {trained.num_items:,} x "
        f"{trained.config.architecture.hidden_size} item table"
    )
    return Path(out)
