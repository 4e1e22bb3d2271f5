"""The in-memory and out-of-core (DuckDB) engines give the same preparation: counts, byte-equal
vocabulary tables and the same decoded samples per user, on data with duplicates, ties in time,
k-core filtering, temporal and leave-one-out splits and windows; and they report bad rows alike."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data.config import PrepareConfig
from data.errors import DataError
from data.outofcore import prepare_out_of_core
from data.prepare import prepare
from data.readers import ColumnMap, read_events
from data.shards import load_manifest, verify_shards
from data.synthetic import SyntheticSpec, generate
from data.tar import iter_members, load_npy

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ColumnMap(rating="rating")
TABLES = ("items.parquet", "users.parquet", "actions.parquet")


def make_events() -> pl.DataFrame:
    """Synthetic events in log order with exact duplicates and ties in time (same user and time,
    another item), as an events file has them."""
    events = generate(SyntheticSpec(users=300, items=250, events_per_user=20, seed=5, text=False)).events
    duplicates = events.sample(250, seed=1)
    ties = events.sample(250, seed=2).with_columns(pl.col("item") % 250 + 1)
    mixed = pl.concat([events, duplicates, ties]).sample(fraction=1.0, shuffle=True, seed=3)
    return mixed.rename({"user": "user_id", "item": "item_id", "ts": "timestamp", "action": "rating"})


def write_inputs(directory: Path, events: pl.DataFrame) -> dict[str, Path]:
    """The events split over two files, as CSV and as Parquet directories."""
    half = events.height // 2
    out = {}
    for kind in ("csv", "parquet"):
        folder = directory / kind
        folder.mkdir(parents=True)
        for name, part in (("part-0", events[:half]), ("part-1", events[half:])):
            getattr(part, f"write_{kind}")(folder / f"{name}.{kind}")
        out[kind] = folder
    return out


def decoded_samples(directory: Path) -> dict[str, bytes]:
    samples = {}
    for entry in load_manifest(directory)["shards"]:
        for name, data in iter_members(directory / entry["name"]):
            samples[name] = load_npy(data).tobytes()
    return samples


def assert_same_preparation(expected: Path, actual: Path) -> None:
    a, b = load_manifest(expected), load_manifest(actual)
    assert a["counts"] == b["counts"]
    assert a["vocab"] == b["vocab"] and a["features"] == b["features"]
    for name in TABLES:
        assert filecmp.cmp(expected / name, actual / name, shallow=False), name
    assert decoded_samples(expected) == decoded_samples(actual)
    assert verify_shards(actual, b) == []


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("events"), make_events())


SETTINGS = {
    "temporal, windows, k-core": dict(
        split="temporal", valid_start="q0.7", test_start="q0.85", window=8, window_overlap=2,
        min_user_events=5, min_item_events=3,
    ),
    "leave-one-out": dict(min_item_events=2),
}  # fmt: skip


@pytest.mark.parametrize("setting", SETTINGS)
def test_out_of_core_gives_what_memory_gives(tmp_path, inputs, setting):
    kw = SETTINGS[setting] | dict(samples_per_shard=40, progress=False)
    in_memory = prepare(read_events(inputs["csv"], COLUMNS), PrepareConfig(out=tmp_path / "memory", **kw), {})
    assert in_memory.manifest["counts"]["dropped"]["duplicates"] > 0
    assert in_memory.manifest["counts"]["dropped"]["k_core"] > 0
    for kind, folder in inputs.items():  # CSV through the chunked reader, Parquet through DuckDB's
        cfg = PrepareConfig(out=tmp_path / kind, engine="duckdb", events_per_partition=1500, workers=1, **kw)
        report = prepare_out_of_core(folder, COLUMNS, None, "fail", cfg, {})
        assert report.manifest["engine"]["parts"] > 1
        assert_same_preparation(tmp_path / "memory", tmp_path / kind)
    assert not list(tmp_path.glob(".*"))  # no database, spill or temporary output left


def test_out_of_core_through_the_command_line_with_workers(tmp_path, inputs):
    out = tmp_path / "cli"
    common = ["--source", "events", "--input", inputs["parquet"], "--rating-col", "rating", "--quiet"]
    cmd = [sys.executable, "-m", "launch.cli", "data", "prepare", *map(str, common)]
    engine = ["--engine", "duckdb", "--memory-limit", "256MB", "--workers", "2", "--events-per-partition", "2000"]
    done = subprocess.run([*cmd, "--out", str(out), *engine], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["engine"]["memory_limit"] == "256MB"
    prepare(read_events(inputs["csv"], COLUMNS), PrepareConfig(out=tmp_path / "memory", progress=False), {})
    assert_same_preparation(tmp_path / "memory", out)


def test_vocab_from_appends_the_same_new_items_out_of_core(tmp_path, inputs):
    events = make_events()
    first_day = events.filter(pl.col("timestamp") < events["timestamp"].quantile(0.6))
    first_day.write_parquet(tmp_path / "day1.parquet")
    day1 = tmp_path / "day1"
    prepare(read_events(tmp_path / "day1.parquet", COLUMNS), PrepareConfig(out=day1, progress=False), {})
    kw = dict(vocab_from=day1, progress=False)
    prepare(read_events(inputs["parquet"], COLUMNS), PrepareConfig(out=tmp_path / "memory", **kw), {})
    cfg = PrepareConfig(out=tmp_path / "duckdb", engine="duckdb", workers=1, **kw)
    prepare_out_of_core(inputs["parquet"], COLUMNS, None, "fail", cfg, {})
    assert_same_preparation(tmp_path / "memory", tmp_path / "duckdb")
    old = pl.read_parquet(day1 / "items.parquet").select("index", "raw_id")
    new = pl.read_parquet(tmp_path / "duckdb" / "items.parquet").select("index", "raw_id")
    assert new.head(old.height).equals(old) and new.height > old.height


def _with_bad_rows(directory: Path, kind: str) -> Path:
    events = make_events().head(400).with_columns(pl.col("timestamp").cast(pl.Float64))
    events = events.with_columns(
        timestamp=pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise(pl.col("timestamp")),
        user_id=pl.when(pl.int_range(pl.len()) == 11).then(None).otherwise(pl.col("user_id")),
    )
    path = directory / f"bad.{kind}"
    getattr(events, f"write_{kind}")(path)
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_bad_rows_are_named_and_skipped_as_in_memory(tmp_path, kind):
    path = _with_bad_rows(tmp_path, kind)
    with pytest.raises(DataError) as in_memory:
        read_events(path, COLUMNS)
    cfg = PrepareConfig(out=tmp_path / "out", engine="duckdb", workers=1, progress=False)
    with pytest.raises(DataError) as out_of_core:
        prepare_out_of_core(path, COLUMNS, None, "fail", cfg, {})
    where = "line 9" if kind == "csv" else "row 8"
    assert f"{path} {where}, column 'timestamp': no value" in str(out_of_core.value)
    assert str(in_memory.value).split(" (")[0] == str(out_of_core.value).split(" (")[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))

    skipped = read_events(path, COLUMNS, on_bad_rows="skip")
    prepare(skipped, PrepareConfig(out=tmp_path / "memory", progress=False), {})
    prepare_out_of_core(path, COLUMNS, None, "skip", cfg, {})
    assert load_manifest(tmp_path / "out")["counts"]["dropped"]["bad_rows"] == skipped.bad_rows == 2
    assert_same_preparation(tmp_path / "memory", tmp_path / "out")


def test_a_failing_part_leaves_nothing_published(tmp_path, inputs, monkeypatch):
    import data.outofcore

    def broken(spec, columns, directory, part):
        raise DataError(f"part {part}: disk full")

    monkeypatch.setattr(data.outofcore, "write_part", broken)
    cfg = PrepareConfig(out=tmp_path / "out", engine="duckdb", workers=1, progress=False)
    with pytest.raises(DataError, match="disk full"):
        prepare_out_of_core(inputs["parquet"], COLUMNS, None, "fail", cfg, {})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))


def test_exact_time_cuts_are_order_statistics():
    from data.prepare import sorted_times_at

    rng = np.random.default_rng(0)
    ts = np.concatenate([rng.integers(0, 1 << 22, 5000), np.full(300, 1 << 21)])  # a heavy tie
    frame = pl.DataFrame({"ts": ts})

    def grouped(bucket):
        if bucket is None:
            return frame.group_by(bucket=pl.col("ts") // (1 << 20)).len("count").sort("bucket")
        return frame.filter(pl.col("ts") // (1 << 20) == bucket).group_by("ts").len("count").sort("ts")

    positions = [0, 1, 2600, 2650, 5299]
    assert sorted_times_at(grouped, positions) == np.sort(ts)[positions].tolist()


def test_files_with_different_rating_values_are_one_log(tmp_path):
    events = make_events().head(600).with_columns(pl.col("rating").cast(pl.Float64))
    folder = tmp_path / "in"
    folder.mkdir()
    events.head(300).write_csv(folder / "a.csv")
    events.tail(300).with_columns(pl.col("rating") + 0.5).write_csv(folder / "b.csv")  # "1.5" ... "5.5"
    raw = read_events(folder, COLUMNS)
    kinds = set(raw.events["action"].unique().to_list())
    assert any("." in k for k in kinds) and any("." not in k for k in kinds)
    prepare(raw, PrepareConfig(out=tmp_path / "memory", progress=False), {})
    cfg = PrepareConfig(out=tmp_path / "duckdb", engine="duckdb", workers=1, progress=False)
    prepare_out_of_core(folder, COLUMNS, None, "fail", cfg, {})
    assert_same_preparation(tmp_path / "memory", tmp_path / "duckdb")
