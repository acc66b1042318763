"""PPO's pure math (rlmath.py) and the EOS helper (padding.py), against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instructrl.padding import shared_padding, truncate_after_eos
from instructrl.rlmath import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    kl_per_token,
    masked_whiten,
    per_token_rewards,
)

EOS, PAD = 2, 0


# ---------------------------------------------------------------- EOS truncation


def test_truncate_after_first_eos():
    ids = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, 9, 9, 9]])
    out, mask, ended = truncate_after_eos(ids, eos_id=EOS, pad_id=PAD)
    # row 0: the EOS at column 1 is kept, what follows (even a second EOS) becomes PAD
    # row 1: no EOS, all four tokens are real, ended is False
    # row 2: EOS first: a one-token response
    assert out.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_shared_padding_is_the_padding_every_row_has():
    # prompts left-padded to 4 columns: no row uses column 0, row 1 starts at column 1
    query_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    # responses right-padded to 5 columns: the longest ends at column 2, so columns 3 and 4 are shared padding
    response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert shared_padding(query_mask, response_mask) == (1, 3)
    # nothing shared: nothing dropped
    assert shared_padding(torch.ones(2, 3), torch.ones(2, 2)) == (0, 2)


# ---------------------------------------------------------------- KL estimators


def test_kl_k1_and_k3_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    # k1 = log π - log π_ref: log 2 and log 0.5
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([[math.log(2), -math.log(2)]]))
    # k3 = (ρ - 1) - log ρ, ρ = π_ref/π: ρ = 0.5 → -0.5 + log 2 = 0.1931; ρ = 2 → 1 - log 2 = 0.3069
    k3 = kl_per_token(logp, ref, "k3")
    assert torch.allclose(k3, torch.tensor([[-0.5 + math.log(2), 1 - math.log(2)]]), atol=1e-6)


def test_kl_estimators_average_to_the_true_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    true_kl = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        estimate = kl_per_token(logp, logq, estimator).mean()
        assert abs(estimate - true_kl) < 0.01, estimator
    assert (kl_per_token(logp, logq, "k3") >= 0).all()


def test_exact_kl_from_logits_by_hand():
    from instructrl.rlmath import kl_from_logits

    # π = softmax(0, ln 3) = (0.25, 0.75), π_ref uniform: 0.25 ln 0.5 + 0.75 ln 1.5 = 0.130812
    logits = torch.tensor([[[0.0, math.log(3)], [1.0, 2.0]]])
    ref = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    assert torch.allclose(kl_from_logits(logits, ref), torch.tensor([[0.25 * math.log(0.5) + 0.75 * math.log(1.5), 0.0]]), atol=1e-6)


def test_exact_kl_is_what_k1_and_k3_average_to_over_the_vocabulary():
    from instructrl.rlmath import kl_from_logits

    torch.manual_seed(0)
    logits, ref = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    logp, logq = logits.log_softmax(-1), ref.log_softmax(-1)
    exact = kl_from_logits(logits, ref)
    assert (exact > 0).all()
    for estimator in ("k1", "k3"):  # E_{a~π}[k(a)] summed exactly over the 11 tokens
        expected = (logp.exp() * kl_per_token(logp, logq, estimator)).sum(-1)
        assert torch.allclose(exact, expected, atol=1e-5), estimator


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k2")


# ---------------------------------------------------------------- rewards


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.5, 1.0, 2.0], [1.0, 9.0, 9.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    rewards = per_token_rewards(torch.tensor([3.0, -1.0, 5.0]), kl, mask, kl_coef=0.1)
    # row 0: -0.1·KL everywhere, score 3 added on token 2 → [-0.05, -0.1, -0.2 + 3]
    # row 1: one real token: -0.1 + (-1) = -1.1; padding gets nothing even though its KL is 9
    # row 2: no real token, so no position to put the score 5 on (not the last column either)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 2.8], [-1.1, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- GAE


def test_gae_hand_values():
    # one response of 3 tokens, γ = 1, λ = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.5]])
    mask = torch.ones(1, 3)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # δ2 = 1 + 0 - 0.5 = 0.5;    A2 = 0.5
    # δ1 = 0 + 0.5 - 0.25 = 0.25; A1 = 0.25 + 0.5·0.5 = 0.5
    # δ0 = 0 + 0.25 - 0.5 = -0.25; A0 = -0.25 + 0.5·0.5 = 0
    assert torch.allclose(adv, torch.tensor([[0.0, 0.5, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.5, 0.75, 1.0]]))


def test_gae_with_lambda_one_is_reward_to_go_minus_value():
    # γ = λ = 1: A_t = sum of rewards from t on - V_t (the Monte Carlo advantage)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[1.0, 1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[5.0, 4.0, 2.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


def _gae_closed_form(rewards, values, mask, gamma, lam):
    """A_t = sum_k (γλ)^k δ_{t+k}: the definition, summed directly for each t."""
    B, T = rewards.shape
    out = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        v = list(values[b, :n]) + [0.0]
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return out


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_gae_scan_matches_closed_form_with_right_padding(lengths, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    rewards = torch.randn(len(lengths), T, generator=g)
    values = torch.randn(len(lengths), T, generator=g)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    expected = _gae_closed_form(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-5)


# ---------------------------------------------------------------- whitening


def test_masked_whiten_ignores_padding():
    values = torch.tensor([[1.0, 3.0, 100.0], [5.0, -100.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = masked_whiten(values, mask)
    # real entries 1, 3, 5: mean 3, unbiased variance (4 + 0 + 4) / 2 = 4, std 2
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-4)
    kept = masked_whiten(values, mask, shift_mean=False)
    # without the shift the mean 3 stays: (x - 3)/2 + 3
    assert torch.allclose(kept, torch.tensor([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]]), atol=1e-4)


# ---------------------------------------------------------------- clipped losses


def test_clipped_policy_loss_hand_values():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, stats = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: A = 1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: A = -1, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped)
    # token 2: A = 2, ratio 1.1: max(-2.2, -2.2) = -2.2 (inside the clip range)
    assert torch.allclose(loss, torch.tensor((-1.2 + 0.8 - 2.2) / 3))
    assert torch.allclose(stats["clipfrac"], torch.tensor(2 / 3))


def test_clipped_policy_loss_ratio_one_at_start():
    logp = torch.randn(2, 4)
    loss, stats = clipped_policy_loss(logp, logp.clone(), torch.randn(2, 4), torch.ones(2, 4))
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0


def test_clipped_policy_loss_gradient_is_zero_when_clipped():
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = clipped_policy_loss(new, old, torch.tensor([[1.0]]), torch.ones(1, 1), clip=0.2)
    loss.backward()
    # ratio 1.5 > 1.2 with a positive advantage: the clipped term wins and has no gradient
    assert new.grad.item() == 0.0


def test_clipped_losses_ignore_the_positions_the_mask_leaves_out():
    """Tokens after the first EOS (mask 0) hold garbage log-probs, values and advantages: they must
    change neither the losses, nor their statistics, nor the gradient."""
    new = torch.log(torch.tensor([[1.1, 50.0]])).requires_grad_()  # ratios 1.1 and, on padding, 50
    mask = torch.tensor([[1, 0]])
    loss, stats = clipped_policy_loss(new, torch.zeros(1, 2), torch.tensor([[2.0, -7.0]]), mask, clip=0.2)
    # the real token alone: A = 2, ratio 1.1 inside the clip range: -2.2; approx-KL 0.5·ln²1.1 = 0.004542
    assert torch.allclose(loss, torch.tensor(-2.2)) and stats["clipfrac"].item() == 0.0
    assert torch.allclose(stats["approx_kl"], torch.tensor(0.5 * math.log(1.1) ** 2)) and torch.allclose(stats["ratio"], torch.tensor(1.1))
    loss.backward()
    assert new.grad[0, 1].item() == 0.0 and new.grad[0, 0].item() != 0.0
    values = torch.tensor([[0.1, 100.0]]).requires_grad_()
    vf_loss, vf_clipfrac = clipped_value_loss(values, torch.zeros(1, 2), torch.tensor([[1.0, -100.0]]), mask, clip=0.2)
    # V = 0.1 inside the clip range of old V = 0: 0.5·(0.1 - 1)² = 0.405
    assert torch.allclose(vf_loss, torch.tensor(0.405)) and vf_clipfrac.item() == 0.0
    vf_loss.backward()
    assert values.grad[0, 1].item() == 0.0


def test_clipped_value_loss_hand_values():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, clipfrac = clipped_value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1 - 1)² = 0, clipped V = 0.2 → (0.2 - 1)² = 0.64: max 0.64
    # token 1: unclipped (0.1 - 1)² = 0.81, clipped V = 0.1 (inside) → 0.81: max 0.81
    assert torch.allclose(loss, torch.tensor(0.5 * (0.64 + 0.81) / 2))
    assert torch.allclose(clipfrac, torch.tensor(0.5))


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -1e9, -1e9, -1e9]]])
    # uniform over 4 → log 4; one certain token → 0
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([[math.log(4), 0.0]]), atol=1e-6)


# ---------------------------------------------------------------- KL controller


def test_kl_controller_fixed_and_adaptive():
    from instructrl.rl.kl_control import KLController

    fixed = KLController(0.02)
    assert fixed.update(mean_kl=50.0, n_episodes=64) == 0.02
    adaptive = KLController(0.1, adaptive=True, target=2.0, horizon=1000)
    # KL 3 vs target 2: error clipped 0.5 → 0.2; β = 0.1 · (1 + 0.2 · 100/1000) = 0.102
    assert abs(adaptive.update(mean_kl=3.0, n_episodes=100) - 0.102) < 1e-12
    # KL 1.8 vs target 2: error -0.1; β = 0.102 · (1 - 0.1 · 0.1) = 0.10098
    assert abs(adaptive.update(mean_kl=1.8, n_episodes=100) - 0.10098) < 1e-12


# ---------------------------------------------------------------- win rate


def test_win_rate_by_hand():
    from instructrl.evaluation.preference import win_rate

    # outcomes 1, 0.5, 0, 1: win rate 0.625. The interval adds two wins and two losses:
    # 1 1 1 1 .5 0 0 0 → p̃ = 4.5 / 8 = 0.5625; squared deviations 4 · .4375² + .0625² + 3 · .5625²
    # = 1.71875, v = 1.71875 / 8 = 0.21484; half-width 1.96 · √(0.21484 / 8) = 0.32120
    result = win_rate([3, 2, 1, 5], [1, 2, 4, 4])
    assert result["win_rate"] == 0.625 and (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert abs(result["ci95"][0] - 0.24130) < 1e-4 and abs(result["ci95"][1] - 0.88370) < 1e-4


def test_win_rate_interval_of_unanimous_prompts_is_not_a_point():
    from instructrl.evaluation.preference import win_rate

    # 3 wins of 3 (the old normal approximation: sd 0, interval [1, 1]). Plus four: 5 of 7,
    # p̃ = 0.71429, half-width 1.96 · √(p̃ (1 - p̃) / 7) = 0.33467 → [0.37962, 1 (clipped)]
    result = win_rate([2, 2, 2], [1, 1, 1])
    assert result["win_rate"] == 1.0 and abs(result["ci95"][0] - 0.37962) < 1e-4 and result["ci95"][1] == 1.0
    # 12 ties of 12: 12 halves, two 1s, two 0s → p̃ = 0.5, v = 4 · 0.25 / 16 = 0.0625,
    # half-width 1.96 · √(0.0625 / 16) = 0.1225
    ties = win_rate([4] * 12, [4] * 12)
    assert ties["win_rate"] == 0.5 and ties["ci95"] == pytest.approx([0.3775, 0.6225])


@given(st.lists(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3), min_size=1, max_size=40), st.data())
def test_win_rate_interval_holds_the_win_rate_and_has_width(scores_a, data):
    from instructrl.evaluation.preference import win_rate

    scores_b = [data.draw(st.lists(st.sampled_from([0, 1, 2]), min_size=len(a), max_size=len(a))) for a in scores_a]
    result = win_rate(scores_a, scores_b)
    low, high = result["ci95"]
    assert 0.0 <= low <= result["win_rate"] <= high <= 1.0 and high - low > 0.01


def test_win_rate_with_several_samples_per_prompt_counts_prompts():
    from instructrl.evaluation.preference import win_rate

    # prompt 1: samples (3 vs 1 win, 1 vs 1 tie) → 0.75; prompt 2: one tie → 0.5. Mean 0.625 over
    # n = 2 prompts. Interval: .75 .5 1 1 0 0 → p̃ = 3.25 / 6 = 0.54167, squared deviations sum
    # 1.05208, v = 0.17535, half-width 1.96 · √(0.17535 / 6) = 0.33507
    result = win_rate([[3, 1], [2]], [[1, 1], [2]])
    assert result["win_rate"] == 0.625 and result["n"] == 2
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 0)
    assert abs(result["ci95"][0] - 0.20660) < 1e-4 and abs(result["ci95"][1] - 0.87673) < 1e-4
    with pytest.raises(ValueError, match="as many answers"):
        win_rate([[3, 1]], [[1]])


def test_win_rate_samples_of_one_prompt_are_not_independent_evidence():
    from instructrl.evaluation.preference import win_rate

    # 6 prompts, 3 won and 3 lost, each answered 4 times alike: as much evidence as one answer per
    # prompt, so the same interval (.5 ± 1.96 · √(.25 / 10) = [0.19010, 0.80990]), not one of 24 comparisons
    once = win_rate([2, 2, 2, 0, 0, 0], [1] * 6)
    four = win_rate([[2] * 4] * 3 + [[0] * 4] * 3, [[1] * 4] * 6)
    assert four["ci95"] == once["ci95"] == pytest.approx([0.19010, 0.80990], abs=1e-5)
    assert (four["n"], four["wins"], four["losses"]) == (6, 12, 12)
