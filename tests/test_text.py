"""Item text: encoder vectors and tokens, the token table sharded by TorchRec, the cold-item
protocol, text-aware export and serving, items added from text alone, and --init-from."""

import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import ROOT, free_port, run_cli, torchrun_train
from tests.test_http import Server

pytestmark = pytest.mark.multiprocess

TEXT_PARTS = ("model.item_text=true", "model.item_text_tokens=true")
TEXT_RUN = (*TEXT_PARTS, "schedule.epochs=3", "checkpoint.keep=10")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny text-aware model trained on 2 ranks, with 10 % of the items held out."""
    root = tmp_path_factory.mktemp("text")
    shards, run = root / "shards", root / "run"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 300, "--num-items", 120, "--events-per-user", 15,
        "--item-text", "--hold-out-items", 0.1, "--out", shards, "--quiet",
    )  # fmt: skip
    metrics, _ = torchrun_train(run, shards, *TEXT_RUN)
    return shards, run, metrics


def test_text_vectors_are_deterministic_and_cached(tmp_path):
    from data.text import HashedTokenizer, SentenceEncoder, TextVectorCache, build_text_features

    texts = ["Toy Story (1995). Animation, Children's, Comedy", "Heat (1995). Action, Crime, Thriller", ""]
    encoder, tokenizer = SentenceEncoder(), HashedTokenizer(buckets=1000)
    cache = TextVectorCache(tmp_path / "cache")
    first, encoded = build_text_features(texts, tokenizer, encoder, cache)
    assert encoded == 2
    again, encoded = build_text_features(texts, tokenizer, encoder, cache)
    assert encoded == 0, "every vector came from the cache"
    np.testing.assert_array_equal(first.vectors, again.vectors)
    np.testing.assert_allclose(np.linalg.norm(first.vectors[:2], axis=1), 1.0, rtol=1e-5)
    assert not first.vectors[2].any(), "no text, no vector"
    # Fresh encodings (no cache) are the cached ones, and a changed text is encoded alone.
    fresh, encoded = build_text_features(texts[:2], tokenizer, encoder, TextVectorCache(tmp_path / "other"))
    np.testing.assert_allclose(fresh.vectors, first.vectors[:2], atol=1e-6)
    _, encoded = build_text_features([texts[0], "Heat (1995). Drama"], tokenizer, encoder, cache)
    assert encoded == 1
    # Similar texts are close, unrelated ones less so: the encoder is real.
    vectors = encoder.encode(
        ["Star Wars (1977). Sci-Fi", "Star Wars: Return of the Jedi (1983). Sci-Fi", "Babe (1995). Comedy"]
    )
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1
    # Tokens are the same in another interpreter (no salted str hash).
    code = "from data.text import HashedTokenizer; print(HashedTokenizer(buckets=1000).encode_many(['Toy Story (1995)'])[1].tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert other.stdout.strip() == str(tokenizer.encode_many(["Toy Story (1995)"])[1].tolist())


def _token_worker(rank: int, world: int, port: int, batches, out) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from model.items import ID_TABLE, TOKEN_TABLE, TableSpec
    from train.distributed import compute_cleanup, compute_init
    from train.embeddings import ItemEmbeddings

    env = compute_init(seed=0)
    specs = [TableSpec(ID_TABLE, 50, 8), TableSpec(TOKEN_TABLE, 40, 8, pooled=True)]
    tables = ItemEmbeddings(specs, env, "row_wise", "sgd", 0.5, seed=3)
    mine = batches if world == 1 else batches[rank : rank + 1]
    tokens = torch.cat([b[0] for b in mine])
    lengths = torch.cat([b[1] for b in mine])
    pooled = tables.pool(TOKEN_TABLE, tokens, lengths)
    before = tables.full(TOKEN_TABLE).clone()
    # The same per-bag loss weights as the one process gives these bags, times the world size:
    # TorchRec divides sharded tables' gradients by it (the trainer's loss is scaled the same way).
    weights = torch.arange(8 * 8, dtype=torch.float32).reshape(8, 8).sin()
    weights = weights if world == 1 else weights[4 * rank : 4 * rank + 4] * world
    pooled.backward(weights)  # the fused SGD updates the shards inside backward
    torch.save({"pooled": pooled.detach(), "before": before, "after": tables.full(TOKEN_TABLE)}, f"{out}/rank{rank}.pt")
    compute_cleanup()


def test_token_table_sharded_over_two_ranks_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    from model.items import TOKEN_TABLE, PlainItemTables

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        lengths = torch.tensor([3, 0, 5, 1])  # an item without tokens included
        batches.append((torch.randint(0, 40, (int(lengths.sum()),), generator=g), lengths))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    mp.spawn(_token_worker, args=(1, free_port(), batches, str(tmp_path / "one")), nprocs=1)
    mp.spawn(_token_worker, args=(2, free_port(), batches, str(tmp_path / "two")), nprocs=2)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(two[0]["before"], one["before"], rtol=0, atol=0)  # seeded init, whatever the sharding
    torch.testing.assert_close(torch.cat([t["pooled"] for t in two]), one["pooled"])
    # The pooled rows are the mean of the table's rows: what serving computes without TorchRec.
    tokens, lengths = batches[0]
    plain = PlainItemTables({TOKEN_TABLE: one["before"]})
    torch.testing.assert_close(two[0]["pooled"], plain.pool(TOKEN_TABLE, tokens, lengths))
    assert not torch.equal(one["after"], one["before"])
    for rank in range(2):
        torch.testing.assert_close(two[rank]["after"], one["after"])


def test_held_out_items_appear_only_as_test_targets(text_run):
    from data.loader import shard_samples
    from data.shards import load_manifest
    from data.tar import load_npy

    shards, _, metrics = text_run
    items = pl.read_parquet(shards / "items.parquet")
    held = set(items.filter("held_out")["index"].to_list())
    assert len(held) == 12 and (items.filter("held_out")["count"] == 0).all()
    manifest = load_manifest(shards)
    assert manifest["held_out_items"] == {"fraction": 0.1, "items": 12}
    test_targets = []
    for entry in manifest["shards"]:
        for sample in shard_samples(shards, entry):
            train, valid, test = (load_npy(sample[f"{s}.npy"])["item"] for s in ("train", "valid", "test"))
            seen = set(train.tolist()) | set(valid.tolist()) | set(test[1:].tolist())
            assert not held & seen, "a held-out item in training, validation or a test history"
            test_targets += test[:1].tolist()
    cold = sum(t in held for t in test_targets)
    assert cold > 0
    assert metrics["test"]["cold"]["users"] == cold
    assert metrics["test"]["cold"]["users"] + metrics["test"]["warm"]["users"] == metrics["test"]["model"]["users"]


def test_text_aware_export_from_checkpoint_equals_the_training_model(text_run, tmp_path):
    from safetensors.torch import load_file

    from serve.tensorfile import map_tensors

    _, run, metrics = text_run
    best = load_file(str(run / "best" / "items.safetensors"))
    assert set(best) == {"items", "text_tokens"}
    best_step = max(metrics["history"], key=lambda h: h["valid"]["model"]["NDCG@10"])["step"]
    checkpoint = run / "checkpoints" / f"step_{best_step:09d}"
    run_cli("export", checkpoint, "--out", tmp_path / "art", "--quant", "fp32", "--no-eval")
    # The checkpoint's ID rows, projection and token table composed in one process give the
    # table the 2-rank training scored with.
    np.testing.assert_allclose(map_tensors(tmp_path / "art" / "items.safetensors")["items"], best["items"], atol=1e-5)
    done = run_cli("eval", tmp_path / "art")
    printed = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("HR@", "NDCG@")))
    assert float(printed["NDCG@10"]) == pytest.approx(metrics["test"]["model"]["NDCG@10"], abs=1e-4)
    assert f"cold targets ({metrics['test']['cold']['users']} users)" in done.stdout


def test_text_aware_run_resumes_bit_identically(text_run, tmp_path):
    """The token table and its optimizer state are in the checkpoint: resuming after epoch 1
    reproduces the uninterrupted run's every later loss."""
    import shutil

    shards, run, metrics = text_run
    first = metrics["history"][0]["step"]
    name = f"step_{first:09d}"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / name, tmp_path / "run" / "checkpoints" / name)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(name + "\n")
    resumed, log = torchrun_train(tmp_path / "run", shards, *TEXT_RUN, train_args=["--resume", "auto"])
    assert f"at step {first} " in log
    assert resumed["losses"] == metrics["losses"][first:]  # the resumed run logs the steps after the checkpoint
    assert resumed["test"]["model"] == metrics["test"]["model"]


def test_served_artifact_recommends_an_item_added_from_text(text_run, tmp_path):
    import httpx
    from safetensors.torch import load_file

    from data.text import HashedTokenizer, build_text_features
    from model.items import ID_TABLE, TOKEN_TABLE, ItemCatalog, PlainItemTables
    from serve.recommender import Recommender
    from train.saved_model import load_source

    shards, run, _ = text_run
    art, grown = tmp_path / "art", tmp_path / "grown"
    run_cli("export", run / "best", "--out", art, "--quant", "int8", "--index", "hnsw:m=8")
    items = pl.read_parquet(shards / "items.parquet").filter(pl.col("count") > 0)
    genre = items.group_by("genres").agg(pl.col("count").sum()).sort("count", descending=True)["genres"][0]
    history = items.filter(pl.col("genres") == genre).sort("count", descending=True)["raw_id"].head(5).to_list()
    new = tmp_path / "new.csv"
    new.write_text(f"item,title,genres\n90001,premium {genre} 90001,{genre}\n90002,,\n")
    bad = run_cli("export", art, "--add-items", new, "--out", grown, check=False)
    assert bad.returncode == 2 and "row 2 (item 90002) has no text" in bad.stderr and "Traceback" not in bad.stderr
    new.write_text(f"item,title,genres\n90001,premium {genre} 90001,{genre}\n")
    run_cli("export", art, "--add-items", new, "--out", grown)
    again = run_cli("export", grown, "--add-items", new, "--out", tmp_path / "twice", check=False)
    assert again.returncode == 2 and "already in" in again.stderr

    rec, old = Recommender.load(grown), Recommender.load(art)
    assert rec.items.rows == old.items.rows + 1
    n = old.items.rows
    # The artifact's item index holds the new item too: its own vector finds it.
    assert rec.index is not None and rec.index.index.ntotal == old.index.index.ntotal + 1 == n - 1
    assert rec.config["index"]["rows"] == n + 1
    own = rec.items._query(rec.items.lookup(torch.tensor([n])))
    assert n in rec.index.candidates(own, 1, [np.zeros(0, dtype=np.int64)])[0]
    np.testing.assert_array_equal(rec.items.dequantize(0, n).numpy(), old.items.dequantize(0, n).numpy())
    # The new row is what training composes for an item with this text and no training events.
    saved = load_source(run / "best")
    model = saved.model()
    features, _ = build_text_features(
        [f"premium {genre} 90001. {genre}"], HashedTokenizer.from_dict(saved.config.text["tokenizer"])
    )
    catalog = ItemCatalog(
        torch.zeros(1, dtype=torch.float64),
        torch.from_numpy(features.vectors),
        torch.from_numpy(features.token_offsets),
        torch.from_numpy(features.token_ids),
    )
    tokens = load_file(str(run / "best" / "items.safetensors"))["text_tokens"]
    tables = PlainItemTables({ID_TABLE: torch.zeros(1, model.cfg.hidden_size), TOKEN_TABLE: tokens})
    with torch.no_grad():
        expected = model.item_encoder(torch.arange(1), tables, catalog)
    np.testing.assert_allclose(rec.items.dequantize(n, n + 1).numpy(), expected.numpy(), atol=0.05)

    server = Server(grown, tmp_path)
    try:
        answer = httpx.post(f"{server.url}/v1/recommend", json={"history": history, "k": 10}, timeout=30).json()
    finally:
        assert server.stop() == 0
    assert 90001 in answer["items"], answer


def test_init_from_carries_the_backbone_and_refuses_a_mismatch(text_run, tmp_path):
    from safetensors.torch import load_file

    shards, run, _ = text_run
    other = tmp_path / "other"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 120, "--num-items", 60, "--synthetic-seed", 5,
        "--events-per-user", 12, "--item-text", "--out", other, "--quiet",
    )  # fmt: skip
    base = ["--config", "configs/debug.yaml", "--set", f"data.shards={other}", "--set", "model.item_text=true"]
    base += ["--set", "model.item_text_tokens=true", "--set", "model.action_head=true", "--set", "schedule.epochs=1"]
    base += ["--set", "loss.auxiliary.action=0.5"]
    bad = run_cli("train", *base, "--set", "model.hidden_size=32", "--init-from", run / "best", check=False)
    assert bad.returncode == 2, bad.stderr
    assert "model.hidden_size: 16 in the source, 32 here" in bad.stderr and "Traceback" not in bad.stderr
    # A dense learning rate too small to move a weight, so that the tuned model shows what was copied.
    still = ["--set", "schedule.max_steps=2", "--set", "optim.lr=1e-12"]
    done = run_cli("train", *base, *still, "--set", f"output.dir={tmp_path / 'tuned'}", "--init-from", run / "best")
    assert f"initialised from {run / 'best'}" in done.stdout
    assert "item ID rows start at zero" in done.stdout
    source = load_file(str(run / "best" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "tuned" / "best" / "model.safetensors"))
    assert any(name.startswith("item_encoder.text_projection") for name in source)
    for name, value in source.items():  # backbone, input norm, text projection, action and gap tables
        torch.testing.assert_close(tuned[name], value, rtol=0, atol=1e-6, msg=name)
    heads = [name for name in tuned if name.startswith("action_head.")]
    assert heads and not any(name in source for name in heads), "the new task head starts fresh"
    tokens = load_file(str(run / "best" / "items.safetensors"))["text_tokens"]
    # The token table is sparse (its own optimizer): carried over, then moved by two steps only.
    tuned_tokens = load_file(str(tmp_path / "tuned" / "best" / "items.safetensors"))["text_tokens"]
    assert (tuned_tokens - tokens).abs().mean() < 0.1 * tokens.abs().mean()
    # An int8 serving artifact works as a source too (its weights dequantized).
    run_cli("export", run / "best", "--out", tmp_path / "art", "--no-eval")
    done = run_cli("train", *base, "--set", f"output.dir={tmp_path / 'from-art'}", "--set", "schedule.max_steps=2",
                   "--init-from", tmp_path / "art")  # fmt: skip
    assert f"initialised from {tmp_path / 'art'}" in done.stdout


def test_text_options_are_checked_in_one_line(tmp_path):
    events = tmp_path / "events.csv"
    events.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{u * 10 + i}\n" for u in range(5) for i in range(4))
    )
    no_text = run_cli("data", "prepare", "--source", "events", "--input", events, "--out", tmp_path / "a", "--item-text", "--quiet", check=False)  # fmt: skip
    assert no_text.returncode == 2 and "--item-text: this source has no item text" in no_text.stderr
    assert not (tmp_path / "a").exists(), "nothing half-written"
    temporal = run_cli(
        "data", "prepare", "--source", "events", "--input", events, "--out", tmp_path / "b", "--split", "temporal",
        "--valid-start", "q0.8", "--test-start", "q0.9", "--hold-out-items", 0.1, check=False,
    )  # fmt: skip
    assert temporal.returncode == 2 and "--hold-out-items needs --split leave_one_out" in temporal.stderr
    plain = tmp_path / "plain"
    run_cli("data", "prepare", "--source", "events", "--input", events, "--out", plain, "--quiet")
    untexted = run_cli("train", "--config", "configs/debug.yaml", "--set", f"data.shards={plain}", "--set", "model.item_text=true", check=False)  # fmt: skip
    assert untexted.returncode == 2 and "was prepared without --item-text" in untexted.stderr
