"""Exact top-K through the compiled int8 kernel, and the approximate item index: export, checks,
filters, fallback to exact scoring, recall, and items added to it."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.schema import FIRST_INDEX
from serve import index as item_index
from serve import topk
from serve.artifact import ArtifactError, ArtifactWriter
from serve.recommender import Recommender
from tests.conftest import run_cli


def _artifact(path, vectors: np.ndarray, normalize: bool, index: str | None = None, quant: str = "int8"):
    """An artifact of an untrained model over ``vectors`` (rows from FIRST_INDEX on), optionally
    with an item index built the way ``lmrec export --index`` builds it."""
    from model.config import ModelConfig, RecommenderConfig
    from model.modeling import SequenceRecommender

    rows, dim = len(vectors) + FIRST_INDEX, vectors.shape[1]
    cfg = ModelConfig(
        hidden_size=dim, num_layers=1, num_heads=1, max_len=8, use_actions=False, use_gaps=False, normalize=normalize
    )
    vocab = {"items": rows, "actions": 0, "gaps": 0}
    dense = {k: v.numpy() for k, v in SequenceRecommender(RecommenderConfig.build(cfg, vocab)).state_dict().items()}
    with ArtifactWriter(path, quant, {"model": cfg.to_dict(), "vocab": vocab}, rows, dim) as writer:
        writer.write_dense(dense)
        writer.write_items(0, np.concatenate([np.zeros((FIRST_INDEX, dim), np.float32), vectors]))
        ids = np.arange(FIRST_INDEX, rows)
        writer.write_vocab(pa.table({"index": ids, "raw_id": ids * 10, "count": np.ones(len(ids), dtype=np.int64)}))
        staged = writer.seal()
        if index is not None:
            table = Recommender.load(staged, verify=False, search="exact").items
            writer.config["index"] = item_index.build(table, item_index.IndexSpec.parse(index), staged, log=print)
            writer.seal()
    return path


def _clustered(rows: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    centers = generator.normal(size=(clusters, dim)).astype(np.float32)
    return centers[generator.integers(0, clusters, rows)] + 0.3 * generator.normal(size=(rows, dim)).astype(np.float32)


def _reference(rec: Recommender, hidden: torch.Tensor, k: int, exclude: list[np.ndarray]):
    """Brute force: every stored (dequantized) row scored by the model in float."""
    scores = rec.model.scores(hidden, rec.items.dequantize(0, rec.items.rows))
    scores[:, :FIRST_INDEX] = -torch.inf
    for b, rows in enumerate(exclude):
        scores[b, rows] = -torch.inf
    return scores.topk(k, dim=1)


@pytest.mark.parametrize("normalize", [True, False])
def test_exact_int8_top_k_equals_brute_force_float_scoring(tmp_path, normalize):
    generator = np.random.default_rng(1)
    vectors = generator.normal(size=(3000, 24)).astype(np.float32) * generator.uniform(0.2, 3, (3000, 1))
    rec = Recommender.load(_artifact(tmp_path / "a", vectors.astype(np.float32), normalize), resident_values=0)
    assert rec.items.candidates is not None and rec.index is None
    hidden = torch.from_numpy(generator.normal(size=(9, 24)).astype(np.float32))
    exclude = [np.sort(generator.choice(rec.items.rows, size=40 * b, replace=False)) for b in range(9)]
    exclude[3] = np.array([0, 1, 5], dtype=np.int64)  # reserved rows listed too
    scores, items = rec.top_k(hidden, 10, exclude)
    expected_scores, expected_items = _reference(rec, hidden, 10, exclude)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-4)
    # The kernel's answer equals the float block path's, and a k past the catalog pads with -inf.
    blocks = (torch.full((9, 10), -torch.inf), torch.zeros((9, 10), dtype=torch.int64))
    rec._top_k_blocks(hidden, 10, exclude, list(range(9)), *blocks)
    assert torch.equal(blocks[1], items)
    few, _ = rec.top_k(hidden[:1], 3005, [np.zeros(0, dtype=np.int64)])
    assert torch.isfinite(few).sum() == 3000 and torch.isinf(few[0, 3000:]).all()


def test_the_portable_kernel_keeps_the_same_candidates_as_the_vector_one():
    generator = np.random.default_rng(2)
    codes = generator.integers(-128, 128, size=(999, 70), dtype=np.int8)
    alpha = generator.uniform(0.01, 1, 999).astype(np.float32)
    beta = generator.normal(size=999).astype(np.float32)
    query = torch.from_numpy(generator.normal(size=(11, 70)).astype(np.float32))
    exclude = [np.sort(generator.choice(999, size=30, replace=False)) for _ in range(11)]
    found = []
    for flags in ((), ("-DLMREC_PORTABLE",)):
        kernel = topk.load_kernel(topk.compile_kernel(flags))
        norms = np.linalg.norm(codes.astype(np.float32), axis=1)
        found.append(topk.Int8Candidates(kernel, codes, alpha, beta, norms, FIRST_INDEX).candidates(query, 7, exclude))
    exact = (query @ torch.from_numpy(codes).float().T) * torch.from_numpy(alpha)
    exact += query.sum(1, keepdim=True) * torch.from_numpy(beta)
    exact[:, :FIRST_INDEX] = -torch.inf
    for b in range(11):
        exact[b, exclude[b]] = -torch.inf
        assert sorted(found[0][b]) == sorted(found[1][b])
        assert set(exact[b].topk(7).indices.tolist()) <= set(found[0][b].tolist())


def test_index_search_is_close_to_exact_and_keeps_the_filters(tmp_path):
    vectors = _clustered(6000, 16, clusters=40)
    path = _artifact(tmp_path / "a", vectors, normalize=True, index="ivf-sq8:nlist=32,nprobe=8")
    rec, exact = Recommender.load(path), Recommender.load(path, search="exact")
    assert rec.index is not None and exact.index is None
    generator = np.random.default_rng(3)
    hidden = torch.from_numpy(_clustered(40, 16, clusters=40, seed=4))
    exclude = [np.sort(generator.choice(rec.items.rows, size=300, replace=False)) for _ in range(40)]
    _, found = rec.top_k(hidden, 10, exclude)
    _, truth = exact.top_k(hidden, 10, exclude)
    recall = np.mean([len(set(found[b].tolist()) & set(truth[b].tolist())) / 10 for b in range(40)])
    assert recall >= 0.95, recall
    for b in range(40):
        assert not set(found[b].tolist()) & set(exclude[b].tolist())
    # allow lists are ranked exactly, as without an index.
    allow = [np.arange(100, 160)] * 40
    assert torch.equal(rec.top_k(hidden, 10, exclude, allow)[1], exact.top_k(hidden, 10, exclude, allow)[1])
    # Raw IDs: deny holds too.
    [answer] = rec.recommend([[1000, 2000]], k=10, deny=[int(i) * 10 for i in truth[0].tolist()])
    assert len(answer.items) == 10 and not {int(i) * 10 for i in truth[0].tolist()} & set(answer.items)


def test_a_filter_that_leaves_too_few_neighbours_falls_back_to_exact(tmp_path):
    vectors = _clustered(2000, 8, clusters=64, seed=5)
    path = _artifact(tmp_path / "a", vectors, normalize=False, index="ivf-sq8:nlist=64,nprobe=1,rerank=1")
    rec, exact = Recommender.load(path, search="index"), Recommender.load(path, search="exact")
    hidden = torch.from_numpy(_clustered(5, 8, clusters=64, seed=6))
    # Exclude all but a few items of the one list each query probes: fewer than k neighbours are left.
    _, listed = rec.index.index.search(hidden.numpy(), 2000)
    exclude = [np.sort(ids[ids >= 0][3:] + FIRST_INDEX) for ids in listed]
    assert all(rows is None for rows in rec.index.candidates(hidden, 10, exclude))
    scores, items = rec.top_k(hidden, 10, exclude)
    expected_scores, expected_items = exact.top_k(hidden, 10, exclude)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores)


def test_index_artifacts_are_listed_checked_and_chosen_at_load(trained_run, tmp_path):
    _, run = trained_run
    out = tmp_path / "indexed"
    done = run_cli("export", run / "best", "--out", out, "--index", "hnsw:m=8")
    assert "built a hnsw index of" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert "index.faiss" in manifest["files"] and config["index"]["kind"] == "hnsw" and config["index"]["m"] == 8
    assert manifest["metrics"]["test"]["users"] == 300  # measured through the index
    rec = Recommender.load(out)
    assert rec.index is not None and Recommender.load(out, search="exact").index is None
    assert rec.recommend([[10, 20, 30]], k=5)[0].items
    bad = run_cli("export", run / "best", "--out", tmp_path / "x", "--index", "ivf-sq8:nprob=3", check=False)
    assert bad.returncode == 2 and "ivf-sq8 takes nlist, nprobe, train, rerank, not 'nprob'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = bytearray((broken / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"index\.faiss: checksum mismatch"):
        Recommender.load(broken)
    done = run_cli("serve", broken, "--port", 1, check=False)
    assert done.returncode == 2 and "index.faiss: checksum mismatch" in done.stderr and "Traceback" not in done.stderr


def test_search_modes_are_checked(tmp_path):
    path = _artifact(tmp_path / "plain", _clustered(50, 4, clusters=3), normalize=True)
    with pytest.raises(ArtifactError, match="plain: has no item index to search"):
        Recommender.load(path, search="index")
    with pytest.raises(ArtifactError, match="search must be one of auto, exact, index, got 'fast'"):
        Recommender.load(path, search="fast")
    with pytest.raises(ArtifactError, match="--index ivf-pq: m=3 must divide the item width 4"):
        item_index.IndexSpec.parse("ivf-pq:m=3").resolved(50, 4)
    with pytest.raises(ArtifactError, match="the kind must be one of ivf-sq8, ivf-pq, hnsw"):
        item_index.IndexSpec.parse("flat")
