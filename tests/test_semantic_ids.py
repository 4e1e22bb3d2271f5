"""Semantic IDs: residual k-means codes, the dedup level, the shards' file and manifest entry, the
command line, and the codes carried through --vocab-from."""

import json
import shutil
import types

import numpy as np
import pytest

from data.errors import DataError
from data.semantic_ids import (
    SEMANTIC_FILE,
    ResidualQuantizer,
    SemanticIds,
    build_semantic_ids,
    dedup_suffixes,
    default_levels,
    load_semantic_ids,
)
from data.shards import MANIFEST, load_manifest, verify_shards
from launch.cli import main
from tests.conftest import run_cli

SYNTHETIC = ["data", "prepare", "--source", "synthetic", "--users", "200", "--events-per-user", "10", "--quiet"]


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    """Small shards with item text (97 items), prepared once; tests copy them before writing."""
    out = tmp_path_factory.mktemp("semantic") / "day1"
    assert main([*SYNTHETIC, "--num-items", "100", "--item-text", "--out", str(out)]) == 0
    return out


@pytest.fixture
def shards(day1, tmp_path):
    return shutil.copytree(day1, tmp_path / "shards")


def _clustered(n=3000, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim))
    return (centres[rng.integers(12, size=n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def _unique_rows(codes):
    return len(np.unique(codes, axis=0)) == len(codes)


def test_fit_and_encode_are_deterministic():
    import faiss

    vectors = _clustered()
    first = ResidualQuantizer.fit(vectors, levels=3, codes=16, seed=0)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        again = ResidualQuantizer.fit(vectors, levels=3, codes=16, seed=0)
    finally:
        faiss.omp_set_num_threads(threads)
    for a, b in zip(first.centroids, again.centroids, strict=True):
        np.testing.assert_array_equal(a, b)
    codes = first.encode(vectors)
    assert codes.shape == (len(vectors), 3) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 16
    np.testing.assert_array_equal(codes, again.encode(vectors, block=100))
    other = ResidualQuantizer.fit(vectors, levels=3, codes=16, seed=1)
    assert not np.array_equal(other.centroids[0], first.centroids[0])
    # Each level takes error away: the residual shrinks as codes are added.
    errors = [np.linalg.norm(vectors - first.mean, axis=1).mean()]
    residual = vectors - first.mean
    for level, centroids in enumerate(first.centroids):
        residual = residual - centroids[codes[:, level]]
        errors.append(np.linalg.norm(residual, axis=1).mean())
    assert errors == sorted(errors, reverse=True), errors


def test_collisions_get_suffixes_in_index_order():
    prefix = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1], [0, 0]])
    np.testing.assert_array_equal(dedup_suffixes(prefix, width=3), [0, 0, 1, 2, 0, 1])
    with pytest.raises(DataError, match=r"3 items share the semantic ID prefix \(1, 2\).*raise --levels or --codes"):
        dedup_suffixes(prefix, width=2)
    # Identical vectors (far from the rest, so alone in their group) get suffixes 0..n-1 in index order.
    vectors = _clustered(500)
    twins = [3, 7, 100, 250, 499]
    vectors[twins] = 20.0
    quantizer = ResidualQuantizer.fit(vectors, levels=2, codes=8, seed=0)
    prefix = quantizer.encode(vectors)
    suffix = dedup_suffixes(prefix, width=len(vectors))
    assert ((prefix == prefix[3]).all(axis=1)).sum() == len(twins)
    np.testing.assert_array_equal(suffix[twins], [0, 1, 2, 3, 4])
    assert _unique_rows(np.column_stack([prefix, suffix]))


def test_new_items_take_the_next_free_suffix():
    vectors = _clustered(300)
    quantizer = ResidualQuantizer.fit(vectors, levels=2, codes=8, seed=0)
    prefix = quantizer.encode(vectors)
    codes = np.full((302, 3), -1, dtype=np.int32)
    codes[2:, :2], codes[2:, 2] = prefix, dedup_suffixes(prefix, width=300)
    ids = SemanticIds(codes, [8, 8, 300], quantizer, {"text": None, "model": None})
    known = int(((prefix == prefix[5]).all(axis=1)).sum())
    new = ids.assign(np.stack([vectors[5], _clustered(1, seed=9)[0], vectors[5]]), first_index=302)
    np.testing.assert_array_equal(
        new[:, :2], quantizer.encode(np.stack([vectors[5], _clustered(1, seed=9)[0], vectors[5]]))
    )
    assert new[0, 2] == known and new[2, 2] == known + 1
    assert _unique_rows(np.concatenate([codes[2:], new]))
    full = SemanticIds(codes, [8, 8, known], quantizer, ids.inputs)
    with pytest.raises(DataError, match=r"item 302: semantic ID prefix \(\d+, \d+\) has no dedup value left"):
        full.assign(vectors[5:6], first_index=302)


def test_default_levels_leave_room():
    assert [default_levels(n) for n in (10**4, 65_536, 65_537, 10**6, 10**7, 10**8)] == [3, 3, 4, 4, 4, 5]
    assert default_levels(10) == 2 and default_levels(100, codes=8) == 4
    for n in (10**4, 10**6, 10**8):
        assert 256 ** default_levels(n) > n


def test_build_writes_checked_ids(shards):
    entry = build_semantic_ids(shards, codes=8, seed=0)
    manifest = load_manifest(shards)
    assert manifest["semantic_ids"] == json.loads(json.dumps(entry))
    assert entry["levels"] == 4 and entry["level_sizes"] == [8] * 5 and entry["method"] == "residual k-means (faiss)"
    assert entry["inputs"]["text"] == manifest["text"]["encoder"] and entry["inputs"]["model"] is None
    assert SEMANTIC_FILE in manifest["files"] and verify_shards(shards, manifest) == []
    ids = load_semantic_ids(shards)
    assert ids.codes.shape == (manifest["vocab"]["items"], 5) and ids.codes.dtype == np.int32
    assert (ids.codes[:2] == -1).all() and (ids.codes[2:] >= 0).all() and (ids.codes[2:, :4] < 8).all()
    assert _unique_rows(ids.codes[2:])
    assert entry["collisions"]["max_group"] == ids.codes[2:, -1].max() + 1
    with pytest.raises(DataError, match="already has semantic IDs.*--overwrite"):
        build_semantic_ids(shards, codes=8)
    with pytest.raises(DataError, match=r"--codes 4 and --levels 2 give 16 tuples for 97 items"):
        build_semantic_ids(shards, levels=2, codes=4, overwrite=True)

    # With a model's rows: items without training events get a zero model part.
    rng = np.random.default_rng(0)
    model = rng.standard_normal((len(ids.codes), 6)).astype(np.float32)
    entry = build_semantic_ids(shards, codes=8, model_vectors=model, model_info={"path": "m"}, overwrite=True)
    assert entry["inputs"]["model"] == {"path": "m", "dim": 6, "weight": 1.0}
    assert verify_shards(shards, load_manifest(shards)) == []
    with_model = load_semantic_ids(shards)
    assert with_model.quantizer.mean.shape == (384 + 6,) and _unique_rows(with_model.codes[2:])

    manifest = load_manifest(shards)
    manifest["vocab"]["items"] += 1
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{SEMANTIC_FILE}: codes for 99 items, the manifest's vocabulary has 100"):
        load_semantic_ids(shards)


def test_command_line(shards, monkeypatch, capsys):
    done = run_cli("data", "semantic-ids", shards, "--codes", "8", "--seed", "3")
    assert "4 levels x 8 codes + a dedup level; largest collision group" in done.stdout
    assert load_manifest(shards)["semantic_ids"]["seed"] == 3
    again = run_cli("data", "semantic-ids", shards, "--codes", "8", check=False)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr and "Traceback" not in again.stderr

    untexted = shutil.copytree(shards, shards.parent / "untexted")
    manifest = load_manifest(untexted)
    manifest["text"] = manifest["semantic_ids"] = None
    (untexted / MANIFEST).write_text(json.dumps(manifest))
    done = run_cli("data", "semantic-ids", untexted, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "prepared without --item-text" in done.stderr and "Traceback" not in done.stderr

    # --from-model reads the model's rows in blocks (here a stand-in for a trained model).
    import torch

    import train.saved_model

    size = manifest["vocab"]["items"]
    table = torch.randn(size, 5)
    trained = types.SimpleNamespace(num_items=size, kind="saved model", training={"step": 7})
    trained.rows = lambda start, stop: table[start:stop]
    calls = []

    def load_source(path, data):
        calls.append((str(path), str(data)))
        return trained

    monkeypatch.setattr(train.saved_model, "load_source", load_source)
    assert main(["data", "semantic-ids", str(shards), "--codes", "8", "--from-model", "M", "--overwrite"]) == 0
    assert calls == [("M", str(shards))]
    model = load_manifest(shards)["semantic_ids"]["inputs"]["model"]
    assert model == {"path": "M", "kind": "saved model", "step": 7, "dim": 5, "weight": 1.0}
    trained.num_items = size + 1
    capsys.readouterr()
    assert main(["data", "semantic-ids", str(shards), "--from-model", "M", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--from-model M: {size + 1:,} item rows, but {shards} has {size:,} item indices" in err


def test_vocab_from_carries_the_codes(shards, tmp_path, capsys):
    from data.text import ItemTextFeatures

    build_semantic_ids(shards, codes=8)
    old = load_semantic_ids(shards)
    day2 = tmp_path / "day2"
    grown = [*SYNTHETIC, "--num-items", "130", "--synthetic-seed", "1", "--vocab-from", str(shards)]
    assert main([*grown, "--item-text", "--out", str(day2)]) == 0
    manifest = load_manifest(day2)
    assert verify_shards(day2, manifest) == [] and SEMANTIC_FILE in manifest["files"]
    entry = manifest["semantic_ids"]
    first, size = len(old.codes), manifest["vocab"]["items"]
    assert entry["carried_from"] == {"path": str(shards), "items": first, "new_items": size - first} and size > first
    new = load_semantic_ids(day2)
    np.testing.assert_array_equal(new.codes[:first], old.codes)
    vectors = ItemTextFeatures.load(day2 / manifest["text"]["file"]).vectors[first:]
    np.testing.assert_array_equal(new.codes[first:, :-1], old.quantizer.encode(vectors))
    assert _unique_rows(new.codes[2:])

    # New items need text to be encoded.
    capsys.readouterr()
    assert main([*grown, "--out", str(tmp_path / "plain")]) == 2
    assert "has semantic IDs; giving the 31 new items theirs needs their text vectors" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()
