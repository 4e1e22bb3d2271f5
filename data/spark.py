"""Preparation on a Spark cluster (``lmrec data prepare --engine spark``).

The same steps as data.outofcore, as Spark jobs: the executors read the event files through the
shared chunked reader (data.readers.iter_event_chunks, so bad rows are named by file and line as
everywhere) and stage them as Parquet; Spark does k-core filtering, the exact time cuts and the
distinct IDs; the driver builds the vocabularies (data.prepare.build_vocabularies) and assigns
every user to a part of about ``--events-per-partition`` events; one shuffle brings each part to
one task, which runs the shared per-user step (data.samples.write_part). The driver then takes
only the parts whose tasks succeeded and writes the tables and manifest (data.prepare.finish).

Paths: the input files, the output and a work directory beside it are read and written by the
executors, so they must be on a filesystem that every node mounts at the same path (NFS, Lustre,
a cluster filesystem). Object stores are not written directly: publishing the output relies on an
atomic directory rename, which S3 and GCS lack; prepare on a shared filesystem and copy the
finished directory (its manifest has every file's sha256, ``lmrec data inspect --verify``).

Code: the driver zips its own ``data`` package and ships it with ``SparkContext.addPyFile``, so
executors run exactly the driver's code; they need Python with numpy, polars and pyarrow (the
interpreter named by PYSPARK_PYTHON, by default the driver's own path).

This module is imported by executors: its top level needs no more than they have.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from data.errors import DataError
from data.readers import EVENT_FORMATS, ColumnMap, event_files, iter_event_chunks, staged_event_types
from data.samples import PartResult, SampleSpec, write_part
from data.shards import atomic_output_dir

# Staged event column types, named as data.readers.staged_event_types names them (DuckDB's), in
# Spark, Arrow and Polars.
_TYPES = {
    "BIGINT": ("bigint", pa.int64(), pl.Int64),
    "VARCHAR": ("string", pa.string(), pl.String),
    "FLOAT": ("float", pa.float32(), pl.Float32),
}
# Key tables up to this many rows are broadcast to every executor instead of shuffling all events
# to join them (a few tens of MB at most).
BROADCAST_KEYS = 1 << 21
_RESULT_SCHEMA = pa.schema(
    [("part", pa.int64()), ("directory", pa.string()), ("code", pa.string()), ("result", pa.binary())]
)
_RESULT_DDL = "part bigint, directory string, code string, result binary"
_TASK_NOTE = "in Spark stage"


class TaskFailed(RuntimeError):
    """An executor's failure other than bad data, with the task it happened in."""


# ---------------------------------------------------------------------------------------------
# The session and lmrec's code on the executors.


@functools.cache
def _driver_files() -> Path:
    """This process's files for Spark (the shipped code, the log configuration). They live as
    long as the process, not one preparation: Spark serves shipped files to executors that join
    later from where they were added."""
    directory = Path(tempfile.mkdtemp(prefix="lmrec-spark-"))
    atexit.register(shutil.rmtree, directory, True)
    return directory


# Spark's own log lines repeat, as Java stack traces, the task failures that prepare_spark reports
# in one line; the rest stays at ERROR. A level of the gateway's own keeps Spark, which takes
# pyspark for a shell, from resetting the root level to WARN and saying so.
_LOG4J2 = """\
rootLogger.level = error
logger.gateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.gateway.level = error
rootLogger.appenderRef.console.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
"""
_QUIET_LOGGERS = (
    "org.apache.spark.TaskContextImpl",  # tasks of a failed job still unwinding as the session stops
    "org.apache.spark.executor.Executor",
    "org.apache.spark.scheduler.TaskSetManager",
    "org.apache.spark.sql.execution.datasources.FileFormatWriter",
    "org.apache.spark.util.Utils",
)


def _log_config() -> Path:
    path = _driver_files() / "log4j2.properties"
    if not path.exists():
        quiet = "".join(
            f"logger.q{i}.name = {name}\nlogger.q{i}.level = off\n" for i, name in enumerate(_QUIET_LOGGERS)
        )
        path.write_text(_LOG4J2 + quiet)
    return path


def spark_session(master: str | None = None, progress: bool = False, conf: dict | None = None):
    """A SparkSession as prepare_spark starts one when none is active: on ``master`` (default:
    spark-submit's --master, else ``local[*]``), with Arrow transfers and quiet logs; ``conf``
    adds or overrides settings."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError("--engine spark needs the pyspark package (make install installs it)") from None
    # pyspark reads PYSPARK_PYTHON when the context starts, for the executors' Python workers;
    # without it they run whatever "python3" is, which may lack numpy and pyarrow.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    settings = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "true" if progress else "false",
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{_log_config()}",
    } | (conf or {})
    builder = SparkSession.builder.appName("lmrec data prepare")
    # Under spark-submit the gateway is already running, configured with spark-submit's --master.
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(master or "local[*]")
    for key, value in settings.items():
        builder = builder.config(key, value)
    if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
        raise DataError(
            "--engine spark needs a Java 17+ runtime: there is no `java` on PATH and JAVA_HOME is not set "
            "(make install sets one up)"
        )
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    try:
        return builder.getOrCreate()
    except (PySparkException, Py4JError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not start Spark: {first} (Spark's own message, if any, is above)") from None


def _session(cfg):
    """The active session (a notebook's) or a new one; and whether it is ours to stop."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError("--engine spark needs the pyspark package (make install installs it)") from None
    active = SparkSession.getActiveSession()
    if active is None:
        return spark_session(cfg.spark_master, cfg.progress), True
    try:
        master = active.sparkContext.master
    except Exception:  # pyspark raises its own "not implemented" error
        raise DataError(
            "--engine spark needs a classic Spark session: a Spark Connect session has no SparkContext "
            "to ship lmrec's code to the executors with"
        ) from None
    if cfg.spark_master and master != cfg.spark_master:
        raise DataError(
            f"--spark-master {cfg.spark_master}: this process already has a Spark session on {master}; "
            "leave --spark-master out to use it"
        )
    return active, False


def _code_zip() -> Path | None:
    """lmrec's ``data`` package, zipped under a name that changes with its content (Spark refuses
    a second, different file under a name it already serves). None when the driver itself runs
    the package from a zip: then it was shipped with --py-files already."""
    package = Path(__file__).parent
    if not package.is_dir():
        return None
    sources = sorted(package.glob("*.py"))
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    path = _driver_files() / f"lmrec-data-{digest.hexdigest()[:12]}.zip"
    if not path.exists():
        partial = path.with_suffix(".tmp")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for source in sources:
                archive.write(source, f"data/{source.name}")
        partial.rename(path)
    return path


def _ship_code(sc) -> None:
    path = _code_zip()
    if path is not None and path.name not in {Path(urlparse(f).path).name for f in sc.listFiles}:
        sc.addPyFile(str(path))


# ---------------------------------------------------------------------------------------------
# Failures: one line naming the file, line and column, or the task, never a Java stack trace.


def _task_note() -> str:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return (
        f"{_TASK_NOTE} {ctx.stageId()} task {ctx.partitionId()}, attempt {ctx.attemptNumber()} "
        f"(TID {ctx.taskAttemptId()}) on host {socket.gethostname()}"
    )


@contextlib.contextmanager
def _in_task():
    """Executor code: every failure names the task it happened in."""
    try:
        yield
    except DataError as e:
        raise DataError(f"{e}; {_task_note()}") from None
    except Exception as e:
        raise TaskFailed(f"{type(e).__name__}: {e}; {_task_note()}") from e


def _exception_line(traceback_text: str) -> str:
    """The ``Type: message`` line of the last Python traceback in ``traceback_text``."""
    last = traceback_text.rsplit("Traceback (most recent call last):", 1)[1]
    return next((line for line in last.splitlines() if line.strip() and not line[0].isspace()), "").strip()


_LOST_TASK = re.compile(r"Lost task (\d+)\.(\d+) in stage (\d+)\.\d+ \(TID (\d+)\) \(([^)]*)\): ([^\n]*)")


def job_error(error: Exception) -> DataError:
    """What a failed Spark job means, from the exception pyspark raised (its text is a Python
    traceback from an executor, or a Java one)."""
    text = str(error)
    if "Traceback (most recent call last):" in text:
        line = _exception_line(text)
        kind, _, message = line.partition(": ")
        if kind == "data.errors.DataError":
            return DataError(message)
        if kind == "data.spark.TaskFailed":
            return DataError(f"the Spark job failed: {message}")
        return DataError(f"the Spark job failed in an executor's Python worker: {line}")
    lost = _LOST_TASK.search(text)
    if lost:
        task, attempt, stage, tid, where, reason = lost.groups()
        return DataError(
            f"the Spark job failed: {reason.strip()}; {_TASK_NOTE} {stage} task {task}, attempt {attempt} "
            f"(TID {tid}) on {where}"
        )
    # Py4J's own first line only names the Java method that was called.
    lines = [line.strip(" :") for line in text.splitlines() if line.strip(" :")]
    first = next((line for line in lines if not line.startswith("An error occurred while calling")), None)
    return DataError(f"the Spark job failed: {(first or type(error).__name__)[:500]}")


@contextlib.contextmanager
def _spark_errors():
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    try:
        yield
    except (PySparkException, Py4JError) as e:
        raise job_error(e) from None


# ---------------------------------------------------------------------------------------------
# Executor side.


def _staged_schema(types: dict[str, str]) -> pa.Schema:
    return pa.schema([(name, _TYPES[kind][1]) for name, kind in types.items()] + [("bad", pa.int64())])


def _read_files(files: list[str], columns: ColumnMap, fmt: str | None, on_bad_rows: str, types: dict, batches):
    """mapInArrow over file indices: every event of those files, typed as staged, and for each
    chunk with dropped bad rows one row holding only their number (``bad``)."""
    schema = _staged_schema(types)
    with _in_task():
        for batch in batches:
            for index in batch.column(0).to_pylist():
                for chunk, dropped in iter_event_chunks(Path(files[index]), index, columns, fmt, on_bad_rows):
                    if chunk.height:
                        frame = chunk.select(pl.col(name).cast(_TYPES[kind][2]) for name, kind in types.items())
                        yield from frame.with_columns(bad=pl.lit(None, pl.Int64)).to_arrow().cast(schema).to_batches()
                    if dropped:
                        nulls = [pa.nulls(1, field.type) for field in list(schema)[:-1]]
                        yield pa.RecordBatch.from_arrays([*nulls, pa.array([dropped], pa.int64())], schema=schema)


def _write_group(spec: SampleSpec, work: str, table: pa.Table) -> pa.Table:
    """applyInArrow over parts: the per-user step on one part, written into a directory of this
    task attempt's own. A retried or speculative attempt writes elsewhere, so the driver, which
    keeps only the attempts whose results came back, never publishes a file another attempt
    was still writing or left half done."""
    from pyspark import TaskContext

    with _in_task():
        part = table.column("part")[0].as_py()
        order = [(name, "ascending") for name in ("user", "ts", "src") if name in table.column_names]
        table = table.take(pc.sort_indices(table, sort_keys=order))  # src: ties keep source order
        directory = Path(work) / "attempts" / f"part-{part:06d}-tid-{TaskContext.get().taskAttemptId()}"
        directory.mkdir(parents=True, exist_ok=True)
        columns = {name: table.column(name).to_numpy() for name in table.column_names if name not in ("part", "src")}
        result = write_part(spec, columns, directory, part)
        code = os.path.abspath(os.path.dirname(__file__))  # where this executor imported lmrec's data from
        return pa.Table.from_pylist(
            [{"part": part, "directory": str(directory), "code": code, "result": result.to_bytes()}],
            schema=_RESULT_SCHEMA,
        )


# ---------------------------------------------------------------------------------------------
# Driver side.


def _table_files(spark, table: str, fmt: str | None) -> list[Path]:
    """The files behind a table of Spark's catalog, in name order (their source order)."""
    from pyspark.errors import AnalysisException

    try:
        uris = spark.table(table).inputFiles()
    except AnalysisException as e:
        raise DataError(f"--table {table}: {str(e).splitlines()[0]}") from None
    if not uris:
        raise DataError(
            f"--table {table} is not backed by files (a view over a query, or an empty table); "
            "--engine spark reads tables stored as Parquet files"
        )
    files = []
    for uri in uris:
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file"):
            raise DataError(
                f"--table {table}: its files are on {parsed.scheme}:// ({uri}); the executors read event files "
                "through a path that every node mounts (file://)"
            )
        files.append(Path(unquote(parsed.path)))
    kinds = {fmt or EVENT_FORMATS.get(p.suffix.lower()) for p in files}
    if kinds != {"parquet"}:
        raise DataError(
            f"--table {table}: stored as {sorted(map(str, kinds))}, and tables are read when stored as Parquet "
            "(Spark writes CSV tables without the header line that names the columns); pass CSV files with --input"
        )
    return sorted(files)


def _counts(events, column: str) -> pl.DataFrame:
    """(raw, count) for every distinct value of ``column``."""
    return pl.from_arrow(events.groupBy(column).count().toArrow()).rename({column: "raw"})


def _distinct(events, column: str) -> pl.Series:
    return pl.from_arrow(events.select(column).distinct().toArrow())[column].alias("raw")


def _materialise(spark, frame, path: Path):
    """Writes ``frame`` as Parquet and reads it back: later jobs start from the file instead of
    recomputing the plan that made it."""
    frame.write.mode("overwrite").parquet(str(path))
    return spark.read.parquet(str(path))


def _write_keys(spark, frame: pl.DataFrame, path: Path):
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    pq.write_table(frame.to_arrow(), path)
    keys = spark.read.parquet(str(path))
    return F.broadcast(keys) if frame.height <= BROADCAST_KEYS else keys


def _canonical_ids(spark, events, column: str, work: Path):
    """IDs read as strings that name the same integer (" 7", "07", "7") are one user or item, as
    in memory, where data.readers.id_column decides over the whole input. The vocabulary maps
    them to one index anyway; k-core filtering counts before that, so such values are replaced
    by their integer first."""
    from data.readers import id_column

    raw = _distinct(events, column)
    canonical = id_column(raw)
    if canonical.dtype == raw.dtype or canonical.n_unique() == raw.len():
        return events
    keys = _write_keys(spark, pl.DataFrame({column: raw, "canonical": canonical}), work / f"{column}-ids.parquet")
    joined = events.join(keys, column).drop(column).withColumnRenamed("canonical", column)
    return _materialise(spark, joined.select(events.columns), work / f"{column}-canonical")


def _k_core(spark, events, work: Path, min_user: int, min_item: int):
    """As data.prepare._k_core: items, then users, until a round removes nothing. A filter that
    would remove nothing is skipped, which is the same; one that removes rows is written out."""
    from pyspark.sql import functions as F

    step = 0
    while True:
        changed = False
        for column, least in (("item", min_item), ("user", min_user)):
            if not least:
                continue
            few = events.groupBy(column).count().where(F.col("count") < least).select(column)
            if few.isEmpty():
                continue
            step += 1
            events = _materialise(spark, events.join(few, column, "left_anti"), work / f"k-core-{step}")
            changed = True
        if not changed:
            return events


def _grouped_times(events):
    from pyspark.sql import functions as F

    from data.prepare import TIME_BUCKET_BITS

    bucket = F.shiftright("ts", TIME_BUCKET_BITS)

    def grouped(at):
        if at is None:
            frame = events.groupBy(bucket.alias("bucket")).count().orderBy("bucket")
        else:
            frame = events.where(bucket == at).groupBy("ts").count().orderBy("ts")
        return pl.from_arrow(frame.toArrow())

    return grouped


def _stage(spark, files: list[Path], columns: ColumnMap, fmt: str | None, on_bad_rows: str, types: dict, work: Path):
    """Reads every file once, one task per file, into Parquet that every later job starts from.
    Returns the events, how many there are and how many bad rows were dropped."""
    from pyspark.sql import functions as F

    reader = functools.partial(_read_files, [str(f) for f in files], columns, fmt, on_bad_rows, types)
    ddl = ", ".join(f"`{name}` {_TYPES[kind][0]}" for name, kind in types.items()) + ", bad bigint"
    staged = _materialise(spark, spark.range(0, len(files), 1, len(files)).mapInArrow(reader, ddl), work / "staged")
    bad, events = staged.agg(F.sum("bad"), F.count("src")).first()  # src is null only in the count rows
    return staged.where(F.col("bad").isNull()).drop("bad"), int(events), int(bad or 0)


def _user_parts(vocab, users: pl.DataFrame, n_events: int, per_part: int) -> pl.DataFrame:
    """(user, user_index, part): users in code order cut into parts of about ``per_part``
    events, never splitting a user."""
    keys = vocab.keys("user", users["raw"])
    index = keys["index"].to_numpy()
    events = np.bincount(index, weights=users["count"].to_numpy(), minlength=vocab.users.len()).astype(np.int64)
    n_parts = max(1, -(-n_events // per_part))
    before = np.cumsum(events) - events
    part = np.minimum(before * n_parts // n_events, n_parts - 1)
    return pl.DataFrame({"user": keys["raw"], "user_index": index, "part": part[index]})


def _coded(spark, events, vocab, users: pl.DataFrame, distinct: dict, n_events: int, per_part: int, work: Path):
    """Every event as the per-user step takes it (user code, item and action indices), with its
    part: the vocabularies' keys joined to the raw values."""
    from pyspark.sql import functions as F

    parts = _user_parts(vocab, users, n_events, per_part)
    coded = events.join(_write_keys(spark, parts, work / "users.parquet"), "user")
    for name, values in distinct.items():
        keys = vocab.keys(name, values).rename({"raw": name, "index": f"{name}_index"})
        coded = coded.join(_write_keys(spark, keys, work / f"{name}s.parquet"), name)
    selected = [F.col("part"), F.col("user_index").alias("user"), F.col("item_index").cast("int").alias("item")]
    if "action" in distinct:
        selected.append(F.col("action_index").cast("smallint").alias("action"))
    return coded.select(*selected, *(name for name in ("ts", "weight", "src") if name in events.columns))


def _write_parts(coded, spec: SampleSpec, work: Path, tmp: Path) -> tuple[list[PartResult], list[str]]:
    """Runs the per-user step on every part and moves the shards of the attempts whose results
    came back into ``tmp``. Also returns where the executors imported lmrec's code from."""
    work_path = str(work)

    # A plain function: pyspark 4.3 fails to inspect a functools.partial given to applyInArrow.
    def write(part):
        return _write_group(spec, work_path, part)

    rows = coded.groupBy("part").applyInArrow(write, _RESULT_DDL).collect()
    results = []
    for row in rows:
        result = PartResult.from_bytes(bytes(row.result))
        for entry in result.shards:
            os.replace(Path(row.directory) / entry["name"], tmp / entry["name"])
        results.append(result)
    return results, sorted({row.code for row in rows})


def prepare_spark(
    path: Path | None,
    table: str | None,
    columns: ColumnMap,
    fmt: str | None,
    on_bad_rows: str,
    cfg,
    source: dict,
):
    """``lmrec data prepare --source events --engine spark``: see the module docstring. Reads
    ``path`` (a file or a directory of Parquet / CSV / TSV files) or the catalog table ``table``.
    Uses the active Spark session, or starts one on ``cfg.spark_master`` and stops it after."""
    from data.prepare import (
        Phases,
        PrepareReport,
        build_vocabularies,
        features_of,
        finish,
        sample_spec,
        sorted_times_at,
        time_cuts,
    )

    phases = Phases()
    out = Path(cfg.out).resolve()
    work = out.parent / f".{out.name}.spark-{os.getpid()}"  # beside --out: every executor can write there
    with atomic_output_dir(out, cfg.overwrite) as tmp:
        spark, owned = _session(cfg)
        try:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            with _spark_errors():
                _ship_code(spark.sparkContext)
                files = _table_files(spark, table, fmt) if table is not None else event_files(path, fmt)
                types = staged_event_types(files, columns, fmt)
                phases.done("session")

                events, n_staged, bad_rows = _stage(spark, files, columns, fmt, on_bad_rows, types, work)
                if n_staged == 0:
                    raise DataError(f"{path if table is None else '--table ' + table}: no events to prepare")
                phases.done("read")

                features = features_of([c for c in ("ts", "action", "weight") if c in types])
                dropped = {"bad_rows": bad_rows, "duplicates": 0, "k_core": 0}
                n_events = n_staged
                if cfg.min_user_events or cfg.min_item_events:
                    for column in ("user", "item"):
                        if types[column] == "VARCHAR":
                            events = _canonical_ids(spark, events, column, work)
                    events = _k_core(spark, events, work, cfg.min_user_events, cfg.min_item_events)
                    n_events = events.count()
                    dropped["k_core"] = n_staged - n_events
                    if n_events == 0:
                        raise DataError(
                            f"k-core filtering (users >= {cfg.min_user_events}, items >= {cfg.min_item_events} "
                            "events) left no events"
                        )
                grouped = _grouped_times(events) if "gap" in features else None
                cuts = time_cuts(cfg, n_events, None if grouped is None else lambda at: sorted_times_at(grouped, at))
                phases.done("filter")

                users = _counts(events, "user")
                distinct = {"item": _distinct(events, "item")}
                if "action" in features:
                    distinct["action"] = _distinct(events, "action")
                vocab = build_vocabularies(cfg, distinct["item"], users["raw"], distinct.get("action"))
                coded = _coded(spark, events, vocab, users, distinct, n_events, cfg.events_per_partition, work)
                phases.done("vocabulary")

                results, code = _write_parts(coded, sample_spec(cfg, features, cuts), work, tmp)
                phases.done("write_shards")
            engine = {"name": "spark", "master": spark.sparkContext.master, "partitions": len(results), "code": code}
            manifest, notes = finish(tmp, cfg, source, files, features, vocab, results, dropped, engine=engine)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if owned:
                spark.stop()
    phases.done("finish")
    return PrepareReport(manifest, sum(phases.seconds.values()), phases.seconds, notes)


# ---------------------------------------------------------------------------------------------
# A real standalone cluster on this machine.


@dataclass
class StandaloneCluster:
    master: str  # spark://127.0.0.1:PORT, for --spark-master
    ui: str  # the master's web UI (``/json`` lists the workers)
    # The master's and the workers' JVMs; executors and their Python workers are the workers'
    # descendants.
    pids: list[int]
    driver_env: dict[str, str]  # what a driver's environment needs on top of its own to use the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@contextlib.contextmanager
def standalone_cluster(workers: int = 2, cores: int = 1, memory: str = "1g", timeout: float = 120.0):
    """A Spark standalone cluster on 127.0.0.1: a master and ``workers`` workers of ``cores``
    cores and ``memory`` each, started with pyspark's own launcher (bin/spark-class), all torn
    down at exit. A way to try ``--engine spark`` against a real cluster on one machine::

        with standalone_cluster() as cluster:
            subprocess.run(["lmrec", "data", "prepare", ..., "--engine", "spark", "--spark-master", cluster.master],
                           env=os.environ | cluster.driver_env)

    Executors run this interpreter (PYSPARK_PYTHON) and do not see the driver's PYTHONPATH: the
    only lmrec code they have is what the driver ships. A driver started with ``driver_env`` added
    to its environment (SPARK_LOCAL_IP=127.0.0.1) is reached on the address the cluster uses."""
    import pyspark

    home = Path(pyspark.__file__).parent
    directory = Path(tempfile.mkdtemp(prefix="lmrec-spark-cluster-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    port, ui_port = _free_port(), _free_port()
    master = f"spark://127.0.0.1:{port}"
    commands = {"master": ["org.apache.spark.deploy.master.Master", "--port", str(port), "--webui-port", str(ui_port)]}
    for i in range(workers):
        commands[f"worker-{i}"] = [
            "org.apache.spark.deploy.worker.Worker", "--cores", str(cores), "--memory", memory,
            "--webui-port", str(_free_port()), "--work-dir", str(directory / f"worker-{i}"), master,
        ]  # fmt: skip
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with open(directory / f"{name}.log", "wb") as log:
                # Own process groups: stopping a worker's group stops its executors too.
                processes[name] = subprocess.Popen(
                    [str(home / "bin" / "spark-class"), command[0], "--host", "127.0.0.1", *command[1:]],
                    env=env,
                    cwd=directory,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        ui = f"http://127.0.0.1:{ui_port}"
        deadline, alive = time.monotonic() + timeout, 0
        while alive < workers:
            for name, process in processes.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"Spark {name} exited ({process.returncode}):\n{_tail(directory / f'{name}.log')}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Spark standalone cluster: {alive} of {workers} workers registered in {timeout:.0f} s; master log:\n"
                    + _tail(directory / "master.log")
                )
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(f"{ui}/json", timeout=2) as answer:
                alive = json.load(answer).get("aliveworkers", 0)
            time.sleep(0.3)
        yield StandaloneCluster(master, ui, [p.pid for p in processes.values()], {"SPARK_LOCAL_IP": "127.0.0.1"})
    finally:
        for process in reversed(processes.values()):  # workers first, then the master
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(processes.values()):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)
