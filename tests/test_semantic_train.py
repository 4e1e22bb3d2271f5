"""The semantic_id objective on the real training path: 2 gloo ranks against one process, ZeRO
stages, an exact resume, and generation in the evaluator; and the objective by hand."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, RecommenderConfig
from model.items import ItemCatalog
from model.modeling import SequenceRecommender
from tests.conftest import run_cli, torchrun_train
from train.config import LossConfig
from train.objectives import ObjectiveContext, StepBatch, build_loss

SEMANTIC = ["model.semantic_id_head=true", "model.item_semantic_ids=true", "loss.main=semantic_id"]
# Same global batches on one process and on two ranks (as in test_train's equivalence test).
SAME_BATCHES = ["schedule.epochs=1", "schedule.max_steps=6", "data.num_workers=1", "data.shuffle=false",
                "data.length_buckets=false", "schedule.log_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("semantic") / "shards"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 200, "--num-items", 80, "--events-per-user", 12,
        "--item-text", "--out", out, "--quiet",
    )  # fmt: skip
    run_cli("data", "semantic-ids", out, "--codes", 16, "--levels", 2)
    return out


def test_the_objective_is_the_tuples_negative_log_likelihood_with_teacher_forcing():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=8, num_layers=1, num_heads=2, max_len=10, semantic_id_head=True)
    config = RecommenderConfig.build(cfg, {"items": 6}, semantic_ids={"level_sizes": [3, 2, 2]})
    model = SequenceRecommender(config)
    codes = torch.tensor([[-1, -1, -1], [-1, -1, -1], [0, 1, 0], [2, 0, 1], [2, 0, 0], [1, 1, 1]])
    catalog = ItemCatalog(torch.ones(6, dtype=torch.int64), semantic_codes=codes)
    loss_fn = build_loss(
        ObjectiveContext(LossConfig(main="semantic_id"), model, None, catalog, None, 6, torch.device("cpu"), None)
    )
    assert not loss_fn.scores_targets and not loss_fn.needs_all_items
    targets = torch.tensor([2, 3, 1, 5])  # item 1 (unknown) has no codes: weight 0
    hidden = torch.randn(4, 8)
    step = StepBatch(None, None, None, targets, torch.ones(4), torch.tensor(3.0), None)
    loss = loss_fn(step, hidden, None, [None])
    expected = 0.0
    for b in (0, 1, 3):
        truth = codes[targets[b]]
        state = hidden[b : b + 1]
        for level in range(3):
            expected -= F.log_softmax(model.code_decoder.logits(state, level), -1)[0, truth[level]]
            if level < 2:
                state = model.code_decoder.advance(state, level, truth[level : level + 1])
    assert torch.allclose(loss, expected / 3, rtol=1e-5)
    # The same sum, through the decoder's own scoring of tuples.
    scored = model.code_decoder.log_probs(hidden[[0, 1, 3]], codes[targets[[0, 1, 3]]])
    assert torch.allclose(loss, -scored.sum() / 3, rtol=1e-5)


@pytest.mark.multiprocess
def test_two_ranks_equal_one_process_resume_exactly_and_zero3_agrees(tmp_path, shards):
    single, _ = torchrun_train(tmp_path / "one", shards, *SEMANTIC, *SAME_BATCHES, "data.batch_size=32", nproc=1)
    every = ["checkpoint.every_steps=3", "checkpoint.keep=5"]
    two, log = torchrun_train(tmp_path / "two", shards, *SEMANTIC, *SAME_BATCHES, "data.batch_size=16", *every)
    np.testing.assert_allclose(two["losses"], single["losses"], rtol=1e-4)
    assert two["losses"][-1] < two["losses"][0]
    # Evaluation generates: ranks from the beam's lists, certified below the beam width.
    assert set(two["test"]["model"]) == {"HR@1", "NDCG@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR@19", "users"}
    assert two["test"]["model"]["NDCG@10"] > two["test"]["popularity"]["NDCG@10"], log
    # The same users, gathered in another order (the bootstrap's resamples differ with it).
    assert two["test"]["model"] == pytest.approx(single["test"]["model"], rel=1e-9)

    resumed_out = tmp_path / "resumed"
    checkpoint = tmp_path / "two" / "checkpoints" / "step_000000003"
    resumed, log = torchrun_train(resumed_out, shards, *SEMANTIC, *SAME_BATCHES, "data.batch_size=16",
                                  train_args=["--resume", str(checkpoint)])  # fmt: skip
    assert "at step 3" in log
    assert resumed["losses"] == two["losses"][3:]
    assert resumed["test"] == two["test"]

    zero3, _ = torchrun_train(tmp_path / "z3", shards, *SEMANTIC, *SAME_BATCHES, "data.batch_size=16",
                              "parallel.zero_stage=3")  # fmt: skip
    np.testing.assert_allclose(zero3["losses"], two["losses"], rtol=2e-3, atol=2e-4)
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["semantic_ids"] == {"level_sizes": [16, 16, 16]}
