"""``sampled``: the target against negatives shared by the step's positions, with logits
corrected by each candidate's expected count in the draw (logQ) and accidental hits masked. Its
cost does not grow with the catalog.

Negatives are mixed (Yang et al., "Mixed Negative Sampling", 2020): ``loss.num_negatives`` from
a proposal over the trained items (uniform or popularity) plus ``loss.in_batch_negatives`` of
the step's own targets, drawn with replacement. In-batch ones are popular items, the hard
negatives a uniform draw over a large catalog almost never contains; uniform ones cover the
tail. The correction uses the mixture's expected count, K c_i / N + M q_i (c_i: occurrences of
item i among the step's N targets; q: the proposal), for every candidate and the positive alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.objectives.base import NegativeProposal, Objective, StepBatch, StepItems, weighted_mean


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
        self.proposal = NegativeProposal(ctx.catalog, ctx.num_items, ctx.cfg.negative_sampler, ctx.device)

    def sample(self, step: StepBatch) -> torch.Tensor:
        drawn = self.proposal.draw(self.ctx.cfg.num_negatives)
        in_batch = self.ctx.cfg.in_batch_negatives
        if not in_batch or not len(step.targets):
            return drawn
        picks = torch.randint(len(step.targets), (in_batch,), device=step.targets.device)
        return torch.cat([drawn, step.targets[picks]])

    def log_expected_counts(self, step: StepBatch, candidates: torch.Tensor) -> torch.Tensor:
        expected = self.ctx.cfg.num_negatives * self.proposal.probability(candidates)
        in_batch = self.ctx.cfg.in_batch_negatives
        if in_batch and len(step.targets):
            ordered = torch.sort(step.targets).values
            occurrences = torch.searchsorted(ordered, candidates, right=True) - torch.searchsorted(ordered, candidates)
            expected = expected + in_batch * occurrences / len(step.targets)
        return torch.log(expected)

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled: torch.Tensor) -> torch.Tensor:
        model, targets = self.ctx.model, step.targets
        positive = model.pair_scores(hidden, items(targets))
        negative = model.scores(hidden, items(sampled))
        # One pass over the step's targets for the positives' and the negatives' corrections.
        log_q = self.log_expected_counts(step, torch.cat([targets, sampled]))
        return sampled_softmax_loss(
            positive, negative, targets, sampled, log_q[: len(targets)], log_q[len(targets) :], step.weights,
            step.total,
        )  # fmt: skip
