"""Training objectives, chosen by name (``loss.main`` plus weighted ``loss.auxiliary``) from one
registry; every objective implements train.objectives.base.Objective."""

from __future__ import annotations

from train.objectives import action, bce, full, full_sharded, in_batch, sampled
from train.objectives.base import Objective, ObjectiveContext, StepBatch, StepItems, WeightedObjectives

REGISTRY: dict[str, type[Objective]] = {
    "full": full.FullSoftmax,
    "full_sharded": full_sharded.ShardedFullSoftmax,
    "sampled": sampled.SampledSoftmax,
    "in_batch": in_batch.InBatchSoftmax,
    "action": action.ActionHead,
    "bce": bce.BinaryCrossEntropy,
}


def build_loss(ctx: ObjectiveContext) -> WeightedObjectives:
    """The main objective (weight 1) followed by the auxiliary ones, as configured."""
    cfg = ctx.cfg
    terms = [(REGISTRY[cfg.main](ctx), 1.0)]
    terms += [(REGISTRY[name](ctx), weight) for name, weight in cfg.auxiliary.items()]
    return WeightedObjectives(terms)


__all__ = ["REGISTRY", "Objective", "ObjectiveContext", "StepBatch", "StepItems", "WeightedObjectives", "build_loss"]
