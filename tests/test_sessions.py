"""Stored sessions (incremental serving) answer as a full recomputation of the whole history does."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from serve.recommender import Query, Recommender
from serve.sessions import SessionMiss, SessionStore

RTOL, ATOL = 1e-4, 1e-5  # float rounding of cached keys/values against one pass over the window


def _stream(rec, raw, rng, length):
    """A random event stream: known and unknown items, actions, increasing timestamps."""
    items = [int(x) for x in rng.choice(raw, size=length)]
    for at in rng.choice(length, size=max(1, length // 10), replace=False):
        items[at] = 10**9 + int(at)  # unknown to the artifact: dropped, reported
    actions = [int(a) for a in rng.integers(1, 6, size=length)]
    timestamps = np.cumsum(rng.exponential(3600, size=length)).round().tolist()
    return items, actions, timestamps


def _check(got, expected):
    assert got.items == expected.items
    np.testing.assert_allclose(got.scores, expected.scores, rtol=RTOL, atol=ATOL)
    assert (got.truncated, got.fallback) == (expected.truncated, expected.fallback)


@pytest.fixture(scope="module")
def rec(artifacts):
    return Recommender.load(artifacts["fp32"])


@pytest.fixture(scope="module")
def raw(artifacts):
    return pq.read_table(artifacts["fp32"] / "vocab.parquet")["raw_id"].to_numpy()


def test_random_streams_with_sessions_equal_full_recomputation(rec, raw, monkeypatch):
    assert rec.lean is not None  # the debug recipe's llama backbone has the cached forward
    rng = np.random.default_rng(0)
    store = SessionStore()
    length = rec.max_len * 2 + 5  # passes the window: the session recomputes its newest max_len events
    streams = {user: _stream(rec, raw, rng, length) for user in ("a", "b", 7)}
    sent = dict.fromkeys(streams, 0)
    calls, extend = [], rec.lean.extend
    monkeypatch.setattr(rec.lean, "extend", lambda *a: calls.append(1) or extend(*a))
    while any(sent[u] < length for u in streams):
        queries, users = [], []
        for user, (items, actions, timestamps) in streams.items():
            if sent[user] >= length:
                continue
            stop = min(length, sent[user] + int(rng.choice([1, 1, 1, 2, 5])))
            part = slice(sent[user], stop)
            queries.append(
                Query(items[part], 10, True, None, None, actions[part], timestamps[part], user=user, seq=sent[user])
            )
            users.append((user, stop))
        answers = rec.answer(queries, store)
        for (user, stop), got in zip(users, answers, strict=True):
            items, actions, timestamps = streams[user]
            [expected] = rec.recommend([items[:stop]], 10, actions=[actions[:stop]], timestamps=[timestamps[:stop]])
            _check(got, expected)
            sent[user] = stop
    # Until each window filled, answers came from the cache; past it, from recomputed windows.
    assert len(calls) >= 20
    assert len(store) == 3 and store.hits > 0


def test_retries_are_not_applied_twice_and_misses_change_nothing(rec, raw):
    rng = np.random.default_rng(1)
    items, actions, timestamps = _stream(rec, raw, rng, 12)
    store = SessionStore()

    def ask(first, stop, seq=None):
        seq = first if seq is None else seq
        part = slice(first, stop)
        return rec.answer(
            [Query(items[part], 10, actions=actions[part], timestamps=timestamps[part], user="u", seq=seq)], store
        )[0]

    def full(stop):
        return rec.recommend([items[:stop]], 10, actions=[actions[:stop]], timestamps=[timestamps[:stop]])[0]

    miss = ask(3, 6)  # the server has never seen the user: send the full history
    assert isinstance(miss, SessionMiss) and "'u': no stored session" in str(miss) and len(store) == 0
    ask(0, 6)
    assert ask(3, 6).events == 6
    _check(ask(3, 6), full(6))  # a retry of events already applied appends nothing
    _check(ask(4, 9), full(9))  # overlapping: only events 6..8 are new
    miss = ask(10, 12)  # event 9 never arrived
    assert isinstance(miss, SessionMiss) and miss.missing == {"u": 9}
    _check(ask(9, 12), full(12))
    _check(ask(0, 12), full(12))  # the whole history again (a client after a miss elsewhere)


def test_evicted_and_reloaded_sessions_miss_and_recover_from_the_full_history(rec, raw, artifacts):
    rng = np.random.default_rng(2)
    streams = {user: _stream(rec, raw, rng, 8) for user in range(4)}
    store = SessionStore()
    for user, (items, actions, timestamps) in streams.items():
        rec.answer([Query(items[:5], actions=actions[:5], timestamps=timestamps[:5], user=user, seq=0)], store)
    one = store.bytes // len(store)
    store.capacity = int(one * 2.5)  # room for two
    items, actions, timestamps = streams[3]
    rec.answer([Query(items[5:6], actions=actions[5:6], timestamps=timestamps[5:6], user=3, seq=5)], store)
    assert len(store) == 2 and store.evictions == 2 and store.bytes <= store.capacity
    items, actions, timestamps = streams[0]
    [miss, kept] = rec.answer(
        [Query(items[5:], actions=actions[5:], timestamps=timestamps[5:], user=0, seq=5), Query(items[:3])], store
    )
    assert isinstance(miss, SessionMiss) and kept.items == rec.recommend([items[:3]])[0].items
    [got] = rec.answer([Query(items, actions=actions, timestamps=timestamps, user=0, seq=0)], store)
    _check(got, rec.recommend([items], actions=[actions], timestamps=[timestamps])[0])
    # A reloaded model starts with an empty store (its caches belong to the old model).
    reloaded, fresh = Recommender.load(artifacts["fp32"]), SessionStore()
    assert isinstance(reloaded.answer([Query(items[7:], user=0, seq=7)], fresh)[0], SessionMiss)
    with pytest.raises(ValueError, match="more than once"):
        rec.answer([Query(items[:1], user=0, seq=0), Query(items[:1], user=0, seq=0)], store)
