"""full_sharded on 2 gloo ranks against the full softmax in one process: each rank scores only the
item rows it owns in TorchRec's row-wise shard, and the loss, the hidden states' gradients and the
table after the fused optimizer's update are those of the one-process full softmax (fp32,
rtol 1e-5 / atol 1e-6: the log-sum-exp is summed in another order)."""

import os

import pytest
import torch

from tests.conftest import free_port

pytestmark = pytest.mark.multiprocess

ITEMS, DIM, POSITIONS = 50, 8, 12
SPLIT = (7, 5)  # positions per rank on 2 ranks: unequal, so the gather pads


def _problem():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 9, (ITEMS,), generator=g).double()
    counts[:2] = 0
    counts[[9, 30]] = 0  # items without training events: never candidates
    candidates = torch.nonzero(counts > 0).squeeze(1)
    targets = candidates[torch.randint(0, len(candidates), (POSITIONS,), generator=g)]
    weights = torch.rand(POSITIONS, generator=g) + 0.5
    weights[3] = 0.0  # a padding position
    return counts, torch.randn(POSITIONS, DIM, generator=g), targets, weights


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    import torch.distributed as dist

    from model.config import ModelConfig, RecommenderConfig
    from model.items import ID_TABLE, ItemCatalog, TableSpec
    from model.modeling import SequenceRecommender
    from train.config import LossConfig
    from train.distributed import compute_cleanup, compute_init
    from train.embeddings import ItemEmbeddings
    from train.objectives import REGISTRY, ObjectiveContext, StepBatch, StepItems

    env = compute_init(seed=0)
    counts, hidden, targets, weights = _problem()
    lo = 0 if world == 1 else sum(SPLIT[:rank])
    hi = POSITIONS if world == 1 else lo + SPLIT[rank]
    tables = ItemEmbeddings([TableSpec(ID_TABLE, ITEMS, DIM)], env, "row_wise", "sgd", 0.5, seed=3)
    initial = tables.full(ID_TABLE).clone()
    results = {"owned": tables.owned_rows(ID_TABLE), "initial": initial}
    names = ["full_sharded"] if world > 1 else ["full", "full_sharded"]
    for normalize in (False, True):
        cfg = ModelConfig(hidden_size=DIM, num_layers=1, num_heads=2, max_len=10, normalize=normalize)
        model = SequenceRecommender(RecommenderConfig.build(cfg, {"items": ITEMS, "actions": 0, "gaps": 0}))
        for name in names:
            ctx = ObjectiveContext(
                LossConfig(main=name, score_block_rows=7), model, tables, ItemCatalog(counts), torch.zeros(0),
                ITEMS, env.device, dist.group.WORLD,
            )  # fmt: skip
            objective = REGISTRY[name](ctx)
            tables.set_rows(ID_TABLE, initial)
            mine = hidden[lo:hi].clone().requires_grad_()
            step = StepBatch(None, None, None, targets[lo:hi], weights[lo:hi], weights.sum() / world, None)
            ids = torch.arange(ITEMS) if objective.needs_all_items else torch.unique(targets[lo:hi])
            items = StepItems(tables.lookup(ID_TABLE, ids), None if objective.needs_all_items else ids)
            loss = objective(step, mine, items, None)
            loss.backward()  # the fused SGD updates the table here
            results[(normalize, name)] = {
                "loss": loss.detach(),
                "grad": mine.grad,
                "table": tables.full(ID_TABLE),
            }
    torch.save(results, f"{out}/rank{rank}.pt")
    compute_cleanup()


def test_full_sharded_on_two_ranks_equals_the_one_process_full_softmax(tmp_path):
    import torch.multiprocessing as mp

    for world in (1, 2):
        (tmp_path / str(world)).mkdir()
        mp.spawn(_worker, args=(world, free_port(), str(tmp_path / str(world))), nprocs=world)
    one = torch.load(tmp_path / "1" / "rank0.pt")
    two = [torch.load(tmp_path / "2" / f"rank{r}.pt") for r in range(2)]
    (a, b), (c, d) = two[0]["owned"], two[1]["owned"]
    assert a == 0 and b == c and d == ITEMS and 0 < b < ITEMS, "each rank owns a row block of its own"
    close = {"rtol": 1e-5, "atol": 1e-6}
    for normalize in (False, True):
        reference = one[(normalize, "full")]
        assert not torch.allclose(reference["table"], one["initial"]), "the step moved the table"
        got = one[(normalize, "full_sharded")]  # one process, several row blocks
        torch.testing.assert_close(got["loss"], reference["loss"], **close)
        torch.testing.assert_close(got["grad"], reference["grad"], **close)
        torch.testing.assert_close(got["table"], reference["table"], **close)
        sharded = [r[(normalize, "full_sharded")] for r in two]
        # Each rank's loss is its share over the global weight sum, scaled by the world size (the
        # convention DeepSpeed's and TorchRec's gradient averaging expect): their mean is the loss.
        torch.testing.assert_close((sharded[0]["loss"] + sharded[1]["loss"]) / 2, reference["loss"], **close)
        torch.testing.assert_close(torch.cat([s["grad"] for s in sharded]) / 2, reference["grad"], **close)
        for rank in range(2):
            torch.testing.assert_close(sharded[rank]["table"], reference["table"], **close)


def test_full_sharded_refuses_column_wise_tables():
    from tests.conftest import ROOT
    from train.config import ConfigError, load_config

    overrides = ["data.shards=shards", "loss.main=full_sharded"]
    assert load_config(ROOT / "configs" / "debug.yaml", overrides).loss.main == "full_sharded"
    with pytest.raises(ConfigError, match="needs parallel.sharding row_wise or table_wise, not column_wise"):
        load_config(ROOT / "configs" / "debug.yaml", [*overrides, "parallel.sharding=column_wise"])
    with pytest.raises(ConfigError, match="loss.score_block_rows must be >= 1"):
        load_config(ROOT / "configs" / "debug.yaml", [*overrides, "loss.score_block_rows=0"])
