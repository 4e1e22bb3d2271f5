"""Raw events -> per-user token sequences in WebDataset shards (see data.schema for the format).

Every engine follows the same steps and shares all but the first:

1. the relational work: k-core filtering, the time cuts of a temporal split, the vocabularies
   and every user's code, then the events of whole users, sorted by (user, time, source order),
   as *parts*. In memory that is Polars (``prepare`` below); out of core DuckDB
   (data.outofcore); on a cluster Spark (data.spark);
2. the per-user step, data.samples.write_part: deduplication, splits, windows, shards;
3. ``finish``: the vocabulary tables, item text and the manifest, written on the driver by one
   writer, so every engine's files can be compared byte for byte.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tqdm import tqdm

from data import schema
from data.config import PrepareConfig
from data.errors import DataError
from data.readers import RawData, id_column, rating_actions
from data.samples import PartResult, SampleSpec, combine_parts, write_part
from data.semantic_ids import SEMANTIC_FILE, carry_semantic_ids
from data.shards import MANIFEST, atomic_output_dir, sha256_file, write_json_atomic
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
from data.vocab import ACTIONS_FILE, ITEMS_FILE, USERS_FILE, build_index, load_previous, lookup, unique_sorted

# Events per part in memory: parts are written by forked workers, a few per worker, so that the
# last one to finish does not leave the other cores idle for long.
PART_EVENTS = 1 << 21


@dataclass
class PrepareReport:
    manifest: dict
    seconds: float
    phases: dict[str, float]
    notes: list[str] = field(default_factory=list)


class Phases:
    """Wall time of each preparation phase, for the report and the benchmark."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


# ---------------------------------------------------------------------------------------------
# Decisions every engine makes the same way, on the driver.


def features_of(columns) -> list[str]:
    """The sample features a source with these event columns gives (see data.schema)."""
    return ["item"] + [f for f, col in (("action", "action"), ("gap", "ts"), ("weight", "weight")) if col in columns]


def time_cuts(cfg: PrepareConfig, n_events: int, sorted_times_at) -> tuple[int | None, int | None]:
    """The temporal split's two cuts in epoch seconds. ``qFRACTION`` is the event time at
    position floor(FRACTION * (n - 1)) of all times in ascending order (after k-core filtering,
    before deduplication), so every engine can find it exactly; ``sorted_times_at(positions)``
    returns those times."""
    if cfg.split != "temporal":
        return None, None
    if sorted_times_at is None:
        raise DataError("--split temporal needs timestamps, and this source has none")
    cuts, positions = {}, {}
    for name, value in (("valid-start", cfg.valid_start), ("test-start", cfg.test_start)):
        text = str(value).strip()
        try:
            if text.startswith("q"):
                q = float(text[1:])
                if not 0.0 < q < 1.0:
                    raise ValueError
                positions[name] = int(q * (n_events - 1))
            else:
                cuts[name] = int(float(text))
        except ValueError:
            raise DataError(
                f"--{name} must be epoch seconds or qFRACTION with 0 < FRACTION < 1, got {value!r}"
            ) from None
    if positions:
        cuts.update(zip(positions, sorted_times_at(list(positions.values()))))
    valid_start, test_start = int(cuts["valid-start"]), int(cuts["test-start"])
    if valid_start > test_start:
        raise DataError(f"--valid-start ({valid_start}) must not be after --test-start ({test_start})")
    return valid_start, test_start


# Times are bucketed by their high bits to find a quantile in two grouped passes (sorted_times_at).
TIME_BUCKET_BITS = 20


def sorted_times_at(grouped, positions: list[int]) -> list[int]:
    """The times at ``positions`` of all times in ascending order, exactly, from two grouped
    counts: ``grouped(None)`` gives (bucket, count) over the high bits of the times, and
    ``grouped(b)`` gives (time, count) of the times in bucket b (both sorted). Shared by the
    engines that cannot sort all times at once (this one and data.spark)."""
    buckets = grouped(None)
    ends = np.cumsum(buckets["count"].to_numpy())
    out = []
    for position in positions:
        at = int(np.searchsorted(ends, position, side="right"))
        before = int(ends[at - 1]) if at else 0
        times = grouped(int(buckets["bucket"][at]))
        inside = np.cumsum(times["count"].to_numpy())
        out.append(int(times["ts"][int(np.searchsorted(inside, position - before, side="right"))]))
    return out


def sample_spec(cfg: PrepareConfig, features: list[str], cuts: tuple[int | None, int | None]) -> SampleSpec:
    return SampleSpec(
        features=tuple(features),
        split=cfg.split,
        valid_start=cuts[0],
        test_start=cuts[1],
        window=cfg.window,
        window_overlap=cfg.window_overlap,
        dedup=cfg.dedup and "gap" in features,
        samples_per_shard=cfg.samples_per_shard,
    )


@dataclass
class Vocabularies:
    items: pl.DataFrame  # index, raw_id
    actions: pl.DataFrame | None  # index, raw_id
    users: pl.Series  # raw IDs in code order
    notes: list[str]

    def user_table(self) -> pl.DataFrame:
        """(index, raw_id): a user's code is its position in sorted ID order."""
        return pl.DataFrame({"index": np.arange(self.users.len(), dtype=np.int64), "raw_id": self.users})

    def keys(self, what: str, raw: pl.Series) -> pl.DataFrame:
        """(raw, index) for every distinct source value ``raw`` of ``what`` ("item", "action",
        "user"): what an engine joins its events with. Values that name the same ID (" 7" and
        "7" where IDs are integers) get the same index."""
        if what == "user":
            table = self.user_table()
        else:
            table = self.items if what == "item" else self.actions
        if what == "action":
            normalised = rating_actions(raw).cast(pl.String) if raw.dtype.is_numeric() else raw
        else:
            normalised = id_column(raw)
        return pl.DataFrame({"raw": raw, "index": lookup(normalised.cast(table["raw_id"].dtype), table)})


def build_vocabularies(
    cfg: PrepareConfig, items: pl.Series, users: pl.Series, actions: pl.Series | None
) -> Vocabularies:
    """Item, action and user vocabularies from the distinct raw values each engine collected.
    Items: a seeded permutation (data.vocab); users: codes in sorted ID order."""
    notes = []
    items, users = id_column(items), id_column(users)
    if actions is not None:  # ratings staged as numbers are named as the readers name them
        actions = (rating_actions(actions) if actions.dtype.is_numeric() else actions).cast(pl.String)
    previous_items = previous_actions = None
    if cfg.vocab_from is not None:
        previous_items, previous_actions = load_previous(cfg.vocab_from)
        # Numeric-looking IDs read as integers still name the same entries as the strings.
        if previous_items["raw_id"].dtype == pl.String:
            items = items.cast(pl.String)
        if previous_actions is not None and actions is not None and previous_actions["raw_id"].dtype == pl.String:
            actions = actions.cast(pl.String)
    items_vocab, change = build_index(items, cfg.seed, previous_items, what="item")
    if change is not None:
        notes.append(f"items against --vocab-from: {change}")
    actions_vocab = None
    if actions is not None:
        actions_vocab, change = build_index(actions, cfg.seed, previous_actions, shuffle=False, what="action")
        if change is not None and change.added:
            notes.append(f"actions against --vocab-from: {change}")
    return Vocabularies(items_vocab, actions_vocab, users.unique().sort(), notes)


def _write_table(frame: pl.DataFrame, path: Path) -> None:
    # One writer for every engine's tables, so equal tables are equal files.
    pq.write_table(frame.to_arrow(), path, compression="zstd")


def _fingerprints(paths: list[Path]) -> list[dict]:
    return [{"path": str(p), "bytes": Path(p).stat().st_size, "sha256": sha256_file(p)} for p in paths]


def finish(
    tmp: Path,
    cfg: PrepareConfig,
    source: dict,
    inputs: list[Path],
    features: list[str],
    vocab: Vocabularies,
    results: list[PartResult],
    dropped: dict,
    item_text_frame: pl.DataFrame | None = None,
    held_out: pl.Series | None = None,
    engine: dict | None = None,
) -> tuple[dict, list[str]]:
    """Everything after the parts: shard names, tables, item text and the manifest in ``tmp``."""
    notes = list(vocab.notes)
    size = int(vocab.items["index"].max()) + 1
    combined = combine_parts(results, tmp, vocab.users.len(), size)
    dropped = dropped | {"duplicates": combined.duplicates}
    # Popularity counts only training events, so the baseline never sees a target.
    items_table = vocab.items.with_columns(pl.Series("count", combined.popularity[vocab.items["index"].to_numpy()]))
    if item_text_frame is not None:
        text = item_text_frame.rename({"item": "raw_id"})
        text = text.with_columns(text["raw_id"].cast(items_table["raw_id"].dtype, strict=False))
        text = text.unique("raw_id", keep="first", maintain_order=True)
        items_table = items_table.join(text, on="raw_id", how="left", maintain_order="left")
        missing = text.height - items_table.filter(pl.col("raw_id").is_in(text["raw_id"].implode())).height
        if missing:
            notes.append(f"{missing} catalog items have text but no events; they are not in the vocabulary")
    if held_out is not None:
        items_table = items_table.with_columns(pl.col("raw_id").is_in(held_out.implode()).alias("held_out"))
    users_table = vocab.user_table().with_columns(pl.Series("events", combined.user_events))
    _write_table(items_table, tmp / ITEMS_FILE)
    _write_table(users_table, tmp / USERS_FILE)
    written = [ITEMS_FILE, USERS_FILE]
    if vocab.actions is not None:
        _write_table(vocab.actions.rename({"raw_id": "value"}), tmp / ACTIONS_FILE)
        written.append(ACTIONS_FILE)
    text = None
    if cfg.item_text:
        text, encoded = _write_item_text(cfg, items_table, size, tmp / TEXT_FILE)
        notes.append(f"item text: {text['items_with_text']:,} items, {encoded:,} encoded now, the rest from the cache")
        written.append(TEXT_FILE)
    semantic_ids = carry_semantic_ids(cfg.vocab_from, tmp, size, text) if cfg.vocab_from else None
    if semantic_ids:
        written.append(SEMANTIC_FILE)
        notes.append(f"semantic IDs carried over; {semantic_ids['carried_from']['new_items']:,} new items encoded")
    files = {name: sha256_file(tmp / name) for name in written}
    split_counts = {s: sum(e["splits"][s] for e in combined.shards) for s in schema.SPLITS}
    manifest = {
        "format": "lmrec-shards",
        "schema_version": schema.SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "engine": engine or {"name": cfg.engine},
        "inputs": _fingerprints(inputs),
        "features": features,
        "padding_side": schema.PADDING_SIDE,
        "split": {"kind": cfg.split, "valid_start": cfg.valid_start, "test_start": cfg.test_start},
        "window": {"length": cfg.window, "overlap": cfg.window_overlap},
        "vocab": {
            "pad": schema.PAD,
            "unk": schema.UNK,
            "items": size,
            "actions": int(vocab.actions["index"].max()) + 1 if vocab.actions is not None else 0,
            "gaps": schema.GAP_VOCAB_SIZE if "gap" in features else 0,
            "item_seed": cfg.seed,
            "from": str(cfg.vocab_from) if cfg.vocab_from else None,
        },
        "counts": {
            "users": vocab.users.len(),
            "items": vocab.items.height,
            "events": int(combined.user_events.sum()),
            "samples": combined.samples,
            "events_per_segment": dict(zip(schema.SEGMENTS, combined.events_per_segment)),
            "samples_per_split": split_counts,
            "dropped": dropped,
        },
        "shards": combined.shards,
        "files": files,
        "text": text,
        "semantic_ids": semantic_ids,
        "held_out_items": None if held_out is None else {"fraction": cfg.hold_out_items, "items": len(held_out)},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("progress",)},
    }
    write_json_atomic(tmp / MANIFEST, manifest)
    return manifest, notes


# ---------------------------------------------------------------------------------------------
# The in-memory engine.


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
    items = events["item"].unique().sort()
    rng = np.random.default_rng(seed)
    held = items.gather(np.sort(rng.choice(len(items), size=round(fraction * len(items)), replace=False)))
    is_held = pl.col("item").is_in(held.implode())
    last = (pl.col("user") != pl.col("user").shift(-1)).fill_null(True)
    kept = events.filter(~is_held | last)
    return kept.filter(~is_held | (pl.len().over("user") >= 3)), held


# State for forked part writers: set before the pool starts, inherited copy-on-write.
_SHARED: dict = {}


def _write_part_task(task: tuple[int, int, int]) -> PartResult:
    part, lo, hi = task
    columns = _SHARED["columns"]
    # The part's events in source order; a stable sort by (user, time) keeps that order among
    # equal times. The gathers run here, in the parallel workers, not in the driver.
    rows = _SHARED["order"][lo:hi]
    keys = (columns["ts"][rows], columns["user"][rows]) if "ts" in columns else (columns["user"][rows],)
    rows = rows[np.lexsort(keys)]
    return write_part(_SHARED["spec"], {name: values[rows] for name, values in columns.items()}, _SHARED["dir"], part)


def _by_user_range(user: np.ndarray, n_users: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Events grouped into parts of whole users (consecutive codes, about PART_EVENTS events
    each): the event order that groups them, in source order within a part, and the (part, lo,
    hi) ranges of that order. A stable sort of small part numbers is a radix sort in numpy,
    linear in the events; sorting within the parts then runs in the parallel workers, where a
    global sort by (user, time) took a third of the time."""
    n = len(user)
    n_parts = max(1, min(-(-n // PART_EVENTS), n_users))
    part = (user * n_parts // n_users).astype(np.int16 if n_parts < 1 << 15 else np.int32)
    order = np.argsort(part, kind="stable")
    counts = np.bincount(part, minlength=n_parts)
    ends = np.cumsum(counts)
    return order, [(p, int(hi - size), int(hi)) for p, (size, hi) in enumerate(zip(counts, ends)) if size]


def run_parts(
    spec: SampleSpec, columns: dict, order: np.ndarray, tmp: Path, tasks: list, workers: int, progress: bool
) -> list:
    """The per-user step over ``tasks`` (ranges of ``order``) in ``workers`` forked processes
    sharing ``columns``."""
    _SHARED.update(columns=columns, order=order, spec=spec, dir=tmp)
    bar = tqdm(total=sum(hi - lo for _, lo, hi in tasks), unit="event", desc="shards", disable=not progress)
    results = []
    try:
        if workers == 1 or len(tasks) == 1:
            pool, done = None, map(_write_part_task, tasks)
        else:
            pool = multiprocessing.get_context("fork").Pool(min(workers, len(tasks)))
            done = pool.imap_unordered(_write_part_task, tasks)
        for result in done:
            results.append(result)
            bar.update(int(result.user_events.sum()) + result.duplicates)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        _SHARED.clear()
    return results


def _action_indices(actions: pl.Series, vocab: pl.DataFrame) -> np.ndarray:
    if isinstance(actions.dtype, pl.Enum):  # through the categories: no string per event
        categories = actions.dtype.categories.cast(vocab["raw_id"].dtype)
        return lookup(categories, vocab).astype(np.int16)[actions.to_physical().to_numpy()]
    return lookup(actions.cast(vocab["raw_id"].dtype), vocab).astype(np.int16)


def prepare(raw: RawData, cfg: PrepareConfig, source: dict) -> PrepareReport:
    """Runs the whole preparation in memory and writes ``cfg.out`` (``raw.events`` becomes the
    filtered events, so that a large input is not held twice)."""
    phases = Phases()
    events = raw.events
    if events.height == 0:
        raise DataError("no events to prepare")
    has_ts = "ts" in events.columns
    features = features_of(events.columns)
    dropped = {"bad_rows": raw.bad_rows, "duplicates": 0, "k_core": 0}

    if cfg.min_user_events or cfg.min_item_events:
        before = events.height
        events = _k_core(events, cfg.min_user_events, cfg.min_item_events)
        dropped["k_core"] = before - events.height
        if events.height == 0:
            raise DataError(
                f"k-core filtering (users >= {cfg.min_user_events}, items >= {cfg.min_item_events} events) left no events"
            )
    ts = events["ts"].to_numpy() if has_ts else None  # a view: no copy
    cuts = time_cuts(cfg, events.height, None if ts is None else lambda at: np.partition(ts, at)[at].tolist())

    held_out = None
    catalog = unique_sorted(events["item"])  # held-out items stay in the vocabulary: the test ranks them
    if cfg.hold_out_items:
        # Needs every user's last event, so a global sort; equal times keep source order (the row
        # number as the last key is 2.5x faster than Polars' maintain_order).
        keys = ["user", "ts", "source_row"] if has_ts else ["user", "source_row"]
        events = events.with_row_index("source_row").sort(keys).drop("source_row")
        before = events.height
        events, held_out = _hold_out_items(events, cfg.hold_out_items, cfg.seed)
        dropped["held_out_items"] = before - events.height
    raw.events = events
    phases.done("filter")

    actions = events["action"].unique().cast(pl.String) if "action" in events.columns else None
    vocab = build_vocabularies(cfg, catalog, unique_sorted(events["user"]), actions)
    columns = {"user": lookup(events["user"], vocab.user_table())}
    columns["item"] = lookup(events["item"].cast(vocab.items["raw_id"].dtype), vocab.items).astype(np.int32)
    if vocab.actions is not None:
        columns["action"] = _action_indices(events["action"], vocab.actions)
    for name in ("ts", "weight"):
        if name in events.columns:
            columns[name] = events[name].to_numpy()
    del events
    order, tasks = _by_user_range(columns["user"], vocab.users.len())
    phases.done("vocabulary")

    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        spec = sample_spec(cfg, features, cuts)
        results = run_parts(spec, columns, order, tmp, tasks, cfg.workers, cfg.progress)
        del columns, order
        phases.done("write_shards")
        manifest, notes = finish(tmp, cfg, source, raw.inputs, features, vocab, results, dropped, raw.items, held_out)
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
