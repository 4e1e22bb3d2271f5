"""Full-ranking evaluation, shared by the Trainer and ``lmrec eval``.

Each rank scores its share of the users (the loader splits them) against the whole item table,
and the per-user ranks are gathered, so the result is exact and equal to a single-process run.
The popularity baseline (training-event counts) is scored by the same code beside the model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.loader import LoaderConfig, iterate_epoch, make_loader
from model.config import ModelConfig
from model.modeling import SequenceRecommender
from train.metrics import RankingMetrics, binary_metrics, popularity_scores, seen_mask, target_ranks

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
) -> dict:
    """``forward(item_embeddings, lengths, actions, gaps)`` runs the dense model (the DeepSpeed
    engine in training, the module itself otherwise); ``table`` is the full (V, D) item table."""
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
        popularity_metrics.update(target_ranks(baseline, targets, exclude).cpu(), batch["weights"])
        if model.action_head is not None:
            real = batch["weights"] > 0
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
    if model.action_head is not None:
        probabilities, labels = _gather_cat(action_probabilities), _gather_cat(action_labels)
        result["action"] = binary_metrics(probabilities, labels)
    return result


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


def save_model(directory: Path, dense_state: dict, table: torch.Tensor, meta: dict) -> None:
    """The best weights of a run: dense state, full item table and a JSON meta (config, step,
    metrics) so that loading needs no flags. Files are written under temporary names first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in (
        (
            SAVED_DENSE,
            lambda p: save_file({k: v.detach().float().contiguous().cpu() for k, v in dense_state.items()}, p),
        ),
        (SAVED_ITEMS, lambda p: save_file({"items": table.detach().float().contiguous().cpu()}, p)),
        (SAVED_META, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=float))),
    ):
        tmp = directory / f".{name}.tmp"
        write(str(tmp))
        tmp.rename(directory / name)


def load_model(directory: Path) -> tuple[dict, SequenceRecommender, torch.Tensor]:
    directory = Path(directory)
    if not (directory / SAVED_META).exists():
        raise FileNotFoundError(f"{directory}: no {SAVED_META}; not a saved lmrec model")
    meta = json.loads((directory / SAVED_META).read_text())
    model = SequenceRecommender(ModelConfig(**meta["config"]["model"]), meta["vocab"]["actions"], meta["vocab"]["gaps"])
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
    if "action" in result:
        action = result["action"]
        lines.append(
            "action head (positive next action): "
            + ", ".join(f"{k} {action[k]:.4f}" for k in ("AUC", "precision", "recall", "F1"))
        )
    return "\n".join(lines)
