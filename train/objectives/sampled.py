"""``sampled``: the target against ``loss.num_negatives`` negatives shared by the step's
positions, drawn from a proposal over the trained items, with logits corrected by the proposal's
log-probability (logQ) and accidental hits masked. Its cost does not grow with the catalog."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.objectives.base import Objective, StepBatch, StepItems, weighted_mean


def sampled_softmax_loss(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    log_q_positive: torch.Tensor,
    log_q_negatives: torch.Tensor,
    weights: torch.Tensor,
    total=None,
) -> torch.Tensor:
    """``positive_logits`` (N,), ``negative_logits`` (N, C) for shared negatives (C,)."""
    negative_logits = negative_logits - log_q_negatives[None, :]
    negative_logits = negative_logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([(positive_logits - log_q_positive)[:, None], negative_logits], dim=1)
    zeros = torch.zeros(len(targets), dtype=torch.long, device=targets.device)
    return weighted_mean(F.cross_entropy(logits, zeros, reduction="none"), weights, total)


class SampledSoftmax(Objective):
    name = "sampled"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.proposal = ctx.trained_items_proposal(ctx.cfg.negative_sampler)
        self.log_q = torch.log(self.proposal.to(ctx.device) * ctx.cfg.num_negatives)

    def sample(self, step: StepBatch) -> torch.Tensor:
        return torch.multinomial(self.proposal, self.ctx.cfg.num_negatives, replacement=True).to(self.ctx.device)

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled: torch.Tensor) -> torch.Tensor:
        model, targets = self.ctx.model, step.targets
        positive = model.pair_scores(hidden, items(targets))
        negative = model.scores(hidden, items(sampled))
        log_q = self.log_q
        return sampled_softmax_loss(
            positive, negative, targets, sampled, log_q[targets], log_q[sampled], step.weights, step.total
        )
