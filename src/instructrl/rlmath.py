"""The pure math of instructrl: torch-only functions, no models, optimizers or I/O.

Shapes: B = batch, T = sequence length, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1. Any matching shapes."""
    return (values * mask).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when the mask is empty)."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, T) log p(tokens[b, t]) from (B, T, V) logits at the same positions."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


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
