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
    weights = loss_mask[:, 1:].to(logits.dtype if logits.is_floating_point() else torch.float32)
    nll = -token_logprobs(logits[:, :-1], targets)
    return masked_sum(nll, weights), weights.sum()
