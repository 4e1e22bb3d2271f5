"""The item representation's learned tables (model.items.item_tables) in TorchRec, sharded
across ranks by DistributedModelParallel: tables with one row per index in an
EmbeddingCollection, mean-pooled tables (text tokens) in an EmbeddingBagCollection.

The tables are built on the meta device, planned by TorchRec's sharding planner (row-wise by
default), and updated by a fused sparse optimizer *inside backward()*. They are kept apart from
the dense model on purpose: DeepSpeed must never be handed these parameters (it would broadcast
rank 0's shard over every other rank's, silently).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import LazyAwaitable, ShardingType
from torchrec.modules.embedding_configs import DataType, PoolingType

from model.items import TableSpec
from train.distributed import ComputeEnv

_SHARDING = {
    "row_wise": ShardingType.ROW_WISE,
    "table_wise": ShardingType.TABLE_WISE,
    "column_wise": ShardingType.COLUMN_WISE,
}
_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "sgd": EmbOptimType.EXACT_SGD,
}
_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
INIT_STD = 0.02
INIT_BLOCK = 1 << 16  # rows drawn from one generator


def initial_rows(seed: int, block: int, dim: int, rows: int = INIT_BLOCK) -> torch.Tensor:
    """The initial values of row block ``block`` (rows [block * rows, (block + 1) * rows)) of a
    table seeded with ``seed``: Normal(0, INIT_STD)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + block)
    return torch.randn(rows, dim, generator=g) * INIT_STD


def _feature(table: str) -> str:
    return f"{table}_ids"


class _Tables(nn.Module):
    """The container DistributedModelParallel shards; its collections are called one by one."""

    def __init__(self, rows: EmbeddingCollection | None, pooled: EmbeddingBagCollection | None):
        super().__init__()
        self.rows, self.pooled = rows, pooled


class ItemEmbeddings:
    """The sharded tables. ``lookup`` and ``pool`` implement model.items.ItemTables; both are
    collective (every rank calls them, with its own indices)."""

    def __init__(
        self,
        tables: list[TableSpec],
        env: ComputeEnv,
        sharding: str,
        optimizer: str,
        lr: float,
        seed: int,
        dtype: str = "fp32",
    ):
        self.specs = {t.name: t for t in tables}
        self.env = env
        meta = torch.device("meta")
        # Lookups return fp32 whatever the weights' dtype (TorchRec's default output type).
        data_type = _DATA_TYPES[dtype]
        rows = [
            EmbeddingConfig(
                name=t.name,
                num_embeddings=t.rows,
                embedding_dim=t.dim,
                feature_names=[_feature(t.name)],
                data_type=data_type,
            )
            for t in tables
            if not t.pooled
        ]
        pooled = [
            EmbeddingBagConfig(
                name=t.name,
                num_embeddings=t.rows,
                embedding_dim=t.dim,
                feature_names=[_feature(t.name)],
                pooling=PoolingType.MEAN,
                data_type=data_type,
            )
            for t in tables
            if t.pooled
        ]
        container = _Tables(
            EmbeddingCollection(tables=rows, device=meta) if rows else None,
            EmbeddingBagCollection(tables=pooled, device=meta) if pooled else None,
        )
        fused = {"optimizer": _OPTIMIZERS[optimizer], "learning_rate": lr}
        if optimizer == "rowwise_adagrad":
            fused["eps"] = 1e-8
        sharders = [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]
        # The topology the way TorchRec 1.8 asks for it (local_world_size: several nodes are
        # planned as several hosts).
        topology = TopologyFactory.create_topology(
            trainer_config=TrainerConfig(world_size=env.world_size, local_world_size=env.local_world_size),
            kernel_config=KernelConfig(compute_device=env.device.type),
        )
        # Row-wise pooled tables need reduce-scatter, which TorchRec has on GPUs only: on CPU they
        # are sharded column-wise instead (still split over the ranks).
        pooled_kinds = sharders[1].sharding_types(env.device.type)
        constraints = {}
        for t in tables:
            kind = sharding if not t.pooled or _SHARDING[sharding].value in pooled_kinds else "column_wise"
            constraints[t.name] = ParameterConstraints(sharding_types=[_SHARDING[kind].value])
        # An explicit reservation: the default heuristic one estimates dense sizes TorchRec itself
        # calls unreliable (it warns so); 15 % of each device is what that heuristic keeps.
        reservation = FixedPercentageStorageReservation(percentage=0.15)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, storage_reservation=reservation)
        plan = planner.collective_plan(container, sharders, dist.GroupMember.WORLD)
        self.module = DistributedModelParallel(module=container, device=env.device, plan=plan, sharders=sharders)
        self.weight_names = {
            t.name: f"pooled.embedding_bags.{t.name}.weight" if t.pooled else f"rows.embeddings.{t.name}.weight"
            for t in tables
        }
        for position, t in enumerate(tables):
            self._initialise(t.name, seed + position)

    def _shards(self, table: str):
        return self.module.state_dict()[self.weight_names[table]].local_shards()

    @torch.no_grad()
    def _initialise(self, table: str, seed: int, block: int = INIT_BLOCK) -> None:
        """Rows drawn from (seed, row block) by ``initial_rows``: the same table whatever the
        sharding and world size, which is what makes sharded and unsharded runs comparable."""
        dim = self.specs[table].dim
        for shard in self._shards(table):
            (row0, col0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            for start in range(row0 - row0 % block, row0 + rows, block):
                values = initial_rows(seed, start // block, dim, block)
                lo, hi = max(start, row0), min(start + block, row0 + rows)
                if lo < hi:
                    shard.tensor[lo - row0 : hi - row0] = values[lo - start : hi - start, col0 : col0 + cols].to(
                        shard.tensor
                    )

    @torch.no_grad()
    def set_rows(self, table: str, values: torch.Tensor | None) -> None:
        """Overwrites this rank's shards of ``table`` with the matching rows of a full ``values``
        (None: zeros). ``--init-from`` uses it for pretrained token rows and zeroed ID rows."""
        for shard in self._shards(table):
            (row0, col0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            if values is None:
                shard.tensor.zero_()
            else:
                shard.tensor.copy_(values[row0 : row0 + rows, col0 : col0 + cols].to(shard.tensor))

    def optimizer_state(self, table: str) -> dict[str, ShardedTensor]:
        """The fused optimizer's state of ``table`` on this rank, by TorchRec's name
        (``item_table.momentum1`` for row-wise Adagrad); views of what the optimizer updates, so
        writing into their shards sets the state. Empty where this rank holds none of the table."""
        return dict(self.fused_optimizer.state_dict()["state"].get(self.weight_names[table], {}))

    @torch.no_grad()
    def overwrite_rows(self, tensor: ShardedTensor, table: str, first: int, stop: int, read, block: int) -> None:
        """Overwrites rows [first, stop) of this rank's shards of ``tensor``, ``table``'s weight or
        a state of its optimizer, ``block`` rows at a time: ``read(part, start, columns, out)``
        fills ``out`` with rows [start, start + len(out)) of column shard ``part`` from column
        ``columns`` on. Row-wise optimizer state under column-wise sharding holds one value per
        row and column shard, stacked: ``part`` k is its rows [k * rows, (k + 1) * rows)."""
        rows = self.specs[table].rows
        for shard in tensor.local_shards():
            offsets, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes[0]
            part, row0 = divmod(offsets[0], rows)
            columns = offsets[1] if len(offsets) > 1 else 0
            for start in range(max(first, row0), min(row0 + size, stop), block):
                out = shard.tensor.narrow(0, start - row0, min(block, stop - start, row0 + size - start))
                read(part, start, columns, out)

    def _features(self, table: str, ids: torch.Tensor, lengths: torch.Tensor) -> KeyedJaggedTensor:
        device = self.env.device
        return KeyedJaggedTensor.from_lengths_sync(
            keys=[_feature(table)], values=ids.to(device, torch.int64), lengths=lengths.to(device, torch.int32)
        )

    def lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        features = self._features(table, ids, torch.tensor([len(ids)]))
        return self.module.module.rows(features)[_feature(table)].values()

    def pool(self, table: str, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pooled = self.module.module.pooled(self._features(table, values, lengths))
        # A sharded module called directly hands back TorchRec's lazy awaitable: resolve it here.
        return (pooled.wait() if isinstance(pooled, LazyAwaitable) else pooled)[_feature(table)]

    @torch.no_grad()
    def full(self, table: str) -> torch.Tensor:
        """Every row of ``table`` on every rank (collective)."""
        spec = self.specs[table]
        if spec.pooled:  # each row pooled alone is the row itself
            return self.pool(table, torch.arange(spec.rows), torch.ones(spec.rows, dtype=torch.int32))
        return self.lookup(table, torch.arange(spec.rows))

    def owned_rows(self, table: str) -> tuple[int, int]:
        """The rows [first, last) of ``table`` this rank holds whole (row-wise or table-wise
        sharding; (0, 0) when it holds none)."""
        shards = self._shards(table)
        if not shards:
            return 0, 0
        (row0, col0), (rows, cols) = shards[0].metadata.shard_offsets, shards[0].metadata.shard_sizes
        if len(shards) > 1 or col0 != 0 or cols != self.specs[table].dim:
            raise ValueError(
                f"table {table}: rank {self.env.rank} holds columns, not whole rows; scoring the rows a rank owns "
                "needs parallel.sharding row_wise or table_wise"
            )
        return row0, row0 + rows

    def weights(self) -> dict:
        """Table name -> this table's ShardedTensor (a view of the rows the optimizer updates)."""
        state = self.module.state_dict()
        return {table: state[key] for table, key in self.weight_names.items()}

    def shard_plan(self, table: str) -> list[dict]:
        """Where each row block of ``table`` lives, for a checkpoint's record of its topology."""
        return [
            {"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "rank": s.placement.rank()}
            for s in self.weights()[table].metadata().shards_metadata
        ]

    @property
    def fused_optimizer(self):
        return self.module.fused_optimizer

    def parameters(self):
        return list(self.module.parameters())
