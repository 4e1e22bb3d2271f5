import pytest
import torch

from model.config import ModelConfig, RecommenderConfig
from model.modeling import SequenceRecommender


def _config(backbone="llama", **kw) -> RecommenderConfig:
    cfg = ModelConfig(backbone=backbone, hidden_size=16, num_layers=2, num_heads=2, max_len=12, dropout=0.0, **kw)
    return RecommenderConfig.build(cfg, {"items": 30, "actions": 5, "gaps": 8})


def _tiny(backbone="llama", **kw):
    return SequenceRecommender(_config(backbone, **kw)).eval()


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
        ({"item_id": False}, "at least one of item_id, item_text, item_text_tokens and item_semantic_ids"),
        ({"hidden_size": 10, "num_heads": 3}, "must be divisible"),
    ],
)
def test_bad_model_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_save_pretrained_and_the_auto_classes_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(2)
    model = _tiny(action_head=True)
    model.save_pretrained(tmp_path / "m")
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "lmrec"
    loaded = AutoModel.from_pretrained(tmp_path / "m")
    assert type(loaded) is SequenceRecommender and loaded.config.vocab == model.config.vocab
    assert loaded.cfg == model.cfg
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    items, lengths = torch.randn(2, 5, 16), torch.tensor([5, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(items, lengths), model(items, lengths), rtol=0, atol=0)


def test_retired_objective_fields_are_dropped_from_old_model_sections():
    old = {**ModelConfig(hidden_size=8).to_dict(), "loss": "sampled", "num_negatives": 10, "action_loss_weight": 0.5}
    assert ModelConfig.from_dict(old) == ModelConfig(hidden_size=8)
    with pytest.raises(TypeError):
        ModelConfig.from_dict({**old, "not_a_field": 1})
