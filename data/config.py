"""``PrepareConfig``: how ``lmrec data prepare`` turns raw events into shards. Kept apart from
data.prepare (and its Polars) so that the command line builds its options from these fields
without loading the preparation code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.errors import DataError

SPLIT_KINDS = ("leave_one_out", "temporal")
ENGINES = ("memory", "duckdb", "spark")


def _option(default, help: str, group: str = "processing", **cli):
    """A PrepareConfig field with what `lmrec data prepare` shows for it (the command line's
    options are generated from these fields). ``cli``: ``flag`` (default --field-name),
    ``negated`` (a flag that sets False), ``choices``."""
    return field(default=default, metadata={"help": help, "group": group, **cli})


@dataclass
class PrepareConfig:
    __pydantic_config__ = {"extra": "forbid"}  # parsed by data.typed

    out: Path = field(metadata={"help": "the shard directory to write", "group": None})
    overwrite: bool = _option(False, "replace an existing --out", group=None)
    split: str = _option("leave_one_out", "how events become train / valid / test", choices=SPLIT_KINDS)
    valid_start: str | None = _option(None, "temporal: epoch seconds or qFRACTION (quantile of event times)")
    test_start: str | None = _option(None, "temporal: epoch seconds or qFRACTION")
    dedup: bool = _option(True, "keep exact duplicate events", flag="--no-dedup", negated=True)
    min_user_events: int = _option(0, "k-core: drop users with fewer events")
    min_item_events: int = _option(0, "k-core: drop items with fewer events")
    window: int = _option(0, "cut training histories into windows of this many events (0: one sample per user)")
    window_overlap: int = _option(0, "events shared by consecutive windows")
    samples_per_shard: int = _option(5000, "samples per shard file")
    seed: int = _option(0, "seed of the item index permutation (and of --hold-out-items)")
    # The cold-item protocol: this fraction of items never appears in training or validation, only
    # as test targets (see _hold_out_items).
    hold_out_items: float = _option(
        0.0, "cold-item protocol: this fraction of items appears only as test targets, never in training or validation"
    )
    vocab_from: Path | None = _option(None, "keep the item/action indices of this prepared directory")
    workers: int = _option(2, "processes writing shards (memory, duckdb)")
    # Where the relational work runs (data.prepare's docstring): Polars in memory, DuckDB spilling
    # to disk in bounded memory, or a Spark cluster.
    engine: str = _option("memory", "where the preparation runs", group="engine", choices=ENGINES)
    memory_limit: str = _option(
        "4GB", "duckdb: memory the database may hold before it spills to disk (DuckDB's memory_limit)", group="engine"
    )
    spill_dir: Path | None = _option(
        None, "duckdb: directory for the database and its spill files (default: beside --out)", group="engine"
    )
    spark_master: str | None = _option(
        None, "spark: master URL (default: the session's, or local[*] when there is none)", group="engine"
    )
    events_per_partition: int = _option(
        2_000_000, "duckdb, spark: events per part of whole users handed to the per-user step", group="engine"
    )
    progress: bool = _option(True, "no progress bar", flag="--quiet", negated=True)
    # Item text features (data.text): sentence-encoder vectors and hashed n-gram tokens per item.
    item_text: bool = _option(
        False,
        "encode each item's text (title, genres, description) for the model: sentence-encoder vectors and hashed "
        "word n-grams",
        group="item text",
    )
    text_buckets: int = _option(1 << 15, "hash buckets of the text tokens", group="item text")
    text_cache: Path | None = _option(None, "encoded-vector cache (default ~/.cache/lmrec/text)", group="item text")

    def __post_init__(self):
        self.out = Path(self.out)
        if self.split not in SPLIT_KINDS:
            raise DataError(f"--split must be one of {SPLIT_KINDS}, got {self.split!r}")
        if self.split == "temporal" and (self.valid_start is None or self.test_start is None):
            raise DataError("--split temporal needs --valid-start and --test-start (epoch seconds or qFRACTION)")
        if self.split != "temporal" and (self.valid_start is not None or self.test_start is not None):
            raise DataError("--valid-start/--test-start only apply to --split temporal")
        if self.window < 0 or self.window_overlap < 0 or (self.window and self.window_overlap >= self.window):
            raise DataError(
                f"need window >= 0 and 0 <= window_overlap < window, got {self.window}, {self.window_overlap}"
            )
        if self.samples_per_shard < 1 or self.workers < 1:
            raise DataError("--samples-per-shard and --workers must be at least 1")
        if min(self.min_user_events, self.min_item_events) < 0:
            raise DataError("--min-user-events and --min-item-events must be >= 0")
        if not 0 <= self.hold_out_items < 1:
            raise DataError(f"--hold-out-items must be a fraction in [0, 1), got {self.hold_out_items}")
        if self.hold_out_items and self.split != "leave_one_out":
            raise DataError("--hold-out-items needs --split leave_one_out (held-out items are test targets only)")
        if self.engine not in ENGINES:
            raise DataError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.hold_out_items and self.engine != "memory":
            raise DataError(
                "--hold-out-items is an evaluation protocol for data that fits in memory: use --engine memory"
            )
        if self.events_per_partition < 1:
            raise DataError("--events-per-partition must be at least 1")
        if self.text_buckets < 1:
            raise DataError("--text-buckets must be >= 1")
