"""The daily retrain: day 2's events prepared against day 1's vocabulary (--vocab-from), and
training continued from day 1's model (--init-from) with the item table grown; the transfer case
for another catalog; the refusal of vocabularies that conflict."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import ROOT, free_port, run_cli, torchrun_train

CONFIG = ROOT / "configs" / "debug.yaml"
MOMENTUM = "item_table.momentum1"  # row-wise Adagrad's per-row accumulator, TorchRec's name


def _prepare(csv, out, *extra):
    run_cli(
        "data", "prepare", "--source", "events", "--input", csv, "--user-col", "user", "--item-col", "item",
        "--time-col", "ts", "--out", out, "--quiet", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Day 1: a timestamped log's events before its 60 % time quantile, prepared and trained on 2
    ranks through the CLI. Day 2: the whole log (day 1's events and the new ones), prepared with
    --vocab-from day 1. Popularity drifts, so day 2 brings items day 1 never saw."""
    from data.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("retrain")
    events = generate(SyntheticSpec(users=300, items=150, events_per_user=12, text=False, drift=1.0)).events
    cut = events["ts"].quantile(0.6)
    events.filter(pl.col("ts") < cut).write_csv(root / "day1.csv")
    events.write_csv(root / "day2.csv")
    _prepare(root / "day1.csv", root / "shards1")
    _prepare(root / "day2.csv", root / "shards2", "--vocab-from", root / "shards1")
    torchrun_train(root / "run1", root / "shards1", "schedule.epochs=1")
    return root


def _day2_worker(rank: int, port: int, cases: list, results) -> None:
    """Builds the Trainer of each case as `lmrec train --init-from` does (train.train.setup, then
    Trainer), records what it starts from before any step, and trains the cases marked so."""
    import os

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    from model.items import ID_TABLE
    from train.distributed import compute_cleanup, compute_init
    from train.train import setup
    from train.trainer import Trainer

    # As in train.train.main: every source is opened and checked before the process group exists.
    built = [
        setup(str(CONFIG), [f"data.shards={shards}", f"output.dir={out}", "data.num_workers=0", "schedule.epochs=1"],
              str(source))
        for _, shards, out, source, _ in cases
    ]  # fmt: skip
    env = compute_init(seed=0)
    for (name, *_, train), (cfg, pretrained) in zip(cases, built):
        trainer = Trainer(cfg, env, pretrained)
        momentum = trainer.tables.optimizer_state(ID_TABLE)[MOMENTUM]
        record = {
            "known": None if pretrained.lineage is None else pretrained.lineage.known,
            "why": pretrained.why,
            "rows": trainer.tables.full(ID_TABLE).numpy().copy(),
            "momentum": [(s.metadata.shard_offsets[0], s.tensor.numpy().copy()) for s in momentum.local_shards()],
            "step": trainer.state.step,
            "lr": trainer.engine.get_lr()[0],
            "warmup_lr": cfg.optim.lr / cfg.optim.warmup_steps,
        }
        if train:
            summary = trainer.train()
            record["trained"] = {"steps": summary["steps"], "evaluated_at": [h["step"] for h in summary["history"]]}
        results[(rank, name)] = record
        del trainer
    compute_cleanup()


def _momentum(results, name: str, rows: int) -> np.ndarray:
    """The ID table's optimizer state as both ranks hold it (row-wise: two row ranges)."""
    full = np.full(rows, np.nan, dtype=np.float32)
    for rank in (0, 1):
        for offset, values in results[(rank, name)]["momentum"]:
            full[offset : offset + len(values)] = values
    assert not np.isnan(full).any()
    return full


@pytest.mark.multiprocess
def test_day_two_continues_day_one_with_the_item_table_grown(days, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from train.checkpoint import optimizer_key, read_table_rows
    from train.embeddings import initial_rows

    checkpoint = days / "run1" / "checkpoints" / (days / "run1" / "checkpoints" / "latest").read_text().strip()
    other = tmp_path / "other"  # another catalog: same kind of data, another generator seed, no --vocab-from
    run_cli("data", "prepare", "--source", "synthetic", "--users", 100, "--num-items", 90, "--synthetic-seed", 3,
            "--events-per-user", 10, "--out", other, "--quiet")  # fmt: skip
    cases = [
        ("saved", days / "shards2", tmp_path / "saved", days / "run1" / "best", False),
        ("other", other, tmp_path / "other-run", checkpoint, False),
        ("checkpoint", days / "shards2", tmp_path / "run2", days / "run1" / "checkpoints", True),
    ]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_day2_worker, args=(free_port(), cases, results), nprocs=2)
        results = dict(results)

    known = json.loads((days / "shards1" / "manifest.json").read_text())["vocab"]["items"]
    grown = json.loads((days / "shards2" / "manifest.json").read_text())["vocab"]["items"]
    assert grown > known, "day 2 brings new items"
    day1_rows = read_table_rows(checkpoint).numpy()
    day1_momentum = read_table_rows(checkpoint, optimizer_key("item_table", MOMENTUM)).numpy()
    assert (day1_momentum[2:] > 0).mean() > 0.5, "day 1 trained most rows"
    fresh = initial_rows(0, 0, day1_rows.shape[1])  # the ID table's initialiser (seed 0, first row block)

    # From day 1's checkpoint: known rows and their optimizer state exactly as day 1 left them;
    # new rows as a fresh run starts them (initialiser, no accumulated state).
    run = results[(0, "checkpoint")]
    assert run["known"] == known and run["why"].startswith("continuing")
    assert results[(1, "checkpoint")]["rows"].shape == (grown, day1_rows.shape[1])
    np.testing.assert_array_equal(run["rows"][:known], day1_rows)
    np.testing.assert_array_equal(run["rows"][known:], fresh[known:grown].numpy())
    momentum = _momentum(results, "checkpoint", grown)
    np.testing.assert_array_equal(momentum[:known], day1_momentum)
    assert (momentum[known:] == 0).all()
    # The schedule restarted: step 0, the first warm-up learning rate; then day 2 trained a whole epoch.
    assert run["step"] == 0 and run["lr"] == pytest.approx(run["warmup_lr"])
    assert run["trained"]["steps"] > 0 and run["trained"]["evaluated_at"] == [run["trained"]["steps"]]
    losses = [json.loads(line)["step"] for line in (tmp_path / "run2" / "losses.jsonl").read_text().splitlines()]
    assert losses[0] == 1

    # From day 1's saved model: the same rows, no optimizer state to carry.
    saved = results[(0, "saved")]
    assert saved["known"] == known
    np.testing.assert_array_equal(
        saved["rows"][:known], load_file(str(days / "run1" / "best" / "items.safetensors"))["items"]
    )
    assert (_momentum(results, "saved", grown) == 0).all()

    # Another catalog: the transfer path, ID rows from the initialiser.
    other_run = results[(0, "other")]
    assert other_run["known"] is None and other_run["why"].startswith("another catalog"), other_run["why"]
    np.testing.assert_array_equal(other_run["rows"], fresh[: len(other_run["rows"])].numpy())

    # Day 2's model exports and serves its test users.
    done = run_cli("export", tmp_path / "run2" / "best", "--out", tmp_path / "artifact")
    assert (tmp_path / "artifact" / "manifest.json").exists(), done.stdout


@pytest.mark.multiprocess
def test_conflicting_vocabularies_stop_with_one_line(days, tmp_path):
    """Day 2 prepared with --vocab-from the shards day 1's model records, which were then prepared
    again with another seed: same index, another raw ID. Training refuses before any process."""
    shards1, shards2 = tmp_path / "shards1", tmp_path / "shards2"
    _prepare(days / "day1.csv", shards1)
    _prepare(days / "day2.csv", shards2, "--vocab-from", shards1)
    _prepare(days / "day1.csv", shards1, "--seed", 7, "--overwrite")
    model = tmp_path / "model"
    shutil.copytree(days / "run1" / "best", model)
    training = json.loads((model / "training.json").read_text())
    training["config"]["data"]["shards"] = str(shards1)  # the model was trained on shards1's first version
    (model / "training.json").write_text(json.dumps(training))
    done = run_cli("train", "--config", CONFIG, "--set", f"data.shards={shards2}", "--init-from", model, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "the item vocabularies conflict" in done.stderr
    assert "raw_id" in done.stderr and str(shards1 / "items.parquet") in done.stderr
    assert str(shards2 / "items.parquet") in done.stderr


def test_id_rows_are_recovered_from_a_text_aware_saved_models_vectors():
    """A saved model stores composed vectors (ID row + projected text + pooled tokens); continuing
    a text-aware model from one takes the text parts away again."""
    from model.config import ModelConfig, RecommenderConfig
    from model.items import ID_TABLE, TOKEN_TABLE, ItemCatalog, ItemEncoder, PlainItemTables
    from train.pretrained import id_rows_of_vectors
    from train.saved_model import SAVED_MODEL, TrainedModel

    torch.manual_seed(0)
    items, width, text_dim, buckets = 12, 8, 6, 20
    model = ModelConfig(hidden_size=width, num_heads=2, item_text=True, item_text_tokens=True)
    text = {"encoder": {"dim": text_dim}, "tokenizer": {"buckets": buckets}}
    config = RecommenderConfig.build(model, {"items": items, "actions": 0, "gaps": 0, "text_dim": text_dim}, text)
    encoder = ItemEncoder(config.architecture, text_dim).eval()
    counts = torch.tensor([0, 0] + [3] * (items - 3) + [0])  # the last item had no training events
    lengths = torch.randint(1, 4, (items,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    catalog = ItemCatalog(counts, torch.randn(items, text_dim), offsets, torch.randint(0, buckets, (int(offsets[-1]),)))
    id_rows, tokens = torch.randn(items, width), torch.randn(buckets, width)
    with torch.no_grad():
        vectors = encoder(torch.arange(items), PlainItemTables({ID_TABLE: id_rows, TOKEN_TABLE: tokens}), catalog)
    dense = {f"item_encoder.{k}": v for k, v in encoder.state_dict().items()}
    trained = TrainedModel(None, SAVED_MODEL, config, {}, dense, tokens, lambda a, b: vectors[a:b])
    recovered = id_rows_of_vectors(trained, catalog)(0, items)
    torch.testing.assert_close(recovered[2:-1], id_rows[2:-1], rtol=0, atol=1e-5)
    assert recovered[-1].abs().max() < 1e-5, "an item without training events was composed without its ID row"
