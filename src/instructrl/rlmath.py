"""The pure math of instructrl: torch-only functions, no models, optimizers or I/O.

Shapes: B = batch, T = sequence length, V = vocabulary, K = responses per prompt. Masks may be
bool, int or float tensors (1 = counted); values and results are float.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from instructrl.padding import last_token_index

__all__ = [
    "masked_sum", "masked_mean", "token_logprobs", "gather_tokens", "next_token_nll",
    "ranked_pairs_mask", "kway_ranking_loss",
    "kl_per_token", "per_token_rewards", "gae_advantages", "masked_whiten", "clipped_policy_loss", "clipped_value_loss",
    "entropy_from_logits", "entropy_from_logprobs", "kl_from_logits", "kl_from_logprobs",
]


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1. Any matching shapes."""
    return (values * mask).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when the mask is empty)."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, T) log p(tokens[b, t]) from (B, T, V) logits at the same positions."""
    return gather_tokens(F.log_softmax(logits.float(), dim=-1), tokens)


def gather_tokens(logprobs: Tensor, tokens: Tensor) -> Tensor:
    """(B, T) log p(tokens[b, t]) from (B, T, V) log-probabilities (log_softmax already taken)."""
    return torch.gather(logprobs, -1, tokens.unsqueeze(-1)).squeeze(-1)


def next_token_nll(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood over the positions ``loss_mask`` marks.

    logits: (B, T, V) from a forward pass over input_ids (B, T); loss_mask: (B, T), 1 where a
    token is a *target* (an assistant token in SFT, a real token in pretraining). Position t's
    logits predict token t + 1, so the first token is never a target.
    Returns (sum of NLL, number of target tokens): divide by the count of the whole optimizer
    step, not of one micro-batch, so that gradient accumulation does not change the loss.
    """
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].to(torch.float32)  # float32: a bf16 count rounds above 256
    nll = -token_logprobs(logits[:, :-1], targets)
    return masked_sum(nll, weights), weights.sum()


def ranked_pairs_mask(ranks: Tensor, valid: Tensor) -> Tensor:
    """(B, K, K) mask, 1 where response i is ranked strictly better than response j.

    ranks: (B, K) rank of each response, 0 = best, equal ranks = a tie; valid: (B, K) 1 for a real
    response (prompts with fewer than K responses are padded). Tied and padded pairs are 0:
    InstructGPT drops ties (§3.5).
    """
    better = ranks.unsqueeze(-1) < ranks.unsqueeze(-2)
    real = valid.bool().unsqueeze(-1) & valid.bool().unsqueeze(-2)
    return (better & real).to(torch.float32)


def kway_ranking_loss(rewards: Tensor, ranks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """InstructGPT's reward-model loss over the ranked pairs of K responses (§3.5, eq. 1).

        loss(x) = -1 / P(x) * sum over pairs (y_w better than y_l) of log sigmoid(r(x, y_w) - r(x, y_l))

    rewards: (B, K) scalar reward of each response; ranks, valid: as in ``ranked_pairs_mask``.
    P(x) is the number of ranked (non-tied) pairs of prompt x: C(K, 2) when nothing ties, as in
    the paper. All pairs of a prompt are one batch element, so each response is forwarded once.
    Returns (sum over prompts of their loss, number of prompts with at least one ranked pair).
    """
    pairs = ranked_pairs_mask(ranks, valid)  # (B, K, K)
    margins = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)  # (B, K, K): r_i - r_j
    pair_losses = -F.logsigmoid(margins.float()) * pairs
    per_prompt_pairs = pairs.sum((-1, -2))
    has_pairs = per_prompt_pairs > 0
    per_prompt = pair_losses.sum((-1, -2)) / per_prompt_pairs.clamp(min=1)
    return (per_prompt * has_pairs).sum(), has_pairs.sum()


# --- PPO (InstructGPT §3.5, Appendix C.4; Huang et al. 2024 for the details) ---------------------


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """(B, T) per-token estimate of KL(π_RL ‖ π_SFT) from log-probs of the *sampled* tokens.

    k1 = log π - log π_ref: the classic, unbiased estimator, negative on some tokens; a mean that
    stays negative means rollout and scoring disagree on the distribution (temperature, padding).
    k3 = (ρ - 1) - log ρ with ρ = π_ref / π: unbiased and never negative (Schulman 2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: choose k1 or k3")


def per_token_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """(B, T) PPO rewards: -β·KL on every response token, plus the episode score on the last one.

    scores: (B,) reward-model score of each response; kl: (B, T); response_mask: (B, T) 1 on the
    response tokens up to and including the first EOS (right-padded). InstructGPT's objective
    r_θ(x, y) - β log(π_RL(y|x) / π_SFT(y|x)), with the KL spread over tokens (§3.5, eq. 2).
    """
    rewards = -kl_coef * kl * response_mask
    last = last_token_index(response_mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_tokens = last >= 0
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards


def gae_advantages(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses: (advantages, returns), (B, T).

    rewards (``per_token_rewards``), values and response_mask: (B, T), one column per response token.

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   returns_t = A_t + V_t

    with V and A zero past the last real token, so padding adds nothing. A reverse scan, one
    step per token; the test checks it against a closed form.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalise ``values`` to unit variance (and zero mean) over the masked entries only; any
    shape, ``mask`` the same.

    Padding must not enter the statistics: with it, short responses shift every advantage.
    The variance is the unbiased one, as in lm-human-preferences. Masked-out entries become 0.
    ``total`` sums a tensor over the processes that hold the rest of the batch (e.g.
    ``accelerator.reduce(t, "sum")``), so the statistics are the global batch's whatever the
    number of processes.
    """
    total = total or (lambda t: t)
    mask = mask.to(values.dtype)
    count = total(mask.sum())
    mean = total(masked_sum(values, mask)) / count.clamp(min=1)
    variance = total(masked_sum((values - mean) ** 2, mask)) / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, averaged over real tokens (Schulman et al. 2017, eq. 7).

        ratio = π(a|s) / π_old(a|s),  loss = mean(max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)))

    All (B, T). Also returns the clip fraction and the approximate KL between the old and new
    policy, 0.5·mean((log ratio)²), which is exactly 0 on the first minibatch of the first epoch.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss, 0.5·mean(max((V - R)², (V_clipped - R)²)) over real tokens; (loss, clip fraction).

    V_clipped = old_V + clip(V - old_V, -ε, ε): the value model moves at most ε per update from
    the values the advantages were computed with (lm-human-preferences, OpenAI baselines).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(B, T) entropy of the categorical distribution at each position of (B, T, V) logits."""
    return entropy_from_logprobs(F.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logprobs: Tensor) -> Tensor:
    """``entropy_from_logits`` of (B, T, V) log-probabilities (log_softmax already taken)."""
    return -(logprobs.exp() * logprobs).sum(-1)


def kl_from_logits(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """(B, T) exact KL(π ‖ π_ref) = Σ_v π(v) (log π(v) - log π_ref(v)) at each position of two (B, T, V) logits.

    What k1 and k3 estimate from the sampled token alone, summed over the whole vocabulary: never
    negative (clamped at 0 against rounding), and with no sampling noise at a given prefix.
    """
    return kl_from_logprobs(F.log_softmax(logits.float(), dim=-1), F.log_softmax(ref_logits.float(), dim=-1))


def kl_from_logprobs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``kl_from_logits`` of two (B, T, V) log-probabilities (log_softmax already taken)."""
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1).clamp(min=0.0)
