import json

import numpy as np
import polars as pl
import pytest

from data import schema
from data.errors import DataError
from data.loader import LoaderConfig, make_loader
from data.prepare import PrepareConfig, prepare
from data.readers import RawData
from data.shards import MANIFEST, load_manifest, verify_shards
from data.synthetic import SyntheticSpec, generate
from data.tar import iter_members, load_npy


def _prepare(raw, out, **kw):
    return prepare(raw, PrepareConfig(out=out, progress=False, **kw), {"name": "test"}).manifest


def _read_all(directory):
    """Every sample of every shard, decoded: {key: {segment: structured array}}."""
    manifest = load_manifest(directory)
    samples = {}
    for entry in manifest["shards"]:
        for name, data in iter_members(directory / entry["name"]):
            key, _, ext = name.partition(".")
            samples.setdefault(key, {})[ext.removesuffix(".npy")] = load_npy(data)
    return samples


@pytest.fixture(scope="module")
def synthetic():
    return generate(SyntheticSpec(users=300, items=200, events_per_user=12, seed=3))


def test_round_trip_reproduces_every_users_sequence(tmp_path, synthetic):
    manifest = _prepare(synthetic, tmp_path / "out", samples_per_shard=64)
    items = pl.read_parquet(tmp_path / "out" / "items.parquet")
    users = pl.read_parquet(tmp_path / "out" / "users.parquet")
    to_raw = dict(zip(items["index"].to_list(), items["raw_id"].to_list()))
    expected = {
        user: group.sort("ts", maintain_order=True)["item"].to_list()
        for (user,), group in synthetic.events.group_by("user", maintain_order=True)
    }
    samples = _read_all(tmp_path / "out")
    assert len(samples) == manifest["counts"]["samples"] == 300
    for key, segments in samples.items():
        user, window = schema.parse_key(key)
        assert window == 0
        raw_user = users["raw_id"][user]
        whole = np.concatenate([segments["train"], segments["valid"], segments["test"]])
        assert [to_raw[int(i)] for i in whole["item"]] == expected[raw_user]
    assert manifest["counts"]["events"] == synthetic.events.height
    assert verify_shards(tmp_path / "out", manifest) == []


def test_leave_one_out_targets_are_the_last_two_events_and_never_inputs(tmp_path, synthetic):
    _prepare(synthetic, tmp_path / "out")
    for segments in _read_all(tmp_path / "out").values():
        n = sum(len(s) for s in segments.values())
        if n >= 3:
            assert len(segments["valid"]) == len(segments["test"]) == 1
            assert len(segments["train"]) == n - 2
    # Through the loader: the validation input is the train segment alone, the test input adds
    # the validation event, and each target is the event right after its input.
    for split in ("valid", "test"):
        _, loader = make_loader(
            tmp_path / "out", LoaderConfig(split=split, batch_size=1000, num_workers=0, max_len=10_000)
        )
        batch = next(iter(loader))
        samples = _read_all(tmp_path / "out")
        for row, user in enumerate(batch["users"].tolist()):
            seg = samples[schema.sample_key(user, 0)]
            history = seg["train"] if split == "valid" else np.concatenate([seg["train"], seg["valid"]])
            n = int(batch["lengths"][row])
            assert batch["items"][row, :n].tolist() == history["item"].tolist()
            assert int(batch["target_items"][row]) == int(seg[split]["item"][0])
            assert int(batch["items"][row, n:].abs().sum()) == 0


def test_item_indices_are_a_seeded_permutation_not_first_appearance(tmp_path):
    # Items appear in the order 1, 2, 3, ... so first-appearance indexing would be monotone.
    n = 500
    events = pl.DataFrame({"user": np.repeat(np.arange(50), 10), "item": np.arange(n), "ts": np.arange(n)})
    _prepare(RawData(events), tmp_path / "a", seed=1)
    _prepare(RawData(events), tmp_path / "b", seed=1)
    _prepare(RawData(events), tmp_path / "c", seed=2)
    a, b, c = (pl.read_parquet(tmp_path / d / "items.parquet").sort("raw_id")["index"].to_numpy() for d in "abc")
    assert sorted(a.tolist()) == list(range(schema.FIRST_INDEX, n + schema.FIRST_INDEX))
    assert (a == b).all() and not (a == c).all()
    # Far from order of appearance: the rank correlation of index and first appearance is small.
    assert abs(np.corrcoef(a, np.arange(n))[0, 1]) < 0.2


def test_vocab_from_keeps_known_indices_and_appends_new(tmp_path):
    first = pl.DataFrame({"user": [1, 1, 1, 2, 2, 2], "item": [10, 11, 12, 10, 12, 13], "ts": [1, 2, 3, 1, 2, 3]})
    _prepare(RawData(first), tmp_path / "v1")
    second = pl.DataFrame({"user": [5, 5, 5], "item": [13, 99, 98], "ts": [1, 2, 3]})
    report = prepare(
        RawData(second), PrepareConfig(out=tmp_path / "v2", vocab_from=tmp_path / "v1", progress=False), {"name": "t"}
    )
    old = dict(pl.read_parquet(tmp_path / "v1" / "items.parquet").select("raw_id", "index").iter_rows())
    new = dict(pl.read_parquet(tmp_path / "v2" / "items.parquet").select("raw_id", "index").iter_rows())
    assert all(new[k] == v for k, v in old.items())
    assert {new[98], new[99]} == {max(old.values()) + 1, max(old.values()) + 2}
    assert any("1 kept, 2 new (appended), 3 known but absent" in note for note in report.notes)
    assert report.manifest["vocab"]["items"] == max(new.values()) + 1


def test_vocab_from_id_types(tmp_path):
    _prepare(RawData(pl.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "ts": [1, 2, 3]})), tmp_path / "ints")
    with pytest.raises(DataError, match="IDs are String in this data but Int64"):
        strings = RawData(pl.DataFrame({"user": [1, 1, 1], "item": ["a", "b", "c"], "ts": [1, 2, 3]}))
        _prepare(strings, tmp_path / "bad", vocab_from=tmp_path / "ints")
    # Numeric-looking IDs against a string vocabulary are the same entries.
    _prepare(RawData(pl.DataFrame({"user": [1, 1, 1], "item": ["7", "b", "c"], "ts": [1, 2, 3]})), tmp_path / "strings")
    numeric = RawData(pl.DataFrame({"user": [2, 2, 2], "item": [7, 7, 8], "ts": [1, 2, 3]}))
    report = prepare(
        numeric, PrepareConfig(out=tmp_path / "n", vocab_from=tmp_path / "strings", progress=False), {"name": "t"}
    )
    assert any("1 kept, 1 new" in note for note in report.notes)


def test_existing_output_refused_unless_overwrite_and_failures_leave_nothing(tmp_path, synthetic):
    out = tmp_path / "out"
    _prepare(synthetic, out)
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        _prepare(synthetic, out)
    _prepare(synthetic, out, overwrite=True)
    # A failure mid-way (temporal split without timestamps) leaves no temporary directory behind.
    no_ts = RawData(pl.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3]}))
    with pytest.raises(DataError, match="needs timestamps"):
        _prepare(no_ts, tmp_path / "fail", split="temporal", valid_start="q0.5", test_start="q0.8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_manifest_contents(tmp_path, synthetic):
    manifest = _prepare(synthetic, tmp_path / "out", samples_per_shard=100)
    on_disk = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest, default=str))
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert manifest["features"] == ["item", "action", "gap"]
    assert manifest["vocab"]["actions"] == schema.FIRST_INDEX + 5
    assert [s["samples"] for s in manifest["shards"]] == [100, 100, 100]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert set(manifest["files"]) == {"items.parquet", "users.parquet", "actions.parquet"}
    counts = manifest["counts"]
    assert sum(counts["events_per_segment"].values()) == counts["events"]
    assert counts["samples_per_split"] == {"train": 300, "valid": 300, "test": 300}


def test_temporal_split(tmp_path):
    events = pl.DataFrame(
        {"user": [1, 1, 1, 1, 2, 2, 3], "item": [1, 2, 3, 4, 1, 2, 5], "ts": [1, 5, 12, 20, 3, 15, 30]}
    )
    manifest = _prepare(RawData(events), tmp_path / "t", split="temporal", valid_start="10", test_start="18")
    samples = _read_all(tmp_path / "t")
    lengths = {k: tuple(len(s[x]) for x in schema.SEGMENTS) for k, s in samples.items()}
    assert lengths == {"u000000000w000": (2, 1, 1), "u000000001w000": (1, 1, 0), "u000000002w000": (0, 0, 1)}
    # user 3 has a test event but no history before it, so only user 1 is tested
    assert manifest["counts"]["samples_per_split"] == {"train": 1, "valid": 2, "test": 1}


def test_windows_cover_the_history_and_only_the_latest_carries_targets(tmp_path):
    events = pl.DataFrame({"user": [7] * 23, "item": np.arange(23), "ts": np.arange(23)})
    _prepare(RawData(events), tmp_path / "w", window=8, window_overlap=2)
    samples = _read_all(tmp_path / "w")
    items = pl.read_parquet(tmp_path / "w" / "items.parquet")
    to_raw = dict(zip(items["index"].to_list(), items["raw_id"].to_list()))
    windows = {schema.parse_key(k)[1]: [to_raw[int(i)] for i in s["train"]["item"]] for k, s in samples.items()}
    # 21 training events, windows of 8 with stride 6 from the end: [13..20], [7..14], [1..8], [0..2]
    assert windows == {0: list(range(13, 21)), 1: list(range(7, 15)), 2: list(range(1, 9)), 3: list(range(0, 3))}
    targets = {schema.parse_key(k)[1]: (len(s["valid"]), len(s["test"])) for k, s in samples.items()}
    assert targets == {0: (1, 1), 1: (0, 0), 2: (0, 0), 3: (0, 0)}


def test_dedup_and_k_core(tmp_path):
    events = pl.DataFrame(
        {
            "user": [1, 1, 1, 1, 2, 2, 2, 3],
            "item": [1, 1, 2, 3, 1, 2, 3, 9],
            "ts": [5, 5, 6, 7, 1, 2, 3, 4],
        }
    )
    manifest = _prepare(RawData(events), tmp_path / "d", min_user_events=2, min_item_events=2)
    assert manifest["counts"]["dropped"] == {"bad_rows": 0, "duplicates": 1, "k_core": 1}
    assert manifest["counts"]["users"] == 2 and manifest["counts"]["items"] == 3
    with pytest.raises(DataError, match="left no events"):
        _prepare(RawData(events), tmp_path / "e", min_user_events=10)


def test_same_input_gives_identical_shards(tmp_path, synthetic):
    # Several shards, so that the worker pool writes them (one shard is written in-process).
    runs = {"a": 2, "b": 3, "serial": 1}
    manifests = {
        name: _prepare(synthetic, tmp_path / name, samples_per_shard=40, workers=n) for name, n in runs.items()
    }
    contents = {
        name: [(s["name"], (tmp_path / name / s["name"]).read_bytes()) for s in manifest["shards"]]
        for name, manifest in manifests.items()
    }
    assert len(contents["a"]) == 8
    assert contents["a"] == contents["b"] == contents["serial"]
    assert manifests["a"]["shards"] == manifests["b"]["shards"] == manifests["serial"]["shards"]


def test_synthetic_generation_is_deterministic():
    a = generate(SyntheticSpec(users=200, items=100, seed=5))
    b = generate(SyntheticSpec(users=200, items=100, seed=5))
    c = generate(SyntheticSpec(users=200, items=100, seed=6))
    assert a.events.equals(b.events) and a.items.equals(b.items)
    assert not a.events.equals(c.events)
    lengths = a.events.group_by("user").len()["len"]
    assert lengths.min() >= 5 and abs(lengths.mean() - 50) < 10


def test_synthetic_has_sequential_structure_that_popularity_misses():
    """The next item repeats an earlier (item -> next) transition far more often than chance."""
    events = generate(SyntheticSpec(users=2000, items=1000, seed=0)).events.sort(["user", "ts"])
    prev = events["item"].shift(1)
    same_user = events["user"] == events["user"].shift(1)
    pairs = pl.DataFrame({"a": prev, "b": events["item"]}).filter(same_user)
    top_next = pairs.group_by("a", "b").len().sort("len", descending=True).unique("a", keep="first")
    transition_hit = top_next["len"].sum() / pairs.height
    top_item_share = events["item"].value_counts()["count"].max() / events.height
    assert transition_hit > 5 * top_item_share


def test_training_counts_are_read_exactly_in_record_batches_and_out_of_range_indices_refused(tmp_path, synthetic):
    import torch

    from train.items import load_counts

    manifest = _prepare(synthetic, tmp_path / "out", samples_per_shard=64)
    items = pl.read_parquet(tmp_path / "out" / "items.parquet")
    counts = load_counts(tmp_path / "out", manifest["vocab"]["items"])
    assert counts.dtype == torch.int32 and len(counts) == manifest["vocab"]["items"]
    assert counts[items["index"].to_list()].tolist() == items["count"].to_list()
    assert int(counts.sum()) == manifest["counts"]["events_per_segment"]["train"] > 0
    items.with_columns(pl.col("index") + 1).write_parquet(tmp_path / "out" / "items.parquet")
    with pytest.raises(ValueError, match=r"items.parquet: an item index outside the vocabulary of \d+"):
        load_counts(tmp_path / "out", manifest["vocab"]["items"])
