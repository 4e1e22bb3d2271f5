import json
import zipfile

import polars as pl
import pytest

from data.errors import DataError
from data.readers import (
    ColumnMap,
    fetch_ml100k,
    read_amazon,
    read_events,
    read_movielens,
    read_recbole,
    read_sasrec,
    read_sequences,
)

CSV = "user_id,item_id,timestamp,rating\nu1,10,100,5\nu1,11,200,3.5\nu2,10,150,4\n"


def test_generic_csv_tsv_jsonl_parquet_agree(tmp_path):
    (tmp_path / "e.csv").write_text(CSV)
    (tmp_path / "e.tsv").write_text(CSV.replace(",", "\t"))
    rows = [dict(zip(["user_id", "item_id", "timestamp", "rating"], line.split(","))) for line in CSV.splitlines()[1:]]
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pl.read_csv(tmp_path / "e.csv").write_parquet(tmp_path / "e.parquet")
    columns = ColumnMap(rating="rating")
    frames = [read_events(tmp_path / f"e.{ext}", columns).events for ext in ("csv", "tsv", "jsonl", "parquet")]
    for frame in frames:
        assert frame["user"].to_list() == ["u1", "u1", "u2"]
        assert frame["item"].to_list() == [10, 11, 10]
        assert frame["ts"].to_list() == [100, 200, 150]
        assert frame["action"].to_list() == ["5", "3.5", "4"]


def test_generic_mapping_action_and_weight(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("who,what,when,kind,w\n1,a,5,view,1.0\n1,b,6,buy,2.5\n")
    events = read_events(path, ColumnMap(user="who", item="what", timestamp="when", action="kind", weight="w")).events
    assert events.columns == ["user", "item", "ts", "action", "weight"]
    assert events["action"].to_list() == ["view", "buy"]
    assert events["weight"].to_list() == [1.0, 2.5]


def test_missing_column_names_file_and_columns(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user,item_id,timestamp\n1,2,3\n")
    with pytest.raises(
        DataError, match=r"e\.csv: no column 'user_id' \(for user\).*\['user', 'item_id', 'timestamp'\]"
    ):
        read_events(path)


def test_non_numeric_timestamp_names_line_and_column(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,3\n1,3,yesterday\n")
    with pytest.raises(DataError, match=r"e\.csv line 3, column 'timestamp': 'yesterday' is not a numeric timestamp"):
        read_events(path)


def test_skip_bad_rows_reports_count(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,3\n1,3,yesterday\n,4,5\n2,2,7\n")
    raw = read_events(path, on_bad_rows="skip")
    assert raw.bad_rows == 2
    assert raw.events["user"].to_list() == [1, 2]


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("e.csv", "", r"e\.csv: empty file"),
        ("e.csv", "user_id,item_id,timestamp\n", r"e\.csv: no events"),
        ("e.xyz", "a", r"cannot tell the format from the extension '\.xyz'"),
        ("e.csv", "user_id,item_id,timestamp\n1,2,3\n1,2,3,4,5\n", r"e\.csv: malformed CSV: line 3 has 5 fields"),
        (
            "e.jsonl",
            '{"user_id": 1, "item_id": 2, "timestamp": 3}\n{"user_id": 1,\n',
            r"e\.jsonl line 2: not valid JSON",
        ),
        ("e.parquet", "PAR1 truncated", r"e\.parquet: not a readable Parquet file"),
        ("e.csv", "user_id,item_id,timestamp\n1,2,3\n1,3", r"e\.csv line 3, column 'timestamp': no value"),
    ],
)
def test_bad_files(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_events(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        read_events(tmp_path / "nope.csv")


def test_truncated_parquet(tmp_path):
    path = tmp_path / "e.parquet"
    pl.DataFrame({"user_id": list(range(1000)), "item_id": 1, "timestamp": 2}).write_parquet(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_events(path)


def test_sasrec_with_titles(tmp_path):
    (tmp_path / "ml.txt").write_text("1 1\n1 2\n2 2\n")
    (tmp_path / "map.txt").write_text("1 1198\n2 10\n")
    (tmp_path / "movies.dat").write_bytes(
        "1198::Raiders of the Lost Ark (1981)::Action|Adventure\n10::Caf\xe9 (1995)::Comedy\n".encode("latin-1")
    )
    raw = read_sasrec(tmp_path / "ml.txt", tmp_path / "map.txt", tmp_path / "movies.dat")
    assert raw.events.columns == ["user", "item"]
    titles = dict(zip(raw.items["item"].to_list(), raw.items["title"].to_list()))
    assert titles == {1: "Raiders of the Lost Ark (1981)", 2: "Café (1995)"}


MOVIES = "1::Heat (1995)::Action\n"
U_ITEM = "7|Heat (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 19) + "\n"


def _sasrec(directory):
    return read_sasrec(directory / "ml.txt")


def _sasrec_with_map(directory):
    return read_sasrec(directory / "ml.txt", directory / "map.txt", directory / "movies.dat")


def _csv(directory):
    return read_events(directory / "e.csv")


@pytest.mark.parametrize(
    ("files", "read", "pattern"),
    [
        # A first line of another width escaped as a Polars SchemaError: Polars took its width as the file's.
        pytest.param(
            {"ml.txt": "1 1 3\n1 2\n"},
            _sasrec,
            r"ml\.txt line 1: expected 2 fields \(user item\) separated by whitespace, got 3 fields",
            id="sasrec-first-line-too-long",
        ),
        pytest.param(
            {"ml.txt": "1\n1 2\n"},
            _sasrec,
            r"ml\.txt line 1: expected 2 fields .*, got 1 field \(",
            id="sasrec-first-line-short",
        ),
        pytest.param(
            {"ml.txt": "1 1\n1 2 3\n2 1\n2\n"},
            _sasrec,
            r"ml\.txt line 2: .*got 3 fields; .*ml\.txt line 4: .*got 1 field \(2 bad rows in all; --on-bad-rows=skip",
            id="sasrec-later-lines",
        ),
        pytest.param(
            {"ml.txt": "1 1\n", "map.txt": "1 1 extra\n", "movies.dat": MOVIES},
            _sasrec_with_map,
            r"map\.txt line 1: expected 2 fields \(item original\) separated by whitespace, got 3 fields$",
            id="item-map",
        ),
        pytest.param(
            {"u.data": "1\t2\t3\t4\t5\n"},
            read_movielens,
            r"u\.data line 1: expected 4 fields \(user_id item_id rating timestamp\) separated by '\\t', got 5 fields",
            id="u.data",
        ),
        # Extra fields were cut off silently.
        pytest.param(
            {"ratings.dat": "1::2::3::4\n\n1::2::3::4::5\n"},
            read_movielens,
            r"ratings\.dat line 3: expected 4 fields .* separated by '::', got 5 fields",
            id="ratings.dat",
        ),
        pytest.param(
            {"ratings.dat": "1::2::3::4\n", "movies.dat": "1::Heat (1995)::Action::extra\n"},
            read_movielens,
            r"movies\.dat line 1: expected 3 fields \(item title genres\) separated by '::', got 4 fields$",
            id="movies.dat",
        ),
        pytest.param(
            {"u.data": "1\t7\t3\t4\n", "u.item": U_ITEM.replace("|", "", 1)},
            read_movielens,
            r"u\.item line 1: expected 24 fields separated by '\|', got 23 fields$",
            id="u.item",
        ),
        pytest.param(
            {"x.inter": "user_id:token\titem_id:token\n1\t2\n1\t2\t3\n"},
            read_recbole,
            r"x\.inter: malformed TSV: line 3 has 3 fields, the header has 2",
            id="recbole",
        ),
        pytest.param(
            {"x.inter": 'user_id:token\titem_id:token\n1\t"5\n1\t2\t3\n'},
            read_recbole,
            r"x\.inter: malformed TSV: line 3 has 3 fields, the header has 2",
            id="recbole-quote-is-no-quote-in-tsv",
        ),
        pytest.param(
            {"ml.txt": "1 1\n1 \xff\n"},
            _sasrec,
            r"ml\.txt: line 2 is not valid UTF-8 \(byte 0xff\)",
            id="sasrec-not-utf8",
        ),
        pytest.param(
            {"e.csv": "user_id,item_id\n1,2\n1,\xff\n"},
            _csv,
            r"e\.csv: malformed CSV: line 3 is not valid UTF-8",
            id="csv-not-utf8",
        ),
        pytest.param({"ml.txt": "1 1\n1\x002\n"}, _sasrec, r"ml\.txt: line 2 holds a NUL byte", id="sasrec-nul-byte"),
        pytest.param(
            {"e.jsonl": '{"user_id": 1, "item_id": 2}\n{"user_id": 1, "item_id": "\xff"}\n'},
            lambda directory: read_events(directory / "e.jsonl"),
            r"e\.jsonl: line 2 is not valid UTF-8 \(byte 0xff\)",
            id="jsonl-not-utf8",
        ),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, files, read, pattern):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=pattern):
        read(tmp_path)


def test_bad_lines_are_skipped_and_counted_with_their_line_numbers(tmp_path):
    (tmp_path / "ml.txt").write_text("1 1\n1 2 3\n2 5\n2\n")
    raw = read_sasrec(tmp_path / "ml.txt", on_bad_rows="skip")
    assert raw.bad_rows == 2
    assert raw.events.rows() == [(1, 1), (2, 5)]
    # Blank lines are skipped without shifting the line numbers of later lines.
    (tmp_path / "ratings.dat").write_text("\n1::2::3::4\n\n1::x::3::y\n")
    with pytest.raises(DataError, match=r"ratings\.dat line 4, column 'timestamp': 'y' is not a numeric"):
        read_movielens(tmp_path / "ratings.dat")
    (tmp_path / "ratings.dat").write_text("\n1::2::3::4\n\n1::2::3::4::5\n")
    raw = read_movielens(tmp_path / "ratings.dat", on_bad_rows="skip")
    assert raw.bad_rows == 1 and raw.events.height == 1
    (tmp_path / "all_bad.txt").write_text("1 2 3\n4\n")
    with pytest.raises(DataError, match=r"all_bad\.txt: every row is invalid \(2 rows\); first problem: .*line 1"):
        read_sasrec(tmp_path / "all_bad.txt", on_bad_rows="skip")


def test_whitespace_separated_files_accept_any_whitespace_and_blank_lines(tmp_path):
    (tmp_path / "plain.txt").write_text("1 10\n1 11\n2 10\n")
    (tmp_path / "ragged.txt").write_text("\n1  10\n  1\t11 \r\n\n \n2 10\n")
    plain, ragged = (read_sasrec(tmp_path / name).events for name in ("plain.txt", "ragged.txt"))
    assert plain.rows() == [(1, 10), (1, 11), (2, 10)]
    assert ragged.equals(plain)


def test_sequences_give_the_same_events_as_the_equivalent_sasrec_file(tmp_path):
    histories = {3: [7, 5, 7, 9], 1: [5], 2: [9, 8]}
    (tmp_path / "seq.txt").write_text("".join(f"{u} {' '.join(map(str, items))}\n" for u, items in histories.items()))
    (tmp_path / "pairs.txt").write_text("".join(f"{u} {i}\n" for u, items in histories.items() for i in items))
    sequences = read_sequences(tmp_path / "seq.txt")
    assert sequences.events.equals(read_sasrec(tmp_path / "pairs.txt").events)
    assert sequences.events.rows() == [(u, i) for u, items in histories.items() for i in items]
    assert sequences.events.schema == {"user": pl.Int64, "item": pl.Int64}
    assert sequences.inputs == [tmp_path / "seq.txt"] and sequences.bad_rows == 0


def test_sequences_string_ids_blank_lines_and_repeated_users(tmp_path):
    (tmp_path / "seq.txt").write_text("\nalice  B01\tB02 \n\nbob B02\nalice B03\n\n")
    events = read_sequences(tmp_path / "seq.txt").events
    # A user on two lines keeps both in file order; prepare's stable sort joins them.
    assert events.rows() == [("alice", "B01"), ("alice", "B02"), ("bob", "B02"), ("alice", "B03")]


@pytest.mark.parametrize(
    ("content", "on_bad_rows", "pattern"),
    [
        (
            "1 2 3\n\n2\n3 4\n",
            "fail",
            r"s\.txt line 3: expected a user and at least one item, got 1 field \(1 bad rows in all; --on-bad",
        ),
        ("1\n2\n", "skip", r"s\.txt: every row is invalid \(2 rows\)"),
        ("", "fail", r"s\.txt: empty file"),
        ("\n \n", "fail", r"s\.txt: no events"),
        ("1 2\n\xff 3\n", "fail", r"s\.txt: line 2 is not valid UTF-8"),
    ],
)
def test_sequences_bad_files(tmp_path, content, on_bad_rows, pattern):
    (tmp_path / "s.txt").write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=pattern):
        read_sequences(tmp_path / "s.txt", on_bad_rows=on_bad_rows)


def test_sequences_skip_a_user_without_items(tmp_path):
    (tmp_path / "s.txt").write_text("1 2 3\n2\n3 4\n")
    raw = read_sequences(tmp_path / "s.txt", on_bad_rows="skip")
    assert raw.bad_rows == 1
    assert raw.events.rows() == [(1, 2), (1, 3), (3, 4)]


def test_movielens_1m_and_100k_layouts(tmp_path):
    ml1m = tmp_path / "ml-1m"
    ml1m.mkdir()
    (ml1m / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (ml1m / "movies.dat").write_bytes(b"1193::One Flew Over (1975)::Drama\n661::James (1996)::Animation|Children's\n")
    raw = read_movielens(ml1m)
    assert raw.events["ts"].to_list() == [978300760, 978302109]
    assert raw.events["action"].to_list() == ["5", "3"]
    assert raw.items["genres"].to_list() == ["Drama", "Animation|Children's"]

    ml100k = tmp_path / "ml-100k"
    ml100k.mkdir()
    (ml100k / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    flags = ["0"] * 19
    flags[5] = "1"
    (ml100k / "u.item").write_bytes(
        ("242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(flags) + "\n").encode("latin-1")
    )
    raw = read_movielens(ml100k)
    assert raw.events["item"].to_list() == [242, 302]
    assert raw.items.row(0) == (242, "Kolya (1996)", "Comedy")


def test_recbole_atomic_files(tmp_path):
    (tmp_path / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t7\t4\t100\n1\t8\t2\t50\n"
    )
    (tmp_path / "x.item").write_text("item_id:token\tmovie_title:token_seq\tclass:token_seq\n7\tHeat\tAction Crime\n")
    raw = read_recbole(tmp_path)
    assert raw.events["ts"].to_list() == [100, 50]
    assert raw.items.columns == ["item", "title", "genres"]


def test_amazon_reviews_with_2014_style_meta(tmp_path):
    reviews = [
        {"reviewerID": "A1", "asin": "B01", "unixReviewTime": 1400000000, "overall": 5.0},
        {"reviewerID": "A1", "asin": "B02", "unixReviewTime": 1400000100, "overall": 2.0},
    ]
    (tmp_path / "r.json").write_text("\n".join(json.dumps(r) for r in reviews))
    (tmp_path / "meta.json").write_text(
        "{'asin': 'B01', 'title': 'Kettle', 'categories': [['Home', 'Kitchen']], 'description': 'Boils water'}\n"
    )
    raw = read_amazon(tmp_path / "r.json", tmp_path / "meta.json")
    assert raw.events["user"].to_list() == ["A1", "A1"]
    assert raw.events["action"].to_list() == ["5", "2"]
    assert raw.items.row(0) == ("B01", "Kettle", "Home|Kitchen", "Boils water")


def test_fetch_ml100k_reads_files_from_a_cached_wheel(tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", "user_id:token\titem_id:token\n1\t2\n")
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.item", "item_id:token\n2\n")
    directory = fetch_ml100k(tmp_path)
    assert (directory / "ml-100k.inter").read_text().startswith("user_id:token")
    assert read_recbole(directory).events.height == 1
