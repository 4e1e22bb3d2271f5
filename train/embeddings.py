"""Item embeddings in a TorchRec table, sharded across ranks by DistributedModelParallel.

The table is built on the meta device, planned by TorchRec's sharding planner (row-wise by
default), and updated by a fused sparse optimizer *inside backward()*. It is kept apart from the
dense model on purpose: DeepSpeed must never be handed these parameters (it would broadcast rank
0's shard over every other rank's, silently).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType

from train.distributed import ComputeEnv

TABLE = "item_table"  # not "items": that name is taken by ModuleDict.items
FEATURE = "item"
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
INIT_STD = 0.02


class ItemEmbeddings:
    """``lookup(ids)`` returns the embeddings of a 1-D tensor of item indices, on this rank."""

    def __init__(self, num_items: int, dim: int, env: ComputeEnv, sharding: str, optimizer: str, lr: float, seed: int):
        self.num_items, self.dim, self.env = num_items, dim, env
        collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, num_embeddings=num_items, embedding_dim=dim, feature_names=[FEATURE])],
            device=torch.device("meta"),
        )
        fused = {"optimizer": _OPTIMIZERS[optimizer], "learning_rate": lr}
        if optimizer == "rowwise_adagrad":
            fused["eps"] = 1e-8
        sharder = EmbeddingCollectionSharder(fused_params=fused)
        topology = Topology(
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            compute_device=env.device.type,
        )
        constraints = {TABLE: ParameterConstraints(sharding_types=[_SHARDING[sharding].value])}
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.collective_plan(collection, [sharder], dist.GroupMember.WORLD)
        self.module = DistributedModelParallel(module=collection, device=env.device, plan=plan, sharders=[sharder])
        self._initialise(seed)

    weight_name = f"embeddings.{TABLE}.weight"  # the table's key in the module's state dict

    def _shards(self):
        return self.module.state_dict()[self.weight_name].local_shards()

    @torch.no_grad()
    def _initialise(self, seed: int, block: int = 1 << 16) -> None:
        """Normal(0, INIT_STD) rows drawn from (seed, row block): the same table whatever the
        sharding and world size, which is what makes sharded and unsharded runs comparable."""
        for shard in self._shards():
            (row0, col0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            for start in range(row0 - row0 % block, row0 + rows, block):
                g = torch.Generator().manual_seed(seed * 1_000_003 + start // block)
                values = torch.randn(block, self.dim, generator=g) * INIT_STD
                lo, hi = max(start, row0), min(start + block, row0 + rows)
                if lo < hi:
                    shard.tensor[lo - row0 : hi - row0] = values[lo - start : hi - start, col0 : col0 + cols].to(
                        shard.tensor
                    )

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.env.device, torch.int64)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[FEATURE], values=ids, lengths=torch.tensor([len(ids)], dtype=torch.int32, device=self.env.device)
        )
        return self.module(features)[FEATURE].values()

    def full_table(self) -> torch.Tensor:
        """The whole table on every rank (evaluation scores users against every item)."""
        with torch.no_grad():
            return self.lookup(torch.arange(self.num_items))

    def parameters(self):
        return list(self.module.parameters())
