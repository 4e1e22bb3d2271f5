"""What every objective gets and gives: one interface, so that the trainer combines any of them
without knowing which they are.

An objective is built once with an ``ObjectiveContext`` (the dense model, the *sharded* item
tables, the item catalog, the process group, ...), so that an objective that scores the rows each
rank owns, or one over code tables, needs nothing new from the trainer. Each step it may draw
extra candidate items before the lookup (``sample``: sampled negatives), and then turns the
step's hidden states into a loss (``__call__``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from model.items import RESERVED, ItemCatalog

if TYPE_CHECKING:
    from model.modeling import SequenceRecommender
    from train.config import LossConfig
    from train.embeddings import ItemEmbeddings


def weighted_mean(values: torch.Tensor, weights: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of weighted values over ``total`` (default: the weights' sum). Data-parallel training
    passes the global weight sum divided by the world size, so that the ranks' losses average to
    the global per-token mean whatever the world size. Padding batches (all weights 0) give 0."""
    denominator = weights.sum() if total is None else total
    return (values * weights).sum() / denominator.clamp(min=1.0)


class LossNormaliser:
    """What a step's summed token losses are divided by (``loss.normaliser``).

    ``step``: the step's own global weight sum, a per-token mean per step. ``running``: the mean
    global weight sum of the steps so far (this one included), so that every token weighs the
    same whatever the length of the histories it was batched with. Length-bucketed batches make
    the difference: a step of short histories holds a tenth of the tokens of a step of long ones,
    and a per-step mean gives each of its tokens ten times the weight. The sum stays on the
    device (no host read in the step) and is checkpointed with the run's progress."""

    KINDS = ("step", "running")

    def __init__(self, kind: str, device: torch.device):
        self.kind = kind
        self.weight_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def __call__(self, global_weight_sum: torch.Tensor) -> torch.Tensor:
        if self.kind == "step":
            return global_weight_sum
        self.weight_sum += global_weight_sum
        self.steps += 1
        return (self.weight_sum / self.steps).to(global_weight_sum.dtype)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "weight_sum": float(self.weight_sum), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.weight_sum.fill_(state["weight_sum"])
        self.steps = int(state["steps"])


@dataclass
class ObjectiveContext:
    cfg: LossConfig
    model: SequenceRecommender  # the dense module (scores, pair_scores, action_logits)
    tables: ItemEmbeddings  # the sharded tables themselves, not only the rows a step looked up
    catalog: ItemCatalog  # counts (popularity), has_id, text features
    positive_action: torch.Tensor  # (A,) bool: which action indices the action head calls positive
    num_items: int
    device: torch.device
    group: torch.distributed.ProcessGroup | None  # the data-parallel group the tables are sharded over


class NegativeProposal:
    """Negatives drawn from the items with training events (the catalog being learned),
    uniformly or by popularity (count + 1), and each drawn item's probability.

    Uniform draws are rejection-sampled from the index range, so they hold no per-item tensor:
    at 10^8 items the (V,) weights, their index and the expected counts held 1.6 GB per rank
    (benchmarks/catalog_scale.py). A draw is rejected with the fraction of untrained items."""

    def __init__(self, catalog: ItemCatalog, num_items: int, sampler: str, device: torch.device):
        self.catalog, self.num_items, self.device = catalog, num_items, device
        self.trained = int(catalog.has_id[RESERVED:].sum())
        if not self.trained:
            raise ValueError("no item has training events: there is nothing to draw negatives from")
        self.weights = None
        if sampler == "popularity":
            weights = catalog.counts.float() + 1.0
            weights[:RESERVED] = 0.0
            weights[~catalog.has_id] = 0.0
            self.weights = (weights / weights.sum()).to(device)

    def draw(self, count: int) -> torch.Tensor:
        if self.weights is not None:
            return torch.multinomial(self.weights, count, replacement=True)
        parts, missing = [], count
        while missing:
            drawn = RESERVED + torch.randint(self.num_items - RESERVED, (missing + missing // 8 + 16,))
            drawn = drawn[self.catalog.has_id[drawn]][:missing]
            parts.append(drawn)
            missing -= len(drawn)
        return torch.cat(parts).to(self.device)

    def probability(self, items: torch.Tensor) -> torch.Tensor:
        """Of drawing each of ``items``, all of them trained items (draws and training targets)."""
        if self.weights is not None:
            return self.weights[items]
        return torch.full(items.shape, 1.0 / self.trained, device=items.device)


@dataclass
class StepBatch:
    """One step's next-item problem, flattened over the real (non-padding) positions."""

    inputs: torch.Tensor  # (B, T) input item indices, right-padded
    input_lengths: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B, T) bool: the real positions
    targets: torch.Tensor  # (N,) the next item after each real position
    weights: torch.Tensor  # (N,) the sample weight of each target (0 in padding batches)
    total: torch.Tensor  # () the loss normaliser (LossNormaliser) over the world size
    next_actions: torch.Tensor | None  # (N,) the action index of each target event, when the data has actions
    weight_share: torch.Tensor | None = None  # () the global weight sum over the world size


class StepItems:
    """The vectors of the items one step scores, looked up once (one collective) and indexed by
    item index: the whole catalog (row = index) or a sorted set of indices."""

    def __init__(self, vectors: torch.Tensor, ids: torch.Tensor | None = None):
        self.vectors, self.ids = vectors, ids

    def __call__(self, items: torch.Tensor) -> torch.Tensor:
        return (
            self.vectors[items] if self.ids is None else self.vectors[torch.searchsorted(self.ids, items.contiguous())]
        )

    @property
    def table(self) -> torch.Tensor:
        """Every item's vector (row = index); only when the step looked up the whole catalog."""
        if self.ids is not None:
            raise RuntimeError("this step looked up a subset of the items, not the whole catalog")
        return self.vectors


class Objective(ABC):
    name: ClassVar[str]
    predicts_next_item: ClassVar[bool] = True  # False: an auxiliary task (it cannot be the main objective)
    needs_all_items: ClassVar[bool] = False  # scores the whole catalog: the step looks every item up
    scores_targets: ClassVar[bool] = True  # reads the targets' item vectors (the step looks them up)

    def __init__(self, ctx: ObjectiveContext):
        self.ctx = ctx

    def sample(self, step: StepBatch) -> torch.Tensor | None:
        """Candidate items this step scores besides its inputs and targets (drawn before the lookup)."""
        return None

    @abstractmethod
    def __call__(
        self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss of ``hidden`` (N, D), the hidden states at the step's real positions; ``sampled``
        is what ``sample`` returned."""


class WeightedObjectives:
    """The main objective plus auxiliary ones, summed with their weights: itself an objective to
    the trainer."""

    def __init__(self, terms: list[tuple[Objective, float]]):
        self.terms = terms
        self.needs_all_items = any(o.needs_all_items for o, _ in terms)
        self.scores_targets = any(o.scores_targets for o, _ in terms)

    def sample(self, step: StepBatch) -> list[torch.Tensor | None]:
        return [o.sample(step) for o, _ in self.terms]

    def extra_items(self, samples: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return [s for s in samples if s is not None]

    def __call__(
        self, step: StepBatch, hidden: torch.Tensor, items: StepItems, samples: list[torch.Tensor | None]
    ) -> torch.Tensor:
        loss = None
        for (objective, weight), sampled in zip(self.terms, samples, strict=True):
            term = weight * objective(step, hidden, items, sampled)
            loss = term if loss is None else loss + term
        return loss
