"""Offline evaluation metrics, shared by training and serving.

train/ and serve/ both import this package (serve/ may never import train/), so the model's
numbers during training and the exported artifact's numbers are computed by the same code, with
the same tie rule and the same cut-offs. It depends on numpy and torch only.
"""

from metrics.binary import binary_metrics
from metrics.ranking import (
    DEFAULT_KS,
    RankingMetrics,
    blocked_target_ranks,
    paired_bootstrap,
    popularity_scores,
    ranks_from_top_k,
    seen_blocks,
    seen_mask,
    target_ranks,
)

__all__ = [
    "DEFAULT_KS",
    "RankingMetrics",
    "binary_metrics",
    "blocked_target_ranks",
    "paired_bootstrap",
    "popularity_scores",
    "ranks_from_top_k",
    "seen_blocks",
    "seen_mask",
    "target_ranks",
]
