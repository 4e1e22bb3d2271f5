"""``full_sharded``: the full softmax without the whole catalog on any rank. Each rank scores
the item rows it owns (its row-wise shard of the ID table) against the hidden states of every
rank, block by block, and the ranks' log-sum-exps are combined: the same loss and gradients as
``full``, with per-rank memory and work that shrink as ranks are added (the vocabulary-parallel
cross-entropy of Megatron-LM, over item rows instead of a vocabulary).

Per step this adds three collectives to the step's lookups: the ranks' position counts (read on
the host, to un-pad), the hidden states, and the per-rank log-sum-exps (their backward passes the
gradients back). A block of ``loss.score_block_rows`` rows is scored at a time, forward and
again in backward, so no (positions x owned rows) matrix is kept.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from model.items import ID_TABLE, RESERVED
from train.objectives.base import Objective, StepBatch, StepItems, weighted_mean


class BlockwiseLogSumExp(torch.autograd.Function):
    """log sum_j exp(scale * h_i . v_j) over the candidate rows j, one block of rows at a time;
    backward scores each block again instead of keeping the probabilities.

    ``normalize``: v_j is row j over its norm (F.normalize's), computed per block here, forward
    and backward, rather than as a normalized copy of every owned row: that copy, and the
    temporaries of its backward, held several times the shard's bytes at 10^7 items
    (benchmarks/sharded_softmax.py)."""

    @staticmethod
    def forward(ctx, hidden, rows, candidates, scale: float, block: int, normalize: bool):
        # The scale goes on the (N, D) side and the (N, block) logits are worked on in place:
        # each pass over them costs as much as the block's matmul at dim 64.
        queries = hidden * scale
        lse = torch.full((hidden.shape[0],), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, rows.shape[0], block):
            block_rows = rows[start : start + block]
            if normalize:
                block_rows = F.normalize(block_rows, dim=-1)
            logits = (queries @ block_rows.T).masked_fill_(~candidates[start : start + block], float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(queries, rows, candidates, lse)
        ctx.scale, ctx.block, ctx.normalize = scale, block, normalize
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        queries, rows, candidates, lse = ctx.saved_tensors
        # A rank with no candidate rows has lse -inf and contributes nothing.
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        grad_hidden = torch.zeros_like(queries)
        grad_rows = torch.empty_like(rows)
        for start in range(0, rows.shape[0], ctx.block):
            block_rows = rows[start : start + ctx.block]
            if ctx.normalize:
                norms = block_rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
                block_rows = block_rows / norms
            logits = (queries @ block_rows.T).masked_fill_(~candidates[start : start + ctx.block], float("-inf"))
            weighted = logits.sub_(finite[:, None]).exp_().mul_(grad_lse[:, None])  # softmax x upstream gradient
            grad_hidden.addmm_(weighted, block_rows)
            grad = weighted.T @ queries
            if ctx.normalize:  # through v = r / |r|: (g - v (v . g)) / |r|
                grad = (grad - block_rows * (block_rows * grad).sum(-1, keepdim=True)) / norms
            grad_rows[start : start + ctx.block] = grad
        return grad_hidden.mul_(ctx.scale), grad_rows, None, None, None, None


def _gather_positions(hidden: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Every rank's hidden states (M, D), in rank order, and where this rank's begin."""
    counts = torch.tensor([hidden.shape[0]], device=hidden.device)
    every = [torch.empty_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, counts, group=group)
    counts = torch.cat(every).tolist()
    padded = F.pad(hidden, (0, 0, 0, max(counts) - hidden.shape[0]))
    # torch's functional collective: differentiable (backward sums each rank's gradient back to it).
    gathered = funcol.all_gather_single(padded, 0, group).view(len(counts), max(counts), hidden.shape[1])
    rank = dist.get_rank(group)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)]), sum(counts[:rank])


class ShardedFullSoftmax(Objective):
    name = "full_sharded"

    def __init__(self, ctx):
        super().__init__(ctx)
        owned = torch.arange(*ctx.tables.owned_rows(ID_TABLE))
        self.owned = owned
        self.candidates = (ctx.catalog.has_id[owned] & (owned >= RESERVED)).to(ctx.device)
        self.block = ctx.cfg.score_block_rows
        distributed = ctx.group is not None and dist.get_world_size(ctx.group) > 1
        self.group = ctx.group if distributed else None

    def __call__(self, step: StepBatch, hidden: torch.Tensor, items: StepItems, sampled) -> torch.Tensor:
        model = self.ctx.model
        # Every rank looks up its own rows (collective), so their gradients reach the fused optimizer.
        rows = model.item_encoder(self.owned, self.ctx.tables, self.ctx.catalog)
        target_logits = model.pair_scores(hidden, items(step.targets))
        normalize = model.cfg.normalize
        queries, scale = (F.normalize(hidden, dim=-1), 1.0 / model.cfg.temperature) if normalize else (hidden, 1.0)
        if self.group is None:
            lse = BlockwiseLogSumExp.apply(queries, rows, self.candidates, scale, self.block, normalize)
        else:
            everyone, mine = _gather_positions(queries, self.group)
            partial = BlockwiseLogSumExp.apply(everyone, rows, self.candidates, scale, self.block, normalize)
            every = funcol.all_gather_single(partial, 0, self.group).view(-1, partial.shape[0])
            lse = torch.logsumexp(every, dim=0)
            lse = lse[mine : mine + hidden.shape[0]]
        return weighted_mean(lse - target_logits, step.weights, step.total)
