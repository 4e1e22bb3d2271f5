"""``lmrec train --init-from SOURCE``: start from a model pretrained on another catalog or task.

What carries over is what does not depend on the catalog: the backbone, the input norm, the
text projection, the text-token table (hashed word n-grams mean the same on any catalog), and
the action and gap embeddings where their vocabularies have the same size. Item ID rows belong to
the old catalog: the new catalog's ID rows start at zero, so each item starts as its text
representation. Parts the source lacks (a new action head, say) start fresh.

SOURCE is anything train.saved_model.resolve_source knows: a saved model (RUN/best), a training
checkpoint (or a checkpoint directory) or a serving artifact.
"""

from __future__ import annotations

import torch

from model.items import ID_TABLE, TOKEN_TABLE
from train.config import Config, ConfigError
from train.saved_model import SourceError, TrainedModel, load_source

# Settings that give the backbone's weights their shapes and meaning.
BACKBONE = ("backbone", "hidden_size", "num_layers", "num_heads", "intermediate_size", "backbone_options", "normalize")
CATALOG_SPECIFIC = ("action_head.",)  # a task head is trained for its task, not carried over


def load_pretrained(path) -> TrainedModel:
    try:
        return load_source(path)
    except SourceError as e:
        raise ConfigError(f"--init-from {e}") from None


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


@torch.no_grad()
def init_model(model: torch.nn.Module, tables, pretrained: TrainedModel, log=print) -> None:
    """Copies what carries over into ``model`` and the sharded ``tables`` (before DeepSpeed
    sees the model), and zeroes the ID table."""
    state = model.state_dict()
    copied, skipped = [], []
    for name, value in pretrained.dense.items():
        if name.startswith(CATALOG_SPECIFIC) or name not in state:
            skipped.append(name)
        elif state[name].shape != value.shape:
            skipped.append(f"{name} {tuple(value.shape)} -> {tuple(state[name].shape)}")
        else:
            state[name].copy_(value)
            copied.append(name)
    if model.cfg.item_text_tokens and pretrained.text_tokens is not None:
        tables.set_rows(TOKEN_TABLE, pretrained.text_tokens)
        copied.append("text-token table")
    if model.cfg.uses_text:
        tables.set_rows(ID_TABLE, None)
    log(
        f"initialised from {pretrained.source}: {len(copied)} tensors carried over"
        + (f", not carried over: {', '.join(skipped)}" if skipped else "")
        + ("; item ID rows start at zero (items start as their text)" if model.cfg.uses_text else "")
    )
