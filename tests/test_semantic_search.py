"""The code trie and constrained beam search (model.semantic) on tiny catalogs, by hand."""

import itertools

import pytest
import torch

from model.semantic import CodeDecoder, CodeTrie, TrieError, beam_search

LEVELS = [4, 3, 5]


def _catalog(items=60, seed=0):
    """``items`` indices, the first two without codes (padding, unknown), the rest with distinct
    random tuples; a decoder with weights large enough to make the ranking sharp."""
    g = torch.Generator().manual_seed(seed)
    tuples = list(itertools.product(*(range(c) for c in LEVELS)))
    codes = torch.full((items, len(LEVELS)), -1, dtype=torch.int32)
    for i, pick in enumerate(torch.randperm(len(tuples), generator=g)[: items - 2].tolist()):
        codes[i + 2] = torch.tensor(tuples[pick])
    torch.manual_seed(seed)
    decoder = CodeDecoder(16, LEVELS)
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return codes, CodeTrie.build(codes, LEVELS), decoder.eval(), torch.randn(5, 16, generator=g)


def _exhaustive(decoder, codes, hidden, k):
    """Every item's tuple scored by the decoder: the ranking a beam search must find."""
    items = torch.arange(2, len(codes))
    out = []
    with torch.no_grad():
        for h in hidden:
            scores = decoder.log_probs(h.expand(len(items), -1), codes[items].long())
            top = torch.topk(scores, k)
            out.append((top.values, items[top.indices]))
    return out


def test_a_beam_of_the_catalogs_size_equals_scoring_every_tuple():
    codes, trie, decoder, hidden = _catalog()
    scores, items = beam_search(decoder, trie, hidden, beam=len(codes), k=20)
    for b, (best_scores, best_items) in enumerate(_exhaustive(decoder, codes, hidden, 20)):
        assert torch.equal(items[b], best_items)
        torch.testing.assert_close(scores[b], best_scores, rtol=1e-5, atol=1e-5)


def test_every_item_exists_and_none_is_seen_denied_or_outside_the_allow_list():
    codes, trie, decoder, hidden = _catalog()
    full_scores, full_items = beam_search(decoder, trie, hidden, beam=len(codes), k=40)
    excluded = [full_items[b, :3] for b in range(5)]
    allow = [torch.tensor([5, 6, 7, 0, 1, 999]), None, torch.tensor([0, 1]), None, torch.arange(60)]
    scores, items = beam_search(decoder, trie, hidden, beam=len(codes), k=40, exclude=excluded, allow=allow)
    for b in range(5):
        got = items[b][items[b] >= 0]
        assert (codes[got, 0] >= 0).all() and not torch.isin(got, excluded[b]).any()
        if allow[b] is not None:
            assert torch.isin(got, allow[b]).all()
    # Without an allow list, the exhaustive ranking with the excluded items taken out.
    assert torch.equal(items[1, :37], full_items[1, 3:])
    assert set(items[0][items[0] >= 0].tolist()) == {5, 6, 7} - set(excluded[0].tolist())
    assert (items[2] == -1).all() and torch.isinf(scores[2]).all()  # allowed items without codes: none
    # A narrow beam still returns only reachable, allowed items, and k above it widens it.
    narrow_scores, narrow = beam_search(decoder, trie, hidden, beam=2, k=10, exclude=excluded)
    assert narrow.shape == (5, 10) and (narrow >= 2).all()
    for b in range(5):
        assert not torch.isin(narrow[b], excluded[b]).any()


def test_the_trie_refuses_colliding_tuples_and_codes_it_was_not_built_from():
    codes, trie, _, _ = _catalog()
    trie.check(codes)
    stored = CodeTrie.from_tensors(trie.tensors(), len(codes))
    stored.check(codes)
    collided = codes.clone()
    collided[3] = collided[2]
    with pytest.raises(TrieError, match="share a code tuple"):
        CodeTrie.build(collided, LEVELS)
    other = codes.clone()
    other[[2, 3]] = other[[3, 2]]  # two items' codes swapped: the leaves no longer match
    with pytest.raises(TrieError):
        trie.check(other)
    with pytest.raises(TrieError, match="codes for 59 items"):
        trie.check(codes[:-1])
