"""Models written before the transformers model class and the objectives' own config section
(lmrec 92508b7: checkpoint format 1, saved models with a meta.json, artifacts whose model section
names the loss) are converted on read: they evaluate, serve and resume as they did.

tests/fixtures/format-1 was written by that version (expected.json says how), on the synthetic
shards the ``shards`` fixture prepares again. Its expected figures were computed on another CPU,
whose kernels round differently by a few units in the last place (a relative 1.6e-7 measured on
a later machine), so computed scores and losses are compared to a relative 1e-5; what conversion itself
produces (the weights it reads) is compared bit for bit. Bit-identical resume on one machine is
test_checkpoint's SIGKILL test."""

import json
import shutil

import pytest
import torch

from tests.conftest import ROOT, run_cli, torchrun_train

pytestmark = pytest.mark.multiprocess

FIXTURE = ROOT / "tests" / "fixtures" / "format-1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("format-1") / "shards"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 300, "--num-items", 120,
        "--events-per-user", 15, "--out", out, "--quiet",
    )  # fmt: skip
    return out


def test_a_format_1_saved_model_evaluates_as_it_did(shards):
    from train.evaluate import evaluate_source

    result = evaluate_source(FIXTURE / "saved-model", "test", str(shards))
    for key, value in EXPECTED["saved_model_test"].items():
        assert result["model"][key] == pytest.approx(value, abs=1e-9), key  # ranks: rounding does not reach them


def test_a_format_1_artifact_recommends_as_it_did():
    from serve.recommender import Recommender

    answers = Recommender.load(FIXTURE / "artifact").recommend(EXPECTED["histories"], k=5)
    for answer, expected in zip(answers, EXPECTED["recommendations"], strict=True):
        assert answer.items == expected["items"]
        assert answer.scores == pytest.approx(expected["scores"], rel=1e-5)


def test_a_format_1_checkpoint_resumes_as_it_did_and_exports(shards, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoint", run / "checkpoints" / "step_000000020")
    (run / "checkpoints" / "latest").write_text("step_000000020\n")
    # Written before length bucketing and the running loss normaliser: resumed with the batching
    # and normaliser it was trained with (with buckets on, the changed data settings restart the
    # data at the next epoch boundary, as logged; a running normaliser starts fresh).
    resumed, log = torchrun_train(
        run, shards, "schedule.epochs=3", "data.length_buckets=false", "loss.normaliser=step",
        train_args=["--resume", "auto"],
    )  # fmt: skip
    assert "at step 20 (epoch 2, batch 0)" in log and "resharded" not in log and "restarts" not in log
    # Steps 21-30. Resuming with the first AdamW moment zeroed moves them by a relative 8e-3.
    assert resumed["losses"] == pytest.approx(EXPECTED["resumed_losses"], rel=1e-5)
    assert resumed["test"]["model"] == pytest.approx(EXPECTED["resumed_test"], rel=1e-5)
    # The old checkpoint is also a source for export and consolidation (in this process: the
    # commands around these functions are tested on current checkpoints).
    from serve.recommender import Recommender
    from train.evaluate import evaluate_source
    from train.export import export
    from train.saved_model import consolidate

    checkpoint = FIXTURE / "checkpoint"
    export(checkpoint, tmp_path / "art", shards=shards, evaluate=False, log=lambda _: None)
    assert Recommender.load(tmp_path / "art").recommend(EXPECTED["histories"][:1], k=5)[0].items
    consolidate(checkpoint, tmp_path / "model", log=lambda _: None)
    assert evaluate_source(tmp_path / "model", "test", str(shards))["model"]["users"] == 300
    written = load_file(str(checkpoint / "dense.safetensors"))
    weights = {name.removeprefix("weight/"): t for name, t in written.items() if name.startswith("weight/")}
    read = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert read.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(read[name], tensor), name


def test_evaluation_in_item_blocks_gives_the_same_figures(shards):
    """Scoring a batch of users against 7 items at a time (18 blocks) ranks exactly as scoring
    the whole catalog at once did."""
    from train.config import config_from_dict
    from train.evaluate import Evaluator
    from train.items import load_counts, positive_actions
    from train.saved_model import load_source

    trained = load_source(FIXTURE / "saved-model", shards)
    cfg = config_from_dict(trained.training["config"])
    cfg.eval.score_block_rows = 7
    model = trained.model()
    counts = load_counts(str(shards), trained.num_items)
    positive = positive_actions(str(shards), trained.config.num_actions, cfg.loss.positive_action_min)
    table = trained.table()
    result = Evaluator(str(shards), cfg, counts, positive)(model, model, table.__getitem__, "test")
    for key, value in EXPECTED["saved_model_test"].items():
        assert result["model"][key] == pytest.approx(value, abs=1e-9), key


def test_a_user_sample_ranks_its_users_as_the_full_evaluation_does(shards, tmp_path):
    import numpy as np

    from train.config import config_from_dict
    from train.evaluate import Evaluator, in_user_sample, user_hash
    from train.items import load_counts, positive_actions
    from train.saved_model import load_source

    trained = load_source(FIXTURE / "saved-model", shards)
    cfg = config_from_dict(trained.training["config"])
    model, table = trained.model(), trained.table()
    counts = load_counts(str(shards), trained.num_items)
    positive = positive_actions(str(shards), trained.config.num_actions, cfg.loss.positive_action_min)
    users = torch.arange(300)  # the fixture's 300 users; below every one's hash, none is chosen
    none = float(user_hash(users).min()) / 2
    ranks = {}
    for fraction in (1.0, 0.3, none):
        cfg.eval.user_fraction = fraction
        out = tmp_path / f"{fraction}.npz"
        result = Evaluator(str(shards), cfg, counts, positive)(model, model, table.__getitem__, "test", out)
        ranks[fraction] = dict(np.load(out))
        assert result["model"]["users"] == len(ranks[fraction]["users"])
    everyone, sample = ranks[1.0], ranks[0.3]
    chosen = in_user_sample(torch.from_numpy(everyone["users"]), 0.3).numpy()
    assert len(everyone["users"]) == 300 and 0 < chosen.sum() < 300 and not len(ranks[none]["users"])
    np.testing.assert_array_equal(sample["users"], everyone["users"][chosen])
    np.testing.assert_array_equal(sample["ranks"], everyone["ranks"][chosen])
