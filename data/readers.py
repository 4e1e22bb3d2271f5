"""Readers: raw interaction logs and item text in many formats -> one normalised form.

Every reader returns ``RawData``: an events frame with columns ``user``, ``item`` and, where the
source has them, ``ts`` (int64 seconds), ``action`` (string), ``weight`` (float); rows in source
order, which breaks ties between equal timestamps. Optionally an items frame: ``item`` plus text
columns (``title``, ``genres``, ``description``, ...). Bad rows fail with the file and line, or are
dropped and counted under ``on_bad_rows="skip"``. In header-less line formats (SASRec, sequences,
MovieLens) blank lines hold nothing and are skipped, and a line with the wrong number of fields is
a bad row.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from data.errors import DataError

ON_BAD_ROWS = ("fail", "skip")
EVENT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class RawData:
    events: pl.DataFrame
    items: pl.DataFrame | None = None
    inputs: list[Path] = field(default_factory=list)
    bad_rows: int = 0


@dataclass(frozen=True)
class ColumnMap:
    """Which source columns hold the event fields (generic events reader)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"
    action: str | None = None
    rating: str | None = None
    weight: str | None = None


# ---------------------------------------------------------------------------------------------
# Shared validation: every reader lands here with string or numeric columns and a line offset
# or the line number of every row.


def _where(path: Path, row: int, line_offset: int, lines: pl.Series | None) -> str:
    if lines is not None:
        return f"{path} line {lines[row]}"
    if line_offset < 0:
        return f"{path} row {row + 1}"
    return f"{path} line {row + 1 + line_offset}"


def _check_columns(df: pl.DataFrame, wanted: dict[str, str | None], path: Path) -> None:
    missing = [f"'{src}' (for {dst})" for dst, src in wanted.items() if src is not None and src not in df.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)}; the file's columns are {df.columns}")


def id_column(series: pl.Series) -> pl.Series:
    """IDs stay integers when every value is one, else become strings."""
    if series.dtype.is_integer():
        return series.cast(pl.Int64)
    as_str = series.cast(pl.String)
    as_int = as_str.str.strip_chars().cast(pl.Int64, strict=False)
    if as_int.null_count() == as_str.null_count():
        return as_int
    return as_str


def normalise_events(
    df: pl.DataFrame,
    columns: dict[str, str | None],
    path: Path,
    on_bad_rows: str,
    line_offset: int = 1,
    lines: pl.Series | None = None,
    first_row: int | None = None,
    extra: dict[str, pl.Series] | None = None,
) -> tuple[pl.DataFrame, int]:
    """Rename ``columns`` (target -> source) and validate types. Returns the frame and the number
    of rows dropped. ``line_offset`` is the line number of the first row minus one (header lines);
    -1 means the format has no lines and rows are counted instead. ``lines``, where given, is the
    line number of every row instead (for formats whose blank lines are skipped, or whose lines
    hold many rows). ``first_row``, where given: ``df`` is a chunk of the file starting at that row
    (see iter_event_chunks); IDs are then left as read (``id_column`` decides over the whole
    input). ``extra`` columns are carried along, bad rows dropped from them too."""
    if on_bad_rows not in ON_BAD_ROWS:
        raise DataError(f"--on-bad-rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    _check_columns(df, columns, path)
    chunk = first_row is not None
    if df.height == 0 and not chunk:
        raise DataError(f"{path}: no events (the file has no data rows)")
    selected = {dst: df[src] for dst, src in columns.items() if src is not None}
    bad = pl.Series("bad", np.zeros(df.height, dtype=bool))
    problems: list[str] = []

    def flag(mask: pl.Series, column: str, what: str) -> None:
        nonlocal bad
        mask = mask.fill_null(False)
        if mask.any() and len(problems) < 5:
            row = int(mask.arg_true()[0])
            value = df[columns[column]][row]
            found = "no value" if value is None else f"{value!r} {what}"
            where = _where(path, (first_row or 0) + row, line_offset, lines)
            problems.append(f"{where}, column '{columns[column]}': {found}")
        bad = bad | mask

    out: dict[str, pl.Series] = {}
    for name in ("user", "item"):
        raw = selected[name]
        empty = (
            raw.is_null() if raw.dtype.is_numeric() else raw.is_null() | (raw.cast(pl.String).str.strip_chars() == "")
        )
        flag(empty, name, "is empty")
        out[name] = (raw.cast(pl.Int64) if raw.dtype.is_integer() else raw.cast(pl.String)) if chunk else id_column(raw)
    if "ts" in selected:
        raw = selected["ts"]
        if raw.dtype.is_temporal():
            ts = raw.cast(pl.Datetime("us")).dt.epoch("s")
        elif raw.dtype.is_numeric():  # typed sources (Parquet): no detour through text
            ts = raw.cast(pl.Int64) if raw.dtype.is_integer() else raw.cast(pl.Float64)
        else:
            ts = raw.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
        flag(ts.is_null() | (ts.is_nan() if ts.dtype.is_float() else False), "ts", "is not a numeric timestamp")
        out["ts"] = (ts.fill_nan(None) if ts.dtype.is_float() else ts).cast(pl.Int64, strict=False)
    if "action" in selected:
        raw = selected["action"]
        flag(raw.is_null(), "action", "is empty")
        out["action"] = raw.cast(pl.String)
    if "rating" in selected:
        raw = selected["rating"]
        rating = (raw if raw.dtype.is_numeric() else raw.cast(pl.String).str.strip_chars()).cast(
            pl.Float64, strict=False
        )
        flag(rating.is_null(), "rating", "is not a number")
        out["action"] = rating_actions(rating)
    if "weight" in selected:
        raw = selected["weight"]
        weight = (raw if raw.dtype.is_numeric() else raw.cast(pl.String).str.strip_chars()).cast(
            pl.Float64, strict=False
        )
        flag(weight.is_null(), "weight", "is not a number")
        out["weight"] = weight.cast(pl.Float32)

    events = pl.DataFrame(out).with_columns(**(extra or {}))
    n_bad = int(bad.sum())
    if n_bad:
        if on_bad_rows == "fail":
            raise bad_rows_error(problems, n_bad, "in this chunk of the file" if chunk else "in all")
        events = events.filter(~bad)
        if events.height == 0 and not chunk:
            raise DataError(f"{path}: every row is invalid ({n_bad} rows); first problem: {problems[0]}")
    return events, n_bad


def rating_actions(rating: pl.Series) -> pl.Series:
    """Ratings become actions: one action per distinct rating value ("4", "4.5"). Named once per
    distinct value, and held as an Enum (one byte per event at 10^8 events, not a string each)."""
    values = rating.drop_nulls().unique()
    names = [str(int(v)) if math.isfinite(v) and v == int(v) else str(v) for v in values.to_list()]
    kinds = pl.Enum(sorted(set(names)))
    return rating.replace_strict(values, names, default=None, return_dtype=kinds).alias("action")


def bad_rows_error(problems: list[str], n_bad: int, scope: str = "in all") -> DataError:
    return DataError("; ".join(problems) + f" ({n_bad} bad rows {scope}; --on-bad-rows=skip drops them)")


# ---------------------------------------------------------------------------------------------
# Low-level file access with clear errors.


def _open_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _line_at(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _undecodable_line(raw: bytes) -> str | None:
    """Where ``raw`` stops being UTF-8 text, if it does (Polars only says that it does)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"line {_line_at(raw, e.start)} is not valid UTF-8 (byte {raw[e.start]:#04x})"
    return None


def _first_ragged_line(text: str, sep: str) -> str:
    # Quote as Polars does in read_delimited (not at all in TSV): else a '"' opening a TSV field
    # would swallow the lines after it here and hide the bad one.
    reader = csv.reader(io.StringIO(text), delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)
    width = None
    for lineno, row in enumerate(reader, start=1):
        if width is None:
            width = len(row)
        elif row and len(row) != width:
            return f"line {lineno} has {len(row)} fields, the header has {width}"
    return "could not locate the bad line"


def read_delimited(path: Path, sep: str) -> pl.DataFrame:
    """A CSV or TSV file with a header line, every column a string."""
    raw = _open_bytes(path)
    try:
        return pl.read_csv(raw, separator=sep, infer_schema=False, quote_char='"' if sep != "\t" else None)
    except pl.exceptions.NoDataError:
        raise DataError(f"{path}: empty file") from None
    except (pl.exceptions.ComputeError, pl.exceptions.ShapeError) as e:
        where = _undecodable_line(raw) or _first_ragged_line(raw.decode("utf-8"), sep)
        raise DataError(
            f"{path}: malformed {('TSV' if sep == chr(9) else 'CSV')}: {where} ({e.__class__.__name__})"
        ) from None


def _read_lines(path: Path, encoding: str = "utf-8") -> pl.DataFrame:
    """The non-blank lines of a text file: ``line`` (its number, from 1) and ``text``."""
    raw = _open_bytes(path)
    if encoding != "utf-8" and not raw.isascii():  # Polars reads UTF-8 only; ASCII already is
        raw = raw.decode(encoding).encode("utf-8")
    try:
        # One column: no byte of a text file is NUL, and without quoting every line is one row,
        # empty lines included (as nulls), so row numbers are line numbers.
        lines = pl.read_csv(
            raw, separator="\0", has_header=False, new_columns=["text"], quote_char=None, infer_schema=False
        )
    except pl.exceptions.NoDataError:
        raise DataError(f"{path}: empty file") from None
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError) as e:
        nul = raw.find(b"\0")
        where = _undecodable_line(raw) or (
            f"line {_line_at(raw, nul)} holds a NUL byte (not a text file?)" if nul >= 0 else str(e)
        )
        raise DataError(f"{path}: {where}") from None
    return lines.with_row_index("line", offset=1).filter(pl.col("text").str.contains(r"\S"))


def _split_fields(text: pl.Series, sep: str | None) -> pl.Series:
    """Each line's fields, split at ``sep`` or, for None, at runs of whitespace."""
    if sep is not None:
        return text.str.split(sep)
    # Splitting at single spaces is several times faster than the regular expression and gives
    # the same fields unless a line has other whitespace, repeated, leading or trailing.
    if text.str.contains(r"\s\s|^\s|\s$|[^\S ]").any():
        return text.str.extract_all(r"\S+")
    return text.str.split(" ")


def _drop_bad_lines(
    path: Path, fields: pl.DataFrame, bad: pl.Series, expected: str, on_bad_rows: str | None
) -> tuple[pl.DataFrame, int]:
    """Fails on the lines marked ``bad`` (naming the first few and their field counts), or with
    ``on_bad_rows="skip"`` drops and counts them. ``on_bad_rows=None``: metadata, always fails."""
    n_bad = int(bad.sum())
    if not n_bad:
        return fields, 0
    first = fields.filter(bad).head(5).select("line", n=pl.col("fields").list.len())
    problems = [
        f"{path} line {line}: expected {expected}, got {n} field{'' if n == 1 else 's'}"
        for line, n in first.iter_rows()
    ]
    if on_bad_rows is None:
        raise DataError("; ".join(problems))
    if on_bad_rows != "skip":
        raise bad_rows_error(problems, n_bad)
    kept = fields.filter(~bad)
    if kept.height == 0:
        raise DataError(f"{path}: every row is invalid ({n_bad} rows); first problem: {problems[0]}")
    return kept, n_bad


def read_records(
    path: Path, names: list[str], sep: str | None = None, encoding: str = "utf-8", on_bad_rows: str | None = None
) -> tuple[pl.DataFrame, int]:
    """A header-less file of one record a line, fields separated by ``sep`` (None: whitespace), as
    string columns ``names`` plus ``line``; and the number of bad lines dropped. A line with
    another number of fields is bad (see _drop_bad_lines for ``on_bad_rows``)."""
    lines = _read_lines(path, encoding)
    fields = lines.select("line", fields=_split_fields(lines["text"], sep))
    separated = "whitespace" if sep is None else repr(sep)
    listed = f" ({' '.join(names)})" if len(names) <= 4 else ""
    fields, bad = _drop_bad_lines(
        path,
        fields,
        fields["fields"].list.len() != len(names),
        f"{len(names)} fields{listed} separated by {separated}",
        on_bad_rows,
    )
    return fields.select("line", *(pl.col("fields").list.get(i).alias(name) for i, name in enumerate(names))), bad


def read_jsonl(path: Path, loads=json.loads) -> pl.DataFrame:
    raw = _open_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: {_undecodable_line(raw)}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = loads(line)
        except (ValueError, SyntaxError) as e:
            raise DataError(f"{path} line {lineno}: not valid JSON ({e.__class__.__name__}: {e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no events (the file has no data rows)")
    try:
        return pl.DataFrame(rows, infer_schema_length=None)
    except Exception as e:  # mixed types in one field across lines
        raise DataError(f"{path}: inconsistent field types across lines ({e})") from None


def read_parquet(path: Path) -> pl.DataFrame:
    _open_bytes(path)[:0]  # existence and permission, with the same messages as other formats
    try:
        return pl.read_parquet(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None


def read_table(path: Path, fmt: str | None = None) -> tuple[pl.DataFrame, int]:
    """A CSV/TSV/Parquet/JSONL file as string-typed columns; returns (frame, line offset)."""
    path = Path(path)
    fmt = fmt or EVENT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension '{path.suffix}'; "
            f"use --format with one of {sorted(set(EVENT_FORMATS.values()))}"
        )
    if fmt == "csv":
        return read_delimited(path, ","), 1
    if fmt == "tsv":
        return read_delimited(path, "\t"), 1
    if fmt == "jsonl":
        return read_jsonl(path), 0
    if fmt == "parquet":
        return read_parquet(path), -1
    raise DataError(f"{path}: unknown format {fmt!r}; use one of {sorted(set(EVENT_FORMATS.values()))}")


# ---------------------------------------------------------------------------------------------
# Source readers.


def _event_mapping(columns: ColumnMap) -> dict[str, str | None]:
    return {
        "user": columns.user,
        "item": columns.item,
        "ts": columns.timestamp,
        "action": columns.action,
        "rating": columns.rating,
        "weight": columns.weight,
    }


def event_files(path: Path, fmt: str | None = None) -> list[Path]:
    """``path`` itself, or the event files of a directory (Spark's and Hive's part files, say) in
    name order, which is their source order. Names starting with '_' or '.' (_SUCCESS, .crc) are
    not data."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and not p.name.startswith(("_", "."))
        and (EVENT_FORMATS.get(p.suffix.lower()) == fmt if fmt else p.suffix.lower() in EVENT_FORMATS)
    )
    if not files:
        raise DataError(f"{path}: no event files ({'.' + fmt if fmt else ', '.join(EVENT_FORMATS)}) in this directory")
    kinds = {fmt or EVENT_FORMATS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: the directory mixes formats {sorted(kinds)}; pass --format to pick one")
    return files


def read_events(
    path: Path, columns: ColumnMap = ColumnMap(), fmt: str | None = None, on_bad_rows: str = "fail"
) -> RawData:
    """Generic events: CSV, TSV, Parquet or JSON lines with a column mapping; a directory of such
    files is read in name order."""
    files = event_files(path, fmt)
    frames, bad = [], 0
    for file in files:
        df, offset = read_table(file, fmt)
        events, dropped = normalise_events(df, _event_mapping(columns), file, on_bad_rows, offset)
        frames.append(events)
        bad += dropped
    if len(frames) == 1:
        return RawData(frames[0], inputs=files, bad_rows=bad)
    # IDs are integers only when they are in every file (as id_column decides for one file).
    ids = {name: pl.concat([f[name].cast(pl.String) for f in frames]) for name in ("user", "item")}
    if "action" in frames[0].columns:  # each file's rating Enum has its own values
        frames = [f.with_columns(pl.col("action").cast(pl.String)) for f in frames]
    events = pl.concat([f.drop("user", "item") for f in frames], how="vertical_relaxed")
    for name in ("user", "item"):
        events = events.with_columns(id_column(ids[name]).alias(name))
    return RawData(events.select(frames[0].columns), inputs=files, bad_rows=bad)


def staged_event_types(files: list[Path], columns: ColumnMap, fmt: str | None) -> dict[str, str]:
    """Types (DuckDB's names) of the event columns as the out-of-core and Spark engines stage
    them. IDs stay integers only when every file has them as integers (Parquet); otherwise they
    are staged as read, as strings, and the vocabulary decides (data.prepare.Vocabularies.keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = {"user": "BIGINT", "item": "BIGINT"}
    for path in files:
        kind = fmt or path.suffix.lower().lstrip(".")
        if kind != "parquet":
            ids = {"user": "VARCHAR", "item": "VARCHAR"}
            break
        schema = pq.read_schema(path)
        for name, source in (("user", columns.user), ("item", columns.item)):
            if source in schema.names and not pa.types.is_integer(schema.field(source).type):
                ids[name] = "VARCHAR"
    types = dict(ids)
    if columns.timestamp:
        types["ts"] = "BIGINT"
    if columns.action or columns.rating:
        types["action"] = "VARCHAR"
    if columns.weight:
        types["weight"] = "FLOAT"
    types["src"] = "BIGINT"
    return types


# Bits of the source position below the file's index: ``src = file << SRC_ROW_BITS | row``
# orders events across files as they were read, for ties in time and duplicates.
SRC_ROW_BITS = 40


def iter_event_chunks(
    path: Path, file_index: int, columns: ColumnMap, fmt: str | None, on_bad_rows: str, rows: int = 1 << 20
):
    """One event file in chunks of about ``rows`` rows, normalised and checked as read_events
    does (bad rows named by file and line or row): yields (events with a ``src`` column, bad rows
    dropped). IDs are left as read: the engine decides integers or strings over the whole input.
    For the engines that read more than memory holds (data.outofcore, data.spark)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(path)
    fmt = fmt or EVENT_FORMATS.get(path.suffix.lower())
    mapping = _event_mapping(columns)
    wanted = [c for c in mapping.values() if c is not None]
    if fmt == "parquet":
        try:
            handle = pq.ParquetFile(path)
            _check_columns(pl.DataFrame(schema=handle.schema_arrow.names), mapping, path)
            batches = handle.iter_batches(batch_size=rows, columns=wanted)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
        line_offset = -1
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        header = pl.read_csv(_open_head(path), separator=sep, n_rows=0, quote_char='"' if sep != "\t" else None)
        _check_columns(header, mapping, path)
        try:
            batches = pcsv.open_csv(
                path,
                read_options=pcsv.ReadOptions(block_size=64 << 20),
                parse_options=pcsv.ParseOptions(delimiter=sep, quote_char='"' if sep != "\t" else False),
                # An empty field is missing, as Polars reads it for the in-memory path.
                convert_options=pcsv.ConvertOptions(
                    column_types={c: pa.string() for c in header.columns},
                    include_columns=wanted,
                    null_values=[""],
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowException as e:
            raise DataError(f"{path}: malformed {fmt.upper()}: {e}") from None
        line_offset = 1
    else:
        raise DataError(f"{path}: out-of-core and Spark preparation read Parquet, CSV or TSV files, not {fmt!r}")
    done = 0
    pending: list = []
    try:
        for batch in batches:
            pending.append(batch)
            if sum(b.num_rows for b in pending) < rows:
                continue
            yield _chunk(pending, mapping, path, on_bad_rows, line_offset, done, file_index)
            done += sum(b.num_rows for b in pending)
            pending = []
    except pa.ArrowException as e:
        raise DataError(f"{path}: malformed {fmt.upper()} after row {done}: {e}") from None
    if pending or done == 0:
        yield _chunk(pending, mapping, path, on_bad_rows, line_offset, done, file_index)


def _open_head(path: Path, size: int = 1 << 16) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head.strip():
        raise DataError(f"{path}: empty file")
    return head[: head.find(b"\n") + 1] if b"\n" in head else head


def _chunk(batches, mapping, path, on_bad_rows, line_offset, first_row, file_index):
    import pyarrow as pa

    frame = pl.from_arrow(pa.Table.from_batches(batches)) if batches else pl.DataFrame()
    if frame.is_empty():
        if first_row == 0:
            raise DataError(f"{path}: no events (the file has no data rows)")
        return pl.DataFrame(), 0
    src = (file_index << SRC_ROW_BITS) + np.arange(first_row, first_row + frame.height, dtype=np.int64)
    return normalise_events(
        frame, mapping, path, on_bad_rows, line_offset, first_row=first_row, extra={"src": pl.Series(src)}
    )


def read_movielens_items(path: Path) -> pl.DataFrame:
    """``movies.dat`` (``id::title::genres``) or ml-100k ``u.item`` (``id|title|date|url|19 flags``),
    both latin-1. Titles keep their year, e.g. "Toy Story (1995)"."""
    path = Path(path)
    if path.name == "u.item":
        genre_names = [
            "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
            "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
            "Thriller", "War", "Western",
        ]  # fmt: skip
        rows, _ = read_records(path, ["item", "title", "date", "video_date", "url", *genre_names], "|", "latin-1")
        flagged = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in genre_names]
        rows = rows.with_columns(genres=pl.concat_str(flagged, separator="|", ignore_nulls=True))
    else:
        rows, _ = read_records(path, ["item", "title", "genres"], "::", "latin-1")
    return pl.DataFrame({"item": id_column(rows["item"]), "title": rows["title"], "genres": rows["genres"]})


def read_movielens(path: Path, on_bad_rows: str = "fail") -> RawData:
    """MovieLens: a directory with ``ratings.dat`` (ML-1M/10M, ``::``) or ``u.data`` (ML-100k, tab),
    or one of those files; titles and genres from ``movies.dat`` / ``u.item`` beside it."""
    path = Path(path)
    ratings = path
    if path.is_dir():
        found = [path / n for n in ("ratings.dat", "u.data") if (path / n).exists()]
        if not found:
            raise DataError(f"{path}: no ratings.dat or u.data in this MovieLens directory")
        ratings = found[0]
    names = ["user_id", "item_id", "rating", "timestamp"]
    if ratings.name == "u.data":
        df, bad_lines = read_records(ratings, names, "\t", on_bad_rows=on_bad_rows)
        item_file = ratings.parent / "u.item"
    else:
        df, bad_lines = read_records(ratings, names, "::", "latin-1", on_bad_rows)
        item_file = ratings.parent / "movies.dat"
    mapping = {"user": "user_id", "item": "item_id", "ts": "timestamp", "rating": "rating"}
    events, bad = normalise_events(df, mapping, ratings, on_bad_rows, lines=df["line"])
    items = read_movielens_items(item_file) if item_file.exists() else None
    inputs = [ratings] + ([item_file] if items is not None else [])
    return RawData(events, items, inputs, bad_lines + bad)


def read_sasrec(
    path: Path, item_map: Path | None = None, items: Path | None = None, on_bad_rows: str = "fail"
) -> RawData:
    """SASRec ``user item`` lines, each user's lines in time order; no timestamps or ratings.
    ``item_map`` (``sasrec_id original_id`` lines) and ``items`` (MovieLens movies.dat) attach text."""
    path = Path(path)
    df, bad_lines = read_records(path, ["user", "item"], on_bad_rows=on_bad_rows)
    events, bad = normalise_events(df, {"user": "user", "item": "item"}, path, on_bad_rows, lines=df["line"])
    inputs = [path]
    item_table = None
    if items is not None:
        item_table = read_movielens_items(Path(items))
        inputs.append(Path(items))
        if item_map is not None:
            mapping, _ = read_records(Path(item_map), ["item", "original"])
            mapping = mapping.select(id_column(mapping["item"]), id_column(mapping["original"]))
            item_table = mapping.join(item_table.rename({"item": "original"}), on="original", how="left").drop(
                "original"
            )
            inputs.append(Path(item_map))
    elif item_map is not None:
        raise DataError("--item-map needs --items (the movies.dat that the mapped ids refer to)")
    return RawData(events, item_table, inputs, bad_lines + bad)


def read_sequences(path: Path, on_bad_rows: str = "fail") -> RawData:
    """One user a line, ``user item1 item2 ...``, whitespace-separated, items in time order; no
    timestamps, so the order of the events is time. A line with a user and no items is a bad row;
    a user on several lines keeps all of them, in file order."""
    path = Path(path)
    lines = _read_lines(path)
    fields = lines.select("line", fields=_split_fields(lines["text"], None))
    fields, bad_lines = _drop_bad_lines(
        path, fields, fields["fields"].list.len() < 2, "a user and at least one item", on_bad_rows
    )
    df = fields.select("line", user=pl.col("fields").list.first(), item=pl.col("fields").list.slice(1)).explode("item")
    events, bad = normalise_events(df, {"user": "user", "item": "item"}, path, on_bad_rows, lines=df["line"])
    return RawData(events, inputs=[path], bad_rows=bad_lines + bad)


def _recbole_frame(path: Path) -> pl.DataFrame:
    df = read_delimited(path, "\t")
    # Headers look like "user_id:token"; the type after the colon is RecBole's, not ours.
    return df.rename({c: c.split(":")[0] for c in df.columns})


def read_recbole(path: Path, on_bad_rows: str = "fail") -> RawData:
    """RecBole atomic files: ``NAME.inter`` (user_id, item_id, [rating], [timestamp]) and, beside
    it, an optional ``NAME.item`` whose token/token_seq columns become item text."""
    path = Path(path)
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if len(inters) != 1:
            raise DataError(f"{path}: expected exactly one .inter file in the directory, found {len(inters)}")
        path = inters[0]
    df = _recbole_frame(path)
    mapping = {
        "user": "user_id",
        "item": "item_id",
        "ts": "timestamp" if "timestamp" in df.columns else None,
        "rating": "rating" if "rating" in df.columns else None,
    }
    events, bad = normalise_events(df, mapping, path, on_bad_rows, line_offset=1)
    item_file = path.with_suffix(".item")
    items = None
    if item_file.exists():
        table = _recbole_frame(item_file)
        if "item_id" not in table.columns:
            raise DataError(f"{item_file}: no column 'item_id'; the file's columns are {table.columns}")
        renames = {"movie_title": "title", "class": "genres", "categories": "genres"}
        table = table.rename({k: v for k, v in renames.items() if k in table.columns})
        items = table.with_columns(id_column(table["item_id"]).alias("item")).drop("item_id")
        items = items.select("item", *[c for c in items.columns if c != "item"])
    return RawData(events, items, [path] + ([item_file] if items is not None else []), bad)


def _amazon_meta(path: Path) -> pl.DataFrame:
    """Amazon metadata lines: strict JSON (2018) or Python dict literals (2014)."""

    def loads(line: str):
        try:
            return json.loads(line)
        except ValueError:
            return ast.literal_eval(line)

    rows = []
    for row in read_jsonl(path, loads=loads).iter_rows(named=True):
        categories = row.get("categories") or row.get("category") or []
        flat = [c for group in categories for c in (group if isinstance(group, list) else [group])]
        description = row.get("description") or ""
        if isinstance(description, list):
            description = " ".join(description)
        rows.append(
            {
                "item": row.get("asin"),
                "title": row.get("title") or "",
                "genres": "|".join(flat),
                "description": description,
            }
        )
    meta = pl.DataFrame(rows)
    if meta["item"].null_count():
        line = int(meta["item"].is_null().arg_true()[0]) + 1
        raise DataError(f"{path} line {line}: no 'asin' field")
    return meta.unique("item", keep="first", maintain_order=True)


def read_amazon(path: Path, meta: Path | None = None, on_bad_rows: str = "fail") -> RawData:
    """Amazon reviews JSON lines (reviewerID, asin, unixReviewTime, overall) + optional metadata."""
    path = Path(path)
    df = read_jsonl(path)
    mapping = {"user": "reviewerID", "item": "asin", "ts": "unixReviewTime", "rating": "overall"}
    events, bad = normalise_events(df, mapping, path, on_bad_rows, line_offset=0)
    items = _amazon_meta(Path(meta)) if meta is not None else None
    return RawData(events, items, [path] + ([Path(meta)] if meta else []), bad)


# ---------------------------------------------------------------------------------------------
# The embedded default data set.

RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_IN_WHEEL = "recbole/dataset_example/ml-100k/"


def fetch_ml100k(cache_dir: Path) -> Path:
    """MovieLens-100k as RecBole ships it inside its wheel: download the wheel (never install it)
    into ``cache_dir`` and extract the atomic files. Returns the directory holding ml-100k.inter."""
    import subprocess
    import sys

    cache_dir = Path(cache_dir)
    target = cache_dir / "ml-100k"
    if (target / "ml-100k.inter").exists():
        return target
    wheels = sorted(cache_dir.glob("recbole-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir), RECBOLE_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataError(f"could not download {RECBOLE_WHEEL} into {cache_dir}: {done.stderr.strip()[-500:]}")
    tmp = cache_dir / "ml-100k.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in ("ml-100k.inter", "ml-100k.item"):
            (tmp / name).write_bytes(wheel.read(ML100K_IN_WHEEL + name))
    tmp.rename(target)
    return target
