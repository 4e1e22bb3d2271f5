"""Semantic IDs in the model: the code decoder that generates the next item's codes level by
level, the trie of the catalog's code tuples, and beam search constrained to that trie.

An item's semantic ID is a tuple of codes, one per level (data.semantic_ids assigns them by
residual k-means; its last level only tells colliding tuples apart). Instead of scoring every
item, the model generates the next item's tuple like a short word, so that neither a training
step nor a request costs in proportion to the catalog.

Everything here is plain torch: training, evaluation and serving run the same decoder and the
same search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class CodeDecoder(nn.Module):
    """The next item's codes, one level at a time, from the backbone's hidden state.

    The state starts as the hidden state h. At level l the logits over its codes are
    ``head_l(norm(s_l))``; choosing code c moves the state on,
    ``s_{l+1} = s_l + mlp_l(norm(s_l + embed_l(c)))``. Each level is thus conditioned on every code
    chosen before it (not one independent head per level), training feeds the true codes (teacher
    forcing), and beam search carries each beam's state forward: one small step per level, never
    re-running the levels before it (the analogue of a key/value cache for a recurrent stack).
    """

    def __init__(self, dim: int, level_sizes: list[int]):
        super().__init__()
        self.level_sizes = [int(c) for c in level_sizes]
        levels = len(self.level_sizes)
        self.head_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(levels))
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in self.level_sizes)
        self.code_embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in self.level_sizes[:-1])
        self.step_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(levels - 1))
        self.steps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(levels - 1)
        )

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    def start(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.heads[0].weight.dtype)

    def logits(self, state: torch.Tensor, level: int) -> torch.Tensor:
        """(N, C_level) float logits of the code at ``level``."""
        return self.heads[level](self.head_norms[level](state)).float()

    def advance(self, state: torch.Tensor, level: int, codes: torch.Tensor) -> torch.Tensor:
        """The state after choosing ``codes`` (N,) at ``level``."""
        step = state + self.code_embeddings[level](codes)
        return state + self.steps[level](self.step_norms[level](step))

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher forcing: each level's logits (N, C_l) given the true codes (N, L) before it."""
        state, logits = self.start(hidden), []
        for level in range(self.levels):
            logits.append(self.logits(state, level))
            if level + 1 < self.levels:
                state = self.advance(state, level, codes[:, level])
        return logits

    def log_probs(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log P(tuple | h) of each row's code tuple (N, L): the score beam search ranks by."""
        logits = self.forward(hidden, codes)
        return sum(F.log_softmax(lg, -1).gather(1, codes[:, i : i + 1]).squeeze(1) for i, lg in enumerate(logits))


class TrieError(ValueError):
    pass


def _lex_order(codes: torch.Tensor, level_sizes: list[int]) -> torch.Tensor:
    """Row order sorting ``codes`` (N, L) lexicographically: one sort of the codes packed into
    one int64 key where they fit (256 codes x 5 levels take 40 bits), else a stable sort per level."""
    bits = [max(1, (size - 1).bit_length()) for size in level_sizes]
    if sum(bits) <= 63:
        key = torch.zeros(codes.shape[0], dtype=torch.int64)
        for level, width in enumerate(bits):
            key = (key << width) | codes[:, level].to(torch.int64)
        return torch.sort(key).indices
    order = torch.arange(codes.shape[0])
    for level in reversed(range(codes.shape[1])):
        order = order[torch.sort(codes[order, level], stable=True).indices]
    return order


@dataclass
class CodeTrie:
    """The catalog's code tuples as a prefix trie held in arrays.

    Leaves are the items with codes, in lexicographic order of their tuples (``leaf_items``). A
    node at depth d (1..L) is a distinct prefix of d codes; the nodes of a depth are numbered in
    lexicographic order too, so a node's leaves are one contiguous range, ``first[d][i]`` to
    ``first[d][i + 1]``, and so are its children. ``codes[d][i]`` is the last code of node i.
    Depth L's nodes are the leaves themselves.
    """

    level_sizes: list[int]
    codes: list[torch.Tensor]  # per depth 1..L (index d - 1): (n_d,) int64 (the items' codes stay int32)
    first: list[torch.Tensor]  # per depth 1..L: (n_d + 1,) int64 leaf ranges
    leaf_items: torch.Tensor  # (n_L,) int64 item index of each leaf
    num_items: int  # the vocabulary size (item indices < num_items)

    def __post_init__(self):
        self.item_leaf = torch.full((self.num_items,), -1, dtype=torch.int64)
        self.item_leaf[self.leaf_items] = torch.arange(len(self.leaf_items))
        # children of depth d's nodes (d = 0: the root) as ranges of depth d + 1's nodes
        self.child_first = [torch.tensor([0, len(self.codes[0])])]
        for depth in range(1, self.levels):
            self.child_first.append(torch.searchsorted(self.first[depth], self.first[depth - 1]))

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    @classmethod
    def build(cls, codes: torch.Tensor, level_sizes: list[int]) -> CodeTrie:
        """From every item's codes (V, L): rows with a negative first code (padding, unknown) are no leaves."""
        items = torch.nonzero(codes[:, 0] >= 0).squeeze(1)
        items = items[_lex_order(codes[items], list(level_sizes))]
        return cls._from_leaves(codes, items, list(level_sizes))

    @classmethod
    def _from_leaves(cls, codes: torch.Tensor, leaf_items: torch.Tensor, level_sizes: list[int]) -> CodeTrie:
        ordered = codes[leaf_items]
        n, levels = ordered.shape
        if levels != len(level_sizes):
            raise TrieError(f"codes have {levels} levels, the level sizes {len(level_sizes)}")
        if n and (int(ordered.min()) < 0 or (ordered >= torch.tensor(level_sizes)).any()):
            raise TrieError("a code is outside its level's range")
        changed = torch.zeros(max(n - 1, 0), dtype=torch.bool)
        node_codes, first = [], []
        for depth in range(1, levels + 1):
            changed |= ordered[1:, depth - 1] != ordered[:-1, depth - 1]
            starts = torch.cat([torch.zeros(min(n, 1), dtype=torch.int64), torch.nonzero(changed).squeeze(1) + 1])
            node_codes.append(ordered[starts, depth - 1].to(torch.int64))
            first.append(torch.cat([starts, torch.tensor([n])]))
        if len(node_codes[-1]) != n:
            raise TrieError("two items share a code tuple (the last level must tell colliding tuples apart)")
        return cls(level_sizes, node_codes, first, leaf_items, codes.shape[0])

    def check(self, codes: torch.Tensor) -> None:
        """Raises TrieError unless this trie is exactly the one ``codes`` (V, L) build: the leaves
        are the coded items in tuple order and every node array matches (no sort needed)."""
        codes = codes.to(torch.int64)
        if codes.shape[0] != self.num_items:
            raise TrieError(f"codes for {codes.shape[0]} items, the trie was built for {self.num_items}")
        coded = int((codes[:, 0] >= 0).sum())
        leaves = self.leaf_items
        if len(leaves) != coded or (len(leaves) and (int(leaves.min()) < 0 or int(leaves.max()) >= self.num_items)):
            raise TrieError(f"the trie has {len(leaves)} leaves, the codes {coded} coded items")
        if len(leaves) and (codes[leaves, 0] < 0).any():
            raise TrieError("a leaf is an item without codes")
        ordered = codes[leaves]
        if len(leaves) > 1:
            differs = ordered[1:] != ordered[:-1]
            level = differs.to(torch.int8).argmax(1, keepdim=True)
            rising = ordered[1:].gather(1, level) > ordered[:-1].gather(1, level)
            if not (differs.any(1) & rising.squeeze(1)).all():
                raise TrieError("the leaves are not the items' code tuples in order")
        rebuilt = CodeTrie._from_leaves(codes, leaves, self.level_sizes)
        for depth in range(self.levels):
            if not (
                torch.equal(rebuilt.codes[depth], self.codes[depth])
                and torch.equal(rebuilt.first[depth], self.first[depth])
            ):
                raise TrieError(f"depth {depth + 1} of the trie does not match the items' codes")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays to store (``from_tensors`` reads them back)."""
        out = {"trie.leaf_items": self.leaf_items, "trie.level_sizes": torch.tensor(self.level_sizes)}
        for depth in range(self.levels):
            out[f"trie.codes.{depth + 1}"] = self.codes[depth]
            out[f"trie.first.{depth + 1}"] = self.first[depth]
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_items: int) -> CodeTrie:
        level_sizes = [int(c) for c in tensors["trie.level_sizes"]]
        depths = range(1, len(level_sizes) + 1)
        return cls(
            level_sizes,
            [tensors[f"trie.codes.{d}"].to(torch.int64) for d in depths],
            [tensors[f"trie.first.{d}"].to(torch.int64) for d in depths],
            tensors["trie.leaf_items"].to(torch.int64),
            num_items,
        )

    def nodes_of(self, items: torch.Tensor, depth: int) -> torch.Tensor:
        """The depth-``depth`` node on each coded item's path."""
        return torch.searchsorted(self.first[depth - 1], self.item_leaf[items], right=True) - 1

    def leaf_counts(self, depth: int, nodes: torch.Tensor) -> torch.Tensor:
        first = self.first[depth - 1]
        return first[nodes + 1] - first[nodes]


class _Live:
    """Which trie nodes still lead to an item a user may get: not seen or denied (``exclude``),
    and in ``allow`` where the user has an allow list. Counted per (user, node) over the few items
    the lists name, never over the catalog."""

    def __init__(self, trie: CodeTrie, users: int, exclude, allow):
        self.trie, self.users = trie, users
        self.allow_rows = torch.zeros(users, dtype=torch.bool)
        removed_owner, removed_items, allowed_owner, allowed_items = [], [], [], []
        for b in range(users):
            banned = exclude[b] if exclude is not None and exclude[b] is not None else None
            banned = _coded(trie, banned)
            if allow is not None and allow[b] is not None:
                self.allow_rows[b] = True
                permitted = _coded(trie, allow[b])
                if banned is not None and len(banned):
                    permitted = permitted[~torch.isin(permitted, banned)]
                allowed_owner.append(torch.full((len(permitted),), b)), allowed_items.append(permitted)
            elif banned is not None:
                removed_owner.append(torch.full((len(banned),), b)), removed_items.append(banned)
        self.removed = _pairs(removed_owner, removed_items)
        self.removed_per_user = torch.bincount(self.removed[0], minlength=users)
        self.allowed = _pairs(allowed_owner, allowed_items)
        self.active = bool(len(self.removed[0]) or self.allow_rows.any())

    def _counts(self, pairs, depth: int, owner: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        users, items = pairs
        if not len(items):
            return torch.zeros(len(nodes), dtype=torch.int64)
        width = len(self.trie.codes[depth - 1])
        keys, counts = torch.unique(users * width + self.trie.nodes_of(items, depth), return_counts=True)
        wanted = owner * width + nodes
        at = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
        return torch.where(keys[at] == wanted, counts[at], 0)

    def mask(self, depth: int, owner: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """True where user ``owner`` may still reach an item under depth-``depth`` ``nodes``."""
        left = self.trie.leaf_counts(depth, nodes)
        alive = torch.ones(len(nodes), dtype=torch.bool)
        if len(self.removed[1]):
            # Only a node with no more leaves than its user excludes can have lost them all: near
            # the root, none does, and nothing is counted.
            unsure = torch.nonzero(left <= self.removed_per_user[owner]).squeeze(1)
            if len(unsure):
                removed = self._counts(self.removed, depth, owner[unsure], nodes[unsure])
                alive[unsure] = left[unsure] > removed
        if self.allow_rows.any():
            restricted = torch.nonzero(self.allow_rows[owner]).squeeze(1)
            alive[restricted] = self._counts(self.allowed, depth, owner[restricted], nodes[restricted]) > 0
        return alive


def _coded(trie: CodeTrie, items) -> torch.Tensor | None:
    if items is None:
        return None
    items = torch.as_tensor(items, dtype=torch.int64).reshape(-1)
    items = items[(items >= 0) & (items < trie.num_items)]
    return torch.unique(items[trie.item_leaf[items] >= 0])


def _pairs(owners: list, items: list) -> tuple[torch.Tensor, torch.Tensor]:
    if not items:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(owners).to(torch.int64), torch.cat(items)


@torch.no_grad()
def beam_search(
    decoder: CodeDecoder,
    trie: CodeTrie,
    hidden: torch.Tensor,
    beam: int,
    k: int,
    exclude: list | None = None,
    allow: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable items for each hidden state (B, D): (log-probabilities, item
    indices), each (B, k), best first; -inf and -1 where fewer items are reachable.

    Every level keeps each user's ``beam`` best prefixes among those that exist in the catalog
    and still lead to an item the user may get (``exclude[b]``: seen or denied items; ``allow[b]``:
    only these), so every item returned exists and none is excluded. ``k`` above ``beam`` widens the
    beam to ``k``. With a beam of at least the catalog's size nothing is pruned, and the result is
    the exhaustive ranking of every tuple by ``decoder.log_probs``.
    """
    if k < 1 or beam < 1:
        raise ValueError(f"beam search needs k >= 1 and beam >= 1, got k={k}, beam={beam}")
    width = max(beam, k)
    users = hidden.shape[0]
    live = _Live(trie, users, exclude, allow)
    device = hidden.device
    nodes = torch.zeros(users, 1, dtype=torch.int64)  # the root
    scores = torch.zeros(users, 1, device=device)
    states = decoder.start(hidden)  # (users * beams, D)
    for level in range(trie.levels):
        beams = nodes.shape[1]
        log_p = F.log_softmax(decoder.logits(states, level), dim=-1)  # (users * beams, C)
        child_first = trie.child_first[level]
        starts = child_first[nodes.reshape(-1)]
        counts = torch.where(torch.isfinite(scores.reshape(-1)).cpu(), child_first[nodes.reshape(-1) + 1] - starts, 0)
        parent = torch.repeat_interleave(torch.arange(users * beams), counts)  # one per candidate child
        offsets = torch.cumsum(counts, 0) - counts
        child = starts[parent] + torch.arange(len(parent)) - offsets[parent]
        code = trie.codes[level][child]
        owner = parent // beams
        if not len(parent):  # nothing reachable for anyone
            scores = torch.full((users, 1), float("-inf"), device=device)
            nodes = torch.zeros(users, 1, dtype=torch.int64)
            break
        candidate = scores.reshape(-1)[parent.to(device)] + log_p[parent.to(device), code.to(device)]
        if live.active:
            candidate = candidate.masked_fill(~live.mask(level + 1, owner, child).to(device), float("-inf"))
        # Each user's best ``width`` candidates: candidates are grouped by user, laid out in a
        # (users, most candidates) block padded with -inf.
        per_user = torch.bincount(owner, minlength=users)
        slot = torch.arange(len(owner)) - (torch.cumsum(per_user, 0) - per_user)[owner]
        block = torch.full((users, max(1, int(per_user.max()) if users else 1)), float("-inf"), device=device)
        block[owner.to(device), slot.to(device)] = candidate
        keep = min(width, block.shape[1])
        scores, chosen = torch.topk(block, keep, dim=1)
        flat = torch.full((users, block.shape[1]), -1, dtype=torch.int64)
        flat[owner, slot] = torch.arange(len(owner))
        picked = flat.gather(1, chosen.cpu()).clamp(min=0)  # -inf padding picks candidate 0; its score stays -inf
        nodes = child[picked]
        if level + 1 < trie.levels:
            states = decoder.advance(
                states[parent[picked.reshape(-1)].to(device)], level, code[picked.reshape(-1)].to(device)
            )
    finite = torch.isfinite(scores).cpu()
    items = torch.where(finite, trie.leaf_items[nodes] if finite.any() else -1, -1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = F.pad(scores, (0, pad), value=float("-inf"))
        items = F.pad(items, (0, pad), value=-1)
    return scores[:, :k], items[:, :k]
