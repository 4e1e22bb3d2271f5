import pytest
import torch

from model.config import ModelConfig, RecommenderConfig
from model.inference import LeanDecoder
from model.modeling import SequenceRecommender

MAX_LEN = 12
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _tiny(backbone="llama", layers=2, **kw) -> SequenceRecommender:
    cfg = ModelConfig(
        backbone=backbone, hidden_size=16, num_layers=layers, num_heads=2, max_len=MAX_LEN, dropout=0.0, **kw
    )
    torch.manual_seed(0)
    model = SequenceRecommender(RecommenderConfig.build(cfg, {"items": 30, "actions": 5, "gaps": 8})).eval()
    # Non-trivial norms, so a skipped norm or a misplaced residual shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _full(model, items, lengths, actions=None, gaps=None) -> torch.Tensor:
    with torch.no_grad():
        return model.last_hidden(model(items, lengths, actions, gaps), lengths).float()


@pytest.mark.parametrize("backbone,layers", [("llama", 2), ("llama", 1), ("qwen2", 3)])
def test_lean_encode_equals_the_full_forward(backbone, layers):
    model = _tiny(backbone, layers, use_actions=True, use_gaps=True)
    lean = LeanDecoder(model)
    items = torch.randn(4, MAX_LEN, 16)
    actions, gaps = torch.randint(2, 5, (4, MAX_LEN)), torch.randint(1, 8, (4, MAX_LEN))
    lengths = torch.tensor([MAX_LEN, 1, 7, 3])
    expected = _full(model, items, lengths, actions, gaps)
    got = lean.encode(model.tokens(items, actions, gaps), lengths)
    torch.testing.assert_close(got, expected, **TOL)


def test_extending_a_cache_equals_recomputing_the_whole_history():
    model = _tiny(use_actions=True)
    lean = LeanDecoder(model)
    items, actions = torch.randn(1, MAX_LEN, 16), torch.randint(2, 5, (1, MAX_LEN))
    tokens = model.tokens(items, actions)
    _, [cache] = lean.encode(tokens[:, :3], torch.tensor([3]), with_cache=True)
    assert cache.length == 3 and cache.nbytes == 2 * 2 * 3 * 16 * 4
    for stop in (4, 7, MAX_LEN):  # one new event, then several at once
        hidden, cache = lean.extend(tokens[0, cache.length : stop], cache)
        torch.testing.assert_close(
            hidden, _full(model, items[:, :stop], torch.tensor([stop]), actions[:, :stop])[0], **TOL
        )
        assert cache.length == stop
    with pytest.raises(ValueError, match="window of 12"):
        lean.extend(tokens[0, :1], cache)


def test_backbones_without_a_lean_forward_are_reported():
    model = _tiny("gpt2")
    assert not LeanDecoder.supports(model)
    with pytest.raises(ValueError, match="no lean forward for backbone 'gpt2'"):
        LeanDecoder(model)


def test_encoding_in_several_passes_equals_one(monkeypatch):
    model = _tiny()
    lean = LeanDecoder(model)
    items, lengths = torch.randn(5, MAX_LEN, 16), torch.tensor([MAX_LEN, 2, 5, 9, 1])
    tokens = model.tokens(items)
    whole, whole_caches = lean.encode(tokens, lengths, with_cache=True)
    monkeypatch.setattr("model.inference.ROWS_PER_PASS", 2)
    parts, part_caches = lean.encode(tokens, lengths, with_cache=True)
    torch.testing.assert_close(parts, whole, **TOL)
    assert [c.length for c in part_caches] == lengths.tolist() == [c.length for c in whole_caches]
