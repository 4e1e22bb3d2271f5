"""The per-user step of preparation, the one definition every engine runs.

An engine (in memory, out of core, Spark) does the relational work: bad rows, k-core filtering,
the vocabularies and every user's code. It then hands ``write_part`` *parts*: whole users, their
events sorted by (user code, time, source order), with item and action already indices. Here
each part is deduplicated, split into train / valid / test, cut into windows and written as
WebDataset shards (see data.schema for the sample layout). What the driver needs to finish the
output (shard entries, events per user, training events per item, counts) comes back as a small
``PartResult``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import schema
from data.errors import DataError
from data.shards import SHARD_PATTERN, ShardWriter

PART_SHARD = "part-{:06d}-{:05d}.tar"  # renamed to data.shards.SHARD_PATTERN once all parts are done


@dataclass(frozen=True)
class SampleSpec:
    """Everything global the per-user step needs, decided by the driver before any part runs."""

    features: tuple[str, ...]
    split: str  # "leave_one_out" or "temporal"
    valid_start: int | None  # temporal: epoch seconds, already resolved from qFRACTION
    test_start: int | None
    window: int
    window_overlap: int
    dedup: bool
    samples_per_shard: int


@dataclass
class PartResult:
    part: int
    shards: list[dict]  # ShardWriter entries plus "splits", in write order
    first_user: int
    user_events: np.ndarray  # events kept per user, for users first_user, first_user + 1, ...
    popular_items: np.ndarray  # item indices with training events in this part ...
    popular_counts: np.ndarray  # ... and how many
    events_per_segment: list[int] = field(default_factory=lambda: [0, 0, 0])
    samples: int = 0
    duplicates: int = 0

    def to_bytes(self) -> bytes:
        # Between lmrec's own processes (pool workers, Spark executors) only.
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(data: bytes) -> PartResult:
        return pickle.loads(data)


def _duplicates(user: np.ndarray, ts: np.ndarray, item: np.ndarray, action: np.ndarray | None) -> np.ndarray:
    """Rows that repeat an earlier row's (user, item, ts, action). Events are sorted by (user, ts,
    source order), so repeats sit among rows sharing (user, ts), usually few: only those are
    sorted, and the first in source order is kept."""
    same = (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])
    tied = np.zeros(len(user), dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    rows = np.flatnonzero(tied)
    if not len(rows):
        return rows
    keys = [user[rows], ts[rows], item[rows]] + ([action[rows]] if action is not None else [])
    order = np.lexsort([rows, *reversed(keys)])
    repeat = np.ones(len(rows) - 1, dtype=bool)
    for key in keys:
        k = key[order]
        repeat &= k[1:] == k[:-1]
    return np.sort(rows[order[1:][repeat]])


def gap_buckets(ts: np.ndarray, first: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """Gap bucket of every event, in chunks so that the temporaries stay small."""
    out = np.empty(len(ts), dtype=np.int16)
    for lo in range(0, len(ts), chunk):
        hi = min(lo + chunk, len(ts))
        gaps = ts[lo:hi] - ts[max(lo - 1, 0) : hi - 1] if lo else np.diff(ts[:hi], prepend=ts[:1])
        out[lo:hi] = schema.gap_buckets(gaps)
    out[first] = schema.UNK  # first event of a user: no previous event
    return out


def plan_samples(spec: SampleSpec, offsets: np.ndarray, seg_counts: np.ndarray) -> dict[str, np.ndarray]:
    """One row per sample: user (position in the part), window and the event ranges of its
    three segments."""
    n_train, n_valid, n_test = seg_counts.T
    start = offsets[:-1]
    if spec.window:
        stride = spec.window - spec.window_overlap
        windows = 1 + np.ceil(np.maximum(n_train - spec.window, 0) / stride).astype(np.int64)
        if len(windows) and windows.max() > 1000:  # the sample key has three digits for the window
            raise DataError(
                f"--window {spec.window} cuts the longest history into {windows.max()} windows; at most 1000 fit"
            )
    else:
        windows = np.ones(len(n_train), dtype=np.int64)
    user = np.repeat(np.arange(len(n_train)), windows)
    first = np.concatenate([[0], np.cumsum(windows)[:-1]]).astype(np.int64)
    w = np.arange(len(user)) - np.repeat(first, windows)
    latest = w == 0
    if spec.window:
        end = n_train[user] - w * stride
        train_lo = np.maximum(end - spec.window, 0)
    else:
        end, train_lo = n_train[user], np.zeros(len(user), dtype=np.int64)
    base = start[user]
    valid_lo = base + n_train[user]
    test_lo = valid_lo + n_valid[user]
    return {
        "user": user,
        "window": w,
        "train": np.stack([base + train_lo, base + end], axis=1),
        "valid": np.stack([valid_lo, np.where(latest, test_lo, valid_lo)], axis=1),
        "test": np.stack([test_lo, np.where(latest, test_lo + n_test[user], test_lo)], axis=1),
    }


def write_part(spec: SampleSpec, columns: dict[str, np.ndarray], directory: Path, part: int) -> PartResult:
    """Writes the samples of one part into ``directory`` (``PART_SHARD`` files).

    ``columns``: ``user`` (int64 codes, consecutive from the part's first user), ``item`` (item
    indices) and, as ``spec.features`` has them, ``action`` (indices), ``ts`` (epoch seconds) and
    ``weight``; every user's events together, in (time, source order)."""
    user = np.asarray(columns["user"], dtype=np.int64)
    ts = np.asarray(columns["ts"], dtype=np.int64) if "ts" in columns else None
    action = columns.get("action")
    duplicates = 0
    if spec.dedup and ts is not None and len(user):
        repeated = _duplicates(user, ts, columns["item"], action)
        duplicates = len(repeated)
        if duplicates:
            keep = np.ones(len(user), dtype=bool)
            keep[repeated] = False
            columns = {name: np.asarray(values)[keep] for name, values in columns.items()}
            user, ts = user[keep], ts[keep]
            action = columns.get("action")
    n = len(user)
    if n == 0:
        return PartResult(part, [], 0, np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))

    starts = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]]))
    first_user = int(user[0])
    if int(user[-1]) - first_user + 1 != len(starts):
        raise DataError(
            f"part {part}: user codes {first_user}..{int(user[-1])} are not consecutive and sorted "
            f"({len(starts)} users); the engine handed over a part that is not whole users in order"
        )
    offsets = np.concatenate([starts, [n]])
    counts = np.diff(offsets)

    records = np.zeros(n, dtype=schema.segment_dtype(list(spec.features)))
    records["item"] = columns["item"]
    if "action" in spec.features:
        records["action"] = action
    if "weight" in spec.features:
        records["weight"] = columns["weight"]
    if "gap" in spec.features:
        records["gap"] = gap_buckets(ts, starts)

    if spec.split == "leave_one_out":
        has_targets = counts >= 3
        seg_counts = np.stack([counts - 2 * has_targets, has_targets, has_targets], axis=1).astype(np.int64)
        is_train = np.ones(n, dtype=bool)
        ends = offsets[1:][has_targets]
        is_train[ends - 1] = False
        is_train[ends - 2] = False
    else:
        segment = (ts >= spec.valid_start).astype(np.int8) + (ts >= spec.test_start).astype(np.int8)
        local = np.repeat(np.arange(len(counts)), counts)
        seg_counts = np.stack([np.bincount(local[segment == s], minlength=len(counts)) for s in range(3)], axis=1)
        is_train = segment == 0
    popular_items, popular_counts = np.unique(records["item"][is_train], return_counts=True)

    plan = plan_samples(spec, offsets, seg_counts)
    shards = []
    n_samples = len(plan["user"])
    for j, lo in enumerate(range(0, n_samples, spec.samples_per_shard)):
        hi = min(lo + spec.samples_per_shard, n_samples)
        writer = ShardWriter(Path(directory) / PART_SHARD.format(part, j))
        for i in range(lo, hi):
            segments = {name: records[plan[name][i, 0] : plan[name][i, 1]] for name in schema.SEGMENTS}
            writer.write(schema.sample_key(first_user + int(plan["user"][i]), int(plan["window"][i])), segments)
        entry = writer.close()
        lengths = {name: np.diff(plan[name][lo:hi], axis=1)[:, 0] for name in schema.SEGMENTS}
        entry["splits"] = {
            split: int(np.sum(schema.eligible(split, lengths["train"], lengths["valid"], lengths["test"])))
            for split in schema.SPLITS
        }
        shards.append(entry)
    return PartResult(
        part=part,
        shards=shards,
        first_user=first_user,
        user_events=counts.astype(np.int64),
        popular_items=popular_items.astype(np.int32),
        popular_counts=popular_counts.astype(np.int64),
        events_per_segment=[int(x) for x in seg_counts.sum(axis=0)],
        samples=n_samples,
        duplicates=duplicates,
    )


@dataclass
class Combined:
    shards: list[dict]
    user_events: np.ndarray
    popularity: np.ndarray
    events_per_segment: list[int]
    samples: int
    duplicates: int


def combine_parts(results: list[PartResult], directory: Path, n_users: int, n_items: int) -> Combined:
    """Puts the parts' results together and renames their shard files, in part order, to the
    final shard names (data.shards.SHARD_PATTERN)."""
    results = sorted(results, key=lambda r: r.part)
    directory = Path(directory)
    shards, user_events = [], np.zeros(n_users, dtype=np.int64)
    popularity = np.zeros(n_items, dtype=np.int64)
    seen = np.zeros(n_users, dtype=bool)
    for result in results:
        for entry in result.shards:
            name = SHARD_PATTERN.format(len(shards))
            (directory / entry["name"]).rename(directory / name)
            shards.append(entry | {"name": name})
        span = slice(result.first_user, result.first_user + len(result.user_events))
        if seen[span].any():
            raise DataError(f"part {result.part} holds users that another part holds too")
        seen[span] = True
        user_events[span] = result.user_events
        popularity[result.popular_items] += result.popular_counts  # unique within a part
    if not seen.all():
        missing = int(np.flatnonzero(~seen)[0])
        raise DataError(f"user {missing} is in no part: the engine lost events")
    return Combined(
        shards=shards,
        user_events=user_events,
        popularity=popularity,
        events_per_segment=[int(sum(r.events_per_segment[s] for r in results)) for s in range(3)],
        samples=sum(r.samples for r in results),
        duplicates=sum(r.duplicates for r in results),
    )
