"""The K-way ranking loss of the reward model, checked by hand and against its pairwise form."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instructrl.rlmath import kway_ranking_loss, ranked_pairs_mask


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_two_responses_is_the_pairwise_loss():
    # K = 2, response 0 ranked first, rewards 1.0 and 0.0: one pair, loss = -log sigmoid(1 - 0)
    total, n = kway_ranking_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]), torch.ones(1, 2))
    assert n.item() == 1
    assert math.isclose(total.item(), -log_sigmoid(1.0), rel_tol=1e-6)  # = 0.31326...


def test_three_responses_by_hand():
    # rewards (2, 0, 1), ranks (0, 2, 1): ranked pairs (0>1), (0>2), (2>1)
    # margins 2 - 0 = 2, 2 - 1 = 1, 1 - 0 = 1; C(3, 2) = 3 pairs
    expected = -(log_sigmoid(2.0) + log_sigmoid(1.0) + log_sigmoid(1.0)) / 3
    total, n = kway_ranking_loss(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0, 2, 1]]), torch.ones(1, 3))
    assert math.isclose(total.item(), expected, rel_tol=1e-6)
    assert n.item() == 1


def test_ties_and_padding_are_dropped():
    # ranks (0, 0, 1): responses 0 and 1 tie, so only (0>2) and (1>2) count; the 4th slot is padding
    ranks = torch.tensor([[0, 0, 1, 0]])
    valid = torch.tensor([[1, 1, 1, 0]])
    mask = ranked_pairs_mask(ranks, valid)
    assert mask.sum().item() == 2
    assert mask[0, 0, 2] == 1 and mask[0, 1, 2] == 1 and mask[0, 0, 1] == 0 and mask[0, 1, 0] == 0
    rewards = torch.tensor([[0.5, -0.5, 0.0, 100.0]])
    expected = -(log_sigmoid(0.5) + log_sigmoid(-0.5)) / 2
    total, _ = kway_ranking_loss(rewards, ranks, valid)
    assert math.isclose(total.item(), expected, rel_tol=1e-6)


def test_a_prompt_whose_responses_all_tie_contributes_nothing():
    total, n = kway_ranking_loss(torch.tensor([[1.0, 2.0], [1.0, 0.0]]), torch.tensor([[0, 0], [0, 1]]), torch.ones(2, 2))
    assert n.item() == 1
    assert math.isclose(total.item(), -log_sigmoid(1.0), rel_tol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_equals_the_mean_of_its_pairwise_losses(k, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(1, k, generator=g)
    ranks = torch.randint(0, k, (1, k), generator=g)
    pairwise = [
        -log_sigmoid((rewards[0, i] - rewards[0, j]).item())
        for i in range(k) for j in range(k) if ranks[0, i] < ranks[0, j]
    ]
    total, n = kway_ranking_loss(rewards, ranks, torch.ones(1, k))
    if not pairwise:
        assert n.item() == 0 and total.item() == 0
    else:
        assert math.isclose(total.item(), sum(pairwise) / len(pairwise), rel_tol=1e-5)


def test_a_steps_gradient_is_its_ranked_prompts_mean_however_it_is_micro_batched():
    """The RM's step divides the summed per-prompt losses by the step's count of prompts that have a
    ranked pair (``fit``'s global targets), so splitting the step into micro-batches changes nothing,
    and a prompt whose responses all tie counts for nothing, not as a zero that dilutes the rest."""
    from instructrl.config import RMConfig
    from instructrl.training.loop import backward_micro_batches, make_accelerator

    class Rewards(torch.nn.Module):  # one learnable reward per response, all 0 to start
        def __init__(self):
            super().__init__()
            self.r = torch.nn.Parameter(torch.zeros(7))

        def forward(self, rows):
            return self.r[rows]

    # prompt A: responses 0 > 1; prompt B: 2 and 3 tie; prompt C: 4 > 5 > 6 (slot 3 of A and B is padding)
    prompts = {"A": ([0, 1, 0], [0, 1, 0], [1, 1, 0]), "B": ([2, 3, 0], [0, 0, 0], [1, 1, 0]), "C": ([4, 5, 6], [0, 1, 2], [1, 1, 1])}

    def batch(names):
        rows, ranks, valid = (torch.tensor([prompts[n][i] for n in names]) for i in range(3))
        return {"rows": rows, "ranks": ranks, "valid": valid}

    loss_fn = lambda model, b: kway_ranking_loss(model(b["rows"]), b["ranks"], b["valid"])[0]  # noqa: E731
    # at margin 0, d/dm -log σ(m) = -σ(0) = -0.5. A: one pair, so r0 gets -0.5 and r1 +0.5. C: three pairs,
    # each loss / 3: r4 wins two (-1/3), r5 wins one and loses one (0), r6 loses two (+1/3). Two prompts
    # have ranked pairs (B has none): the step's gradient is half the sum.
    expected = torch.tensor([-0.25, 0.25, 0.0, 0.0, -1 / 6, 0.0, 1 / 6])
    accelerator = make_accelerator(RMConfig())
    for split in ([["A", "B", "C"]], [["A"], ["B"], ["C"]], [["A", "B"], ["C"]]):
        model = Rewards()
        backward_micro_batches(accelerator, model, loss_fn, [batch(names) for names in split], global_targets=2)
        assert torch.allclose(model.r.grad, expected, atol=1e-7), split
