"""Full-ranking evaluation, shared by the Trainer and ``lmrec eval``.

Each rank scores its share of the users (the loader splits them) against the whole item table,
and the per-user ranks are gathered, so the result is exact and equal to a single-process run.
The popularity baseline (training-event counts) is scored by the same code beside the model.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.loader import LoaderConfig, iterate_epoch, make_loader
from metrics import RankingMetrics, binary_metrics, popularity_scores, seen_mask, target_ranks
from model.config import ModelConfig
from model.modeling import SequenceRecommender

SAVED_META = "meta.json"
SAVED_DENSE = "model.safetensors"
SAVED_ITEMS = "items.safetensors"


@torch.no_grad()
def evaluate(
    forward,
    model: SequenceRecommender,
    table: torch.Tensor,
    popularity: torch.Tensor,
    shards: str,
    split: str,
    cfg,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device = torch.device("cpu"),
    positive_action: torch.Tensor | None = None,
    ranks_out: Path | None = None,
) -> dict:
    """``forward(item_embeddings, lengths, actions, gaps)`` runs the dense model (the DeepSpeed
    engine in training, the module itself otherwise); ``table`` is the full (V, D) item table.
    ``ranks_out``: also write every user's target rank there (rank 0)."""
    dataset, loader = make_loader(
        shards,
        LoaderConfig(
            split=split,
            batch_size=cfg.data.eval_batch_size,
            max_len=cfg.model.max_len,
            num_workers=cfg.data.num_workers,
            with_seen=cfg.eval.filter_seen,
        ),
        rank,
        world_size,
    )
    baseline = popularity_scores(popularity).to(device)
    model_metrics, popularity_metrics = RankingMetrics(), RankingMetrics()
    users, cold = [], []
    action_probabilities, action_labels = [], []
    for batch in iterate_epoch(dataset, loader, epoch=0):
        items, lengths = batch["items"].to(device), batch["lengths"].to(device)
        actions = batch["actions"].to(device) if "actions" in batch else None
        gaps = batch["gaps"].to(device) if "gaps" in batch else None
        hidden = model.last_hidden(forward(table[items], lengths, actions, gaps), lengths).float()
        exclude = None
        if cfg.eval.filter_seen:
            exclude = seen_mask(batch["seen_items"].to(device), batch["seen_lengths"].to(device), len(table))
        targets = batch["target_items"].to(device)
        model_metrics.update(target_ranks(model.scores(hidden, table), targets, exclude).cpu(), batch["weights"])
        real = batch["weights"] > 0
        users.append(batch["users"][real])
        cold.append((popularity[targets.cpu()] == 0)[real])
        popularity_metrics.update(target_ranks(baseline, targets, exclude).cpu(), batch["weights"])
        if model.action_head is not None:
            probabilities = torch.sigmoid(model.action_logits(hidden, table[targets])).cpu()
            action_probabilities.append(probabilities[real])
            action_labels.append(positive_action[batch["target_actions"]][real].cpu())
    model_metrics.gather()
    popularity_metrics.gather()
    ks = tuple(cfg.eval.ks)
    result = {
        "split": split,
        "model": model_metrics.compute(ks),
        "popularity": popularity_metrics.compute(ks),
        "model_ndcg10_ci": model_metrics.bootstrap("NDCG@10", samples=cfg.eval.bootstrap_samples),
    }
    extra = {}
    if model.action_head is not None:
        probabilities, labels = _gather_cat(action_probabilities), _gather_cat(action_labels)
        result["action"] = binary_metrics(probabilities, labels)
        extra = {"action_probability": probabilities.numpy(), "action_label": labels.numpy()}
    # Targets without training events (cold items, e.g. under --hold-out-items) apart from the rest.
    users, cold = _gather_cat(users).numpy(), _gather_cat(cold).numpy()
    if cold.any():
        ranks = model_metrics.ranks
        for name, chosen in (("cold", cold), ("warm", ~cold)):
            group = RankingMetrics()
            group.update(torch.from_numpy(ranks[chosen]))
            result[name] = group.compute(ks)
    if ranks_out is not None and (rank == 0):
        _write_ranks(ranks_out, users=users, cold=cold, ranks=model_metrics.ranks, **extra)
    return result


def _write_ranks(path: Path, **arrays) -> None:
    """Per-user test ranks (and action-head predictions), for paired comparisons between runs."""
    import numpy as np

    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.rename(path)


def _gather_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    local = torch.cat(parts) if parts else torch.zeros(0)
    if not torch.distributed.is_initialized():
        return local
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, local)
    return torch.cat(everyone)


def load_popularity(shards: str, num_items: int) -> torch.Tensor:
    """Training-event count of every item index (the popularity baseline's scores)."""
    import polars as pl

    items = pl.read_parquet(Path(shards) / "items.parquet", columns=["index", "count"])
    counts = torch.zeros(num_items, dtype=torch.float64)
    counts[torch.tensor(items["index"].to_numpy())] = torch.tensor(items["count"].to_numpy(), dtype=torch.float64)
    return counts


@dataclass
class ItemText:
    """The shards' item text features as tensors (rows = item indices) and their spec."""

    spec: dict
    vectors: torch.Tensor
    token_offsets: torch.Tensor
    token_ids: torch.Tensor

    @property
    def buckets(self) -> int:
        return int(self.spec["tokenizer"]["buckets"])


def load_item_text(shards: str, num_items: int) -> ItemText:
    from data.shards import load_manifest
    from data.text import ItemTextFeatures

    spec = load_manifest(shards).get("text")
    if not spec:
        raise ValueError(
            f"{shards}: no item text features; prepare the shards with --item-text for model.item_text / item_text_tokens"
        )
    features = ItemTextFeatures.load(Path(shards) / spec["file"])
    if len(features.vectors) != num_items:
        raise ValueError(f"{shards}: text features for {len(features.vectors)} items, the vocabulary has {num_items}")
    return ItemText(
        spec,
        torch.from_numpy(features.vectors),
        torch.from_numpy(features.token_offsets),
        torch.from_numpy(features.token_ids),
    )


@torch.no_grad()
def compose_items(
    model: SequenceRecommender,
    start: int,
    id_rows: torch.Tensor,
    text: ItemText | None,
    has_id: torch.Tensor,
    token_table: torch.Tensor | None,
) -> torch.Tensor:
    """Item vectors of rows [start, start + len(id_rows)) in one process: what the sharded tables
    give in training, from a plain ID block and token table (export, consolidation)."""
    if not model.cfg.uses_text:
        return id_rows
    stop = start + len(id_rows)
    return model.item_encoder.from_tables(
        id_rows,
        text.vectors[start:stop],
        token_table,
        text.token_ids,
        text.token_offsets[start : stop + 1],
        has_id[start:stop],
    )


def positive_actions(shards: str, num_actions: int, minimum: float) -> torch.Tensor:
    """Which action indices count as positive for the action head: numeric values >= minimum
    (a rating of 4 or 5, say); non-numeric event types are negative."""
    positive = torch.zeros(max(num_actions, 1), dtype=torch.bool)
    path = Path(shards) / "actions.parquet"
    if num_actions and path.exists():
        import polars as pl

        for index, value in pl.read_parquet(path).select("index", "value").iter_rows():
            with contextlib.suppress(ValueError):
                positive[index] = float(value) >= minimum
    return positive


def save_model(
    directory: Path, dense_state: dict, table: torch.Tensor, meta: dict, token_table: torch.Tensor | None = None
) -> None:
    """The best weights of a run: dense state, full item table (each item's scoring vector, text
    parts included), the text-token table of text-aware models, and a JSON meta (config, step,
    metrics) so that loading needs no flags. Files are written under temporary names first."""
    tables = {"items": table} | ({"text_tokens": token_table} if token_table is not None else {})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in (
        (
            SAVED_DENSE,
            lambda p: save_file({k: v.detach().float().contiguous().cpu() for k, v in dense_state.items()}, p),
        ),
        (SAVED_ITEMS, lambda p: save_file({k: v.detach().float().contiguous().cpu() for k, v in tables.items()}, p)),
        (SAVED_META, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=float))),
    ):
        tmp = directory / f".{name}.tmp"
        write(str(tmp))
        tmp.rename(directory / name)


def build_model(meta: dict) -> SequenceRecommender:
    """An untrained model shaped as the one ``meta`` (a saved model's or checkpoint's) describes."""
    vocab = meta["vocab"]
    return SequenceRecommender(
        ModelConfig(**meta["config"]["model"]), vocab["actions"], vocab["gaps"], vocab.get("text_dim", 0)
    )


def load_model(directory: Path) -> tuple[dict, SequenceRecommender, torch.Tensor]:
    directory = Path(directory)
    if not (directory / SAVED_META).exists():
        raise FileNotFoundError(f"{directory}: no {SAVED_META}; not a saved lmrec model")
    meta = json.loads((directory / SAVED_META).read_text())
    model = build_model(meta)
    model.load_state_dict(load_file(str(directory / SAVED_DENSE)))
    return meta, model.eval(), load_file(str(directory / SAVED_ITEMS))["items"]


def evaluate_saved(directory: Path, split: str = "test", shards: str | None = None) -> dict:
    """``lmrec eval``: a saved model on a split of its own shards (or others with the same
    vocabulary), in one process."""
    from data.shards import load_manifest
    from train.config import config_from_dict

    meta, model, table = load_model(directory)
    cfg = config_from_dict(meta["config"])
    shards = shards or cfg.data.shards
    manifest = load_manifest(shards)
    if manifest["vocab"]["items"] != len(table):
        raise ValueError(
            f"{shards}: {manifest['vocab']['items']} item indices, the model was trained with {len(table)}"
        )
    popularity = load_popularity(shards, len(table))
    positive = positive_actions(shards, meta["vocab"]["actions"], cfg.model.positive_action_min)
    return evaluate(model, model, table, popularity, shards, split, cfg, positive_action=positive)


def metrics_table(result: dict) -> str:
    keys = [k for k in result["model"] if k != "users"]
    lines = [f"{'metric':<10}{'model':>10}{'popularity':>12}"]
    for key in keys:
        lines.append(f"{key:<10}{result['model'][key]:>10.4f}{result['popularity'][key]:>12.4f}")
    low, high = result["model_ndcg10_ci"]
    lines.append(f"test users {result['model']['users']}; model NDCG@10 95% bootstrap interval [{low:.4f}, {high:.4f}]")
    for group in ("cold", "warm"):
        if group in result:
            values = result[group]
            lines.append(
                f"{group} targets ({values['users']} users): HR@10 {values['HR@10']:.4f}, NDCG@10 {values['NDCG@10']:.4f}"
            )
    if "action" in result:
        action = result["action"]
        lines.append(
            "action head (positive next action): "
            + ", ".join(f"{k} {action[k]:.4f}" for k in ("AUC", "precision", "recall", "F1"))
        )
    return "\n".join(lines)
