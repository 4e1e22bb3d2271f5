"""Serving a model that generates semantic IDs: the artifact's codes, trie and quantizer, beam
search behind top_k (exclusions, allow lists, k above the beam), the beam-certified evaluation,
HTTP, offline scoring, a tampered trie refused, and items added later getting codes."""

import json
import shutil

import numpy as np
import pytest
import torch

from data.shards import sha256_file
from launch.cli import main
from serve import artifact
from serve.artifact import ArtifactError
from serve.recommender import Recommender
from tests.conftest import run_cli

SEMANTIC = ("model.semantic_id_head=true", "model.item_semantic_ids=true", "loss.main=semantic_id")


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory):
    """Shards with item text and semantic IDs, and a tiny semantic-ID model trained one epoch on
    them in one process: (shards, run directory)."""
    root = tmp_path_factory.mktemp("semantic-serve")
    shards, run = root / "shards", root / "run"
    prepare = ["data", "prepare", "--source", "synthetic", "--users", "150", "--num-items", "100"]
    assert main([*prepare, "--events-per-user", "10", "--item-text", "--out", str(shards), "--quiet"]) == 0
    assert main(["data", "semantic-ids", str(shards), "--codes", "8"]) == 0
    overrides = [f"data.shards={shards}", f"output.dir={run}", "schedule.epochs=1", *SEMANTIC]
    run_cli("train", "--config", "configs/debug.yaml", *(a for o in overrides for a in ("--set", o)))
    return shards, run


@pytest.fixture(scope="module")
def exported(semantic_run, tmp_path_factory):
    """The model as an int8 artifact, measured at export, and as an fp32 one."""
    from train.export import export

    _, run = semantic_run
    root = tmp_path_factory.mktemp("semantic-artifacts")
    export(run / "best", root / "int8", "int8", log=lambda *_: None)
    export(run / "best", root / "fp32", "fp32", evaluate=False, log=lambda *_: None)
    return root / "int8", root / "fp32"


def _codes(art):
    return np.asarray(artifact.read_semantic_ids(art, json.loads((art / artifact.CONFIG).read_text())).codes)


def _reseal(art, name):
    """Rewrites the manifest's size and checksum of ``name``: only the consistency checks can tell."""
    manifest = json.loads((art / artifact.MANIFEST).read_text())
    manifest["files"][name] = {"bytes": (art / name).stat().st_size, "sha256": sha256_file(art / name)}
    (art / artifact.MANIFEST).write_text(json.dumps(manifest))


def test_top_k_returns_existing_allowed_unseen_items(semantic_run, exported):
    shards, run = semantic_run
    art, _ = exported
    config = json.loads((art / artifact.CONFIG).read_text())
    training = json.loads((run / "best" / "training.json").read_text())
    assert config["semantic_ids"]["beam_width"] == training["config"]["eval"]["beam_width"] == 20
    assert artifact.SEMANTIC in json.loads((art / artifact.MANIFEST).read_text())["files"]
    # Export measured the artifact on cut-offs the beam certifies only (k < 20).
    test = json.loads((art / artifact.MANIFEST).read_text())["metrics"]["test"]
    assert {"HR@10", "NDCG@10", "MRR@19"} <= set(test) and "HR@50" not in test and "HR@200" not in test

    rec = Recommender.load(art)
    assert rec.beam_width == 20 and rec.info()["semantic_ids"] == {
        "levels": 5, "level_sizes": [8] * 5, "beam_width": 20
    }  # fmt: skip
    codes = _codes(art)
    coded = set(np.flatnonzero(codes[:, 0] >= 0).tolist())
    assert len(coded) == rec.items.rows - 2
    hidden = rec.encode(torch.tensor([[5, 9, 14, 0], [3, 4, 0, 0]]), torch.tensor([3, 2]))
    seen = [np.array([5, 9, 14]), np.array([3, 4])]
    scores, items = rec.top_k(hidden, 10, seen)
    for b in range(2):
        assert torch.isfinite(scores[b]).all() and (scores[b][:-1] >= scores[b][1:]).all()
        found = items[b].tolist()
        assert set(found) <= coded and not set(found) & set(seen[b].tolist()) and len(set(found)) == 10
    allowed = np.array([7, 8, 9, 11, 1, -1])
    scores, items = rec.top_k(hidden, 5, seen, [allowed, None])
    assert set(items[0][torch.isfinite(scores[0])].tolist()) == {7, 8, 11}
    assert torch.isfinite(scores[1]).all()
    # k above the beam widens it; every coded item but the seen ones is reachable.
    scores, items = rec.top_k(hidden, 120, seen)
    for b in range(2):
        found = items[b][torch.isfinite(scores[b])].tolist()
        assert sorted(found) == sorted(coded - set(seen[b].tolist()))
    narrow = Recommender.load(art, beam_width=3)
    assert narrow.beam_width == 3 and narrow.top_k(hidden, 8)[1].shape == (2, 8)
    answer = rec.recommend([[rec.vocab.raw(np.array([5]))[0]]], k=4, deny=[rec.vocab.raw(np.array([6]))[0]])[0]
    assert len(answer.items) == 4 and not set(rec.vocab.indices(answer.items)) & {5, 6}

    from serve.offline import score

    summary = score(art, [shards], art.parent / "scored", k=25, beam_width=30, progress=False, log=lambda *_: None)
    assert summary["complete"] and summary["users"] == 150
    job = json.loads((art.parent / "scored" / "_job.json").read_text())
    assert job["beam_width"] == 30


def test_bad_beam_width_and_index_are_one_line(exported, semantic_run, capsys, tmp_path):
    from train.export import ExportError, export

    art, _ = exported
    assert main(["score", "--artifact", str(art), "--input", "x", "--out", "y", "--beam-width", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--beam-width must be >= 1, got 0")
    with pytest.raises(ExportError, match="--index: a semantic-ID model ranks by beam search"):
        export(semantic_run[1] / "best", tmp_path / "indexed", index="hnsw", log=lambda *_: None)


@pytest.mark.parametrize("damage", ["trie", "codes"])
def test_a_trie_or_codes_not_matching_the_vocabulary_are_refused(exported, tmp_path, capsys, damage):
    from safetensors.numpy import load_file, save_file

    art = shutil.copytree(exported[0], tmp_path / "art")
    file = art / artifact.SEMANTIC
    tensors = load_file(str(file))
    if damage == "trie":
        leaves = tensors["trie.leaf_items"]
        leaves[[0, 1]] = leaves[[1, 0]]
        expected = "the code trie does not match the items' codes"
    else:
        tensors["codes"] = tensors["codes"][:-1]
        expected = f"codes for {len(tensors['codes'])} items, the vocabulary has {len(tensors['codes']) + 1}"
    save_file(tensors, str(file))
    _reseal(art, artifact.SEMANTIC)
    with pytest.raises(ArtifactError, match=expected) as caught:
        Recommender.load(art)
    assert str(caught.value).startswith(str(file)) and "\n" not in str(caught.value)
    assert main(["eval", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_added_items_get_codes_and_are_served(exported, tmp_path):
    import httpx

    from serve.catalog import add_items
    from tests.test_http import Server

    old, fp32 = exported
    new = tmp_path / "new.csv"
    new.write_text("item,title,genres\n90001,premium Loni 90001,Drama\n90002,basic Kavo 90002,Comedy\n")
    grown = add_items(fp32, new, tmp_path / "grown", log=lambda *_: None)
    rec, before = Recommender.load(grown), Recommender.load(fp32)
    n = before.items.rows
    codes = _codes(grown)
    np.testing.assert_array_equal(codes[:n], _codes(fp32))
    assert (codes[n:] >= 0).all() and len(np.unique(codes[2:], axis=0)) == len(codes) - 2
    assert sorted(rec.trie.leaf_items.tolist()) == list(range(2, n + 2))
    # A new item's vector is the mean of its code rows: no ID part, no text part in this model.
    table = torch.from_numpy(np.asarray(rec.semantic.code_table))
    offsets = np.cumsum([0, *rec.trie.level_sizes[:-1]])
    expected = torch.stack([table[torch.from_numpy(row + offsets)].mean(0) for row in codes[n:]])
    torch.testing.assert_close(rec.items.dequantize(n, n + 2), expected)
    torch.testing.assert_close(rec.items.dequantize(0, n), before.items.dequantize(0, n))
    hidden = rec.encode(torch.tensor([[5, 9]]), torch.tensor([2]))
    assert set(rec.top_k(hidden, 2, allow=[np.array([n, n + 1])])[1][0].tolist()) == {n, n + 1}
    assert {n, n + 1} <= set(rec.top_k(hidden, n)[1][0].tolist())

    server = Server(grown, tmp_path, "--beam-width", "25")
    try:
        history = rec.vocab.raw(np.array([5, 9, 14]))
        answer = httpx.post(f"{server.url}/v1/recommend", json={"history": history, "k": 30}, timeout=30).json()
        allowed = httpx.post(
            f"{server.url}/v1/recommend", json={"history": history, "k": 3, "allow": [90002, history[0]]}, timeout=30
        ).json()
        info = httpx.get(f"{server.url}/v1/model", timeout=30).json()
    finally:
        assert server.stop() == 0
    assert len(answer["items"]) == 30 and not set(answer["items"]) & set(history)
    assert set(answer["items"]) <= set(rec.vocab.raw(np.arange(2, n + 2)))
    assert allowed["items"] == [90002]
    assert info["semantic_ids"]["beam_width"] == 25 and info["items"] == n
