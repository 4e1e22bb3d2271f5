"""``lmrec train --init-from SOURCE``: start from a model pretrained on another catalog or task.

What carries over is what does not depend on the catalog: the backbone, the input norm, the
text projection, the text-token table (hashed word n-grams mean the same on any catalog), and
the action and gap embeddings where their vocabularies have the same size. Item ID rows belong to
the old catalog: the new catalog's ID rows start at zero, so each item starts as its text
representation. Parts the source lacks (a new action head, say) start fresh.

SOURCE is a saved model (RUN/best), a training checkpoint (or a checkpoint directory) or a
serving artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.config import Config, ConfigError

# Settings that give the backbone's weights their shapes and meaning.
BACKBONE = ("backbone", "hidden_size", "num_layers", "num_heads", "intermediate_size", "backbone_options", "normalize")
CATALOG_SPECIFIC = ("action_head.",)  # a task head is trained for its task, not carried over


@dataclass
class Pretrained:
    source: str
    model: dict  # the source's model config
    vocab: dict
    text: dict | None  # the source's text spec (encoder and tokenizer), if text-aware
    dense: dict[str, torch.Tensor]
    tokens: torch.Tensor | None  # the text-token table


def load_pretrained(path: str | Path) -> Pretrained:
    from safetensors.torch import load_file

    from train.checkpoint import DENSE, TOKEN_KEY, _load_safetensors, list_checkpoints, read_item_rows, resolve, verify
    from train.evaluate import SAVED_DENSE, SAVED_ITEMS, SAVED_META

    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / DENSE).exists() and list_checkpoints(path):
        path = resolve(str(path), path)[0]
    if (path / DENSE).exists():
        meta = verify(path)
        dense = _load_safetensors(path / DENSE, prefix="weight/")
        text = meta.get("text")
        tokens = read_item_rows(path, key=TOKEN_KEY) if meta["config"]["model"].get("item_text_tokens") else None
        return Pretrained(str(path), meta["config"]["model"], meta["vocab"], text, dense, tokens)
    if (path / SAVED_META).exists() and (path / SAVED_ITEMS).exists():
        meta = json.loads((path / SAVED_META).read_text())
        tables = load_file(str(path / SAVED_ITEMS))
        dense = load_file(str(path / SAVED_DENSE))
        return Pretrained(
            str(path), meta["config"]["model"], meta["vocab"], meta.get("text"), dense, tables.get("text_tokens")
        )
    from serve import artifact

    if (path / artifact.MANIFEST).exists():
        try:
            _, config, dense, _, _ = artifact.read(path)
            tokens = artifact.read_text_tokens(path)
        except artifact.ArtifactError as e:
            raise ConfigError(f"--init-from: {e}") from None
        return Pretrained(
            str(path),
            config["model"],
            config["vocab"],
            config.get("text"),
            {k: torch.from_numpy(np.array(v)) for k, v in dense.items()},
            None if tokens is None else torch.from_numpy(tokens),
        )
    raise ConfigError(
        f"--init-from {path}: not a saved model (meta.json), a training checkpoint ({DENSE}) or a serving artifact"
    )


def check_pretrained(pretrained: Pretrained, cfg: Config, text_spec: dict | None) -> None:
    """Refuses, with every difference named, a source whose backbone or text paths do not fit."""
    problems = [
        f"model.{key}: {pretrained.model.get(key)!r} in the source, {getattr(cfg.model, key)!r} here"
        for key in BACKBONE
        if pretrained.model.get(key) != getattr(cfg.model, key)
    ]
    for part in ("item_text", "item_text_tokens"):
        if getattr(cfg.model, part) and pretrained.model.get(part):
            source, here = pretrained.text or {}, text_spec or {}
            what = "encoder" if part == "item_text" else "tokenizer"
            if source.get(what) != here.get(what):
                problems.append(f"{what} of the item text: {source.get(what)} in the source, {here.get(what)} here")
    if problems:
        raise ConfigError(
            f"--init-from {pretrained.source}: the model does not fit this config: " + "; ".join(problems)
        )


@torch.no_grad()
def init_model(model: torch.nn.Module, items, pretrained: Pretrained, log=print) -> None:
    """Copies what carries over into ``model`` and the sharded tables ``items`` (before DeepSpeed
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
    if model.cfg.item_text_tokens and pretrained.tokens is not None:
        items.set_rows(items.token_weight_name, pretrained.tokens)
        copied.append("text-token table")
    if model.cfg.uses_text:
        items.set_rows(items.weight_name, None)
    log(
        f"initialised from {pretrained.source}: {len(copied)} tensors carried over"
        + (f", not carried over: {', '.join(skipped)}" if skipped else "")
        + ("; item ID rows start at zero (items start as their text)" if model.cfg.uses_text else "")
    )
