"""Raw events -> per-user token sequences in WebDataset shards (see data.schema for the format).

The relational work (deduplication, k-core filtering, the per-user stable sort, ID mapping) is
done by Polars; per-user splitting and windowing are vectorised in numpy over the sorted events;
shards are written by ``workers`` forked processes, each owning whole shards.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from data import schema
from data.config import PrepareConfig
from data.errors import DataError
from data.readers import RawData
from data.shards import MANIFEST, SHARD_PATTERN, ShardWriter, atomic_output_dir, sha256_file, write_json_atomic
from data.text import (
    TEXT_COLUMNS,
    TEXT_FILE,
    YEAR_COLUMNS,
    HashedTokenizer,
    SentenceEncoder,
    TextVectorCache,
    build_text_features,
    item_text,
    text_spec,
)
from data.vocab import ACTIONS_FILE, ITEMS_FILE, USERS_FILE, build_index, load_previous, lookup


@dataclass
class PrepareReport:
    manifest: dict
    seconds: float
    phases: dict[str, float]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------


def _k_core(events: pl.DataFrame, min_user: int, min_item: int) -> pl.DataFrame:
    while True:
        before = events.height
        if min_item:
            events = events.filter(pl.len().over("item") >= min_item)
        if min_user:
            events = events.filter(pl.len().over("user") >= min_user)
        if events.height == before:
            return events


def _hold_out_items(events: pl.DataFrame, fraction: float, seed: int) -> tuple[pl.DataFrame, pl.Series]:
    """Removes a seeded random ``fraction`` of the items from every history, except where one is a
    user's last event and that user keeps enough events (3) to be evaluated: there it stays as the
    test target. So training and validation never see a held-out item, and test histories hold
    none either; only the targets do."""
    items = _unique_items(events)
    rng = np.random.default_rng(seed)
    held = items.gather(np.sort(rng.choice(len(items), size=round(fraction * len(items)), replace=False)))
    is_held = pl.col("item").is_in(held.implode())
    last = (pl.col("user") != pl.col("user").shift(-1)).fill_null(True)
    kept = events.filter(~is_held | last)
    return kept.filter(~is_held | (pl.len().over("user") >= 3)), held


def _unique_items(events: pl.DataFrame) -> pl.Series:
    return events["item"].unique().sort()


def _drop_duplicates(events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Drops exact repeats of (user, item, ts, action) from events sorted by (user, ts).
    Repeats can only sit among rows that share (user, ts), usually few, so only those are hashed."""
    user, ts = events["user"], events["ts"]
    same = ((user == user.shift(1)) & (ts == ts.shift(1))).fill_null(False)
    tied = same | same.shift(-1, fill_value=False)
    if not tied.any():
        return events, 0
    key = [c for c in ("user", "item", "ts", "action") if c in events.columns]
    rows = events.with_row_index("row").filter(tied)
    repeated = rows.filter(~pl.struct(key).is_first_distinct())["row"]
    if repeated.len() == 0:
        return events, 0
    keep = np.ones(events.height, dtype=bool)
    keep[repeated.to_numpy()] = False
    return events.filter(pl.Series(keep)), repeated.len()


def _time_cut(value: str, ts: np.ndarray, name: str) -> int:
    text = str(value).strip()
    try:
        if text.startswith("q"):
            q = float(text[1:])
            if not 0.0 < q < 1.0:
                raise ValueError
            return int(np.quantile(ts, q))
        return int(float(text))
    except ValueError:
        raise DataError(f"--{name} must be epoch seconds or qFRACTION with 0 < FRACTION < 1, got {value!r}") from None


def _segments(cfg: PrepareConfig, ts: np.ndarray | None) -> np.ndarray:
    """Temporal split: the segment of every event, 0 train, 1 valid, 2 test."""
    if ts is None:
        raise DataError("--split temporal needs timestamps, and this source has none")
    valid_start = _time_cut(cfg.valid_start, ts, "valid-start")
    test_start = _time_cut(cfg.test_start, ts, "test-start")
    if valid_start > test_start:
        raise DataError(f"--valid-start ({valid_start}) must not be after --test-start ({test_start})")
    return (ts >= valid_start).astype(np.int8) + (ts >= test_start).astype(np.int8)


def _plan_samples(cfg: PrepareConfig, offsets: np.ndarray, seg_counts: np.ndarray) -> dict[str, np.ndarray]:
    """One row per sample: user, window and the event ranges of its three segments."""
    n_train, n_valid, n_test = seg_counts.T
    start = offsets[:-1]
    if cfg.window:
        stride = cfg.window - cfg.window_overlap
        windows = 1 + np.ceil(np.maximum(n_train - cfg.window, 0) / stride).astype(np.int64)
        if windows.max() > 1000:  # the sample key has three digits for the window
            raise DataError(
                f"--window {cfg.window} cuts the longest history into {windows.max()} windows; at most 1000 fit"
            )
    else:
        windows = np.ones(len(n_train), dtype=np.int64)
    user = np.repeat(np.arange(len(n_train)), windows)
    first = np.concatenate([[0], np.cumsum(windows)[:-1]])
    w = np.arange(len(user)) - np.repeat(first, windows)
    latest = w == 0
    if cfg.window:
        end = n_train[user] - w * stride
        train_lo = np.maximum(end - cfg.window, 0)
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


# State for forked shard writers: set before the pool starts, inherited copy-on-write.
_SHARED: dict = {}


def _write_shard(task: tuple[int, int, int]) -> dict:
    index, lo, hi = task
    records, plan, directory = _SHARED["records"], _SHARED["plan"], _SHARED["dir"]
    writer = ShardWriter(directory / SHARD_PATTERN.format(index))
    lengths = {name: np.diff(plan[name][lo:hi], axis=1)[:, 0] for name in schema.SEGMENTS}
    for i in range(lo, hi):
        segments = {name: records[plan[name][i, 0] : plan[name][i, 1]] for name in schema.SEGMENTS}
        writer.write(schema.sample_key(int(plan["user"][i]), int(plan["window"][i])), segments)
    entry = writer.close()
    entry["splits"] = {
        split: int(np.sum(schema.eligible(split, lengths["train"], lengths["valid"], lengths["test"])))
        for split in schema.SPLITS
    }
    return entry


def _write_shards(cfg: PrepareConfig, tmp: Path, records: np.ndarray, plan: dict) -> list[dict]:
    n = len(plan["user"])
    tasks = [(i, lo, min(lo + cfg.samples_per_shard, n)) for i, lo in enumerate(range(0, n, cfg.samples_per_shard))]
    _SHARED.update(records=records, plan=plan, dir=tmp)
    bar = tqdm(total=n, unit="sample", desc="shards", disable=not cfg.progress)
    entries = []
    try:
        if cfg.workers == 1 or len(tasks) == 1:
            results = map(_write_shard, tasks)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(min(cfg.workers, len(tasks)))
            results = pool.imap(_write_shard, tasks)
        for entry in results:
            entries.append(entry)
            bar.update(entry["samples"])
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        _SHARED.clear()
    return entries


def _fingerprints(paths: list[Path]) -> list[dict]:
    return [{"path": str(p), "bytes": Path(p).stat().st_size, "sha256": sha256_file(p)} for p in paths]


class _Phases:
    """Wall time of each preparation phase, for the report and the benchmark."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


def _gap_buckets(ts: np.ndarray, first: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """Gap bucket of every event, in chunks so that the temporaries stay small."""
    out = np.empty(len(ts), dtype=np.int16)
    for lo in range(0, len(ts), chunk):
        hi = min(lo + chunk, len(ts))
        gaps = ts[lo:hi] - ts[max(lo - 1, 0) : hi - 1] if lo else np.diff(ts[:hi], prepend=ts[:1])
        out[lo:hi] = schema.gap_buckets(gaps)
    out[first] = schema.UNK  # first event of a user: no previous event
    return out


def prepare(raw: RawData, cfg: PrepareConfig, source: dict) -> PrepareReport:
    """Runs the whole preparation and writes ``cfg.out``. Sorts ``raw.events`` in place (the frame
    is replaced by its sorted version) so that a large input is never held twice."""
    phases = _Phases()
    notes: list[str] = []
    events = raw.events
    if events.height == 0:
        raise DataError("no events to prepare")
    has_ts = "ts" in events.columns
    features = ["item"] + [
        f for f, col in (("action", "action"), ("gap", "ts"), ("weight", "weight")) if col in events.columns
    ]
    dropped = {"bad_rows": raw.bad_rows, "duplicates": 0, "k_core": 0}

    if cfg.min_user_events or cfg.min_item_events:
        before = events.height
        events = _k_core(events, cfg.min_user_events, cfg.min_item_events)
        dropped["k_core"] = before - events.height
        if events.height == 0:
            raise DataError(
                f"k-core filtering (users >= {cfg.min_user_events}, items >= {cfg.min_item_events} events) left no events"
            )

    previous_items = previous_actions = None
    if cfg.vocab_from is not None:
        previous_items, previous_actions = load_previous(cfg.vocab_from)
        for column, previous in (("item", previous_items), ("action", previous_actions)):
            # Numeric-looking IDs read as integers still name the same entries as the strings.
            if previous is not None and column in events.columns and previous["raw_id"].dtype == pl.String:
                events = events.with_columns(pl.col(column).cast(pl.String))

    # Stable sort: equal timestamps keep source order, which is the only order SASRec files have.
    raw.events = events = events.sort(["user", "ts"] if has_ts else ["user"], maintain_order=True)
    if cfg.dedup and has_ts:
        events, dropped["duplicates"] = _drop_duplicates(events)
    # Held-out items stay in the vocabulary: the test ranks targets among all items.
    catalog = _unique_items(events)
    held_out = None
    if cfg.hold_out_items:
        before = events.height
        events, held_out = _hold_out_items(events, cfg.hold_out_items, cfg.seed)
        raw.events = events
        dropped["held_out_items"] = before - events.height
    phases.done("filter_sort")

    items_vocab, item_change = build_index(catalog, cfg.seed, previous_items, what="item")
    if item_change is not None:
        notes.append(f"items against --vocab-from: {item_change}")
    records = np.zeros(events.height, dtype=schema.segment_dtype(features))
    records["item"] = lookup(events["item"], items_vocab)
    actions_vocab = None
    if "action" in features:
        actions_vocab, action_change = build_index(
            events["action"], cfg.seed, previous_actions, shuffle=False, what="action"
        )
        if action_change is not None and action_change.added:
            notes.append(f"actions against --vocab-from: {action_change}")
        records["action"] = lookup(events["action"], actions_vocab)
    if "weight" in features:
        records["weight"] = events["weight"].to_numpy()
    phases.done("vocabulary")

    # Events are sorted by user: a user's code is the number of user changes before its rows.
    new_user = (events["user"] != events["user"].shift(1)).fill_null(True)
    user_codes = (new_user.cast(pl.Int32).cum_sum() - 1).to_numpy()
    n_users = int(user_codes[-1]) + 1
    counts = np.bincount(user_codes, minlength=n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ts = events["ts"].to_numpy() if has_ts else None
    if "gap" in features:
        records["gap"] = _gap_buckets(ts, offsets[:-1])
    if cfg.split == "leave_one_out":
        has_targets = counts >= 3
        seg_counts = np.stack([counts - 2 * has_targets, has_targets, has_targets], axis=1).astype(np.int64)
        segment_of_train = None
    else:
        segment = _segments(cfg, ts)
        seg_counts = np.stack([np.bincount(user_codes[segment == s], minlength=n_users) for s in range(3)], axis=1)
        segment_of_train = segment == 0
        del segment
    del user_codes
    plan = _plan_samples(cfg, offsets, seg_counts)
    phases.done("split")

    # Popularity counts only training events, so the baseline never sees a target.
    size = int(items_vocab["index"].max()) + 1
    if segment_of_train is None:  # leave-one-out: every event but each evaluated user's last two
        ends = offsets[1:][has_targets]
        popularity = np.bincount(records["item"], minlength=size) - np.bincount(
            records["item"][np.concatenate([ends - 1, ends - 2])], minlength=size
        )
    else:
        popularity = np.bincount(records["item"][segment_of_train], minlength=size)
    items_table = items_vocab.with_columns(pl.Series("count", popularity[items_vocab["index"].to_numpy()]))
    if raw.items is not None:
        text = raw.items.rename({"item": "raw_id"})
        text = text.with_columns(text["raw_id"].cast(items_table["raw_id"].dtype, strict=False))
        text = text.unique("raw_id", keep="first", maintain_order=True)
        items_table = items_table.join(text, on="raw_id", how="left", maintain_order="left")
        missing = text.height - items_table.filter(pl.col("raw_id").is_in(text["raw_id"].implode())).height
        if missing:
            notes.append(f"{missing} catalog items have text but no events; they are not in the vocabulary")
    if held_out is not None:
        items_table = items_table.with_columns(pl.col("raw_id").is_in(held_out.implode()).alias("held_out"))
    users_table = pl.DataFrame(
        {"index": np.arange(n_users), "raw_id": events["user"].gather(offsets[:-1]), "events": counts}
    )
    del events
    phases.done("tables")

    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        shard_entries = _write_shards(cfg, tmp, records, plan)
        phases.done("write_shards")
        files = {}
        items_table.write_parquet(tmp / ITEMS_FILE)
        users_table.write_parquet(tmp / USERS_FILE)
        written = [ITEMS_FILE, USERS_FILE]
        if actions_vocab is not None:
            actions_vocab.rename({"raw_id": "value"}).write_parquet(tmp / ACTIONS_FILE)
            written.append(ACTIONS_FILE)
        text = None
        if cfg.item_text:
            text, encoded = _write_item_text(cfg, items_table, size, tmp / TEXT_FILE)
            notes.append(
                f"item text: {text['items_with_text']:,} items, {encoded:,} encoded now, the rest from the cache"
            )
            written.append(TEXT_FILE)
        for name in written:
            files[name] = sha256_file(tmp / name)
        split_counts = {s: sum(e["splits"][s] for e in shard_entries) for s in schema.SPLITS}
        manifest = {
            "format": "lmrec-shards",
            "schema_version": schema.SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source,
            "inputs": _fingerprints(raw.inputs),
            "features": features,
            "padding_side": schema.PADDING_SIDE,
            "split": {"kind": cfg.split, "valid_start": cfg.valid_start, "test_start": cfg.test_start},
            "window": {"length": cfg.window, "overlap": cfg.window_overlap},
            "vocab": {
                "pad": schema.PAD,
                "unk": schema.UNK,
                "items": int(items_vocab["index"].max()) + 1,
                "actions": int(actions_vocab["index"].max()) + 1 if actions_vocab is not None else 0,
                "gaps": schema.GAP_VOCAB_SIZE if "gap" in features else 0,
                "item_seed": cfg.seed,
                "from": str(cfg.vocab_from) if cfg.vocab_from else None,
            },
            "counts": {
                "users": n_users,
                "items": items_vocab.height,
                "events": int(len(records)),
                "samples": int(len(plan["user"])),
                "events_per_segment": {name: int(seg_counts[:, i].sum()) for i, name in enumerate(schema.SEGMENTS)},
                "samples_per_split": split_counts,
                "dropped": dropped,
            },
            "shards": shard_entries,
            "files": files,
            "text": text,
            "held_out_items": None if held_out is None else {"fraction": cfg.hold_out_items, "items": len(held_out)},
            "args": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("progress",)
            },
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    phases.done("finish")
    return PrepareReport(manifest, sum(phases.seconds.values()), phases.seconds, notes)


def _write_item_text(cfg: PrepareConfig, items_table: pl.DataFrame, size: int, path: Path) -> tuple[dict, int]:
    columns = [c for c in (*TEXT_COLUMNS, *YEAR_COLUMNS) if c in items_table.columns]
    if not any(c in items_table.columns for c in TEXT_COLUMNS):
        raise DataError("--item-text: this source has no item text (title, genres or description)")
    texts = [""] * size
    for row in items_table.select("index", *columns).iter_rows(named=True):
        texts[row["index"]] = item_text(row)
    encoder, tokenizer = SentenceEncoder(), HashedTokenizer(cfg.text_buckets)
    features, encoded = build_text_features(texts, tokenizer, encoder, TextVectorCache(cfg.text_cache), cfg.progress)
    features.save(path)
    return text_spec(encoder, tokenizer) | {"items_with_text": sum(1 for t in texts if t)}, encoded


def summary_rows(manifest: dict) -> list[tuple[str, str]]:
    c = manifest["counts"]
    rows = [
        ("users", f"{c['users']:,}"),
        ("items", f"{c['items']:,}"),
        ("events", f"{c['events']:,}"),
        ("samples", f"{c['samples']:,} in {len(manifest['shards'])} shards"),
        ("features", ", ".join(manifest["features"])),
        ("split", manifest["split"]["kind"]),
    ]
    rows += [(f"events in {k}", f"{v:,}") for k, v in c["events_per_segment"].items()]
    rows += [(f"{k} samples", f"{v:,}") for k, v in c["samples_per_split"].items()]
    rows += [(f"dropped {k.replace('_', ' ')}", f"{v:,}") for k, v in c["dropped"].items() if v]
    if manifest.get("text"):
        text = manifest["text"]
        rows.append(
            (
                "item text",
                f"{text['items_with_text']:,} items, {text['encoder']['name']} + {text['tokenizer']['buckets']:,} token buckets",
            )
        )
    if manifest.get("held_out_items"):
        rows.append(("held-out items", f"{manifest['held_out_items']['items']:,} (test targets only)"))
    rows.append(("vocab sizes", ", ".join(f"{k} {manifest['vocab'][k]}" for k in ("items", "actions", "gaps"))))
    return rows
