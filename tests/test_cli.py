import json

import pytest

from data.errors import DataError
from tests.conftest import run_cli


def test_prepare_and_inspect_events_csv(tmp_path):
    csv = tmp_path / "log.csv"
    rows = ["user_id,item_id,timestamp,kind"] + [
        f"u{u},i{(u * 7 + k) % 30},{1000 + k},view" for u in range(20) for k in range(6)
    ]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    done = run_cli(
        "data", "prepare", "--source", "events", "--input", csv, "--action-col", "kind", "--out", out, "--quiet"
    )
    assert "users   " in done.stdout and "20" in done.stdout
    assert "events in valid  20" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["events"] == 120
    assert manifest["features"] == ["item", "action", "gap"]

    done = run_cli("data", "inspect", out, "--verify")
    assert "verified: 4 files match their sha256" in done.stdout

    shard = out / manifest["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = run_cli("data", "inspect", out, "--verify", check=False)
    assert done.returncode == 1
    assert f"FAILED {shard}: sha256" in done.stdout


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("user,item_id,timestamp\n1,2,3\n", [], "log.csv: no column 'user_id' (for user)"),
        (
            "user_id,item_id,timestamp\n1,2,x\n",
            [],
            "log.csv line 2, column 'timestamp': 'x' is not a numeric timestamp",
        ),
        ("", [], "log.csv: empty file"),
        (
            "user_id,item_id,timestamp\n1,2,3\n",
            ["--split", "temporal"],
            "--split temporal needs --valid-start and --test-start",
        ),
    ],
)
def test_bad_input_is_a_clear_error_without_traceback_and_without_output(tmp_path, content, extra, message):
    csv = tmp_path / "log.csv"
    csv.write_text(content)
    out = tmp_path / "shards"
    done = run_cli(
        "data", "prepare", "--source", "events", "--input", csv, "--out", out, "--quiet", *extra, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["log.csv"]


@pytest.mark.parametrize(
    ("source", "content", "message"),
    [
        # The first line's three fields used to escape as a Polars SchemaError traceback.
        (
            "sasrec",
            "1 1 3\n1 2\n",
            "ml.txt line 1: expected 2 fields (user item) separated by whitespace, got 3 fields",
        ),
        (
            "sasrec",
            "1 1\n1 2 3\n",
            "ml.txt line 2: expected 2 fields (user item) separated by whitespace, got 3 fields",
        ),
        ("sequences", "1 5 6\n2\n", "ml.txt line 2: expected a user and at least one item, got 1 field"),
    ],
)
def test_bad_line_in_a_whitespace_separated_file_is_a_clear_error(tmp_path, source, content, message):
    path = tmp_path / "ml.txt"
    path.write_text(content)
    out = tmp_path / "shards"
    done = run_cli("data", "prepare", "--source", source, "--input", path, "--out", out, "--quiet", check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("lmrec: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ml.txt"]


def test_prepare_sequences_gives_the_shards_of_the_equivalent_sasrec_file(tmp_path):
    histories = {u: [(u * 7 + k) % 30 + 1 for k in range(3 + u % 5)] for u in range(1, 41)}
    sequences, pairs = tmp_path / "seq.txt", tmp_path / "pairs.txt"
    sequences.write_text("".join(f"{u} {' '.join(map(str, items))}\n" for u, items in histories.items()) + "41\n")
    pairs.write_text("".join(f"{u} {i}\n" for u, items in histories.items() for i in items))
    common = ["--samples-per-shard", 16, "--quiet"]
    done = run_cli(
        "data", "prepare", "--source", "sequences", "--input", sequences, "--out", tmp_path / "a",
        "--on-bad-rows", "skip", *common,
    )  # fmt: skip
    assert "dropped bad rows  1" in done.stdout
    run_cli("data", "prepare", "--source", "sasrec", "--input", pairs, "--out", tmp_path / "b", *common)
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["source"]["name"] == "sequences"
    assert (a["counts"]["users"], a["counts"]["events"]) == (40, sum(map(len, histories.values())))
    assert a["features"] == ["item"] and len(a["shards"]) == 3
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert run_cli("data", "inspect", tmp_path / "a", "--verify").returncode == 0


def test_skip_bad_rows_reports_them(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n1,2,3\n1,3,4\n1,4,oops\n1,5,6\n")
    done = run_cli(
        "data",
        "prepare",
        "--source",
        "events",
        "--input",
        csv,
        "--out",
        tmp_path / "o",
        "--on-bad-rows",
        "skip",
        "--quiet",
    )
    assert "dropped bad rows  1" in done.stdout


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "syn"
    args = ["data", "prepare", "--source", "synthetic", "--users", 50, "--num-items", 40, "--out", out, "--quiet"]
    run_cli(*args)
    done = run_cli(*args, check=False)
    assert done.returncode == 2 and "already exists; pass --overwrite" in done.stderr
    run_cli(*args, "--overwrite")


def test_inspect_of_a_directory_without_manifest(tmp_path):
    done = run_cli("data", "inspect", tmp_path, check=False)
    assert done.returncode == 2 and "no manifest.json" in done.stderr


def test_ml1m_acceptance_counts(tmp_path, ml1m_dir):
    out = tmp_path / "ml-1m"
    run_cli(
        "data", "prepare", "--source", "sasrec", "--input", ml1m_dir / "sasrec" / "ml-1m.txt",
        "--item-map", ml1m_dir / "sasrec" / "sas_to_original_items.txt", "--items", ml1m_dir / "raw" / "movies.dat",
        "--out", out, "--quiet",
    )  # fmt: skip
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["users"], counts["items"], counts["events"]) == (6040, 3416, 999_611)
    assert counts["events_per_segment"] == {"train": 999_611 - 2 * 6040, "valid": 6040, "test": 6040}

    import polars as pl

    from data.loader import LoaderConfig, make_loader

    raw = pl.read_csv(ml1m_dir / "sasrec" / "ml-1m.txt", separator=" ", has_header=False, new_columns=["user", "item"])
    last_two = {u: g["item"].to_list()[-2:] for (u,), g in raw.group_by("user", maintain_order=True)}
    to_raw_item = dict(pl.read_parquet(out / "items.parquet").select("index", "raw_id").iter_rows())
    to_raw_user = dict(pl.read_parquet(out / "users.parquet").select("index", "raw_id").iter_rows())
    for position, split in enumerate(("valid", "test")):
        _, loader = make_loader(out, LoaderConfig(split=split, batch_size=10_000, num_workers=0))
        (batch,) = list(loader)
        targets = {
            to_raw_user[u]: to_raw_item[t] for u, t in zip(batch["users"].tolist(), batch["target_items"].tolist())
        }
        assert len(targets) == 6040
        assert all(targets[u] == items[position] for u, items in last_two.items())


def test_prepare_options_are_generated_from_prepare_config(tmp_path):
    import argparse
    import dataclasses

    from data.config import PrepareConfig
    from launch.cli import _config_from_options, build_parser

    parser = build_parser()
    args = parser.parse_args(["data", "prepare", "--source", "synthetic", "--out", str(tmp_path / "s")])
    # Every field is an option, and the options' defaults are the fields' defaults.
    assert _config_from_options(PrepareConfig, args) == PrepareConfig(out=tmp_path / "s")
    flags = ["--no-dedup", "--quiet", "--window", "4", "--window-overlap", "1", "--text-cache", str(tmp_path)]
    args = parser.parse_args(["data", "prepare", "--source", "synthetic", "--out", "o", *flags])
    cfg = _config_from_options(PrepareConfig, args)
    assert (cfg.dedup, cfg.progress, cfg.window, cfg.window_overlap, cfg.text_cache) == (False, False, 4, 1, tmp_path)
    assert {f.name for f in dataclasses.fields(PrepareConfig)} <= set(vars(args))
    with pytest.raises(DataError, match="window_overlap < window"):
        _config_from_options(PrepareConfig, argparse.Namespace(**{**vars(args), "window_overlap": 9}))
