"""Full-ranking retrieval metrics and bootstrap intervals.

Everything ranks the target against the *whole* catalogue rather than a sampled set of negatives,
because sampled metrics are known to reorder models (Krichene & Rendle, 2020). The same code scores
the model and the baselines, so their numbers are comparable by construction. Ranks come either
from a full score matrix (:func:`target_ranks`) or from a ranker's top-K lists
(:func:`ranks_from_top_k`), under one tie rule, so the two agree wherever a list can tell.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_KS",
    "RankingMetrics",
    "blocked_target_ranks",
    "paired_bootstrap",
    "popularity_scores",
    "ranks_from_top_k",
    "seen_blocks",
    "seen_mask",
    "target_ranks",
]

# The cut-offs of HR@k and NDCG@k that training and artifact evaluation report unless configured
# otherwise. Exact values up to 200 from a top-K ranker need 201 candidates (see ranks_from_top_k).
DEFAULT_KS = (1, 5, 10, 50, 200)

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
    if exclude is not None and exclude.shape != (batch, num_items):
        raise ValueError(f"exclude must have shape {(batch, num_items)}, got {tuple(exclude.shape)}")
    targets = targets.to(device=scores.device, dtype=torch.int64)
    if batch and (int(targets.min()) < 0 or int(targets.max()) >= num_items):
        raise ValueError(f"targets must lie in [0, {num_items})")
    return blocked_target_ranks(
        lambda start, stop: scores[:, start:stop],
        num_items,
        targets,
        scores[torch.arange(batch, device=scores.device), targets],
        None if exclude is None else lambda start, stop: exclude[:, start:stop],
        block=max(num_items, 1),
        reserved=reserved,
    )


def blocked_target_ranks(
    score_block,
    num_items: int,
    targets: torch.Tensor,
    target_scores: torch.Tensor,
    exclude_block=None,
    block: int = 65536,
    reserved: int = 2,
    span: tuple[int, int] | None = None,
) -> torch.Tensor:
    """:func:`target_ranks` without the ``[B, V]`` score matrix: ``score_block(start, stop)``
    gives the users' scores of items ``[start, stop)`` (``[B, stop - start]``, or 1-D when every
    user shares them), scored ``block`` items at a time, so memory is ``B x block`` whatever the
    catalog. ``target_scores`` ``[B]`` are the targets' own scores, computed the way the blocks
    are (the same ties then break the same way); ``exclude_block(start, stop)``, where given,
    gives the ``[B, stop - start]`` items to exclude (:func:`seen_blocks`). :func:`target_ranks`
    is this with one block. ``span``: count only items ``[start, stop)``; the counts of disjoint
    row ranges add up to the rank over all of them (how ranks split the catalog)."""
    batch = targets.shape[0]
    device = target_scores.device
    targets = targets.to(device=device, dtype=torch.int64)
    if batch and (int(targets.min()) < 0 or int(targets.max()) >= num_items):
        raise ValueError(f"targets must lie in [0, {num_items})")
    if not target_scores.is_floating_point():
        target_scores = target_scores.double()
    target_scores = target_scores.nan_to_num(nan=-math.inf).unsqueeze(1)
    rows = torch.arange(batch, device=device)
    ranks = torch.zeros(batch, dtype=torch.int64, device=device)
    first, last = span or (0, num_items)
    for start in range(first, last, block):
        stop = min(start + block, last)
        scores = score_block(start, stop)
        if not scores.is_floating_point():
            scores = scores.double()
        scores = scores.nan_to_num(nan=-math.inf)
        if scores.dim() == 1:
            scores = scores.unsqueeze(0).expand(batch, -1)
        candidates = torch.ones((batch, stop - start), dtype=torch.bool, device=device)
        candidates[:, : max(0, reserved - start)] = False
        if exclude_block is not None:
            candidates &= ~exclude_block(start, stop).to(device=device, dtype=torch.bool)
        here = (targets >= start) & (targets < stop)
        candidates[rows[here], targets[here] - start] = False
        ranks += (scores >= target_scores).logical_and_(candidates).sum(dim=1)
    return ranks


def ranks_from_top_k(
    top_items: torch.Tensor,
    top_scores: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """0-based rank of each user's target from a ranker's top-L lists, clipped at ``L - 1``.

    Row ``b`` of ``top_items`` / ``top_scores`` (both ``[B, L]``) holds the ``L`` best candidates
    for user ``b`` and their scores, best first as ``torch.topk`` returns them (the order itself is
    not relied on). Entries scored -inf are padding: a row may have fewer real candidates than
    ``L``, and a top-K over a masked score matrix lists masked items with -inf. The list must come
    from the same candidate set as :func:`target_ranks` (reserved and excluded items masked, the
    target left a candidate) and NaN scores must already be -inf: ``torch.topk`` ranks NaN above
    everything, so NaN candidates would take the places of real ones, and NaN here raises.

    The tie rule is :func:`target_ranks`' (every other candidate with the target's exact score is
    ahead of it), but a list cannot tell what lies beyond it: any candidate outside it may tie with
    its lowest score. A rank is therefore only certain when some entry scores strictly below the
    target, which bounds everything outside the list below the target too; that makes ranks
    ``< L - 1`` exact, while a target at the last place, tied with the last place, or not in the
    list at all is only known to rank ``>= L - 1`` and gets ``L - 1``. Feed these ranks to
    ``RankingMetrics(max_rank=L - 1)``, which computes cut-offs ``k <= L - 1`` only: a caller that
    wants exact HR@K and NDCG@K asks the ranker for ``K + 1`` candidates.

    A target scored -inf cannot be told apart from padding, so it gets ``L - 1`` (a miss at every
    cut-off), which is also its full-matrix rank, clipped, whenever the row has at least ``L - 1``
    other candidates. Returns int64 ``[B]`` on the device of ``top_items``.
    """
    if top_items.dim() != 2 or top_scores.shape != top_items.shape or targets.shape != top_items.shape[:1]:
        raise ValueError(
            "expected top_items [B, L], top_scores [B, L] and targets [B], got "
            f"{tuple(top_items.shape)}, {tuple(top_scores.shape)} and {tuple(targets.shape)}"
        )
    length = top_items.shape[1]
    if length < 2:
        raise ValueError(f"lists of {length} candidates certify no rank; ask the ranker for K + 1 >= 2 candidates")
    if not top_scores.is_floating_point():
        top_scores = top_scores.double()
    top_scores = top_scores.to(top_items.device)
    if top_scores.isnan().any():
        raise ValueError("top_scores contain NaN: replace NaN scores by -inf before selecting the top K")
    is_target = top_items.to(torch.int64) == targets.to(device=top_items.device, dtype=torch.int64).unsqueeze(1)
    # An absent target scores -inf here, as does padding, so it is "behind" the whole list.
    target_scores = top_scores.masked_fill(~is_target, -math.inf).amax(dim=1, keepdim=True)
    # With an entry strictly below the target this count is exact and at most L - 2. Without one,
    # all L - 1 other entries are at or above the target and the count reaches L - 1: exactly the
    # uncertain cases, which the clip turns into "L - 1 or worse".
    ahead = (top_scores >= target_scores).logical_and_(~is_target).sum(dim=1)
    return ahead.clamp_(max=length - 1)


def seen_blocks(seen_items: torch.Tensor, seen_lengths: torch.Tensor, num_items: int):
    """``mask(start, stop)``: the dense ``[B, stop - start]`` exclusion mask of items
    ``[start, stop)`` from the loader's jagged ``seen_items``/``seen_lengths``, checked once.

    The loader ships histories jagged because users differ by orders of magnitude in length; the
    ranking needs dense masks aligned with the score blocks, built on the device the items are on
    so that no per-row Python loop or host round trip is needed.
    """
    seen_items = seen_items.to(torch.int64)
    seen_lengths = seen_lengths.to(device=seen_items.device, dtype=torch.int64)
    if int(seen_lengths.sum()) != seen_items.numel():
        raise ValueError(f"seen_lengths sum to {int(seen_lengths.sum())} but there are {seen_items.numel()} seen_items")
    if seen_items.numel() and (int(seen_items.min()) < 0 or int(seen_items.max()) >= num_items):
        raise ValueError(f"seen_items must lie in [0, {num_items})")
    rows = torch.repeat_interleave(torch.arange(seen_lengths.shape[0], device=seen_items.device), seen_lengths)

    def mask(start: int, stop: int) -> torch.Tensor:
        block = torch.zeros((seen_lengths.shape[0], stop - start), dtype=torch.bool, device=seen_items.device)
        inside = (seen_items >= start) & (seen_items < stop)
        block[rows[inside], seen_items[inside] - start] = True
        return block

    return mask


def seen_mask(seen_items: torch.Tensor, seen_lengths: torch.Tensor, num_items: int) -> torch.Tensor:
    """Dense ``[B, num_items]`` exclusion mask: :func:`seen_blocks` as one block."""
    return seen_blocks(seen_items, seen_lengths, num_items)(0, num_items)


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

    ``max_rank`` is for ranks from top-K lists (see :func:`ranks_from_top_k`), which are only exact
    below ``max_rank``: ranks at or beyond it are stored as ``max_rank``, meaning "not within the
    first ``max_rank``". Cut-offs above it would be guesses, so asking for one raises, and the
    mean reciprocal rank is reported as ``MRR@{max_rank}`` (ranks ``>= max_rank`` contribute 0)
    rather than as an ``MRR`` it is not. ``None`` means the ranks are exact: full-matrix ranks.
    """

    def __init__(self, max_rank: int | None = None) -> None:
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {max_rank}")
        self.max_rank = max_rank
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
        if self.max_rank is not None:
            ranks = np.minimum(ranks, self.max_rank)
        self._chunks.append(ranks.copy())

    @property
    def ranks(self) -> np.ndarray:
        """All accumulated ranks (padding removed, clipped at ``max_rank`` if set), in update order."""
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

    def per_user(self, metric_name: str) -> np.ndarray:
        """Per-user values of ``HR@k``, ``NDCG@k``, ``MRR@k`` (reciprocal rank, 0 from rank k on)
        or ``MRR``, in accumulation order.

        Exposed for paired bootstraps between two systems evaluated on the same users in the same
        order (see :func:`paired_bootstrap`).
        """
        ranks = self.ranks.astype(np.float64)
        name, _, k = metric_name.partition("@")
        if name not in ("HR", "NDCG", "MRR") or (name != "MRR" and not k):
            raise ValueError(f"unknown metric {metric_name!r}; expected 'HR@k', 'NDCG@k', 'MRR@k' or 'MRR'")
        if not k:
            if self.max_rank is not None:
                raise ValueError(
                    f"MRR needs every rank, but these are only known below {self.max_rank}; ask for 'MRR@{self.max_rank}'"
                )
            return 1.0 / (ranks + 1.0)
        try:
            cutoff = int(k)
        except ValueError:
            cutoff = 0
        if cutoff <= 0:
            raise ValueError(f"bad cut-off in metric name {metric_name!r}")
        if self.max_rank is not None and cutoff > self.max_rank:
            raise ValueError(
                f"{metric_name} needs exact ranks below {cutoff}, but these are only known below "
                f"{self.max_rank} (top-{self.max_rank + 1} lists); ask the ranker for {cutoff + 1} candidates"
            )
        hit = ranks < cutoff
        if name == "HR":
            return hit.astype(np.float64)
        if name == "MRR":
            return np.where(hit, 1.0 / (ranks + 1.0), 0.0)
        # One relevant item, so the ideal DCG is 1 and NDCG is just the discount of the hit.
        return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)

    def compute(self, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
        """Means over users; NaN (not 0) when there are no users, so an empty split cannot pass for a bad model.

        The reciprocal rank is ``MRR``, or ``MRR@{max_rank}`` when the ranks are clipped.
        """
        users = len(self.ranks)
        mrr = "MRR" if self.max_rank is None else f"MRR@{self.max_rank}"
        names = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + [mrr]
        result: dict[str, float] = {}
        for name in names:
            values = self.per_user(name)  # even without users, so that an uncertified cut-off always raises
            result[name] = float(values.mean()) if users else math.nan
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
