"""Next-item losses over given item embeddings.

``full``: softmax over the whole catalog (cheap for thousands of items, and known to beat sampled
losses there). ``sampled``: the target against N sampled negatives, with logits corrected by the
sampler's log-probability (logQ) and accidental hits masked. ``in_batch``: the other positions'
targets are the negatives, corrected by their popularity.

Item indices below ``RESERVED`` (padding, unknown) are never candidates; the data schema defines
the same two (model/ does not import data/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RESERVED = 2


def weighted_mean(values: torch.Tensor, weights: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of weighted values over ``total`` (default: the weights' sum). Data-parallel training
    passes the global weight sum divided by the world size, so that the ranks' losses average to
    the global per-token mean whatever the world size. Padding batches (all weights 0) give 0."""
    denominator = weights.sum() if total is None else total
    return (values * weights).sum() / denominator.clamp(min=1.0)


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


def in_batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor, weights: torch.Tensor, total=None
) -> torch.Tensor:
    """``logits`` (N, N): position i against every position's target; the diagonal is positive."""
    logits = logits - log_q[None, :]
    same = (targets[None, :] == targets[:, None]) & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(targets), device=targets.device)
    return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights, total)
