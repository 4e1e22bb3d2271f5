"""Item embeddings in TorchRec tables, sharded across ranks by DistributedModelParallel: the ID
table (an EmbeddingCollection) and, for text-aware models, the hashed text-token table (an
EmbeddingBagCollection, mean-pooled per item).

The tables are built on the meta device, planned by TorchRec's sharding planner (row-wise by
default), and updated by a fused sparse optimizer *inside backward()*. It is kept apart from the
dense model on purpose: DeepSpeed must never be handed these parameters (it would broadcast rank
0's shard over every other rank's, silently).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import LazyAwaitable, ShardingType
from torchrec.modules.embedding_configs import PoolingType

from train.distributed import ComputeEnv

TABLE = "item_table"  # not "items": that name is taken by ModuleDict.items
FEATURE = "item"
TOKEN_TABLE, TOKEN_FEATURE = "text_token_table", "text_token"
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


def token_bags(
    offsets: torch.Tensor, token_ids: torch.Tensor, items: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, lengths) of ``items`` from the CSR text tokens of the whole catalog."""
    starts, lengths = offsets[items], offsets[items + 1] - offsets[items]
    shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
    return token_ids[torch.arange(int(lengths.sum())) + shift], lengths


class _Tables(nn.Module):
    """The container DistributedModelParallel shards; its tables are called one by one."""

    def __init__(self, ids: EmbeddingCollection, tokens: EmbeddingBagCollection | None):
        super().__init__()
        self.ids, self.tokens = ids, tokens


class ItemEmbeddings:
    """``lookup(ids)`` returns the ID embeddings of a 1-D tensor of item indices, on this rank;
    ``pool_tokens`` the mean text-token embedding of items given as token bags."""

    def __init__(
        self,
        num_items: int,
        dim: int,
        env: ComputeEnv,
        sharding: str,
        optimizer: str,
        lr: float,
        seed: int,
        text_buckets: int = 0,
    ):
        self.num_items, self.dim, self.env, self.text_buckets = num_items, dim, env, text_buckets
        meta = torch.device("meta")
        ids = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, num_embeddings=num_items, embedding_dim=dim, feature_names=[FEATURE])],
            device=meta,
        )
        tokens = None
        if text_buckets:
            tokens = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=TOKEN_TABLE,
                        num_embeddings=text_buckets,
                        embedding_dim=dim,
                        feature_names=[TOKEN_FEATURE],
                        pooling=PoolingType.MEAN,
                    )
                ],
                device=meta,
            )
        fused = {"optimizer": _OPTIMIZERS[optimizer], "learning_rate": lr}
        if optimizer == "rowwise_adagrad":
            fused["eps"] = 1e-8
        sharders = [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]
        topology = Topology(
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            compute_device=env.device.type,
        )
        constraints = {TABLE: ParameterConstraints(sharding_types=[_SHARDING[sharding].value])}
        # Row-wise pooled tables need reduce-scatter, which TorchRec has on GPUs only: on CPU the
        # token table is sharded column-wise instead (still split over the ranks).
        allowed = sharders[1].sharding_types(env.device.type)
        token_sharding = sharding if _SHARDING[sharding].value in allowed else "column_wise"
        constraints[TOKEN_TABLE] = ParameterConstraints(sharding_types=[_SHARDING[token_sharding].value])
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        tables = _Tables(ids, tokens)
        plan = planner.collective_plan(tables, sharders, dist.GroupMember.WORLD)
        self.module = DistributedModelParallel(module=tables, device=env.device, plan=plan, sharders=sharders)
        self._initialise(self.weight_name, seed)
        if text_buckets:
            self._initialise(self.token_weight_name, seed + 1)

    # The tables' keys in the module's state dict.
    weight_name = f"ids.embeddings.{TABLE}.weight"
    token_weight_name = f"tokens.embedding_bags.{TOKEN_TABLE}.weight"

    def _shards(self, name: str):
        return self.module.state_dict()[name].local_shards()

    @torch.no_grad()
    def _initialise(self, name: str, seed: int, block: int = 1 << 16) -> None:
        """Normal(0, INIT_STD) rows drawn from (seed, row block): the same table whatever the
        sharding and world size, which is what makes sharded and unsharded runs comparable."""
        for shard in self._shards(name):
            (row0, col0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            for start in range(row0 - row0 % block, row0 + rows, block):
                g = torch.Generator().manual_seed(seed * 1_000_003 + start // block)
                values = torch.randn(block, self.dim, generator=g) * INIT_STD
                lo, hi = max(start, row0), min(start + block, row0 + rows)
                if lo < hi:
                    shard.tensor[lo - row0 : hi - row0] = values[lo - start : hi - start, col0 : col0 + cols].to(
                        shard.tensor
                    )

    @torch.no_grad()
    def set_rows(self, name: str, table: torch.Tensor | None) -> None:
        """Overwrites this rank's shards of a table with the matching rows of a full ``table``
        (None: zeros). ``--init-from`` uses it for pretrained token rows and zeroed ID rows."""
        for shard in self._shards(name):
            (row0, col0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            if table is None:
                shard.tensor.zero_()
            else:
                shard.tensor.copy_(table[row0 : row0 + rows, col0 : col0 + cols].to(shard.tensor))

    def _device_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.to(self.env.device, torch.int64)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._device_ids(ids)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[FEATURE], values=ids, lengths=torch.tensor([len(ids)], dtype=torch.int32, device=self.env.device)
        )
        return self.module.module.ids(features)[FEATURE].values()

    def pool_tokens(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(N, D): the mean token embedding of N items whose tokens are ``token_ids`` split by
        ``lengths`` (an item without tokens gets zeros)."""
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[TOKEN_FEATURE], values=self._device_ids(token_ids), lengths=lengths.to(self.env.device, torch.int32)
        )
        pooled = self.module.module.tokens(features)
        # A sharded module called directly hands back TorchRec's lazy awaitable: resolve it here.
        return (pooled.wait() if isinstance(pooled, LazyAwaitable) else pooled)[TOKEN_FEATURE]

    def token_table(self) -> torch.Tensor:
        """The whole text-token table on every rank: each row pooled alone is the row itself."""
        with torch.no_grad():
            return self.pool_tokens(torch.arange(self.text_buckets), torch.ones(self.text_buckets, dtype=torch.int32))

    def full_table(self) -> torch.Tensor:
        """The whole ID table on every rank (evaluation scores users against every item)."""
        with torch.no_grad():
            return self.lookup(torch.arange(self.num_items))

    def parameters(self):
        return list(self.module.parameters())
