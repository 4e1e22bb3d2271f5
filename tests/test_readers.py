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
        ("e.csv", "user_id,item_id,timestamp\n1,2,3\n1,3", r"e\.csv line 3, column 'timestamp': None is not a numeric"),
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


def test_sasrec_bad_line(tmp_path):
    (tmp_path / "ml.txt").write_text("1 1\n1 2 3\n")
    with pytest.raises(DataError, match=r"ml\.txt: malformed .*line 2 has 3 fields"):
        read_sasrec(tmp_path / "ml.txt")


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
