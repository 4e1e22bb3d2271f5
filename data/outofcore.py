"""Out-of-core preparation (``lmrec data prepare --engine duckdb``): inputs larger than memory.

DuckDB does the relational work in a database file beside the output, holding at most
``--memory-limit`` and spilling the rest to disk: reading (through the same chunked reader and
checks as everywhere, data.readers.iter_event_chunks), k-core filtering, the exact time cuts, the
distinct IDs for the vocabularies, and one pass that maps every event to its indices and writes
the events into parts of whole users (Parquet, partitioned by user range). The database is then
closed and ``--workers`` processes sort each part by (user, time, source order) and run the
shared per-user step (data.samples.write_part) on it, so shards are written as parts complete and
no process ever holds more than one part.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import polars as pl

from data.config import PrepareConfig
from data.errors import DataError
from data.prepare import (
    TIME_BUCKET_BITS,
    Phases,
    PrepareReport,
    build_vocabularies,
    features_of,
    finish,
    sample_spec,
    sorted_times_at,
    time_cuts,
)
from data.readers import (
    SRC_ROW_BITS,
    ColumnMap,
    bad_rows_error,
    event_files,
    id_column,
    iter_event_chunks,
    staged_event_types,
)
from data.samples import write_part
from data.shards import atomic_output_dir


def _duckdb():
    try:
        import duckdb
    except ImportError:
        raise DataError("--engine duckdb needs the duckdb package (make install installs it)") from None
    return duckdb


def _ingest(con, files: list[Path], columns: ColumnMap, fmt: str | None, on_bad_rows: str) -> int:
    if _typed_parquet(files, columns, fmt):
        return _stage_parquet(con, files, columns, on_bad_rows)
    types = staged_event_types(files, columns, fmt)
    _run(con, "CREATE TABLE events (" + ", ".join(f'"{k}" {v}' for k, v in types.items()) + ")")
    polars_types = {"BIGINT": pl.Int64, "VARCHAR": pl.String, "FLOAT": pl.Float32}
    bad = 0
    for index, path in enumerate(files):
        for chunk, dropped in iter_event_chunks(path, index, columns, fmt, on_bad_rows):
            bad += dropped
            if chunk.height:
                con.register(
                    "chunk", chunk.select(pl.col(k).cast(polars_types[v]) for k, v in types.items()).to_arrow()
                )
                _run(con, "INSERT INTO events BY NAME SELECT * FROM chunk")
                con.unregister("chunk")
    return bad


def _typed_parquet(files: list[Path], columns: ColumnMap, fmt: str | None) -> bool:
    """Whether DuckDB can read the files itself: Parquet whose time, rating and weight columns
    are numbers and whose columns have the same types in every file. Then nothing needs parsing,
    and checking is a question of missing values, asked in SQL (``_stage_parquet``); reading
    10^9 events through Python chunks would cost more than all the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if any((fmt or p.suffix.lower().lstrip(".")) != "parquet" for p in files):
        return False
    wanted = [c for c in (columns.user, columns.item, columns.timestamp, columns.rating, columns.weight) if c]
    schemas = []
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException):
            return False  # the chunked reader names the file and the problem
        if any(c not in schema.names for c in wanted + ([columns.action] if columns.action else [])):
            return False
        schemas.append({c: schema.field(c).type for c in wanted})
    if any(s != schemas[0] for s in schemas):
        return False
    types = schemas[0]
    numeric = [c for c in (columns.timestamp, columns.rating, columns.weight) if c]
    ids_ok = all(pa.types.is_integer(types[c]) or pa.types.is_string(types[c]) for c in (columns.user, columns.item))
    return ids_ok and all(pa.types.is_integer(types[c]) or pa.types.is_floating(types[c]) for c in numeric)


def _stage_parquet(con, files: list[Path], columns: ColumnMap, on_bad_rows: str) -> int:
    """Stages typed Parquet files with DuckDB's own reader. Bad rows are missing values (and
    empty IDs), reported as data.readers.normalise_events words them: the file, the row, the
    column, for the first file that has any; ``skip`` drops and counts them."""

    def q(name):
        return '"' + name.replace('"', '""') + '"'

    checks = []  # (source column, condition, what), in normalise_events' order
    for source in (columns.user, columns.item):
        checks.append((source, f"{q(source)} IS NULL OR trim({q(source)}::VARCHAR) = ''", "is empty"))
    if columns.timestamp:
        checks.append((columns.timestamp, f"{q(columns.timestamp)} IS NULL OR isnan({q(columns.timestamp)}::DOUBLE)",
                       "is not a numeric timestamp"))  # fmt: skip
    if columns.action:
        checks.append((columns.action, f"{q(columns.action)} IS NULL", "is empty"))
    for source in (columns.rating, columns.weight):
        if source:
            checks.append((source, f"{q(source)} IS NULL OR isnan({q(source)}::DOUBLE)", "is not a number"))
    is_bad = " OR ".join(f"({cond})" for _, cond, _ in checks)
    selected = [f"{q(columns.user)} AS user", f"{q(columns.item)} AS item"]
    if columns.timestamp:
        selected.append(f"{q(columns.timestamp)}::BIGINT AS ts")
    if columns.action:
        selected.append(f"{q(columns.action)}::VARCHAR AS action")
    elif columns.rating:
        # Ratings stay numbers here; each distinct value is named once (data.readers.rating_actions).
        selected.append(f"{q(columns.rating)}::DOUBLE AS action")
    if columns.weight:
        selected.append(f"{q(columns.weight)}::FLOAT AS weight")
    bad = 0
    for index, path in enumerate(files):
        # One file at a time: its index is a constant, where a filename column would be a string
        # compared on every row.
        scan = f"read_parquet('{_sql_text(path)}', file_row_number = true)"
        in_file = _run(con, f"SELECT count(*) FROM {scan} WHERE {is_bad}")[0][0]
        if in_file and on_bad_rows == "fail":
            problems = []
            for source, cond, what in checks:
                row = _run(con, f"SELECT file_row_number, {q(source)} FROM {scan} WHERE {cond} ORDER BY 1 LIMIT 1")
                if row and len(problems) < 5:
                    number, value = row[0]
                    found = "no value" if value is None else f"{value!r} {what}"
                    problems.append(f"{path} row {number + 1}, column '{source}': {found}")
            raise bad_rows_error(problems, in_file)
        bad += in_file
        src = f"({index}::BIGINT << {SRC_ROW_BITS}) + file_row_number AS src"
        rows = f"SELECT {', '.join(selected)}, {src} FROM {scan} WHERE NOT ({is_bad})"
        _run(con, f"CREATE TABLE events AS {rows}" if index == 0 else f"INSERT INTO events {rows}")
    if not _count(con):
        raise DataError(f"every row of {len(files)} file(s) is invalid ({bad} rows)")
    return bad


def _sql_text(path: Path) -> str:
    return str(path).replace("'", "''")


def _run(con, sql: str) -> list:
    """Runs a statement to completion (DuckDB keeps a connection busy until its result is read)."""
    return con.execute(sql).fetchall()


def _count(con, table: str = "events") -> int:
    return _run(con, f"SELECT count(*) FROM {table}")[0][0]


def _k_core(con, min_user: int, min_item: int) -> None:
    """As data.prepare._k_core: items, then users, until nothing changes."""
    while True:
        before = _count(con)
        for column, least in (("item", min_item), ("user", min_user)):
            if least:
                _run(
                    con,
                    f"CREATE OR REPLACE TABLE events AS SELECT * FROM events WHERE {column} IN "
                    f"(SELECT {column} FROM events GROUP BY {column} HAVING count(*) >= {int(least)})",
                )
        if _count(con) == before:
            return


def _grouped_times(con):
    def grouped(bucket):
        if bucket is None:
            query = f"SELECT ts >> {TIME_BUCKET_BITS} AS bucket, count(*) AS count FROM events GROUP BY 1 ORDER BY 1"
        else:
            query = (
                f"SELECT ts, count(*) AS count FROM events WHERE ts >> {TIME_BUCKET_BITS} = {bucket} "
                "GROUP BY 1 ORDER BY 1"
            )
        return con.sql(query).pl()

    return grouped


def _distinct(con, column: str) -> pl.Series:
    return con.sql(f'SELECT DISTINCT "{column}" AS raw FROM events').pl()["raw"]


def _write_parts(con, vocab, distinct: dict[str, pl.Series], parts_dir: Path, n_parts: int, features) -> None:
    """One pass: every event to its indices, written as Parquet partitioned by user range."""
    joins, selected = [], []
    for name in distinct:
        con.register("keys", vocab.keys(name, distinct[name]).to_arrow())
        _run(con, f"CREATE TABLE {name}_keys AS SELECT * FROM keys")
        con.unregister("keys")
        joins.append(f'JOIN {name}_keys AS {name}_k ON e."{name}" = {name}_k.raw')
    n_users = vocab.users.len()
    selected.append(f"(user_k.index * {n_parts}) // {n_users} AS part")
    selected.append("user_k.index AS user")
    selected.append("item_k.index::INTEGER AS item")
    if "action" in features:
        selected.append("action_k.index::SMALLINT AS action")
    if "gap" in features:
        selected.append("e.ts")
    if "weight" in features:
        selected.append("e.weight")
    selected.append("e.src")
    _run(
        con,
        f"COPY (SELECT {', '.join(selected)} FROM events AS e {' '.join(joins)}) "
        f"TO '{parts_dir}' (FORMAT parquet, PARTITION_BY (part), COMPRESSION zstd)",
    )


def _write_part_task(task: tuple):
    spec, out, part, directory = task
    frame = pl.read_parquet(Path(directory) / "*.parquet").drop("part", strict=False)
    frame = frame.sort(["user", "ts", "src"] if "ts" in frame.columns else ["user", "src"])
    columns = {name: frame[name].to_numpy() for name in frame.columns if name != "src"}
    del frame
    result = write_part(spec, columns, out, part)
    shutil.rmtree(directory)  # its shards are written: give the disk back as parts complete
    return result


def prepare_out_of_core(
    path: Path, columns: ColumnMap, fmt: str | None, on_bad_rows: str, cfg: PrepareConfig, source: dict
) -> PrepareReport:
    """``lmrec data prepare --source events --engine duckdb``: see the module docstring."""
    duckdb = _duckdb()
    phases = Phases()
    files = event_files(path, fmt)
    work = Path(cfg.spill_dir or Path(cfg.out).parent) / f".{Path(cfg.out).name}.duckdb-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "spill").mkdir(parents=True)
    try:
        con = duckdb.connect(
            str(work / "events.duckdb"),
            config={
                "memory_limit": cfg.memory_limit,
                "temp_directory": str(work / "spill"),
                "preserve_insertion_order": False,
                "threads": os.cpu_count() or 1,
            },
        )
        try:
            bad_rows = _ingest(con, files, columns, fmt, on_bad_rows)
            staged = _count(con)
            if staged == 0:
                raise DataError(f"{path}: no events to prepare")
            phases.done("read")
            _canonical_ids(con)
            features = features_of([c for c in ("ts", "action", "weight") if c in _event_columns(con)])
            dropped = {"bad_rows": bad_rows, "duplicates": 0, "k_core": 0}
            if cfg.min_user_events or cfg.min_item_events:
                _k_core(con, cfg.min_user_events, cfg.min_item_events)
                dropped["k_core"] = staged - _count(con)
                if dropped["k_core"] == staged:
                    raise DataError(
                        f"k-core filtering (users >= {cfg.min_user_events}, items >= {cfg.min_item_events} events) "
                        "left no events"
                    )
            n_events = _count(con)
            grouped = _grouped_times(con) if "gap" in features else None
            cuts = time_cuts(cfg, n_events, None if grouped is None else lambda at: sorted_times_at(grouped, at))
            phases.done("filter")
            distinct = {"user": _distinct(con, "user"), "item": _distinct(con, "item")}
            if "action" in features:
                distinct["action"] = _distinct(con, "action")
            vocab = build_vocabularies(cfg, distinct["item"], distinct["user"], distinct.get("action"))
            phases.done("vocabulary")
            n_parts = max(1, -(-n_events // cfg.events_per_partition))
            _write_parts(con, vocab, distinct, work / "parts", min(n_parts, vocab.users.len()), features)
            phases.done("partition")
        finally:
            con.close()
        (work / "events.duckdb").unlink()
        shutil.rmtree(work / "spill", ignore_errors=True)

        with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
            tasks = sorted(
                (int(d.name.split("=", 1)[1]), str(d)) for d in (work / "parts").iterdir() if d.name.startswith("part=")
            )
            results = _run_tasks(sample_spec(cfg, features, cuts), tmp, tasks, cfg.workers)
            phases.done("write_shards")
            manifest, notes = finish(
                tmp,
                cfg,
                source,
                files,
                features,
                vocab,
                results,
                dropped,
                engine={"name": "duckdb", "memory_limit": cfg.memory_limit, "parts": len(tasks)},
            )
        phases.done("finish")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PrepareReport(manifest, sum(phases.seconds.values()), phases.seconds, notes)


def _canonical_ids(con) -> None:
    """IDs staged as strings that name the same integer (" 7", "07", "7") are one user or item,
    as in memory, where data.readers.id_column decides over the whole input. The vocabulary maps
    them to one index anyway, but k-core filtering counts before that, so when the strings are
    all integers they become integers first."""
    types = dict(_run(con, "SELECT column_name, column_type FROM (DESCRIBE events)"))
    for column in ("user", "item"):
        if types[column] == "VARCHAR" and id_column(_distinct(con, column)).dtype == pl.Int64:
            _run(
                con,
                f"CREATE OR REPLACE TABLE events AS SELECT * REPLACE (trim({column})::BIGINT AS {column}) FROM events",
            )


def _event_columns(con) -> list[str]:
    return [row[0] for row in _run(con, "SELECT column_name FROM (DESCRIBE events)")]


def _run_tasks(spec, tmp: Path, parts: list, workers: int) -> list:
    tasks = [(spec, tmp, part, directory) for part, directory in parts]
    if workers == 1 or len(tasks) == 1:
        return list(map(_write_part_task, tasks))
    # Spawned, not forked: DuckDB's threads may hold allocator locks that a forked child would
    # inherit locked (the children then hang). One Polars thread each: the workers are the
    # parallelism.
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        return list(pool.imap_unordered(_write_part_task, tasks))
