"""--engine spark gives what the in-memory engine gives: the same counts, the same vocabulary
files byte for byte, the same decoded samples (shard boundaries aside). One local Spark session
serves the module; the standalone-cluster test starts a real master and two workers."""

import filecmp
import os
from urllib.parse import urlparse

import numpy as np
import polars as pl
import pytest

from data.config import PrepareConfig
from data.errors import DataError
from data.prepare import prepare
from data.readers import ColumnMap, read_events
from data.shards import load_manifest, verify_shards
from data.spark import job_error, prepare_spark, spark_session, standalone_cluster
from data.synthetic import SyntheticSpec, generate
from data.tar import iter_members
from tests.conftest import ROOT, run_cli

RATINGS = ColumnMap(rating="rating")
# Duplicates, ties, k-core, a temporal split at quantiles and windows all at once. At 12 events,
# k-core drops users whose events are split between two spellings of their ID (_write_csvs)
# unless the spellings count as one user, as they do in memory.
HARD = dict(
    split="temporal",
    valid_start="q0.7",
    test_start="q0.85",
    window=8,
    window_overlap=2,
    min_user_events=12,
    min_item_events=3,
    samples_per_shard=50,
)


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    session = spark_session(
        "local[2]",
        conf={
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "4",
            "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse")),
        },
    )
    yield session
    session.stop()


def _events(users=300, items=200, seed=5) -> pl.DataFrame:
    """Synthetic events plus exact duplicates and same-time events, shuffled, under the column
    names of a typical log."""
    raw = generate(SyntheticSpec(users=users, items=items, events_per_user=20, seed=seed, text=False)).events
    duplicates = raw.sample(200, seed=1)
    ties = raw.sample(200, seed=2).with_columns(pl.col("item") + 1)
    events = pl.concat([raw, duplicates, ties]).sample(fraction=1.0, shuffle=True, seed=3)
    return events.rename({"user": "user_id", "item": "item_id", "ts": "timestamp", "action": "rating"})


def _write_csvs(events: pl.DataFrame, directory):
    directory.mkdir()
    half = events.height // 2
    events[:half].write_csv(directory / "a.csv")
    # The same users written as "0123" in the second file: one user in memory, where IDs that are
    # all integers become integers, so one user for k-core too.
    second = events[half:].with_columns(pl.col("user_id").cast(pl.String))
    second = second.with_columns(
        pl.when(pl.col("user_id").str.ends_with("3"))
        .then(pl.concat_str(pl.lit("0"), "user_id"))
        .otherwise("user_id")
        .alias("user_id")
    )
    second.write_csv(directory / "b.csv")
    return directory


def _memory(path, out, columns=RATINGS, **kw):
    raw = read_events(path, columns, on_bad_rows=kw.pop("on_bad_rows", "fail"))
    return prepare(raw, PrepareConfig(out=out, progress=False, overwrite=True, **kw), {"name": "test"}).manifest


def _spark(path, out, columns=RATINGS, table=None, on_bad_rows="fail", **kw):
    cfg = PrepareConfig(out=out, progress=False, engine="spark", events_per_partition=1500, **kw)
    return prepare_spark(path, table, columns, None, on_bad_rows, cfg, {"name": "test"}).manifest


def _samples(directory) -> dict[str, bytes]:
    return {
        name: data
        for entry in load_manifest(directory)["shards"]
        for name, data in iter_members(directory / entry["name"])
    }


def _assert_same(memory_dir, memory, spark_dir, spark):
    assert spark["counts"] == memory["counts"]
    assert spark["vocab"] == memory["vocab"]
    for name in ("items.parquet", "users.parquet", "actions.parquet"):
        assert filecmp.cmp(memory_dir / name, spark_dir / name, shallow=False), name
    assert _samples(spark_dir) == _samples(memory_dir)
    assert verify_shards(spark_dir, spark) == []


def _leftovers(out) -> list[str]:
    """Anything a run left beside its output: temporary or work directories."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_spark_matches_memory_with_duplicates_ties_k_core_temporal_split_and_windows(spark, tmp_path):
    events = _write_csvs(_events(), tmp_path / "in")
    memory = _memory(events, tmp_path / "memory", **HARD)
    result = _spark(events, tmp_path / "spark", **HARD)
    assert memory["counts"]["dropped"]["k_core"] > 0 and memory["counts"]["dropped"]["duplicates"] > 0
    _assert_same(tmp_path / "memory", memory, tmp_path / "spark", result)
    assert result["engine"]["name"] == "spark" and result["engine"]["partitions"] > 1
    assert _leftovers(tmp_path / "spark") == []


def test_parquet_files_and_a_catalog_table_give_the_same_result(spark, tmp_path):
    events = _events(users=150, items=100, seed=7)
    directory = tmp_path / "parquet"
    directory.mkdir()
    events[:2000].write_parquet(directory / "part-0.parquet")
    events[2000:].write_parquet(directory / "part-1.parquet")
    memory = _memory(directory, tmp_path / "memory", min_user_events=3)
    result = _spark(directory, tmp_path / "spark", min_user_events=3)
    _assert_same(tmp_path / "memory", memory, tmp_path / "spark", result)

    spark.read.parquet(str(directory)).write.saveAsTable("lmrec_events")
    # The table's own files, in the name order in which --table reads them.
    table_dir = tmp_path / "table"
    table_dir.mkdir()
    for i, uri in enumerate(sorted(spark.table("lmrec_events").inputFiles())):
        os.link(urlparse(uri).path, table_dir / f"{i:03d}.parquet")
    memory = _memory(table_dir, tmp_path / "memory-table")
    result = _spark(None, tmp_path / "by-table", table="lmrec_events")
    _assert_same(tmp_path / "memory-table", memory, tmp_path / "by-table", result)

    spark.range(3).createOrReplaceTempView("not_files")
    with pytest.raises(DataError, match="not backed by files"):
        _spark(None, tmp_path / "none", table="not_files")
    assert not (tmp_path / "none").exists()


def _with_bad_row(tmp_path) -> tuple:
    events = _events(users=100, items=80, seed=11)
    directory = _write_csvs(events, tmp_path / "in")
    lines = (directory / "b.csv").read_text().splitlines()
    fields = lines[6].split(",")
    fields[events.columns.index("timestamp")] = "yesterday"
    lines[6] = ",".join(fields)
    (directory / "b.csv").write_text("\n".join(lines) + "\n")
    return directory, directory / "b.csv"


def test_bad_rows_fail_with_file_line_column_value_and_task_and_publish_nothing(spark, tmp_path):
    directory, bad_file = _with_bad_row(tmp_path)
    with pytest.raises(DataError) as failure:
        _spark(directory, tmp_path / "out")
    message = str(failure.value)
    assert f"{bad_file} line 7, column 'timestamp': 'yesterday' is not a numeric timestamp" in message
    assert "in Spark stage" in message and "task 1" in message  # b.csv is the second file: task 1
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path / "out") == []


def test_bad_rows_skip_counts_them_as_memory_does(spark, tmp_path):
    directory, _ = _with_bad_row(tmp_path)
    memory = _memory(directory, tmp_path / "memory", on_bad_rows="skip")
    result = _spark(directory, tmp_path / "spark", on_bad_rows="skip")
    assert result["counts"]["dropped"]["bad_rows"] == memory["counts"]["dropped"]["bad_rows"] == 1
    _assert_same(tmp_path / "memory", memory, tmp_path / "spark", result)


def test_a_failing_write_task_names_the_task_and_publishes_nothing(spark, tmp_path):
    # One user with 1,100 events cut into windows of one: more windows than a sample key holds,
    # which the per-user step finds on an executor.
    directory = tmp_path / "in"
    directory.mkdir()
    n = 1100
    pl.DataFrame({"user_id": [1] * n, "item_id": np.arange(n) % 50, "timestamp": np.arange(n)}).write_csv(
        directory / "a.csv"
    )
    with pytest.raises(DataError, match=r"windows; at most 1000 fit; in Spark stage \d+ task \d+"):
        _spark(directory, tmp_path / "out", ColumnMap(), window=1)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path / "out") == []


def test_a_lost_task_is_reported_in_one_line():
    text = (
        "An error occurred while calling o91.collectToPython.\n: org.apache.spark.SparkException: Job aborted due to "
        "stage failure: Task 3 in stage 7.0 failed 4 times, most recent failure: Lost task 3.3 in stage 7.0 (TID 41) "
        "(10.0.0.5 executor 2): ExecutorLostFailure (executor 2 exited caused by one of the running tasks) Reason: "
        "Container killed\n\tat org.apache.spark.scheduler.DAGScheduler.failJobAndIndependentStages(...)"
    )
    assert str(job_error(RuntimeError(text))) == (
        "the Spark job failed: ExecutorLostFailure (executor 2 exited caused by one of the running tasks) Reason: "
        "Container killed; in Spark stage 7 task 3, attempt 3 (TID 41) on 10.0.0.5 executor 2"
    )


@pytest.mark.slow
def test_standalone_cluster_with_two_workers_through_the_cli(tmp_path, monkeypatch):
    """The real command line against a real cluster: the executors run the code the driver ships
    (not the checkout, which they cannot see) and the samples equal the in-memory engine's."""
    events = _write_csvs(_events(), tmp_path / "in")
    memory = _memory(events, tmp_path / "memory", **HARD)
    options = [f"--{k.replace('_', '-')}={v}" for k, v in HARD.items()]
    with standalone_cluster(workers=2, cores=1, memory="1g") as cluster:
        for name, value in cluster.driver_env.items():
            monkeypatch.setenv(name, value)  # run_cli's driver inherits this environment
        run_cli(
            "data", "prepare", "--source", "events", "--input", events, "--rating-col", "rating",
            "--engine", "spark", "--spark-master", cluster.master, "--events-per-partition", 1500,
            "--out", tmp_path / "spark", "--quiet", *options, cwd=tmp_path,
        )  # fmt: skip
    result = load_manifest(tmp_path / "spark")
    _assert_same(tmp_path / "memory", memory, tmp_path / "spark", result)
    assert result["engine"]["master"] == cluster.master
    code = result["engine"]["code"]
    assert code and all(".zip" in c and "lmrec-data-" in c and not c.startswith(str(ROOT)) for c in code), code
