"""Padding and index arithmetic (padding.py) and the loss math (rlmath.py)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from instructrl import padding, rlmath
from instructrl.padding import last_token_index, pad_sequences, position_ids_from_mask
from instructrl.rlmath import masked_mean, masked_sum, next_token_nll, token_logprobs

LN2 = math.log(2)


@pytest.mark.parametrize("module", [rlmath, padding])
def test_the_math_modules_export_every_function_they_define_each_with_a_docstring(module):
    defined = {name for name, value in vars(module).items()
               if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")}
    assert sorted(module.__all__) == sorted(defined)  # help() and `import *` show them, not torch or F
    assert [name for name in module.__all__ if not inspect.getdoc(getattr(module, name))] == []


# ---------------------------------------------------------------- padding


def test_pad_left():
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=0, side="left")
    # the short row gets its two pads in front
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_right():
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=0, side="right")
    # the short row gets its two pads after
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_uses_the_pad_id_and_handles_empty_rows():
    ids, mask = pad_sequences([[5, 6], []], pad_id=9, side="left")
    # an empty row is all pad, all mask 0; the pad id is 9, not 0
    assert ids.tolist() == [[5, 6], [9, 9]]
    assert mask.tolist() == [[1, 1], [0, 0]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_position_ids_from_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    # row 0: cumsum 0 0 1 2 3, minus 1 -> -1 -1 0 1 2, pads clamped to 0 -> 0 0 0 1 2
    # row 1: cumsum 1 2 3 4 5, minus 1 -> 0 1 2 3 4
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_last_token_index():
    mask = torch.tensor([
        [0, 0, 1, 1, 1],  # left padded: last real token in the last column, 4
        [1, 1, 0, 0, 0],  # right padded: last real token at column 1
        [0, 0, 0, 0, 0],  # no real token: -1
        [1, 1, 1, 1, 1],  # no padding: 4
    ])
    assert last_token_index(mask).tolist() == [4, 1, -1, 4]


# ---------------------------------------------------------------- masked means


def test_masked_mean():
    # (1 + 3) / 2 = 2; the masked-out 100 is ignored
    assert masked_mean(torch.tensor([1.0, 100.0, 3.0]), torch.tensor([1.0, 0.0, 1.0])).item() == 2.0


def test_masked_mean_of_empty_mask_is_zero():
    result = masked_mean(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    # 0 / clamp(0, min=1) = 0 / 1 = 0, not 0 / 0 = nan
    assert result.item() == 0.0


def test_masked_sum():
    # 2 + 5 = 7
    assert masked_sum(torch.tensor([[2.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 0], [1, 0]])).item() == 7.0


# ---------------------------------------------------------------- next-token NLL


def test_token_logprobs_hand_case():
    # logits (0, ln 3): softmax = (1/4, 3/4); log p(token 1) = ln 3/4, log p(token 0) = ln 1/4
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(lp, torch.tensor([[math.log(0.75), math.log(0.25)]]))


def test_next_token_nll_uniform_logits():
    # V = 2 and all logits 0: every token has probability 1/2 and costs ln 2
    logits = torch.zeros(1, 4, 2)
    input_ids = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1]])
    total, count = next_token_nll(logits, input_ids, mask)
    # the first token is never a target even with mask[0] = 1: targets are tokens 1, 2, 3
    assert count.item() == 3
    assert math.isclose(total.item(), 3 * LN2, rel_tol=1e-6)


def test_next_token_nll_uses_only_masked_targets():
    logits = torch.zeros(1, 5, 2)
    input_ids = torch.tensor([[0, 1, 1, 0, 1]])
    mask = torch.tensor([[1, 0, 1, 1, 0]])  # targets: tokens 2 and 3 only
    total, count = next_token_nll(logits, input_ids, mask)
    assert count.item() == 2
    assert math.isclose(total.item(), 2 * LN2, rel_tol=1e-6)


def test_next_token_nll_position_t_predicts_token_t_plus_1():
    # position 0's logits favour token 1 three to one, position 1's favour token 0 three to one;
    # the target of position 0 is token 1 (p = 3/4), of position 1 is token 1 (p = 1/4)
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 0.0]]])
    input_ids = torch.tensor([[0, 1, 1]])
    total, count = next_token_nll(logits, input_ids, torch.ones(1, 3))
    assert count.item() == 2
    assert math.isclose(total.item(), -math.log(0.75) - math.log(0.25), rel_tol=1e-6)


def test_next_token_nll_matches_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=generator)
    input_ids = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.randint(0, 2, (B, T), generator=generator)
    total, count = next_token_nll(logits, input_ids, mask)
    # the usual shift: labels are the next tokens, -100 where the mask is 0
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert torch.allclose(total, expected, atol=1e-5)
    assert count.item() == (labels != -100).sum().item()


@settings(max_examples=40, deadline=None, database=None)
@given(
    st.integers(1, 4).flatmap(
        lambda b: st.integers(1, 8).flatmap(
            lambda t: st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t), min_size=b, max_size=b)
        )
    )
)
def test_next_token_nll_counts_masked_targets(rows):
    mask = torch.tensor(rows)
    B, T = mask.shape
    logits = torch.zeros(B, T, 3)
    total, count = next_token_nll(logits, torch.zeros(B, T, dtype=torch.long), mask)
    # every position but the first can be a target
    assert count.item() == mask[:, 1:].sum().item()
    # uniform over V = 3: each target costs ln 3
    assert math.isclose(total.item(), count.item() * math.log(3), rel_tol=1e-5, abs_tol=1e-6)
