import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.losses import full_softmax_loss, in_batch_loss, sampled_softmax_loss
from model.modeling import SequenceRecommender


def _tiny(backbone="llama", **kw):
    cfg = ModelConfig(backbone=backbone, hidden_size=16, num_layers=2, num_heads=2, max_len=12, dropout=0.0, **kw)
    return SequenceRecommender(cfg, num_actions=5, num_gaps=8).eval()


@pytest.mark.parametrize("backbone", ["llama", "qwen2", "gpt2"])
def test_changing_later_tokens_leaves_earlier_predictions_unchanged(backbone):
    torch.manual_seed(0)
    model = _tiny(backbone)
    items = torch.randn(2, 10, 16)
    actions = torch.randint(2, 5, (2, 10))
    gaps = torch.randint(1, 8, (2, 10))
    lengths = torch.tensor([10, 7])
    with torch.no_grad():
        before = model(items, lengths, actions, gaps)
        t = 4
        items2, actions2 = items.clone(), actions.clone()
        items2[:, t + 1 :] = torch.randn(2, 10 - t - 1, 16)
        actions2[:, t + 1 :] = 2
        after = model(items2, lengths, actions2, gaps)
    assert before.shape == (2, 10, 16)
    assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-5)
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :], atol=1e-3)


def test_padding_does_not_change_real_positions():
    torch.manual_seed(1)
    model = _tiny()
    items = torch.randn(1, 6, 16)
    lengths = torch.tensor([4])
    with torch.no_grad():
        a = model(items, lengths)
        padded = torch.cat([items[:, :4], torch.zeros(1, 2, 16)], dim=1)
        b = model(padded, lengths)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert torch.equal(model.last_hidden(a, lengths), a[:, 3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "no-such-model"}, "unknown transformers model type 'no-such-model'"),
        ({"loss": "hinge"}, "model.loss must be one of"),
        ({"hidden_size": 10, "num_heads": 3}, "must be divisible"),
    ],
)
def test_bad_model_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_full_softmax_ignores_reserved_columns_and_zero_weights():
    logits = torch.tensor([[5.0, 5.0, 1.0, 2.0], [9.0, 0.0, 0.0, 3.0]])
    targets = torch.tensor([3, 2])
    loss = full_softmax_loss(logits, targets, torch.tensor([1.0, 0.0]))
    # Row 0 over columns 2, 3: -log(e^2 / (e^1 + e^2))
    assert math.isclose(loss.item(), -math.log(math.e**2 / (math.e + math.e**2)), rel_tol=1e-6)
    assert full_softmax_loss(logits, targets, torch.zeros(2)).item() == 0.0


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
