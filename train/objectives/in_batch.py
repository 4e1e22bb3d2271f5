"""``in_batch``: the other positions' targets are the negatives, corrected by their popularity
(logQ, with count + 1); repeated targets are masked rather than counted as negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.objectives.base import Objective, StepBatch, StepItems, weighted_mean


def in_batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor, weights: torch.Tensor, total=None
) -> torch.Tensor:
    """``logits`` (N, N): position i against every position's target; the diagonal is positive."""
    logits = logits - log_q[None, :]
    same = (targets[None, :] == targets[:, None]) & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(targets), device=targets.device)
    return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights, total)


class InBatchSoftmax(Objective):
    name = "in_batch"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.log_q = torch.log(ctx.catalog.counts.float().to(ctx.device) + 1.0)

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled) -> torch.Tensor:
        targets = step.targets
        logits = self.ctx.model.scores(hidden, items(targets))
        return in_batch_loss(logits, targets, self.log_q[targets], step.weights, step.total)
