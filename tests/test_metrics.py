"""Evaluation metrics against hand-computed values, top-K ranks against full-matrix ranks, and the
all-gather across real gloo ranks."""

import json
import math
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics import (
    DEFAULT_KS,
    RankingMetrics,
    binary_metrics,
    blocked_target_ranks,
    paired_bootstrap,
    popularity_scores,
    ranks_from_top_k,
    seen_blocks,
    seen_mask,
    target_ranks,
)
from tests.conftest import free_port

# Columns 0 and 1 are padding / unknown: high scores there must never count.
SCORES = torch.tensor(
    [
        [9.0, 9.0, 0.5, 0.7, 0.5, 0.1],
        [0.0, 0.0, 0.2, 0.9, 0.8, 0.3],
    ]
)
TARGETS = torch.tensor([2, 5])


def test_target_ranks_by_hand():
    # row 0, target col 2 (0.5): col 3 (0.7) is higher -> 1; col 4 (0.5) ties -> +1 (pessimistic);
    #   col 5 (0.1) lower; cols 0, 1 (9.0) reserved -> rank 2.
    # row 1, target col 5 (0.3): cols 3 (0.9) and 4 (0.8) higher; col 2 (0.2) lower -> rank 2.
    assert target_ranks(SCORES, TARGETS).tolist() == [2, 2]
    # With row 1 excluding cols 3 and 5 (5 is the target, which is never excluded): only col 4 is
    # higher -> rank 1. Excluding col 4 in row 0 removes the tie -> rank 1.
    exclude = torch.zeros(2, 6, dtype=torch.bool)
    exclude[0, 4] = True
    exclude[1, 3] = exclude[1, 5] = True
    assert target_ranks(SCORES, TARGETS, exclude).tolist() == [1, 1]
    # reserved=0 makes cols 0, 1 candidates: row 0 gains two higher (9.0) -> 4; row 1 gains two
    # zeros below 0.3 -> still 2.
    assert target_ranks(SCORES, TARGETS, reserved=0).tolist() == [4, 2]


def test_target_ranks_constant_and_nan_scores_rank_last():
    # A constant model ties with the 3 other non-reserved items (cols 2, 4, 5) -> rank 3.
    assert target_ranks(torch.zeros(1, 6), torch.tensor([3])).tolist() == [3]
    # A NaN target score is treated as -inf: the 3 finite candidates are ahead of it.
    nan_target = torch.tensor([[0.0, 0.0, 1.0, float("nan"), 2.0, 3.0]])
    assert target_ranks(nan_target, torch.tensor([3])).tolist() == [3]


def test_seen_mask_and_popularity():
    # user 0 saw items 3 and 5, user 1 nothing, user 2 saw item 2.
    mask = seen_mask(torch.tensor([3, 5, 2]), torch.tensor([2, 0, 1]), num_items=6)
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, 3] = expected[0, 5] = expected[2, 2] = True
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError):
        seen_mask(torch.tensor([3]), torch.tensor([2]), num_items=6)

    counts = torch.tensor([100, 50, 7, 9, 7, 1])
    scores = popularity_scores(counts)
    assert scores.dtype == torch.float64 and scores.tolist() == [100.0, 50.0, 7.0, 9.0, 7.0, 1.0]
    # A shared [V] score vector broadcasts over users. Target 2 (7): col 3 (9) higher, col 4 (7)
    # ties -> 2. Target 5 (1) with col 3 seen: cols 2, 4 -> 2.
    seen = seen_mask(torch.tensor([3]), torch.tensor([0, 1]), num_items=6)
    assert target_ranks(scores, torch.tensor([2, 5]), seen).tolist() == [2, 2]


def test_ranking_metrics_by_hand():
    metrics = RankingMetrics()
    metrics.update(torch.tensor([0, 2]))
    # The trailing weight-0 user is loader padding: rank 0 would inflate every metric if counted.
    metrics.update(torch.tensor([9, 60, 0]), weights=torch.tensor([1.0, 1.0, 0.0]))
    result = metrics.compute()
    assert result["users"] == 4
    # ranks 0, 2, 9, 60
    expected = {
        "HR@1": 1 / 4,  # only rank 0
        "HR@5": 2 / 4,  # ranks 0, 2
        "HR@10": 3 / 4,  # ranks 0, 2, 9
        "HR@50": 3 / 4,
        "HR@200": 4 / 4,
        "NDCG@1": 1 / 4,  # 1/log2(2) = 1
        "NDCG@5": (1 + 0.5) / 4,  # + 1/log2(4) = 0.5 -> 0.375
        "NDCG@10": (1 + 0.5 + 1 / math.log2(11)) / 4,  # 1/3.45943 = 0.28906 -> 0.44727
        "NDCG@50": (1 + 0.5 + 1 / math.log2(11)) / 4,
        "NDCG@200": (1 + 0.5 + 1 / math.log2(11) + 1 / math.log2(62)) / 4,  # + 1/5.95420 = 0.16795 -> 0.48925
        "MRR": (1 + 1 / 3 + 1 / 10 + 1 / 61) / 4,  # (1 + 0.33333 + 0.1 + 0.01639) / 4 = 0.36243
    }
    for name, value in expected.items():
        assert result[name] == pytest.approx(value), name
    assert result["NDCG@10"] == pytest.approx(0.447266, abs=1e-6)
    assert result["MRR"] == pytest.approx(0.362432, abs=1e-6)
    assert metrics.per_user("HR@5").tolist() == [1.0, 1.0, 0.0, 0.0]
    assert set(metrics.compute(ks=(3,))) == {"HR@3", "NDCG@3", "MRR", "users"}
    with pytest.raises(ValueError):
        metrics.per_user("NDCG")

    empty = RankingMetrics().compute(ks=(10,))
    assert empty["users"] == 0 and math.isnan(empty["HR@10"])
    default_names = {f"{m}@{k}" for k in DEFAULT_KS for m in ("HR", "NDCG")} | {"MRR", "users"}
    assert set(RankingMetrics().compute()) == default_names


def test_gather_in_a_single_process_group(monkeypatch):
    metrics = RankingMetrics()
    metrics.update(torch.tensor([0, 2, 9]))
    before = metrics.compute()
    if sys.platform == "linux":  # as in _gather_worker: gloo must not pick an interface it cannot reach
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        metrics.gather()
        metrics.gather()  # a second gather must not add the users again
    finally:
        dist.destroy_process_group()
    assert metrics.ranks.tolist() == [0, 2, 9] and metrics.compute() == before
    # Only a gather that really ran closes the accumulator: a no-op would still accept updates.
    with pytest.raises(RuntimeError):
        metrics.update(torch.tensor([1]))


def test_ranks_from_top_k_by_hand():
    inf = math.inf
    top_items = torch.tensor(
        [
            [7, 3, 5, 9],  # target 3 second, strictly above 5 -> exact rank 1
            [7, 3, 5, 9],  # target 5 ties with 3 -> 3 counts ahead (pessimistic), 9 is lower -> 2
            [7, 3, 5, 9],  # target 9 is last: candidates beyond the list may tie -> only >= 3
            [7, 3, 5, 9],  # target 4 is not in the list -> only >= 3
            [4, 6, 0, 0],  # two real candidates, then -inf padding: target 6 is exact at 1
            [4, 6, 8, 0],  # target 8 is -inf, indistinguishable from padding -> 3
        ]
    )
    top_scores = torch.tensor(
        [
            [4.0, 3.0, 2.0, 1.0],
            [4.0, 2.0, 2.0, 1.0],
            [4.0, 3.0, 2.0, 1.0],
            [4.0, 3.0, 2.0, 1.0],
            [4.0, 3.0, -inf, -inf],
            [4.0, 3.0, -inf, -inf],
        ]
    )
    targets = torch.tensor([3, 5, 9, 4, 6, 8])
    assert ranks_from_top_k(top_items, top_scores, targets).tolist() == [1, 2, 3, 3, 1, 3]
    # Ties reaching the last entry may continue beyond the list, so the rank is only >= L - 1.
    tied = ranks_from_top_k(torch.tensor([[7, 3, 5]]), torch.tensor([[4.0, 2.0, 2.0]]), torch.tensor([3]))
    assert tied.tolist() == [2]
    with pytest.raises(ValueError, match="NaN"):  # torch.topk ranks NaN first; the caller must map it to -inf
        ranks_from_top_k(top_items[:1], torch.tensor([[math.nan, 3.0, 2.0, 1.0]]), targets[:1])
    with pytest.raises(ValueError, match="K \\+ 1"):
        ranks_from_top_k(top_items[:, :1], top_scores[:, :1], targets)


def test_truncated_ranking_metrics():
    full, truncated = RankingMetrics(), RankingMetrics(max_rank=10)
    for metrics in (full, truncated):
        metrics.update(torch.tensor([0, 2, 9, 10, 60]))
    # Ranks at or past max_rank are only known to be >= max_rank, and are stored as such.
    assert truncated.ranks.tolist() == [0, 2, 9, 10, 10]
    result = truncated.compute(ks=(1, 5, 10))
    # HR and NDCG up to max_rank are the full ranks' values; the full MRR is replaced by MRR@10.
    expected = full.compute(ks=(1, 5, 10))
    del expected["MRR"]
    expected["MRR@10"] = (1 + 1 / 3 + 1 / 10) / 5  # ranks 10 and 60 contribute 0
    assert result == pytest.approx(expected)
    assert truncated.per_user("MRR@10").tolist() == full.per_user("MRR@10").tolist()
    with pytest.raises(ValueError, match="12 candidates"):
        truncated.compute(ks=(11,))
    with pytest.raises(ValueError, match="MRR@10"):
        truncated.per_user("MRR")
    with pytest.raises(ValueError):  # uncertified cut-offs raise even without users
        RankingMetrics(max_rank=10).compute()
    with pytest.raises(ValueError):
        RankingMetrics(max_rank=0)


@st.composite
def _ranking_problems(draw):
    """Scores with many ties (a few small integers), +-inf and NaN, random exclusions, reserved
    columns, and a list length L = K + 1 up to the whole catalogue."""
    reserved = draw(st.integers(0, 2))
    num_items = draw(st.integers(reserved + 2, 12))
    batch = draw(st.integers(1, 6))
    values = st.sampled_from([0.0, 1.0, 2.0, 3.0, math.inf, -math.inf, math.nan])
    scores = torch.tensor(
        draw(st.lists(st.lists(values, min_size=num_items, max_size=num_items), min_size=batch, max_size=batch))
    )
    exclude = torch.tensor(
        draw(st.lists(st.lists(st.booleans(), min_size=num_items, max_size=num_items), min_size=batch, max_size=batch))
    )
    targets = torch.tensor(draw(st.lists(st.integers(reserved, num_items - 1), min_size=batch, max_size=batch)))
    k = draw(st.integers(1, num_items - 1))
    return scores, exclude, targets, reserved, k


@settings(max_examples=300, deadline=None)
@given(_ranking_problems())
def test_top_k_ranks_agree_with_full_ranks(problem):
    scores, exclude, targets, reserved, k = problem
    full = target_ranks(scores, targets, exclude, reserved)

    # What a ranker does: mask the non-candidates (the target stays one), map NaN to -inf, take the top K + 1.
    candidates = ~exclude
    candidates[:, :reserved] = False
    candidates[torch.arange(len(targets)), targets] = True
    masked = scores.nan_to_num(nan=-math.inf).masked_fill(~candidates, -math.inf)
    top_scores, top_items = masked.topk(k + 1, dim=1)
    from_top_k = ranks_from_top_k(top_items, top_scores, targets)

    # Every rank below K is exact and equal; the rest are reported as K ("not within K"), and so is
    # a target scored -inf or NaN, which a list cannot tell from padding.
    target_missing = masked[torch.arange(len(targets)), targets] == -math.inf
    expected = torch.where(target_missing, k, full.clamp(max=k))
    assert from_top_k.tolist() == expected.tolist()

    metrics_full, metrics_top_k = RankingMetrics(), RankingMetrics(max_rank=k)
    metrics_full.update(full)
    metrics_top_k.update(from_top_k)
    exact = ~target_missing.numpy()
    for name in [f"{m}@{cutoff}" for cutoff in range(1, k + 1) for m in ("HR", "NDCG", "MRR")]:
        assert metrics_top_k.per_user(name)[exact].tolist() == metrics_full.per_user(name)[exact].tolist(), name


def _metrics_from(ranks: np.ndarray) -> RankingMetrics:
    metrics = RankingMetrics()
    metrics.update(torch.from_numpy(ranks))
    return metrics


def test_bootstrap_contains_point_and_narrows():
    rng = np.random.default_rng(1)
    small = _metrics_from(rng.geometric(0.05, size=200) - 1)
    large = _metrics_from(rng.geometric(0.05, size=20000) - 1)
    widths = []
    for metrics in (small, large):
        point = metrics.compute(ks=(10,))["NDCG@10"]
        low, high = metrics.bootstrap("NDCG", 10, samples=200, seed=0)
        assert low <= point <= high
        assert (low, high) == metrics.bootstrap("NDCG@10", samples=200, seed=0)  # same seed, same interval
        widths.append(high - low)
    # sqrt(100) = 10x more users -> about 10x narrower; a 3x margin keeps this robust.
    assert widths[1] < widths[0] / 3
    low, high = small.bootstrap("MRR", samples=200)
    assert low <= small.compute()["MRR"] <= high


def test_paired_bootstrap():
    rng = np.random.default_rng(2)
    a = rng.random(500)
    # A constant improvement of 0.1 on every user: no variance, the interval collapses onto it.
    mean, low, high = paired_bootstrap(a, a + 0.1, samples=100)
    assert mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    b = a + rng.normal(0.05, 0.2, size=500)
    mean, low, high = paired_bootstrap(a, b, samples=300)
    assert low < mean < high and mean == pytest.approx(float((b - a).mean()))
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:10])


def test_binary_metrics_by_hand():
    probabilities = torch.tensor([0.9, 0.6, 0.6, 0.3, 0.2])
    labels = torch.tensor([1, 1, 0, 0, 1])
    result = binary_metrics(probabilities, labels)
    # positives 0.9, 0.6, 0.2 vs negatives 0.6, 0.3, all 6 pairs:
    # (0.9,0.6)=1 (0.9,0.3)=1 (0.6,0.6)=0.5 tie (0.6,0.3)=1 (0.2,0.6)=0 (0.2,0.3)=0 -> 3.5 / 6
    assert result["AUC"] == pytest.approx(3.5 / 6)
    # predicted positive (>= 0.5): 0.9, 0.6, 0.6 -> TP 2, FP 1, FN 1 (0.2), TN 1 (0.3)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["F1"] == pytest.approx(2 / 3)  # 2 * (2/3) * (2/3) / (4/3)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["count"] == 5
    # A constant predictor: every pair ties -> 0.5.
    assert binary_metrics(torch.full((4,), 0.3), torch.tensor([0, 1, 0, 1]))["AUC"] == pytest.approx(0.5)
    one_class = binary_metrics(torch.tensor([0.2, 0.7]), torch.tensor([1, 1]))
    assert math.isnan(one_class["AUC"]) and one_class["recall"] == pytest.approx(0.5)


# Rank 0 holds 3 users, rank 1 holds 3 plus a padding user: uneven counts on purpose.
_ALL_RANKS = [0, 2, 9, 60, 1, 250]
_SHARDS = [([0, 2, 9], [1.0, 1.0, 1.0]), ([60, 1, 250, 0], [1.0, 1.0, 1.0, 0.0])]


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    if os.uname().sysname == "Linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        ranks, weights = _SHARDS[rank]
        metrics = RankingMetrics()
        metrics.update(torch.tensor(ranks), torch.tensor(weights))
        metrics.gather()
        metrics.gather()  # idempotent: must not duplicate users
        result = {"compute": metrics.compute(), "ranks": metrics.ranks.tolist()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_gather_across_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _metrics_from(np.array(_ALL_RANKS)).compute()
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["ranks"] == _ALL_RANKS
        assert result["compute"] == pytest.approx(expected)


@pytest.mark.parametrize("block", [1, 7, 50, 1000])
def test_blocked_ranks_equal_the_full_matrix_ranks(block):
    g = torch.Generator().manual_seed(3)
    batch, items = 9, 50
    scores = torch.randint(0, 6, (batch, items), generator=g).float()  # many ties
    scores[0] = 1.0  # a constant model
    scores[1, 10] = float("nan")
    targets = torch.randint(2, items, (batch,), generator=g)
    scores[2, targets[2]] = float("nan")  # a NaN target ranks last
    lengths = torch.randint(0, 12, (batch,), generator=g)
    seen = torch.randint(0, items, (int(lengths.sum()),), generator=g)
    seen[0] = targets[0]  # the target among the seen items stays a candidate
    expected = target_ranks(scores, targets, seen_mask(seen, lengths, items))
    rows = torch.arange(batch)
    got = blocked_target_ranks(
        lambda a, b: scores[:, a:b],
        items,
        targets,
        scores[rows, targets],
        seen_blocks(seen, lengths, items),
        block=block,
    )
    assert torch.equal(got, expected)
    assert torch.equal(blocked_target_ranks(lambda a, b: scores[:, a:b], items, targets, scores[rows, targets],
                                            block=block), target_ranks(scores, targets))  # fmt: skip
    counts = torch.randint(0, 4, (items,), generator=g).double()  # popularity: one row for everyone
    shared = blocked_target_ranks(
        lambda a, b: counts[a:b], items, targets, counts[targets], seen_blocks(seen, lengths, items), block
    )
    assert torch.equal(shared, target_ranks(counts, targets, seen_mask(seen, lengths, items)))
