"""Offline evaluation: full-ranking retrieval metrics, bootstrap intervals and binary-classifier metrics.

Everything ranks the target against the *whole* catalogue rather than a sampled set of negatives,
because sampled metrics are known to reorder models (Krichene & Rendle, 2020). The same code scores
the model and the baselines, so their numbers are comparable by construction.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "RankingMetrics",
    "binary_metrics",
    "paired_bootstrap",
    "popularity_scores",
    "seen_mask",
    "target_ranks",
]

# Rows drawn per bootstrap chunk are capped so that (chunk x users) indices stay around this many
# int64s: a million users times a thousand resamples would otherwise need 8 GB at once.
_BOOTSTRAP_CELLS = 1 << 22


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    reserved: int = 2,
) -> torch.Tensor:
    """0-based rank of each user's target among every candidate item.

    Ties are counted pessimistically (every other candidate with the target's exact score is
    placed ahead of it): a model that outputs a constant, or collapses to a few distinct scores,
    must not get credit for the ties, and a deterministic rule keeps runs reproducible. NaN scores
    are treated as -inf for the same reason: a diverged model must rank last, not first.

    Columns ``[0, reserved)`` are the padding and unknown tokens; they are never items a user could
    be recommended, so they are never candidates. ``exclude`` removes further candidates (usually
    the items already seen, see :func:`seen_mask`), except the target itself: in a repeat-consumption
    data set the target may be in the history, and dropping it would silently lose the user.

    ``scores`` is ``[B, V]`` or ``[V]`` (one score vector shared by all users, e.g. popularity);
    ``targets`` is ``[B]``. Returns int64 ``[B]`` on the device of ``scores``.
    """
    if scores.dim() == 1:
        scores = scores.unsqueeze(0).expand(targets.shape[0], -1)
    if scores.dim() != 2 or targets.dim() != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected scores [B, V] and targets [B], got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    batch, num_items = scores.shape
    targets = targets.to(device=scores.device, dtype=torch.int64)
    if batch and (int(targets.min()) < 0 or int(targets.max()) >= num_items):
        raise ValueError(f"targets must lie in [0, {num_items})")
    if not scores.is_floating_point():
        scores = scores.double()  # exact for integer counts up to 2**53
    scores = scores.nan_to_num(nan=-math.inf)

    if exclude is None:
        candidates = torch.ones((batch, num_items), dtype=torch.bool, device=scores.device)
    else:
        if exclude.shape != (batch, num_items):
            raise ValueError(f"exclude must have shape {(batch, num_items)}, got {tuple(exclude.shape)}")
        candidates = ~exclude.to(device=scores.device, dtype=torch.bool)
    candidates[:, :reserved] = False
    rows = torch.arange(batch, device=scores.device)
    # The target is not its own competitor; with it out of the candidate set, ">=" counts exactly
    # the strictly better candidates plus the other ties.
    candidates[rows, targets] = False
    target_scores = scores[rows, targets].unsqueeze(1)
    return (scores >= target_scores).logical_and_(candidates).sum(dim=1)


def seen_mask(
    seen_items: torch.Tensor,
    seen_lengths: torch.Tensor,
    num_items: int,
) -> torch.Tensor:
    """Dense ``[B, num_items]`` exclusion mask from the loader's jagged ``seen_items``/``seen_lengths``.

    The loader ships histories jagged because users differ by orders of magnitude in length; the
    ranking needs a dense mask aligned with the score matrix, built on the device the items are on
    so that no per-row Python loop or host round trip is needed.
    """
    seen_items = seen_items.to(torch.int64)
    seen_lengths = seen_lengths.to(device=seen_items.device, dtype=torch.int64)
    if int(seen_lengths.sum()) != seen_items.numel():
        raise ValueError(f"seen_lengths sum to {int(seen_lengths.sum())} but there are {seen_items.numel()} seen_items")
    if seen_items.numel() and (int(seen_items.min()) < 0 or int(seen_items.max()) >= num_items):
        raise ValueError(f"seen_items must lie in [0, {num_items})")
    mask = torch.zeros((seen_lengths.shape[0], num_items), dtype=torch.bool, device=seen_items.device)
    rows = torch.repeat_interleave(torch.arange(seen_lengths.shape[0], device=seen_items.device), seen_lengths)
    mask[rows, seen_items] = True
    return mask


def popularity_scores(counts: torch.Tensor) -> torch.Tensor:
    """Item counts as scores, so the popularity baseline goes through the very same :func:`target_ranks`.

    Float64 keeps integer counts exact (float32 would merge counts above 2**24 into false ties).
    Reserved columns need no special value: :func:`target_ranks` never treats them as candidates.
    """
    return counts.to(torch.float64)


def _bootstrap_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Means of ``samples`` resamples with replacement, drawn in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    n = len(values)
    chunk = max(1, _BOOTSTRAP_CELLS // max(n, 1))
    means = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        index = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[index].mean(axis=1)
    return means


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean per-user difference ``b - a`` with a percentile bootstrap interval.

    Resampling the users *jointly* for both systems removes the between-user variance, which is
    usually far larger than the difference between two models; two separate intervals that
    overlap therefore say little, while an interval of the paired difference that excludes 0 does.
    ``a`` and ``b`` must be per-user values for the same users in the same order
    (see :meth:`RankingMetrics.per_user`).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D and aligned, got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        return math.nan, math.nan, math.nan
    diff = b - a
    low, high = _percentiles(_bootstrap_means(diff, samples, seed), level)
    return float(diff.mean()), low, high


class RankingMetrics:
    """Accumulates per-user 0-based target ranks and turns them into HR@k, NDCG@k and MRR.

    Ranks rather than running sums are kept because the bootstrap intervals and the paired
    comparisons between models need per-user values, and because any set of cut-offs can then be
    computed after the fact. One int64 per user is small even for millions of users.
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._gathered = False

    def update(self, ranks: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Adds one batch of ranks.

        ``weights`` is the loader's per-user weight. It is a padding mask, not an importance
        weight: the loader pads ranks that ran out of data with weight-0 users so that every rank
        takes the same number of collective steps, and those must not count. Any positive weight
        counts the user once, so the metrics stay plain per-user means that the bootstrap can resample.
        """
        if self._gathered:
            raise RuntimeError("update() after gather(): the metrics already hold every rank's users")
        ranks = ranks.detach().reshape(-1).to("cpu", torch.int64).numpy()
        if weights is not None:
            weights = weights.detach().reshape(-1).to("cpu", torch.float64).numpy()
            if weights.shape != ranks.shape:
                raise ValueError(f"weights {weights.shape} do not match ranks {ranks.shape}")
            if (weights < 0).any() or np.isnan(weights).any():
                raise ValueError("weights must be non-negative")
            ranks = ranks[weights > 0]
        if (ranks < 0).any():
            raise ValueError("ranks must be non-negative")
        self._chunks.append(ranks.copy())

    @property
    def ranks(self) -> np.ndarray:
        """All accumulated ranks (padding removed), in update order."""
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int64)]
        return self._chunks[0]

    def __len__(self) -> int:
        return len(self.ranks)

    def gather(self, group=None) -> None:
        """Makes every process hold every process's users; a no-op without an initialized process group.

        Each data-parallel rank only sees its shard of the users, but the metrics and especially
        the bootstrap intervals need the full population, and having every rank hold it means any
        rank can log or checkpoint the result. ``all_gather_object`` handles the uneven user counts
        per rank and works on gloo as well as NCCL (which needs ``torch.cuda.set_device`` done, as
        for any NCCL collective). Calling it twice does not duplicate users.
        """
        if self._gathered or not (dist.is_available() and dist.is_initialized()):
            return
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, self.ranks, group=group)
        self._chunks = [np.concatenate(parts).astype(np.int64, copy=False)]
        self._gathered = True

    merge_distributed = gather

    def per_user(self, metric_name: str) -> np.ndarray:
        """Per-user values of ``HR@k``, ``NDCG@k`` or ``MRR``, in accumulation order.

        Exposed for paired bootstraps between two systems evaluated on the same users in the same
        order (see :func:`paired_bootstrap`).
        """
        ranks = self.ranks.astype(np.float64)
        name, _, k = metric_name.partition("@")
        if name == "MRR" and not k:
            return 1.0 / (ranks + 1.0)
        if name in ("HR", "NDCG") and k:
            try:
                cutoff = int(k)
            except ValueError:
                cutoff = 0
            if cutoff <= 0:
                raise ValueError(f"bad cut-off in metric name {metric_name!r}")
            hit = ranks < cutoff
            if name == "HR":
                return hit.astype(np.float64)
            # One relevant item, so the ideal DCG is 1 and NDCG is just the discount of the hit.
            return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
        raise ValueError(f"unknown metric {metric_name!r}; expected 'HR@k', 'NDCG@k' or 'MRR'")

    def compute(self, ks: tuple[int, ...] = (1, 5, 10, 50, 200)) -> dict[str, float]:
        """Means over users; NaN (not 0) when there are no users, so an empty split cannot pass for a bad model."""
        users = len(self.ranks)
        names = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + ["MRR"]
        result = {name: float(self.per_user(name).mean()) if users else math.nan for name in names}
        result["users"] = users
        return result

    def bootstrap(
        self,
        metric: str,
        k: int | None = None,
        samples: int = 1000,
        seed: int = 0,
        level: float = 0.95,
    ) -> tuple[float, float]:
        """Percentile bootstrap interval, over users, of a metric's mean.

        Accepts ``bootstrap("NDCG@10")``, ``bootstrap("NDCG", 10)`` or ``bootstrap("MRR")``. Users
        are the sampling unit because they are what the test set samples: a difference of a few
        tenths of a point on a few thousand users is often noise, and the interval says so.
        """
        if k is not None:
            if "@" in metric:
                raise ValueError(f"cut-off given twice: {metric!r} and k={k}")
            metric = f"{metric}@{k}"
        values = self.per_user(metric)
        if len(values) == 0:
            return math.nan, math.nan
        return _percentiles(_bootstrap_means(values, samples, seed), level)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank, which makes AUC count a tied pair as half."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    starts = ends - counts
    return ((starts + ends + 1) / 2.0)[inverse]


def binary_metrics(
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    threshold: float = 0.5,
) -> dict[str, float]:
    """AUC, precision, recall, F1 and accuracy of a binary head (e.g. click / no click).

    AUC is the Mann-Whitney statistic from average ranks: exact, O(n log n), with tied scores
    counted as half a correct pair, so a constant predictor gets 0.5 rather than an arbitrary value
    depending on sort order. Predictions are ``probability >= threshold``. Undefined quantities
    (AUC with one class only, precision with no predicted positive, recall with no actual
    positive) are NaN rather than 0, so they cannot be mistaken for a measured failure.
    """
    p = probabilities.detach().reshape(-1).to("cpu", torch.float64).numpy()
    y = labels.detach().reshape(-1).to("cpu", torch.float64).numpy()
    if p.shape != y.shape:
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} differ in size")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    positive = y == 1.0
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos

    if n_pos and n_neg:
        rank_sum = _average_ranks(p)[positive].sum()
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    else:
        auc = math.nan

    predicted = p >= threshold
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float((predicted == positive).mean()) if len(y) else math.nan
    return {
        "AUC": float(auc),
        "precision": float(precision),
        "recall": float(recall),
        "F1": float(f1),
        "accuracy": accuracy,
        "count": len(y),
    }
