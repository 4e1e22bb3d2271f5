"""Training objectives, chosen by name (``loss.main`` plus weighted ``loss.auxiliary``) from one
registry; every objective implements train.objectives.base.Objective."""

from __future__ import annotations

from train.objectives import action, bce, full, full_sharded, in_batch, sampled, semantic
from train.objectives.base import (
    LossNormaliser,
    Objective,
    ObjectiveContext,
    StepBatch,
    StepItems,
    WeightedObjectives,
)

REGISTRY: dict[str, type[Objective]] = {
    "full": full.FullSoftmax,
    "full_sharded": full_sharded.ShardedFullSoftmax,
    "sampled": sampled.SampledSoftmax,
    "in_batch": in_batch.InBatchSoftmax,
    "action": action.ActionHead,
    "bce": bce.BinaryCrossEntropy,
    "semantic_id": semantic.SemanticIdGeneration,
}


# loss.main=auto: the full softmax while the catalog is small, the sharded one while each rank's
# share of it is, sampled softmax beyond (loss.full_softmax_max_items). On 2 ranks full_sharded
# takes 0.79x full's step time at 10^5 items and 0.40x at 3 x 10^5, with 0.22x and 0.12x its memory
# (benchmarks/sharded_softmax.py); it is not measured below 10^5, where full is cheap anyway.
SHARDED_FROM_ITEMS = 100_000


def choose_main(cfg, num_items: int, world_size: int, sharding: str) -> str:
    """The next-item objective ``loss.main=auto`` stands for with ``num_items`` items."""
    if cfg.main != "auto":
        return cfg.main
    if num_items > cfg.full_softmax_max_items:
        return "sampled"
    if num_items >= SHARDED_FROM_ITEMS and world_size > 1 and sharding != "column_wise":
        return "full_sharded"
    return "full"


def build_loss(ctx: ObjectiveContext) -> WeightedObjectives:
    """The main objective (weight 1) followed by the auxiliary ones, as configured."""
    cfg = ctx.cfg
    terms = [(REGISTRY[cfg.main](ctx), 1.0)]
    terms += [(REGISTRY[name](ctx), weight) for name, weight in cfg.auxiliary.items()]
    return WeightedObjectives(terms)


__all__ = [
    "REGISTRY",
    "choose_main",
    "LossNormaliser",
    "Objective",
    "ObjectiveContext",
    "StepBatch",
    "StepItems",
    "WeightedObjectives",
    "build_loss",
]
