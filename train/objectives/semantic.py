"""``semantic_id``: the next item as its semantic ID, generated level by level.

The code decoder (model.semantic.CodeDecoder) reads each position's hidden state and predicts the
next item's codes one level at a time, each level given the true codes before it (teacher
forcing); the loss is the tuple's negative log-likelihood, the sum of the levels' cross-entropies.
Nothing here touches the item vectors of the catalog: a step costs the same at 10^4 items as at
10^8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.objectives.base import Objective, StepBatch, StepItems, weighted_mean


class SemanticIdGeneration(Objective):
    name = "semantic_id"
    scores_targets = False

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.model.code_decoder is None or ctx.catalog.semantic_codes is None:
            raise ValueError("loss.main=semantic_id needs model.semantic_id_head and shards with semantic IDs")
        self.codes = ctx.catalog.semantic_codes.to(ctx.device)  # int32: widened per step, not whole

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled) -> torch.Tensor:
        codes = self.codes[step.targets].to(torch.int64)
        # A target without codes (the unknown item) teaches nothing: it weighs 0.
        weights = step.weights * (codes[:, 0] >= 0)
        codes = codes.clamp(min=0)
        logits = self.ctx.model.code_decoder(hidden, codes)
        nll = sum(F.cross_entropy(lg, codes[:, level], reduction="none") for level, lg in enumerate(logits))
        return weighted_mean(nll, weights, step.total)
