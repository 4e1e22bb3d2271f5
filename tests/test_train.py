"""The real training path: TorchRec sharded item table + DeepSpeed engine in 2 gloo processes
under torchrun, on tiny synthetic shards."""

import json
import os

import numpy as np
import pytest

from tests.conftest import ROOT, free_port, run_cli, torchrun_train

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny"
    run_cli(
        "data",
        "prepare",
        "--source",
        "synthetic",
        "--users",
        200,
        "--num-items",
        80,
        "--events-per-user",
        12,
        "--out",
        out,
        "--quiet",
    )
    return out


def test_zero_stages_give_the_same_losses_and_bf16_runs(tmp_path, tiny):
    steps = ["schedule.max_steps=6", "schedule.epochs=1", "data.num_workers=1"]
    losses = {}
    for stage in (0, 1, 2, 3):
        summary, _ = torchrun_train(tmp_path / f"z{stage}", tiny, f"parallel.zero_stage={stage}", *steps)
        losses[stage] = summary["losses"]
        assert len(losses[stage]) == 6
    for stage in (1, 2, 3):
        np.testing.assert_allclose(losses[stage], losses[0], rtol=2e-3, atol=2e-4)
    assert losses[0][-1] < losses[0][0]
    summary, _ = torchrun_train(tmp_path / "bf16", tiny, "parallel.zero_stage=2", "parallel.precision=bf16", *steps)
    assert np.isfinite(summary["losses"]).all()


def test_sharded_training_matches_a_single_process_reference(tmp_path, tiny):
    # Same global batches: one process reads samples 0..31, two ranks read the even and the odd
    # ones 16 at a time; the loss is a global per-token mean either way. (Length buckets would
    # sort each rank's samples apart: batch composition is tested in test_batching.)
    common = ["schedule.max_steps=5", "schedule.epochs=1", "data.num_workers=1", "data.shuffle=false",
              "data.length_buckets=false"]  # fmt: skip
    single, _ = torchrun_train(tmp_path / "one", tiny, "data.batch_size=32", *common, nproc=1)
    for sharding in ("row_wise", "table_wise"):
        sharded, _ = torchrun_train(
            tmp_path / sharding, tiny, "data.batch_size=16", f"parallel.sharding={sharding}", *common
        )
        np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-4)


def test_short_run_on_default_synthetic_data_beats_popularity_twice(tmp_path):
    shards = tmp_path / "synthetic"
    run_cli("data", "prepare", "--source", "synthetic", "--out", shards, "--quiet")  # the documented defaults
    summary, stdout = torchrun_train(
        tmp_path / "run", shards, "model.hidden_size=32", "model.max_len=50", "data.batch_size=64",
        "data.eval_batch_size=512", "schedule.epochs=2", "schedule.log_every=100", "eval.bootstrap_samples=200",
    )  # fmt: skip
    test = summary["test"]
    model, popularity = test["model"]["NDCG@10"], test["popularity"]["NDCG@10"]
    print(f"test NDCG@10: model {model:.4f}, popularity {popularity:.4f}")
    assert test["model"]["users"] == 10_000
    assert model >= 2 * popularity, stdout


@pytest.mark.parametrize("objective", ["sampled", "in_batch", "bce", "full_sharded"])
def test_every_next_item_objective_trains_on_two_ranks(tmp_path, tiny, objective):
    summary, stdout = torchrun_train(
        tmp_path / objective, tiny, f"loss.main={objective}", "loss.num_negatives=32", "schedule.epochs=1",
        "schedule.log_every=1",
    )  # fmt: skip
    assert len(summary["losses"]) == summary["steps"] and np.isfinite(summary["losses"]).all()
    assert np.mean(summary["losses"][-3:]) < np.mean(summary["losses"][:3]), stdout
    assert summary["config"]["loss"]["main"] == objective


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_is_a_valid_config(recipe):
    from train.config import load_config

    cfg = load_config(ROOT / "configs" / recipe, ["data.shards=shards"])
    assert cfg.model.action_head == ("action" in cfg.loss.auxiliary)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.backbone=nope", "unknown transformers model type 'nope'"),
        ("model.nope=1", "unknown config field model.nope"),
        ("optim.grad_accumulation=2", "optim.grad_accumulation must be 1"),
        ("parallel.zero_stage=4", "parallel.zero_stage must be 0, 1, 2 or 3"),
        ("parallel.precision=bf16", "needs zero_stage >= 1"),
        ("data.batch_size=x", "data.batch_size: input should be a valid integer"),
        ("eval.ks=[1,x]", "eval.ks.1: input should be a valid integer"),
        ("model.loss=sampled", "unknown config field model.loss; it is loss.main now"),
        ("loss.main=hinge", "loss.main must be a next-item objective"),
        ("loss.normaliser=tokens", "loss.normaliser must be one of ('step', 'running'), got 'tokens'"),
        ("model.action_head=true", "model.action_head and the 'action' objective go together"),
    ],
)
def test_bad_config_is_one_clear_line(tiny, override, message):
    extra = ["--set", "parallel.zero_stage=0"] if "bf16" in override else []
    done = run_cli(
        "train",
        "--config",
        "configs/debug.yaml",
        "--set",
        f"data.shards={tiny}",
        *extra,
        "--set",
        override,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr


def test_shards_without_a_split_are_refused_before_training(tmp_path):
    shards = tmp_path / "short"
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n1,1,1\n1,2,2\n2,1,1\n")  # nobody has 3 events: no test split
    run_cli("data", "prepare", "--source", "events", "--input", csv, "--out", shards, "--quiet")
    done = run_cli("train", "--config", "configs/debug.yaml", "--set", f"data.shards={shards}", check=False)
    assert done.returncode == 2 and "the valid split is empty" in done.stderr


def test_saved_model_evaluated_in_one_process_matches_the_two_rank_test_metrics(tmp_path, tiny):
    from train.evaluate import evaluate_source

    summary, _ = torchrun_train(tmp_path / "run", tiny, "schedule.epochs=2", "parallel.zero_stage=3")
    single = evaluate_source(tmp_path / "run" / "best", "test")
    distributed = summary["test"]["model"]
    assert single["model"]["users"] == distributed["users"] == 200
    for key, value in distributed.items():
        assert abs(single["model"][key] - value) < 1e-3, key
    done = run_cli("eval", tmp_path / "run" / "best")
    assert "NDCG@10" in done.stdout and "test users 200" in done.stdout
    # The saved model is transformers' save_pretrained output: AutoModel reads it as it is.
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path / "run" / "best")
    items = json.loads((tiny / "manifest.json").read_text())["vocab"]["items"]
    assert type(loaded).__name__ == "SequenceRecommender" and loaded.config.num_items == items
    for name, value in load_file(str(tmp_path / "run" / "best" / "model.safetensors")).items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_fp16_tables_train_resume_exactly_and_stay_fp16_with_a_sampled_blocked_evaluation(tmp_path, tiny):
    import torch
    from safetensors import safe_open

    from tests.conftest import run_losses
    from train.checkpoint import read_table_rows
    from train.evaluate import evaluate_source, in_user_sample

    # Blocks of 7 rows: the catalog is swept in rounds of 14 rows shared by the 2 ranks.
    common = ["parallel.table_dtype=fp16", "eval.user_fraction=0.5", "eval.score_block_rows=7",
              "schedule.epochs=2", "schedule.log_every=1", "checkpoint.every_steps=4", "data.num_workers=1"]  # fmt: skip
    summary, _ = torchrun_train(tmp_path / "run", tiny, *common, "checkpoint.keep=10")
    sampled = int(in_user_sample(torch.arange(200), 0.5).sum())
    assert 70 < sampled < 130 and summary["test"]["model"]["users"] == sampled

    checkpoint = tmp_path / "run" / "checkpoints" / "step_000000004"
    rows = read_table_rows(checkpoint)
    items = json.loads((tiny / "manifest.json").read_text())["vocab"]["items"]
    assert rows.dtype == torch.float16 and rows.shape == (items, 16)
    # The fused optimizer changed the fp16 rows: they are not the initial N(0, 0.02) draw cast.
    assert not torch.equal(rows, read_table_rows(tmp_path / "run" / "checkpoints" / "step_000000008"))

    # Resumed from step 4 in another directory, training goes on exactly as it did.
    torchrun_train(tmp_path / "resumed", tiny, *common, train_args=["--resume", str(checkpoint)])
    theirs, ours = run_losses(tmp_path / "run"), run_losses(tmp_path / "resumed")
    assert sorted(ours) == [step for step in sorted(theirs) if step > 4]
    assert all(ours[step] == theirs[step] for step in ours)

    # fp16 through consolidation and the saved best model; both evaluate like the run.
    consolidated = tmp_path / "consolidated"
    run_cli("checkpoint", "consolidate", checkpoint, "--out", consolidated)
    for model in (consolidated, tmp_path / "run" / "best"):
        with safe_open(str(model / "items.safetensors"), "pt") as f:
            assert f.get_slice("items").get_dtype() == "F16", model
    with safe_open(str(consolidated / "items.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("items"), rows)
    single = evaluate_source(tmp_path / "run" / "best", "test")
    assert single["model"]["users"] == sampled
    for key, value in summary["test"]["model"].items():
        assert abs(single["model"][key] - value) < 1e-3, key


def _ownership_worker(rank: int, port: int, shards: str, out: str, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    from data.loader import iterate_epoch
    from model.items import ID_TABLE
    from train.config import load_config
    from train.distributed import compute_cleanup, compute_init
    from train.trainer import Trainer

    cfg = load_config(
        ROOT / "configs" / "debug.yaml", [f"data.shards={shards}", f"output.dir={out}", "data.num_workers=0"]
    )
    env = compute_init(seed=0)
    trainer = Trainer(cfg, env)
    trainer.check_parameter_ownership()
    before = [(s.metadata.shard_offsets, s.tensor.clone()) for s in trainer.tables._shards(ID_TABLE)]
    batch = next(iter(iterate_epoch(trainer.train_data, trainer.train_loader, epoch=0)))
    trainer.train_step(batch)
    after = [(s.metadata.shard_offsets, s.tensor.clone()) for s in trainer.tables._shards(ID_TABLE)]
    full = trainer.tables.full(ID_TABLE)
    compute_cleanup()
    (row0, _), shard = after[0]
    results[rank] = {
        "rows": (row0, len(shard)),
        "changed": not torch.equal(before[0][1], shard),
        "matches_full_table": torch.equal(full[row0 : row0 + len(shard)], shard),
    }


def test_each_rank_owns_its_shard_and_deepspeed_holds_none(tmp_path, tiny):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ownership_worker, args=(free_port(), str(tiny), str(tmp_path / "o"), results), nprocs=2)
        results = dict(results)
    (lo0, n0), (lo1, n1) = results[0]["rows"], results[1]["rows"]
    assert lo0 + n0 == lo1 and n0 > 0 and n1 > 0  # row-wise: disjoint, adjacent row ranges
    for rank in (0, 1):
        assert results[rank]["changed"], "the fused optimizer updated this rank's rows"
        assert results[rank]["matches_full_table"], "no rank's rows were overwritten by another's"


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce_scatter", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce")  # fmt: skip
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
LMREC = tuple(str(ROOT / package) + os.sep for package in ("train", "model", "data", "metrics", "serve", "launch"))


def _sync_worker(rank: int, port: int, shards: str, out: str, results) -> None:
    """Trains one epoch with every lmrec call of a collective or a device-to-host read recorded,
    step by step, beside the policy's decision for that step."""
    import sys

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    import torch
    import torch.distributed as dist

    from train.config import load_config
    from train.distributed import compute_cleanup, compute_init
    from train.trainer import Trainer

    events = []

    def recording(kind, original):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(LMREC):
                events.append(kind)
            return original(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, recording("collective", getattr(dist, name)))
    for name in HOST_READS:
        setattr(torch.Tensor, name, recording("host read", getattr(torch.Tensor, name)))
    overrides = [f"data.shards={shards}", f"output.dir={out}", "data.num_workers=0", "schedule.epochs=1"]
    cfg = load_config(ROOT / "configs" / "debug.yaml", [*overrides, "schedule.log_every=4"])
    env = compute_init(seed=0)
    trainer = Trainer(cfg, env)
    steps, decide, train_step = [], trainer.policy.after_step, trainer.train_step

    def marked_step(batch):
        events.append("step")
        train_step(batch)

    def marked_decision(state, *signals):
        decision = decide(state, *signals)
        steps.append(decision)
        return decision

    trainer.train_step, trainer.policy.after_step = marked_step, marked_decision
    trainer.train()
    compute_cleanup()
    per_step = [part.split(",") for part in ",".join(events).split("step")[1:]]
    results[rank] = [
        (d.log or d.evaluate or d.checkpoint or d.stop, part.count("collective"), part.count("host read"))
        for d, part in zip(steps, per_step, strict=True)
    ]


def test_a_plain_step_issues_one_collective_and_no_device_sync(tmp_path, tiny):
    """Between log steps a step waits for nothing: its only lmrec collective is the loss
    normaliser's all-reduce (which also carries the stop signals), and nothing reads a tensor back
    to the host; the losses are reduced and read at the next log step."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(free_port(), str(tiny), str(tmp_path / "run"), results), nprocs=2)
        results = dict(results)
    for rank, steps in results.items():
        plain = [(collectives, reads) for special, collectives, reads in steps if not special]
        special = [(collectives, reads) for special, collectives, reads in steps if special]
        assert len(plain) >= 5 and len(special) >= 2, steps
        assert set(plain) == {(1, 0)}, f"rank {rank}: (collectives, host reads) per plain step: {plain}"
        # The instrument sees what a log step adds: the losses' reduction and read-back.
        assert all(collectives >= 2 and reads >= 1 for collectives, reads in special), special


def test_parameter_ownership_check_fails_when_deepspeed_holds_a_torchrec_parameter():
    import torch

    from train.trainer import assert_disjoint

    shared = torch.nn.Parameter(torch.zeros(3))
    assert_disjoint([torch.nn.Parameter(torch.zeros(2))], [shared])
    with pytest.raises(RuntimeError, match="DeepSpeed holds 1 TorchRec parameter"):
        assert_disjoint([shared], [shared])
