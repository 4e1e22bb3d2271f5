"""``bce``: SASRec's original objective. Each position's target against one negative drawn for
that position (from the trained items, uniformly or by popularity), each scored on its own by
binary cross-entropy: -log sigmoid(s+) - log sigmoid(-s-). A negative that is the target itself
is dropped. (SASRec draws negatives outside the user's whole history; one accidental hit in a
catalog of thousands is rare enough that masking it gives the same objective.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.objectives.base import NegativeProposal, Objective, StepBatch, StepItems, weighted_mean


def bce_loss(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    weights: torch.Tensor,
    total=None,
) -> torch.Tensor:
    """``positive_logits``, ``negative_logits``, ``targets`` and ``negatives`` are (N,): one
    negative per position."""
    negative_terms = F.softplus(negative_logits).masked_fill(negatives == targets, 0.0)
    return weighted_mean(F.softplus(-positive_logits) + negative_terms, weights, total)


class BinaryCrossEntropy(Objective):
    name = "bce"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.proposal = NegativeProposal(ctx.catalog, ctx.num_items, ctx.cfg.negative_sampler, ctx.device)

    def sample(self, step: StepBatch) -> torch.Tensor:
        return self.proposal.draw(len(step.targets))

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled: torch.Tensor) -> torch.Tensor:
        model, targets = self.ctx.model, step.targets
        positive = model.pair_scores(hidden, items(targets))
        negative = model.pair_scores(hidden, items(sampled))
        return bce_loss(positive, negative, targets, sampled, step.weights, step.total)
