"""Choosing each row's next token under its own sampling parameters, and scoring tokens. Torch only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """(V,) logits with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (Holtzman et al. 2020); the most likely token always stays. ``top_p >= 1`` keeps everything.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the tokens before it already reach top_p
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def adjusted_logits(
    logits: Tensor, generated: Sequence[int], presence_penalty: float, frequency_penalty: float, bias: Sequence[tuple[int, float]]
) -> Tensor:
    """(V,) ``logits`` as OpenAI's sampling options change them before sampling.

    A token j that the answer holds c_j > 0 times so far (``generated``) loses
    c_j * ``frequency_penalty`` + ``presence_penalty`` (OpenAI's formula; the prompt's tokens do
    not count), and each (token, value) of ``bias`` (``logit_bias``) adds value to its token.
    """
    logits = logits.clone()
    if generated and (presence_penalty or frequency_penalty):
        tokens, counts = torch.tensor(list(generated), device=logits.device).unique(return_counts=True)
        logits[tokens] -= counts.to(logits.dtype) * frequency_penalty + presence_penalty
    if bias:
        tokens, values = zip(*bias)
        logits[torch.tensor(tokens, device=logits.device)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return logits


GREEDY_BELOW = 1e-5  # a temperature under this is greedy: dividing by it could take logits past float32 (vLLM's _SAMPLING_EPS)


def sample_next_tokens(
    logits: Tensor, temperatures: Sequence[float], top_ps: Sequence[float], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token per row of (B, V) ``logits``: greedy where the temperature is 0 (below ``GREEDY_BELOW``), else sampled.

    Row b is sampled from softmax(logits[b] / temperatures[b]) restricted to its top-p nucleus,
    drawing from ``generators[b]`` only, so a row's samples depend on its own seed and not on
    which other requests share the batch.
    """
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()  # one copy to the host for the whole batch, not one per row
    sampled = [row for row, temperature in enumerate(temperatures) if temperature >= GREEDY_BELOW]
    if sampled:
        # each row's distribution on the model's device, then one copy of them all for the rows' CPU generators
        probs = torch.stack([top_p_filter(logits[row] / temperatures[row], top_ps[row]).softmax(-1) for row in sampled]).cpu()
        for i, row in enumerate(sampled):
            tokens[row] = int(torch.multinomial(probs[i], 1, generator=generators[row]))
    return tokens


LOGPROB_FLOOR = -9999.0  # stands for -inf, which JSON cannot carry (vLLM's choice)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and the most likely tokens in its place."""

    token_id: int
    logprob: Optional[float]  # None for a prompt's first token: nothing before it predicts it
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), most likely first
    text_offset: int = 0  # where its text begins in the text it belongs to (the answer, or the prompt)


def token_logprobs(logits: Tensor, tokens: Sequence[int], top_ks: Sequence[int]) -> list[TokenLogprob]:
    """Row b's ``tokens[b]`` scored by log_softmax(``logits[b]``), with its ``top_ks[b]`` most likely tokens.

    ``logits`` is (N, V), the raw model's: neither temperature nor top-p applies (vLLM's default),
    so a token's log-prob does not depend on how it was sampled. A log-prob of -inf comes out as ``LOGPROB_FLOOR``.
    """
    logprobs = logits.float().log_softmax(-1).clamp_min(LOGPROB_FLOOR)
    chosen = logprobs.gather(-1, torch.tensor(list(tokens), device=logits.device)[:, None]).squeeze(-1).tolist()
    k = min(max(top_ks, default=0), logits.shape[-1])
    top_values, top_ids = logprobs.topk(k, -1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(token, logprob, tuple(zip(top_ids[b][: top_ks[b]], top_values[b][: top_ks[b]])))
        for b, (token, logprob) in enumerate(zip(tokens, chosen))
    ]
