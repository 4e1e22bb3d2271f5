"""Full-ranking evaluation, shared by the Trainer and ``lmrec eval``.

Each rank scores its share of the users (the loader splits them) against the whole item table,
``eval.score_block_rows`` items at a time (memory: batch x block, whatever the catalog), and the
per-user ranks are gathered, so the result is exact and equal to a single-process run.
The popularity baseline (training-event counts) is scored by the same code beside the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.loader import LoaderConfig, iterate_epoch, make_loader
from metrics import RankingMetrics, binary_metrics, blocked_target_ranks, popularity_scores, seen_blocks
from model.modeling import SequenceRecommender


class Evaluator:
    """Scores one split of ``shards``: ``counts`` are the items' training-event counts (the
    baseline, and what makes a target cold), ``positive_action`` the action head's labels."""

    def __init__(
        self,
        shards: str,
        cfg,
        counts: torch.Tensor,
        positive_action: torch.Tensor,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device = torch.device("cpu"),
    ):
        self.shards, self.cfg, self.counts, self.positive_action = shards, cfg, counts, positive_action
        self.rank, self.world_size, self.device = rank, world_size, device

    @torch.no_grad()
    def __call__(
        self, forward, model: SequenceRecommender, table: torch.Tensor, split: str, ranks_out: Path | None = None
    ) -> dict:
        """``forward(item_embeddings, lengths, actions, gaps)`` runs the dense model (the DeepSpeed
        engine in training, the module itself otherwise); ``table`` is the full (V, D) item table.
        ``ranks_out``: also write every user's target rank there (rank 0)."""
        cfg, device = self.cfg, self.device
        dataset, loader = make_loader(
            self.shards,
            LoaderConfig(
                split=split,
                batch_size=cfg.data.eval_batch_size,
                max_len=cfg.model.max_len,
                num_workers=cfg.data.num_workers,
                with_seen=cfg.eval.filter_seen,
                length_buckets=cfg.data.length_buckets,
            ),
            self.rank,
            self.world_size,
        )
        baseline = popularity_scores(self.counts).to(device)
        model_metrics, popularity_metrics = RankingMetrics(), RankingMetrics()
        users, cold = [], []
        action_probabilities, action_labels = [], []
        for batch in iterate_epoch(dataset, loader, epoch=0):
            items, lengths = batch["items"].to(device), batch["lengths"].to(device)
            actions = batch["actions"].to(device) if "actions" in batch else None
            gaps = batch["gaps"].to(device) if "gaps" in batch else None
            hidden = model.last_hidden(forward(table[items], lengths, actions, gaps), lengths).float()
            seen = None
            if cfg.eval.filter_seen:
                seen = seen_blocks(batch["seen_items"].to(device), batch["seen_lengths"].to(device), len(table))
            targets = batch["target_items"].to(device)
            # The targets' scores by the same matmul the blocks use, so that ties break the same way.
            target_scores = model.scores(hidden, table[targets]).diagonal()
            ranks = blocked_target_ranks(
                lambda start, stop, hidden=hidden: model.scores(hidden, table[start:stop]),
                len(table), targets, target_scores, seen, cfg.eval.score_block_rows,
            )  # fmt: skip
            model_metrics.update(ranks.cpu(), batch["weights"])
            real = batch["weights"] > 0
            users.append(batch["users"][real])
            cold.append((self.counts[targets.cpu()] == 0)[real])
            ranks = blocked_target_ranks(
                lambda start, stop: baseline[start:stop], len(table), targets, baseline[targets], seen,
                cfg.eval.score_block_rows,
            )  # fmt: skip
            popularity_metrics.update(ranks.cpu(), batch["weights"])
            if model.action_head is not None:
                probabilities = torch.sigmoid(model.action_logits(hidden, table[targets])).cpu()
                action_probabilities.append(probabilities[real])
                action_labels.append(self.positive_action[batch["target_actions"]][real].cpu())
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
        if ranks_out is not None and self.rank == 0:
            _write_ranks(ranks_out, users=users, cold=cold, ranks=model_metrics.ranks, **extra)
        return result


def _write_ranks(path: Path, **arrays) -> None:
    """Per-user test ranks (and action-head predictions), for paired comparisons between runs."""
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


def evaluate_source(source: str | Path, split: str = "test", shards: str | None = None) -> dict:
    """``lmrec eval``: a saved model or checkpoint (train.saved_model.resolve_source) on a split of
    its own shards (or others with the same vocabulary), in one process."""
    from data.shards import load_manifest
    from train.config import config_from_dict
    from train.items import load_counts, positive_actions
    from train.saved_model import ARTIFACT, SourceError, load_source

    trained = load_source(source, shards)
    if trained.kind == ARTIFACT or trained.training.get("config") is None:
        raise SourceError(f"{trained.source}: a serving artifact; it is evaluated through the serving code")
    cfg = config_from_dict(trained.training["config"])
    shards = str(shards or cfg.data.shards)
    items = load_manifest(shards)["vocab"]["items"]
    if items != trained.num_items:
        raise SourceError(f"{shards}: {items} item indices, the model was trained with {trained.num_items}")
    model = trained.model()
    positive = positive_actions(shards, trained.config.num_actions, cfg.loss.positive_action_min)
    evaluator = Evaluator(shards, cfg, load_counts(shards, items), positive)
    return evaluator(model, model, trained.table(), split)


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
