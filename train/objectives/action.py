"""``action``: the action head predicts whether the next event's action is positive (a rating of
at least ``loss.positive_action_min``, say) from the history and the next item; binary
cross-entropy, an auxiliary objective beside a next-item one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.objectives.base import Objective, StepBatch, StepItems, weighted_mean


class ActionHead(Objective):
    name = "action"
    predicts_next_item = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.positive = ctx.positive_action.to(ctx.device)

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled) -> torch.Tensor:
        labels = self.positive[step.next_actions].float()
        logits = self.ctx.model.action_logits(hidden, items(step.targets))
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return weighted_mean(losses, step.weights, step.total)
