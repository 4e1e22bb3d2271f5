"""The objectives one by one, by hand, and the registry that builds the loss from the config."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, RecommenderConfig
from model.items import ItemCatalog
from model.modeling import SequenceRecommender
from train.config import LossConfig
from train.objectives import REGISTRY, ObjectiveContext, StepBatch, StepItems, build_loss
from train.objectives.in_batch import in_batch_loss
from train.objectives.sampled import sampled_softmax_loss


def test_sampled_softmax_masks_accidental_hits_and_applies_log_q():
    positive = torch.tensor([2.0])
    negatives = torch.tensor([7, 9, 4])
    negative_logits = torch.tensor([[1.0, 3.0, 0.5]])
    targets = torch.tensor([9])  # negative 9 is the target itself: masked
    log_q = torch.log(torch.tensor([0.1, 0.2, 0.3]))
    loss = sampled_softmax_loss(
        positive, negative_logits, targets, negatives, torch.log(torch.tensor([0.2])), log_q, torch.ones(1)
    )
    kept = torch.tensor([2.0 - math.log(0.2), 1.0 - math.log(0.1), 0.5 - math.log(0.3)])
    assert math.isclose(loss.item(), F.cross_entropy(kept[None], torch.tensor([0])).item(), rel_tol=1e-6)


def test_in_batch_loss_masks_repeated_targets():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 5.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([4, 6, 4])  # positions 0 and 2 share a target
    loss = in_batch_loss(logits, targets, torch.zeros(3), torch.ones(3))
    row0 = F.cross_entropy(torch.tensor([[3.0, 1.0]]), torch.tensor([0]))
    row1 = F.cross_entropy(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([1]))
    row2 = F.cross_entropy(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))
    assert math.isclose(loss.item(), ((row0 + row1 + row2) / 3).item(), rel_tol=1e-6)


def _context(loss: LossConfig, num_items=12, action_head=False) -> ObjectiveContext:
    cfg = ModelConfig(hidden_size=8, num_layers=1, num_heads=2, max_len=10, dropout=0.0, action_head=action_head)
    model = SequenceRecommender(RecommenderConfig.build(cfg, {"items": num_items, "actions": 4, "gaps": 0}))
    counts = torch.arange(num_items, dtype=torch.float64)
    counts[:2] = 0
    counts[5] = 0  # an item without training events: never a candidate
    positive = torch.tensor([False, False, True, True])
    return ObjectiveContext(loss, model, None, ItemCatalog(counts), positive, num_items, torch.device("cpu"), None)


def _step(n=6, num_items=12) -> StepBatch:
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(2, num_items, (n,), generator=g)
    targets[targets == 5] = 6
    inputs = targets.reshape(2, n // 2)
    positions = torch.ones_like(inputs, dtype=torch.bool)
    actions = torch.randint(0, 4, (n,), generator=g)
    return StepBatch(
        inputs, torch.full((2,), n // 2), positions, targets, torch.ones(n), torch.tensor(float(n)), actions
    )


def test_the_registry_builds_main_plus_weighted_auxiliary_objectives():
    torch.manual_seed(0)
    ctx = _context(LossConfig(main="full", auxiliary={"action": 0.5}), action_head=True)
    loss_fn = build_loss(ctx)
    assert [type(o).name for o, _ in loss_fn.terms] == ["full", "action"]
    assert [w for _, w in loss_fn.terms] == [1.0, 0.5] and loss_fn.needs_all_items
    step = _step()
    table = torch.randn(12, 8)
    hidden = torch.randn(6, 8)
    samples = loss_fn.sample(step)
    total = loss_fn(step, hidden, StepItems(table), samples)
    full = REGISTRY["full"](ctx)(step, hidden, StepItems(table), None)
    action = REGISTRY["action"](ctx)(step, hidden, StepItems(table), None)
    assert torch.equal(total, 1.0 * full + 0.5 * action)
    # The full softmax never puts mass on an item without training events.
    logits = ctx.model.scores(hidden, table)
    logits[:, :2] = -math.inf
    logits[:, 5] = -math.inf
    assert torch.allclose(full, F.cross_entropy(logits, step.targets))


def test_sampled_negatives_come_from_trained_items_and_are_looked_up_with_the_batch():
    ctx = _context(LossConfig(main="sampled", num_negatives=200, negative_sampler="popularity", in_batch_negatives=0))
    loss_fn = build_loss(ctx)
    assert not loss_fn.needs_all_items
    torch.manual_seed(0)
    [negatives] = loss_fn.sample(_step())
    assert negatives.shape == (200,) and negatives.min() >= 2 and not (negatives == 5).any()
    # Popularity proposal: item 11 (count 11) is drawn far more often than item 2 (count 2).
    assert (negatives == 11).sum() > (negatives == 2).sum()
    step = _step()
    ids = torch.unique(torch.cat([step.inputs.reshape(-1), step.targets, negatives]))
    vectors = torch.randn(len(ids), 8)
    loss = loss_fn(step, torch.randn(6, 8), StepItems(vectors, ids), [negatives])
    assert torch.isfinite(loss)


def test_uniform_negatives_are_uniform_over_the_trained_items_with_no_per_item_table():
    objective = REGISTRY["sampled"](_context(LossConfig(main="sampled", num_negatives=9000, in_batch_negatives=0)))
    assert objective.proposal.weights is None
    torch.manual_seed(0)
    counts = torch.bincount(objective.proposal.draw(9000), minlength=12)
    assert counts.sum() == 9000 and counts[:2].sum() == 0 and counts[5] == 0  # reserved, untrained
    # 1,000 draws expected for each of the 9 trained items; 150 is 5 standard deviations.
    assert (counts[[2, 3, 4, 6, 7, 8, 9, 10, 11]] - 1000).abs().max() < 150


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"main": "action"}, "loss.main must be a next-item objective"),
        ({"main": "nope"}, "loss.main must be a next-item objective"),
        ({"auxiliary": {"nope": 1.0}}, "loss.auxiliary.nope: not an objective"),
        ({"auxiliary": {"in_batch": 0.0}}, "the weight must be > 0"),
        ({"negative_sampler": "zipf"}, "loss.negative_sampler must be one of"),
    ],
)
def test_bad_loss_config(fields, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**fields)


def test_bce_is_sasrecs_binary_cross_entropy_with_one_negative_per_position():
    from train.objectives.bce import bce_loss

    positive = torch.tensor([2.0, -1.0, 0.5])
    negative = torch.tensor([0.0, 3.0, 1.0])
    targets, negatives = torch.tensor([4, 5, 6]), torch.tensor([7, 5, 2])  # position 1 drew its own target
    loss = bce_loss(positive, negative, targets, negatives, torch.tensor([1.0, 1.0, 0.0]))
    by_hand = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 - 0.5)) + -math.log(1 / (1 + math.exp(1.0)))
    assert math.isclose(loss.item(), by_hand / 2, rel_tol=1e-6)

    ctx = _context(LossConfig(main="bce"))
    loss_fn = build_loss(ctx)
    step = _step()
    torch.manual_seed(0)
    [negatives] = loss_fn.sample(step)
    assert negatives.shape == step.targets.shape and not (negatives == 5).any() and negatives.min() >= 2
    ids = torch.unique(torch.cat([step.inputs.reshape(-1), step.targets, negatives]))
    hidden = torch.randn(6, 8, requires_grad=True)
    loss = loss_fn(step, hidden, StepItems(torch.randn(len(ids), 8), ids), [negatives])
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0


def test_mixed_negatives_add_the_steps_own_targets_with_their_expected_count_in_log_q():
    ctx = _context(LossConfig(main="sampled", num_negatives=50, in_batch_negatives=30))
    objective = REGISTRY["sampled"](ctx)
    step = _step()
    torch.manual_seed(0)
    drawn = objective.sample(step)
    assert drawn.shape == (80,) and set(drawn[50:].tolist()) <= set(step.targets.tolist())
    # Expected count of candidate i: 30 x (its share of the 6 targets) + 50 x q(i), q uniform over
    # the 9 trained items (2..11 but 5).
    candidates = torch.tensor([2, 7, step.targets[0].item()])
    share = torch.tensor([(step.targets == c).sum().item() / 6 for c in candidates.tolist()])
    expected = 30 * share + 50 / 9
    torch.testing.assert_close(objective.log_expected_counts(step, candidates), torch.log(expected))
    hidden = torch.randn(6, 8, requires_grad=True)
    ids = torch.unique(torch.cat([step.inputs.reshape(-1), step.targets, drawn]))
    loss = objective(step, hidden, StepItems(torch.randn(len(ids), 8), ids), drawn)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0
    # in_batch_negatives=0: the proposal's draws alone, corrected by M q(i).
    plain = REGISTRY["sampled"](_context(LossConfig(main="sampled", num_negatives=50, in_batch_negatives=0)))
    assert plain.sample(step).shape == (50,)
    torch.testing.assert_close(plain.log_expected_counts(step, candidates), torch.log(torch.full((3,), 50 / 9)))


@pytest.mark.parametrize(
    ("items", "world", "sharding", "expected"),
    [
        (3_418, 2, "row_wise", "full"),
        (100_000, 1, "row_wise", "full"),
        (99_999, 2, "row_wise", "full"),
        (100_000, 2, "row_wise", "full_sharded"),
        (300_000, 2, "column_wise", "full"),
        (1_048_576, 2, "row_wise", "full_sharded"),
        (10_000_000, 2, "row_wise", "sampled"),
    ],
)
def test_auto_objective_follows_the_catalog_size(items, world, sharding, expected):
    from train.objectives import choose_main

    assert choose_main(LossConfig(), items, world, sharding) == expected
    assert choose_main(LossConfig(main="bce"), items, world, sharding) == "bce"


def test_the_running_normaliser_weighs_every_token_alike_and_resumes_exactly():
    from train.objectives import LossNormaliser

    sums = [torch.tensor(s) for s in (400.0, 40.0, 100.0)]  # a step of long histories, then short ones
    per_step = LossNormaliser("step", torch.device("cpu"))
    assert [float(per_step(s)) for s in sums] == [400.0, 40.0, 100.0]
    running = LossNormaliser("running", torch.device("cpu"))
    assert [float(running(s)) for s in sums[:2]] == [400.0, 220.0]
    # Each token's loss is divided by the same mean, not by its own step's count.
    saved = running.state_dict()
    resumed = LossNormaliser("running", torch.device("cpu"))
    resumed.load_state_dict(json.loads(json.dumps(saved)))  # as meta.json keeps it
    assert float(resumed(sums[2])) == float(running(sums[2])) == 180.0
