"""Length-bucketed batches train the same model as plain ones: each history's per-token losses,
and the gradients of their sum, do not depend on which histories share its batch."""

import torch
import torch.nn.functional as F

from data.loader import LoaderConfig, iterate_epoch, make_loader
from data.prepare import PrepareConfig, prepare
from data.synthetic import SyntheticSpec, generate
from model.config import ModelConfig, RecommenderConfig
from model.modeling import SequenceRecommender


def _per_token_losses(model, table, batches):
    """{(user, position): loss} over every real position, and the gradients of their sum."""
    model.zero_grad()
    losses, total = {}, 0.0
    for batch in batches:
        items, lengths = batch["items"], batch["lengths"]
        inputs, targets = items[:, :-1], items[:, 1:]
        positions = torch.arange(inputs.shape[1])[None, :] < (lengths - 1)[:, None]
        hidden = model(table[inputs], lengths - 1, batch["actions"][:, :-1], batch["gaps"][:, :-1])[positions]
        per_token = F.cross_entropy(model.scores(hidden, table), targets[positions], reduction="none")
        rows, cols = positions.nonzero(as_tuple=True)
        for user, col, loss in zip(batch["users"][rows].tolist(), cols.tolist(), per_token.tolist(), strict=True):
            losses[user, col] = loss
        total = total + per_token.sum()
    total.backward()
    return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_bucketed_and_plain_batches_give_the_same_per_token_losses_and_gradients(tmp_path):
    raw = generate(SyntheticSpec(users=120, items=60, events_per_user=12, seed=3))
    manifest = prepare(raw, PrepareConfig(out=tmp_path / "s", samples_per_shard=50, progress=False), {"name": "t"})
    cfg = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, max_len=20, dropout=0.0)
    torch.manual_seed(0)
    model = SequenceRecommender(RecommenderConfig.build(cfg, manifest.manifest["vocab"])).eval()
    table = torch.randn(manifest.manifest["vocab"]["items"], 16)
    results = []
    for buckets in (False, True):
        dataset, loader = make_loader(
            tmp_path / "s",
            LoaderConfig(batch_size=16, max_len=20, num_workers=0, length_buckets=buckets, shuffle_buffer=64),
        )
        batches = list(iterate_epoch(dataset, loader, epoch=0))
        results.append(_per_token_losses(model, table, batches))
        widths = sum(b["items"].numel() for b in batches)
        results[-1] += (widths,)
    (plain, plain_grads, plain_cells), (bucketed, bucketed_grads, bucketed_cells) = results
    assert bucketed_cells < plain_cells  # the point of bucketing: fewer padded cells
    assert plain.keys() == bucketed.keys() and len(plain) > 500
    # fp32, the same positions through differently shaped matmuls: equal to rounding.
    keys = sorted(plain)
    torch.testing.assert_close(
        torch.tensor([bucketed[k] for k in keys]), torch.tensor([plain[k] for k in keys]), rtol=1e-5, atol=1e-6
    )
    assert plain_grads.keys() == bucketed_grads.keys()
    for name, grad in plain_grads.items():
        # A sum over about a thousand positions in another order: equal to 1e-6 of the norm
        # (elementwise, entries near 0 carry the sum's absolute rounding).
        assert (bucketed_grads[name] - grad).norm() <= 1e-6 * grad.norm(), name
