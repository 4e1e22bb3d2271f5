"""parallel.compile: the compiled decoder blocks compute what the eager ones do."""

import copy
import os
import sys
from pathlib import Path

import torch

from model.config import ModelConfig, RecommenderConfig
from model.modeling import SequenceRecommender
from train.compile import compile_dense_blocks, decoder_blocks


def test_compiled_blocks_match_eager_forward_and_backward_across_lengths():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_len=40, dropout=0.0)
    eager = SequenceRecommender(RecommenderConfig.build(cfg, {"items": 50, "actions": 3, "gaps": 4}))
    compiled = copy.deepcopy(eager)
    messages = []
    assert compile_dense_blocks(compiled.backbone, messages.append, torch.device("cpu")) == 2, messages
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(Path(sys.prefix) / "torchinductor_cache")
    assert len(decoder_blocks(eager.backbone)) == 2
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints do not see the flag
    for length in (17, 9, 33):  # bucketed batches: another sequence length every step
        items = torch.randn(3, length, 32)
        lengths = torch.tensor([length, length - 2, 4])
        outputs = []
        for model in (eager, compiled):
            model.zero_grad()
            hidden = model(items, lengths)
            (hidden.square().mean() + hidden[:, -1].sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            outputs.append((hidden.detach(), grads))
        (h_eager, g_eager), (h_compiled, g_compiled) = outputs
        # Inductor fuses the elementwise work (norms, rotary, SwiGLU) with another rounding order.
        torch.testing.assert_close(h_compiled, h_eager, rtol=1e-4, atol=1e-5)
        assert not torch.equal(h_compiled, h_eager)  # another kernel ran, not the eager one
        assert g_compiled.keys() == g_eager.keys()
        for name, grad in g_eager.items():
            torch.testing.assert_close(g_compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_without_a_compiler_the_run_says_why_and_stays_eager(monkeypatch):
    import train.compile

    monkeypatch.setattr(train.compile, "compile_unavailable", lambda device: "CalledProcessError: no c++")
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8, dropout=0.0)
    model = SequenceRecommender(RecommenderConfig.build(cfg, {"items": 10, "actions": 0, "gaps": 0}))
    messages = []
    assert compile_dense_blocks(model.backbone, messages.append, torch.device("cpu")) == 0
    assert messages == [
        "parallel.compile: torch.compile is unavailable here (CalledProcessError: no c++); training eagerly"
    ]
    assert all(block._compiled_call_impl is None for block in decoder_blocks(model.backbone))
