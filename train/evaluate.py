"""Full-ranking evaluation, shared by the Trainer and ``lmrec eval``.

Two passes, so that no rank ever holds the whole item table (a 10^8 x 64 table is 25.6 GB):

1. Each rank runs its share of the users (the loader splits them, every rank taking the same
   number of batches) and keeps each user's last hidden state and target score.
2. Every rank gets every user's state, and the catalog is swept in rounds: in each round each
   rank fetches its own ``eval.score_block_rows`` items (one collective lookup, so each item
   vector crosses the wire once) and counts, for every user, the items of its block that score
   at least the target. The counts add up across ranks (``all_reduce``) to exact ranks, equal to
   a single-process run's.

Memory per rank: one item block, and the kept users' states and histories. ``eval.user_fraction``
evaluates a fixed sample of users (chosen by a hash of the user index: the same users whatever
the world size, sharding or order). The popularity baseline (training-event counts) is scored by
the same sweep beside the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.loader import LoaderConfig, iterate_epoch, make_loader
from metrics import (
    RankingMetrics,
    binary_metrics,
    blocked_target_ranks,
    popularity_scores,
    ranks_from_top_k,
    seen_blocks,
)
from model.modeling import SequenceRecommender
from model.semantic import CodeTrie, beam_search

_HASH = 0x9E3779B1  # Knuth's multiplicative hash (2^32 / golden ratio)


def user_hash(users: torch.Tensor) -> torch.Tensor:
    """Each user index's place in [0, 1), spread evenly whatever the indices' order."""
    return ((users.to(torch.int64) + 1) * _HASH % (1 << 32)).double() / (1 << 32)


def in_user_sample(users: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which users belong to the fixed evaluation sample of ``fraction`` of the users."""
    if fraction >= 1.0:
        return torch.ones(users.shape, dtype=torch.bool)
    return user_hash(users) < fraction


class Evaluator:
    """Scores one split of ``shards``: ``counts`` are the items' training-event counts (the
    baseline, and what makes a target cold), ``positive_action`` the action head's labels.
    ``trie``: the catalog's semantic IDs, for a model that generates them (its ranks come from
    constrained beam search, exact below ``eval.beam_width - 1``)."""

    def __init__(
        self,
        shards: str,
        cfg,
        counts: torch.Tensor,
        positive_action: torch.Tensor,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device = torch.device("cpu"),
        trie: CodeTrie | None = None,
    ):
        self.shards, self.cfg, self.counts, self.positive_action = shards, cfg, counts, positive_action
        self.trie = trie
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_items = len(counts)

    @torch.no_grad()
    def __call__(self, forward, model: SequenceRecommender, vectors, split: str, ranks_out: Path | None = None) -> dict:
        """``forward(item_embeddings, lengths, actions, gaps)`` runs the dense model (the DeepSpeed
        engine in training, the module itself otherwise); ``vectors(ids)`` gives items' vectors
        (collective in training: every rank calls it the same number of times).
        ``ranks_out``: also write every user's target rank there (rank 0)."""
        users = self._encode(forward, model, vectors, split)
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, users)
            users = {key: torch.cat([part[key] for part in everyone]) for key in users}
        generates = model.code_decoder is not None
        model_ranks, popularity_ranks = self._sweep(model, vectors, users, score_model=not generates)
        ks = tuple(self.cfg.eval.ks)
        max_rank, model_ks = None, ks
        if generates:
            model_ranks = self._generate(model, users)
            max_rank = self.cfg.eval.beam_width - 1
            model_ks = tuple(k for k in ks if k <= max_rank)
        model_metrics, popularity_metrics = RankingMetrics(max_rank), RankingMetrics()
        model_metrics.update(model_ranks)
        popularity_metrics.update(popularity_ranks)
        result = {
            "split": split,
            "model": model_metrics.compute(model_ks),
            "popularity": popularity_metrics.compute(ks),
            "model_ndcg10_ci": model_metrics.bootstrap("NDCG@10", samples=self.cfg.eval.bootstrap_samples),
        }
        extra = {}
        if model.action_head is not None:
            result["action"] = binary_metrics(users["action_probability"], users["action_label"])
            extra = {key: users[key].numpy() for key in ("action_probability", "action_label")}
        # Targets without training events (cold items, e.g. under --hold-out-items) apart from the rest.
        cold = (self.counts[users["targets"]] == 0).numpy()
        if cold.any():
            for name, chosen in (("cold", cold), ("warm", ~cold)):
                group = RankingMetrics(max_rank)
                group.update(model_ranks[torch.from_numpy(chosen)])
                result[name] = group.compute(model_ks)
        if ranks_out is not None and self.rank == 0:
            _write_ranks(ranks_out, users=users["users"].numpy(), cold=cold, ranks=model_metrics.ranks, **extra)
        return result

    def _encode(self, forward, model, vectors, split: str) -> dict[str, torch.Tensor]:
        """Pass 1: this rank's users (those in the sample, padding dropped), on the CPU."""
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
        kept: dict[str, list[torch.Tensor]] = {}
        for batch in iterate_epoch(dataset, loader, epoch=0):
            # Padding rows and users outside the sample go before the forward.
            keep = (batch["weights"] > 0) & in_user_sample(batch["users"], cfg.eval.user_fraction)
            lengths = batch["lengths"][keep]
            width = max(1, int(lengths.max())) if len(lengths) else 1
            items = batch["items"][keep, :width].to(device)
            targets = batch["target_items"][keep].to(device)
            # One lookup for the histories and the targets: one collective per batch on every rank,
            # whether or not it kept any user.
            looked_up = vectors(torch.cat([items.reshape(-1), targets]))
            if not keep.any():
                continue
            history, target_vectors = looked_up[: items.numel()].reshape(*items.shape, -1), looked_up[items.numel() :]
            actions = batch["actions"][keep, :width].to(device) if "actions" in batch else None
            gaps = batch["gaps"][keep, :width].to(device) if "gaps" in batch else None
            hidden = model.last_hidden(forward(history, lengths.to(device), actions, gaps), lengths.to(device)).float()
            part = {
                "users": batch["users"][keep],
                "hidden": hidden.cpu(),
                "targets": targets.cpu(),
                # Scored by the same matmul the blocks use, so that ties break the same way.
                "target_scores": model.scores(hidden, target_vectors).diagonal().cpu(),
            }
            if cfg.eval.filter_seen:
                seen_lengths = batch["seen_lengths"].to(torch.int64)
                owner = torch.repeat_interleave(torch.arange(len(seen_lengths)), seen_lengths)
                part["seen_items"] = batch["seen_items"].to(torch.int64)[keep[owner]]
                part["seen_lengths"] = seen_lengths[keep]
            if model.action_head is not None:
                part["action_probability"] = torch.sigmoid(model.action_logits(hidden, target_vectors)).cpu()
                part["action_label"] = self.positive_action[batch["target_actions"][keep]].cpu()
            for key, value in part.items():
                kept.setdefault(key, []).append(value)
        if not kept:  # no user of the sample on this rank: empty parts of the same shapes
            dim = model.cfg.hidden_size
            empty = {"users": [], "hidden": torch.zeros(0, dim), "targets": [], "target_scores": torch.zeros(0)}
            if cfg.eval.filter_seen:
                empty |= {"seen_items": [], "seen_lengths": []}
            if model.action_head is not None:
                empty |= {"action_probability": torch.zeros(0), "action_label": torch.zeros(0, dtype=torch.bool)}
            return {
                k: v if isinstance(v, torch.Tensor) else torch.zeros(0, dtype=torch.int64) for k, v in empty.items()
            }
        return {key: torch.cat(values) for key, values in kept.items()}

    def _generate(self, model, users: dict) -> torch.Tensor:
        """Pass 2 of a semantic-ID model: each user's rank of its target in the beam search's list,
        seen items excluded (the target itself stays a candidate, as in the sweep). Each rank
        searches its share of the users; the ranks add up across ranks."""
        cfg, device, world = self.cfg, self.device, self.world_size
        beam, chunk = cfg.eval.beam_width, cfg.data.eval_batch_size
        n = len(users["targets"])
        ranks = torch.zeros(n, dtype=torch.int64)
        offsets = torch.zeros(n + 1, dtype=torch.int64)
        if cfg.eval.filter_seen:
            offsets[1:] = torch.cumsum(users["seen_lengths"], 0)
        for lo in range(self.rank * chunk, n, world * chunk):
            hi = min(n, lo + chunk)
            targets = users["targets"][lo:hi]
            exclude = None
            if cfg.eval.filter_seen:
                exclude = []
                for b in range(lo, hi):
                    seen = users["seen_items"][offsets[b] : offsets[b + 1]]
                    exclude.append(seen[seen != users["targets"][b]])
            scores, items = beam_search(model.code_decoder, self.trie, users["hidden"][lo:hi].to(device), beam, beam,
                                        exclude)  # fmt: skip
            ranks[lo:hi] = ranks_from_top_k(items, scores.cpu(), targets)
        if world > 1:
            dist.all_reduce(ranks)
        return ranks

    def _sweep(self, model, vectors, users: dict, score_model: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 2: every user's rank of its target, the model's (``score_model``) and the
        popularity baseline's."""
        cfg, device, world = self.cfg, self.device, self.world_size
        block, chunk, num_items = cfg.eval.score_block_rows, cfg.data.eval_batch_size, self.num_items
        n = len(users["targets"])
        targets = users["targets"]
        chunks = []
        offsets = torch.zeros(n + 1, dtype=torch.int64)
        if cfg.eval.filter_seen:
            offsets[1:] = torch.cumsum(users["seen_lengths"], 0)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            seen = None
            if cfg.eval.filter_seen:
                seen_items = users["seen_items"][offsets[lo] : offsets[hi]].to(device)
                seen = seen_blocks(seen_items, users["seen_lengths"][lo:hi].to(device), num_items)
            chunks.append((lo, hi, users["hidden"][lo:hi].to(device), seen))
        model_ranks = torch.zeros(n, dtype=torch.int64, device=device)
        popularity_ranks = torch.zeros(n, dtype=torch.int64, device=device)
        target_popularity = popularity_scores(self.counts[targets]).to(device)
        round_rows = block * world
        for base in range(0, num_items, round_rows):
            # This round's rows, split evenly: rank r scores [first, last).
            share = -(-min(round_rows, num_items - base) // world)
            first = min(num_items, base + self.rank * share)
            last = min(num_items, first + share)
            rows = vectors(torch.arange(first, last)).float()
            # Per round, not (V,) float64 scores at once: 0.8 GB per rank at 10^8 items.
            popularity = popularity_scores(self.counts[first:last]).to(device)
            for lo, hi, hidden, seen in chunks:
                chunk_targets = targets[lo:hi].to(device)
                if score_model:
                    model_ranks[lo:hi] += blocked_target_ranks(
                        lambda a, b, hidden=hidden, rows=rows, first=first: model.scores(hidden, rows[a - first : b - first]),
                        num_items, chunk_targets, users["target_scores"][lo:hi].to(device), seen, block, span=(first, last),
                    )  # fmt: skip
                popularity_ranks[lo:hi] += blocked_target_ranks(
                    lambda a, b, popularity=popularity, first=first: popularity[a - first : b - first],
                    num_items, chunk_targets, target_popularity[lo:hi], seen, block, span=(first, last),
                )  # fmt: skip
        if world > 1:
            dist.all_reduce(model_ranks)
            dist.all_reduce(popularity_ranks)
        return model_ranks.cpu(), popularity_ranks.cpu()


def _write_ranks(path: Path, **arrays) -> None:
    """Per-user test ranks (and action-head predictions), for paired comparisons between runs."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.rename(path)


def evaluate_source(source: str | Path, split: str = "test", shards: str | None = None) -> dict:
    """``lmrec eval``: a saved model or checkpoint (train.saved_model.resolve_source) on a split of
    its own shards (or others with the same vocabulary), in one process."""
    from data.shards import load_manifest
    from train.config import config_from_dict
    from train.items import load_counts, load_semantic_codes, positive_actions
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
    trie = None
    if model.code_decoder is not None:
        trie = CodeTrie.build(load_semantic_codes(shards, items), trained.config.level_sizes)
    evaluator = Evaluator(shards, cfg, load_counts(shards, items), positive, trie=trie)
    table = trained.table()
    return evaluator(model, model, lambda ids: table[ids], split)


def metrics_table(result: dict) -> str:
    keys = [k for k in result["model"] if k != "users"]
    lines = [f"{'metric':<10}{'model':>10}{'popularity':>12}"]
    for key in keys:
        lines.append(f"{key:<10}{result['model'][key]:>10.4f}{result['popularity'].get(key, float('nan')):>12.4f}")
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
