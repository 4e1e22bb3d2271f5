"""Export -> load -> recommend, from a real 2-rank training run (the session fixtures)."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.artifact import FORMAT_VERSION, ArtifactError, ArtifactWriter
from serve.recommender import ItemTable, Recommender
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.multiprocess


def _raw_ids(artifact):
    vocab = pq.read_table(artifact / "vocab.parquet").sort_by("index")
    return vocab["raw_id"].to_pylist(), vocab["count"].to_pylist()


def test_fp32_artifact_ranks_exactly_like_the_training_evaluator(trained_run, artifacts):
    from train.saved_model import load_source

    shards, run = trained_run
    trained = json.loads((run / "metrics.json").read_text())["test"]["model"]
    manifest = json.loads((artifacts["fp32"] / "manifest.json").read_text())
    served = manifest["metrics"]["test"]
    assert served["users"] == trained["users"] == 300
    for key in ("HR@1", "HR@10", "NDCG@10", "NDCG@50"):
        assert served[key] == pytest.approx(trained[key], abs=1e-9), key
    # Same top-K as the training model's own scoring, user by user.
    saved = load_source(run / "best")
    model, table = saved.model(), saved.table()
    rec = Recommender.load(artifacts["fp32"])
    items = torch.randint(2, len(table), (16, 12))
    lengths = torch.randint(1, 13, (16,))
    with torch.no_grad():
        hidden = model.last_hidden(model(table[items], lengths), lengths)
        expected = model.scores(hidden, table)
    expected[:, :2] = -torch.inf
    _, served_top = rec.top_k(rec.encode(items, lengths), 10)
    assert torch.equal(served_top, expected.topk(10).indices)


def test_quantized_artifacts_stay_close_and_small(artifacts):
    test = {q: json.loads((a / "manifest.json").read_text())["metrics"]["test"] for q, a in artifacts.items()}
    assert test["fp16"]["NDCG@10"] == pytest.approx(test["fp32"]["NDCG@10"], rel=0.01)
    assert test["int8"]["NDCG@10"] == pytest.approx(test["fp32"]["NDCG@10"], rel=0.03)
    assert test["int4"]["NDCG@10"] == pytest.approx(test["fp32"]["NDCG@10"], rel=0.15)
    sizes = {
        q: (a / "items.safetensors").stat().st_size + (a / "model.safetensors").stat().st_size
        for q, a in artifacts.items()
    }
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_recommend_handles_unknown_empty_long_and_filtered_histories(artifacts):
    rec = Recommender.load(artifacts["int8"])
    raw, counts = _raw_ids(artifacts["int8"])
    history = raw[:5]
    [plain, unknown, empty, long] = rec.recommend(
        [history, history + ["no-such-item", 10**12], [], raw[: rec.max_len + 7]], k=10
    )
    assert len(plain.items) == 10 and not set(plain.items) & set(history)
    assert plain.scores == sorted(plain.scores, reverse=True)
    assert unknown.unknown_items == ["no-such-item", 10**12] and unknown.items == plain.items
    count_of = dict(zip(raw, counts, strict=True))
    assert empty.fallback == "popularity" and empty.scores == sorted(counts, reverse=True)[:10]
    assert [count_of[i] for i in empty.items] == empty.scores
    assert long.truncated and not plain.truncated
    # Batched results equal one-at-a-time results.
    [alone] = rec.recommend([history], k=10)
    assert alone.items == plain.items
    np.testing.assert_allclose(alone.scores, plain.scores, rtol=1e-5)
    # allow / deny / exclude_seen
    [denied] = rec.recommend([history], k=10, deny=plain.items[:3])
    assert denied.items[:7] == plain.items[3:10]
    [allowed] = rec.recommend([history], k=10, allow=raw[:20])
    [everything] = rec.recommend([history], k=len(raw))
    assert allowed.items == [i for i in everything.items if i in set(raw[5:20])][:10]
    [with_seen] = rec.recommend([history], k=len(raw), exclude_seen=False)
    assert set(history) <= set(with_seen.items) and len(with_seen.items) == len(raw)
    # Actions and timestamps are used when the model has those inputs.
    [timed] = rec.recommend([history], k=10, actions=[[1, 2, 3, 4, 5]], timestamps=[[0, 60, 3600, 86400, 10**6]])
    assert timed.scores != plain.scores
    with pytest.raises(ValueError, match="timestamps has 2 entries"):
        rec.recommend([history], timestamps=[[0, 1]])


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(3, 40),
    dim=st.integers(1, 9),
    quant=st.sampled_from(["int8", "int4"]),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_scores_on_the_quantized_table_equal_scores_of_dequantized_rows(rows, dim, quant, normalize, seed):
    """The served ranking multiplies queries with integer codes and applies scale and offset
    afterwards; it must equal scoring the dequantized rows, in any block size."""
    from model.config import ModelConfig, RecommenderConfig
    from model.modeling import SequenceRecommender
    from serve import quant as q

    generator = np.random.default_rng(seed)
    values = generator.normal(size=(rows, dim)).astype(np.float32) * generator.uniform(0.01, 5)
    codes, scale, offset = (q.quantize_rows_int8 if quant == "int8" else q.quantize_rows_int4)(values)
    tensors = {"items": codes, "items.scale": scale, "items.offset": offset}
    table = ItemTable(tensors, quant, dim, normalize, block_rows=7, resident_values=0)  # the quantized blocks
    cfg = ModelConfig(backbone="gpt2", hidden_size=dim, num_heads=1, num_layers=1, normalize=normalize)
    model = SequenceRecommender(RecommenderConfig.build(cfg, {"items": rows}))
    hidden = torch.from_numpy(generator.normal(size=(3, dim)).astype(np.float32))
    dequantized = table.dequantize(0, rows)
    expected = model.scores(hidden, dequantized)
    got = torch.cat([table.scores(model, hidden, s, min(rows, s + 7)) for s in range(0, rows, 7)], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-5)
    torch.testing.assert_close(table.lookup(torch.arange(rows)), dequantized)


def test_damaged_artifacts_are_refused_with_the_file_named(artifacts, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifacts["int8"], broken)
    data = bytearray((broken / "items.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "items.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"items\.safetensors: checksum mismatch"):
        Recommender.load(broken)
    (broken / "items.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"items\.safetensors: missing"):
        Recommender.load(broken)
    manifest = json.loads((artifacts["int8"] / "manifest.json").read_text())
    shutil.copytree(artifacts["int8"], tmp_path / "old")
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="format version"):
        Recommender.load(tmp_path / "old")
    done = run_cli("serve", tmp_path / "old", "--port", 1, check=False)
    assert done.returncode == 2 and "format version" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("export", tmp_path / "nowhere", "--out", tmp_path / "x", check=False)
    assert done.returncode == 2 and "nowhere: no such file or directory" in done.stderr
    (tmp_path / "empty").mkdir()
    done = run_cli("export", tmp_path / "empty", "--out", tmp_path / "x", check=False)
    assert done.returncode == 2 and "empty: not a trained model: expected a checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()


RSS_PROBE = """
import json, sys, psutil, torch
from serve.recommender import Recommender
process = psutil.Process()
def load_and_use(path):
    rec = Recommender.load(path, verify=False)
    rec.recommend([[20, 30, 40]], k=10)
    rec.recommend([[50, 60]], k=10)
    return rec
small = load_and_use(sys.argv[1])  # imports, model code and allocator warm-up: everything but the table
before = process.memory_info().rss
big = load_and_use(sys.argv[2])
print(json.dumps({"grown": process.memory_info().rss - before}))
"""


def _synthetic_artifact(path, rows, dim=64):
    import pyarrow as pa

    from model.config import ModelConfig, RecommenderConfig
    from model.modeling import SequenceRecommender

    cfg = ModelConfig(hidden_size=dim, num_layers=1, num_heads=2, max_len=20, use_actions=False, use_gaps=False)
    vocab = {"items": rows, "actions": 0, "gaps": 0}
    dense = {k: v.numpy() for k, v in SequenceRecommender(RecommenderConfig.build(cfg, vocab)).state_dict().items()}
    config = {"model": cfg.to_dict(), "vocab": vocab}
    with ArtifactWriter(path, "int8", config, rows, dim) as writer:
        writer.write_dense(dense)
        generator = np.random.default_rng(0)
        for start in range(0, rows, 100_000):
            writer.write_items(start, generator.normal(size=(min(rows, start + 100_000) - start, dim)))
        index = np.arange(2, rows)
        writer.write_vocab(pa.table({"index": index, "raw_id": index * 10, "count": np.ones(rows - 2, dtype=np.int64)}))
    return path


def test_an_int8_artifact_stays_int8_in_memory(tmp_path):
    rows, dim = 400_000, 64
    small = _synthetic_artifact(tmp_path / "small", 1_000, dim)
    big = _synthetic_artifact(tmp_path / "big", rows, dim)
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(small), str(big)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    grown = json.loads(done.stdout.strip().splitlines()[-1])["grown"]
    fp32_table = rows * dim * 4
    print(f"RSS grew by {grown / 2**20:.0f} MiB; the fp32 table would take {fp32_table / 2**20:.0f} MiB")
    assert grown < fp32_table


def test_lmrec_eval_of_an_artifact_prints_the_training_metrics(trained_run, artifacts):
    _, run = trained_run
    trained = json.loads((run / "metrics.json").read_text())["test"]["model"]
    done = run_cli("eval", artifacts["fp32"])
    printed = dict(line.split() for line in done.stdout.splitlines()[1:] if line.strip())
    assert float(printed["NDCG@10"]) == pytest.approx(trained["NDCG@10"], abs=1e-4)
    assert int(printed["users"]) == trained["users"]


def test_export_from_a_training_checkpoint_streams_its_table_unchanged(trained_run, tmp_path):
    from safetensors.numpy import load_file

    from serve.tensorfile import map_tensors
    from train.checkpoint import read_table_rows, resolve

    _, run = trained_run
    checkpoint, meta = resolve("auto", run / "checkpoints")
    out = tmp_path / "from-checkpoint"
    done = run_cli("export", run / "checkpoints", "--out", out, "--quant", "fp32", "--no-eval")
    assert f"exported {run / 'checkpoints'}" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"checkpoint": str(checkpoint), "step": meta["progress"]["step"]}
    np.testing.assert_array_equal(map_tensors(out / "items.safetensors")["items"], read_table_rows(checkpoint))
    dense = load_file(str(checkpoint / "dense.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert {f"weight/{k}" for k in exported} <= set(dense)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, dense[f"weight/{name}"])
