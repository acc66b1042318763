"""Token ids held compactly (data/sequences.py) read back, and batch, exactly as the lists they were given."""

from __future__ import annotations

import random

import pytest
import torch

from instructrl.data.chat import TokenizedConversation
from instructrl.data.records import ComparisonRecord
from instructrl.data.sequences import TokenizedConversations, TokenSequences
from instructrl.padding import pad_sequences
from instructrl.stages.rm import best_ranked


def test_token_sequences_read_back_as_the_lists_they_were_given():
    lists = [[5, 300, 70000], [], [1], [2**31 - 1, 0, 256, 257]]  # ids past one byte, two and the small-int cache; an empty one
    sequences = TokenSequences(lists)
    assert list(sequences) == lists and len(sequences) == 4
    assert sequences[-1] == lists[-1] and sequences[1:3] == lists[1:3] and sequences[::-2] == lists[::-2]
    assert sequences.lengths() == [3, 0, 1, 4] and TokenSequences().lengths() == []
    with pytest.raises(IndexError):
        sequences[4]
    masks = TokenSequences([[0, 1, 1], [1]], typecode="b")
    masks.append([0, 0])
    assert list(masks) == [[0, 1, 1], [1], [0, 0]]


def test_compact_conversations_make_the_batches_the_lists_made():
    """SFT's batches: the ids padded with the pad id and the masks with 0, from any examples in any order."""
    rng = random.Random(0)
    lists = []
    for _ in range(40):
        n = rng.randrange(1, 30)
        lists.append(TokenizedConversation([rng.randrange(50_000) for _ in range(n)], [rng.randrange(2) for _ in range(n)]))
    compact = TokenizedConversations(lists)
    assert len(compact) == 40 and list(compact) == lists and compact[3:5] == lists[3:5]
    for _ in range(10):
        indices = rng.sample(range(40), 8)
        for field, pad in (("input_ids", 3), ("assistant_mask", 0)):
            expected = pad_sequences([getattr(lists[i], field) for i in indices], pad, side="right")
            got = pad_sequences([getattr(compact[i], field) for i in indices], pad, side="right")
            assert all(torch.equal(e, g) for e, g in zip(expected, got))


def test_the_rm_centres_the_best_ranked_of_compact_responses_as_of_lists():
    records = [ComparisonRecord(id=f"p{i}", prompt=[{"role": "user", "content": "hi"}], responses=["a", "b", "c"], ranks=ranks, labeler_id="me")
               for i, ranks in enumerate([[1, 0, 2], [0, 0, 1], [2, 1, 1]])]
    encoded = [[[i, 300 + j] * (j + 1) for j in range(3)] for i in range(3)]
    chosen = best_ranked(records, [TokenSequences(seqs) for seqs in encoded])
    assert list(chosen) == list(best_ranked(records, encoded)) == [encoded[0][1], encoded[1][0], encoded[1][1], encoded[2][1], encoded[2][2]]
