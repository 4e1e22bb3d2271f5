"""Metrics of a binary head (e.g. click / no click), apart from the ranking metrics because they
score a classifier's probabilities against labels, not a target's place in a catalogue."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["binary_metrics"]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank, which makes AUC count a tied pair as half."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    starts = ends - counts
    return ((starts + ends + 1) / 2.0)[inverse]


def binary_metrics(
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    threshold: float = 0.5,
) -> dict[str, float]:
    """AUC, precision, recall, F1 and accuracy of a binary head (e.g. click / no click).

    AUC is the Mann-Whitney statistic from average ranks: exact, O(n log n), with tied scores
    counted as half a correct pair, so a constant predictor gets 0.5 rather than an arbitrary value
    depending on sort order. Predictions are ``probability >= threshold``. Undefined quantities
    (AUC with one class only, precision with no predicted positive, recall with no actual
    positive) are NaN rather than 0, so they cannot be mistaken for a measured failure.
    """
    p = probabilities.detach().reshape(-1).to("cpu", torch.float64).numpy()
    y = labels.detach().reshape(-1).to("cpu", torch.float64).numpy()
    if p.shape != y.shape:
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} differ in size")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    positive = y == 1.0
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos

    if n_pos and n_neg:
        rank_sum = _average_ranks(p)[positive].sum()
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    else:
        auc = math.nan

    predicted = p >= threshold
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float((predicted == positive).mean()) if len(y) else math.nan
    return {
        "AUC": float(auc),
        "precision": float(precision),
        "recall": float(recall),
        "F1": float(f1),
        "accuracy": accuracy,
        "count": len(y),
    }
