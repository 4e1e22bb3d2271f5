"""A seeded, fully offline generator of interaction logs with structure a sequence model can learn.

The generative story (defaults in ``SyntheticSpec``; they are fixed and documented, not tuned):

- Items belong to ``topics`` topics. Item popularity follows a power law (Zipf exponent
  ``popularity_exponent``) over a random order of the items, so a popularity baseline is fair.
- Each user has a taste: ``topics_per_user`` topics drawn at random.
- Each item has ``successors`` successor items from its own topic (drawn by popularity). With
  probability ``markov`` a user's next item is a random successor of their previous item
  (sequential structure); otherwise it is drawn by popularity from one of the user's topics.
- History lengths are ``min_events`` plus a geometric tail with mean ``events_per_user``.
- Timestamps: each user starts at a random time and waits exponential gaps whose mean is
  lognormal around one day. Ratings 1..5 are higher for items in the user's topics.
- Item text: a title and a genre that name the item's topic, so text carries real signal.
- Popularity drift (``drift``, off by default): a popularity draw comes from a second,
  independent popularity order with a probability that grows with the time of the user's previous
  event, from 0 at the first possible start to ``drift`` at the last (users start over
  ``START_SPAN`` seconds). Items popular only in the second order then mostly appear late, and
  a model trained on the early events has learned the old popularity (benchmarks/retrain.py).
  Its draws come from their own generator, so every other value is the same with or without it.

What a model can learn: the successor structure (a first-order Markov chain) and the user's
topics; popularity captures neither. Generation is vectorised over users, one step at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from data.errors import DataError
from data.readers import RawData

_SYLLABLES = ["ka", "lo", "mi", "ren", "su", "ta", "vo", "zel", "pri", "dun", "ex", "or", "ni", "qua", "bel", "tor"]
START, START_SPAN = 1_500_000_000, 100_000_000  # users start at a uniform time in [START, START + START_SPAN)
_STYLES = ["classic", "deluxe", "mini", "pro", "vintage", "modern", "limited", "basic"]


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 10_000
    items: int = 5_000
    events_per_user: float = 50.0
    min_events: int = 5
    topics: int = 50
    topics_per_user: int = 3
    popularity_exponent: float = 1.0
    markov: float = 0.5
    successors: int = 4
    text: bool = True
    drift: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.users < 1 or self.items < 2:
            raise DataError(f"synthetic data needs at least 1 user and 2 items, got {self.users} and {self.items}")
        if not 0.0 <= self.markov <= 1.0:
            raise DataError(f"synthetic markov must be in [0, 1], got {self.markov}")
        if self.events_per_user < self.min_events:
            raise DataError(f"events_per_user ({self.events_per_user}) must be >= min_events ({self.min_events})")
        if not 0.0 <= self.drift <= 1.0:
            raise DataError(f"synthetic drift must be in [0, 1], got {self.drift}")
        if not 1 <= self.topics_per_user <= self.topics:
            raise DataError(f"topics_per_user must be in [1, topics={self.topics}], got {self.topics_per_user}")


class _TopicSampler:
    """Draws items of a given topic in proportion to their popularity, in O(1) per draw with one
    alias table (Vose) per topic."""

    def __init__(self, item_topic: np.ndarray, weight: np.ndarray, topics: int):
        self.order = np.argsort(item_topic, kind="stable").astype(np.int32)
        self.count = np.bincount(item_topic, minlength=topics)
        self.start = np.cumsum(self.count) - self.count
        self.empty = self.count == 0
        self.prob = np.ones(len(weight))
        self.alias = np.arange(len(weight))
        sorted_weight = weight[self.order]
        for topic in np.flatnonzero(~self.empty):
            lo, n = int(self.start[topic]), int(self.count[topic])
            scaled = sorted_weight[lo : lo + n] * (n / sorted_weight[lo : lo + n].sum())
            small = [i for i in range(n) if scaled[i] < 1.0]
            large = [i for i in range(n) if scaled[i] >= 1.0]
            prob, alias = scaled.tolist(), list(range(n))
            while small and large:
                s, g = small.pop(), large[-1]
                alias[s] = g
                prob[g] -= 1.0 - prob[s]
                if prob[g] < 1.0:
                    small.append(large.pop())
            for i in large + small:  # leftovers are 1 up to rounding
                prob[i] = 1.0
            self.prob[lo : lo + n] = prob
            self.alias[lo : lo + n] = np.asarray(alias) + lo

    def draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        slot = self.start[topics] + (rng.random(len(topics)) * self.count[topics]).astype(np.int64)
        pick = np.where(rng.random(len(topics)) < self.prob[slot], slot, self.alias[slot])
        return self.order[pick]


def generate(spec: SyntheticSpec = SyntheticSpec()) -> RawData:
    rng = np.random.default_rng(spec.seed)
    n_users, n_items = spec.users, spec.items

    item_topic = rng.integers(spec.topics, size=n_items)
    rank = rng.permutation(n_items)
    popularity = (rank + 1.0) ** -spec.popularity_exponent
    sampler = _TopicSampler(item_topic, popularity, spec.topics)
    # Topics with no items cannot be drawn: map them to topic of item 0.
    topic_ok = np.where(sampler.empty, item_topic[0], np.arange(spec.topics))
    successors = sampler.draw(np.repeat(item_topic, spec.successors), rng).reshape(n_items, spec.successors)

    late = None
    if spec.drift:
        drift_rng = np.random.default_rng([spec.seed, 1])
        late = _TopicSampler(
            item_topic, (drift_rng.permutation(n_items) + 1.0) ** -spec.popularity_exponent, spec.topics
        )

    user_topics = topic_ok[rng.integers(spec.topics, size=(n_users, spec.topics_per_user))]
    tail_mean = spec.events_per_user - spec.min_events + 1.0
    lengths = spec.min_events - 1 + rng.geometric(1.0 / tail_mean, size=n_users)
    lengths = np.minimum(lengths, int(20 * spec.events_per_user) + spec.min_events).astype(np.int64)
    total = int(lengths.sum())

    # Users are processed longest history first, so the users still active at step t are a prefix
    # of that order and per-user state is sliced, never gathered. Events are emitted step by step,
    # interleaved across users as in a real log (sorted neither by user nor by time), so
    # preparation does its full sort.
    by_length = np.argsort(-lengths, kind="stable")
    lengths, user_topics = lengths[by_length], user_topics[by_length]
    active_at = np.searchsorted(-lengths, -np.arange(int(lengths[0])), side="left")  # users with length > t
    users = np.empty(total, dtype=np.int32)
    items = np.empty(total, dtype=np.int32)
    ratings = np.empty(total, dtype=np.int8)
    ts = np.empty(total, dtype=np.int64)
    clock = rng.integers(START, START + START_SPAN, size=n_users)
    mean_gap = np.exp(rng.normal(np.log(86_400.0), 1.0, size=n_users)).astype(np.float32)
    prev = np.zeros(n_users, dtype=np.int32)
    rows = np.arange(n_users)
    at = 0
    for step, n in enumerate(active_at):
        topics = user_topics[:n]
        picked = topics[rows[:n], rng.integers(spec.topics_per_user, size=n)]
        choice = sampler.draw(picked, rng)
        if late is not None:
            share = spec.drift * np.clip((clock[:n] - START) / START_SPAN, 0.0, 1.0)
            choice = np.where(drift_rng.random(n) < share, late.draw(picked, drift_rng), choice)
        if step > 0:
            follow = rng.random(n, dtype=np.float32) < spec.markov
            choice = np.where(follow, successors[prev[:n], rng.integers(spec.successors, size=n)], choice)
        prev[:n] = choice
        liked = (item_topic[choice][:, None] == topics).any(axis=1)
        clock[:n] += (rng.standard_exponential(n, dtype=np.float32) * mean_gap[:n]).astype(np.int64) + 1
        users[at : at + n] = by_length[:n]
        items[at : at + n] = choice
        noise = rng.standard_normal(n, dtype=np.float32) * 0.9
        ratings[at : at + n] = np.clip(np.rint(noise + (2.8 + 1.2 * liked)), 1, 5)
        ts[at : at + n] = clock[:n]
        at += n

    # Raw IDs start at 1, as in most public logs.
    events = pl.DataFrame(
        {
            "user": users + 1,
            "item": items + 1,
            "ts": ts,
            "action": ratings,
        }
    )
    item_table = None
    if spec.text:
        names = [_topic_name(t) for t in range(spec.topics)]
        style = rng.integers(len(_STYLES), size=n_items)
        item_table = pl.DataFrame(
            {
                "item": np.arange(1, n_items + 1, dtype=np.int64),
                "title": [f"{_STYLES[s]} {names[t]} {i + 1}" for i, (t, s) in enumerate(zip(item_topic, style))],
                "genres": [names[t] for t in item_topic],
            }
        )
    return RawData(events, item_table)


def _topic_name(topic: int) -> str:
    a, b = divmod(topic, len(_SYLLABLES))
    return (_SYLLABLES[a % len(_SYLLABLES)] + _SYLLABLES[b]).capitalize()
