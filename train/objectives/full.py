"""``full``: softmax over the whole catalog. Cheap for up to a few hundred thousand items, and
known to beat sampled losses there; the candidates are the items with training events."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.items import RESERVED
from train.objectives.base import Objective, StepBatch, StepItems, weighted_mean


def full_softmax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    total=None,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logits`` (N, V) over the whole catalog, column = item index; ``candidates`` (V, bool)
    limits the softmax to those items."""
    logits = logits.clone()
    logits[:, :RESERVED] = float("-inf")
    if candidates is not None:
        logits[:, ~candidates] = float("-inf")
    return weighted_mean(F.cross_entropy(logits, targets, reduction="none"), weights, total)


class FullSoftmax(Objective):
    name = "full"
    needs_all_items = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.candidates = ctx.catalog.has_id.to(ctx.device)

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled) -> torch.Tensor:
        logits = self.ctx.model.scores(hidden, items.table)
        return full_softmax_loss(logits, step.targets, step.weights, step.total, self.candidates)
