"""One batch of PPO episodes and the model passes that fill it.

Layout of every tensor: prompts are left-padded to Tq columns (generation appends on the
right), responses right-padded to Tr columns, so ``cat(query, response)`` is one (B, Tq + Tr)
sequence whose position ids count real tokens only (``position_ids_from_mask``). Logits are
divided by the sampling temperature in *every* log-prob pass, the rollout's, the reference's
and the update's, or the KL estimate is biased (RLHF-DETAILS.md).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from instructrl.models.base import own_generation_config_aside
from instructrl.padding import pad_sequences, position_ids_from_mask, shared_padding, truncate_after_eos
from instructrl.rlmath import entropy_from_logits, entropy_from_logprobs, gather_tokens, kl_from_logprobs, token_logprobs


QUERY_FIELDS = ("query_ids", "query_mask")  # (B, Tq); the other 2-D fields are (B, Tr)


@dataclass
class Rollout:
    """A batch of B episodes (prompt, response) with everything PPO computes about them."""

    query_ids: Tensor  # (B, Tq) prompt tokens, left-padded with PAD
    query_mask: Tensor  # (B, Tq) 1 on real prompt tokens
    response_ids: Tensor  # (B, Tr) sampled tokens, PAD after the first EOS
    response_mask: Tensor  # (B, Tr) 1 up to and including the first EOS
    ended: Tensor  # (B,) bool: the response emitted EOS
    logprobs: Tensor  # (B, Tr) log π_old(a_t | s_t) at the sampling temperature
    ref_logprobs: Tensor  # (B, Tr) log π_SFT(a_t | s_t), same temperature
    values: Tensor  # (B, Tr) V(s_t), the value model's estimate before token t
    scores: Tensor  # (B,) reward-model score; missing_eos_score where ended is False
    rm_scores: Tensor  # (B,) the reward model's own score, even without EOS (for the logs)
    entropy: Tensor  # (B, Tr) policy entropy at each response position
    kl: Tensor | None = None  # (B, Tr) per-token KL estimate, log π_old vs log π_SFT
    rewards: Tensor | None = None  # (B, Tr) -β·KL per token + score on the last real token
    advantages: Tensor | None = None  # (B, Tr) GAE advantages, whitened over real tokens
    returns: Tensor | None = None  # (B, Tr) value targets: advantages before whitening + values
    exact_kl: Tensor | None = None  # (B, Tr) KL(π_old ‖ π_SFT) over the whole vocabulary at each position (logged)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, rows: Tensor | list[int]) -> "Rollout":
        """The episodes at ``rows``, every field indexed alike."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows] for f in fields(self)})

    def trimmed(self) -> "Rollout":
        """The same episodes without the padding columns all of them share (``shared_padding``)."""
        first, width = shared_padding(self.query_mask, self.response_mask)
        sliced = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value.dim() == 2:
                value = value[:, first:] if f.name in QUERY_FIELDS else value[:, :width]
            sliced[f.name] = value
        return Rollout(**sliced)

    def sequences(self) -> tuple[Tensor, Tensor]:
        """(B, Tq + Tr) ids and attention mask of prompt + response."""
        return torch.cat([self.query_ids, self.response_ids], 1), torch.cat([self.query_mask, self.response_mask], 1)


class GumbelNoise:
    """A logits processor for ``generate``: logits / T plus Gumbel noise drawn from one generator
    per row. Greedy decoding of the result is an exact sample from softmax(logits / T) (the
    Gumbel-max trick) that depends on the row's own seed only, not on which rows share its batch
    or its process: one process or several sample the same episodes."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-30)))
        return scores.float() / self.temperature + gumbel


@torch.no_grad()
def sample_responses(policy, query_ids: Tensor, query_mask: Tensor, *, temperature: float, max_new_tokens: int,
                     eos_id: int, pad_id: int, seeds: list[int], synced: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Sample one response per left-padded prompt from the full distribution at ``temperature``,
    row i with random numbers from ``seeds[i]`` (``GumbelNoise``).

    The generation config is built here, and the checkpoint's is set aside (``own_generation_config_aside``):
    its repetition penalty, min_new_tokens or suppressed tokens would make the samples disagree with
    the log-probs PPO computes.
    ``synced``: the policy is sharded (FSDP), so every process goes on forwarding until all are done.
    Returns (response_ids, response_mask, ended) as ``truncate_after_eos`` gives them.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id)
    with own_generation_config_aside(policy):
        out = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config, synced_gpus=synced,
                              logits_processor=LogitsProcessorList([GumbelNoise(seeds, temperature, query_ids.device)]))
    return truncate_after_eos(out[:, query_ids.shape[1]:], eos_id, pad_id)


def response_logprobs(policy, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                      temperature: float, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(B, Tr) log-probs of the response tokens under ``policy`` at ``temperature`` (and entropy)."""
    logits = response_logits(policy, query_ids, query_mask, response_ids, response_mask, temperature)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return token_logprobs(logits, response_ids), entropy


def response_logits(model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                    temperature: float) -> Tensor:
    """(B, Tr, V) logits / ``temperature`` that predict each response token (column Tq - 1 + t predicts token t).

    A model that can (``logits_to_keep``) computes logits for those Tr + 1 last columns only: the
    prompt's would be thrown away, and with a large vocabulary they are most of the pass's memory.
    """
    ids = torch.cat([query_ids, response_ids], 1)
    mask = torch.cat([query_mask, response_mask], 1)
    keep = response_ids.shape[1] + 1
    kwargs = {"logits_to_keep": keep} if takes_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), **kwargs).logits
    return logits[:, -keep:-1].float() / temperature


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM inside ``model`` (through DDP/FSDP's ``module`` and PEFT's base model)
    takes transformers' ``logits_to_keep``."""
    for _ in range(4):
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            return True
        model = getattr(model, "module", None) or (model.get_base_model() if hasattr(model, "get_base_model") else None)
        if model is None:
            return False
    return False


def policy_and_reference_logprobs(policy, reference, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                                  response_mask: Tensor, temperature: float, reference_context=contextlib.nullcontext,
                                  seconds: dict[str, float] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logprobs, entropy, ref_logprobs, exact_kl), each (B, Tr): both models over the same episodes.

    Both models' logits of the batch are alive at once, so the exact KL over the vocabulary
    (``kl_from_logits``) comes with no extra forward pass; each model's log_softmax is taken once.
    ``reference_context``: entered around the reference's forward (LoRA: the adapters off).
    ``seconds["reference"]`` accumulates its time.
    """
    logits = response_logits(policy, query_ids, query_mask, response_ids, response_mask, temperature)
    start = time.perf_counter()
    with reference_context():
        ref_logits = response_logits(reference, query_ids, query_mask, response_ids, response_mask, temperature)
    if seconds is not None:
        seconds["reference"] = seconds.get("reference", 0.0) + time.perf_counter() - start
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)  # once per model (response_logits are float32)
    return (gather_tokens(logp, response_ids), entropy_from_logprobs(logp), gather_tokens(ref_logp, response_ids),
            kl_from_logprobs(logp, ref_logp))


def response_values(value_model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """(B, Tr) V(s_t): the value model's per-token output at the token *before* response token t."""
    ids = torch.cat([query_ids, response_ids], 1)
    mask = torch.cat([query_mask, response_mask], 1)
    return value_model(ids, mask, per_token=True)[:, query_ids.shape[1] - 1 : -1]


def score_episodes(policy, reference, value_model, reward_model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                   response_mask: Tensor, ended: Tensor, *, temperature: float, micro_batch_size: int, missing_eos_score: float,
                   reference_context=contextlib.nullcontext) -> tuple[Rollout, dict[str, float]]:
    """Step 2 of PPO: every model's view of the sampled episodes, as a ``Rollout``.

    Policy and reference log-probs (one pass over both, ``policy_and_reference_logprobs``), the
    value model's per-token values and the reward model's score read at EOS; a response that never
    ended gets ``missing_eos_score`` instead. The passes run in micro-batches of
    ``micro_batch_size``, the first PPO epoch's, each without the padding all its rows share, as
    the update's micro-batches, so the first epoch's probability ratio is exactly 1.
    Returns the rollout and the seconds each model took ("policy", "reference", "value", "reward").
    """
    args = (query_ids, query_mask, response_ids, response_mask)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    logprobs, entropy, ref_logprobs, exact_kl = in_micro_batches(without_shared_padding(lambda *t: policy_and_reference_logprobs(
        policy, reference, *t, temperature, reference_context=reference_context, seconds=seconds)), micro_batch_size, *args)
    seconds["policy"] = time.perf_counter() - start - seconds["reference"]
    start = time.perf_counter()
    values = in_micro_batches(without_shared_padding(lambda *t: response_values(value_model, *t)), micro_batch_size, *args)
    seconds["value"] = time.perf_counter() - start
    start = time.perf_counter()
    rm_scores = in_micro_batches(without_shared_padding(lambda q, qm, r, rm: reward_model(torch.cat([q, r], 1), torch.cat([qm, rm], 1))),
                                 micro_batch_size, *args)
    seconds["reward"] = time.perf_counter() - start
    scores = torch.where(ended, rm_scores, torch.full_like(rm_scores, missing_eos_score))
    rollout = Rollout(query_ids, query_mask, response_ids, response_mask, ended, logprobs, ref_logprobs, values, scores, rm_scores, entropy,
                      exact_kl=exact_kl)
    return rollout, seconds


def left_pad_prompts(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """(B, Tq) query ids and mask on ``device``, left-padded: generation appends on the right."""
    ids, mask = pad_sequences(prompts, pad_id, side="left")
    return ids.to(device), mask.to(device)


def without_shared_padding(fn):
    """``fn(query_ids, query_mask, response_ids, response_mask)`` run on the columns some row
    uses (``shared_padding``), its (b, width) outputs zero-padded back to the responses' width."""
    def run(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor):
        first, width = shared_padding(query_mask, response_mask)
        out = fn(query_ids[:, first:], query_mask[:, first:], response_ids[:, :width], response_mask[:, :width])
        pad = lambda t: t if t.dim() == 1 else torch.nn.functional.pad(t, (0, response_ids.shape[1] - width))  # noqa: E731
        return tuple(map(pad, out)) if isinstance(out, tuple) else pad(out)
    return run


@torch.no_grad()
def in_micro_batches(fn, batch_size: int, *tensors: Tensor):
    """Apply ``fn`` to row slices of ``tensors`` and concatenate the results (tuples field-wise)."""
    outputs = [fn(*(t[i : i + batch_size] for t in tensors)) for i in range(0, tensors[0].shape[0], batch_size)]
    if isinstance(outputs[0], tuple):
        return tuple(None if o[0] is None else torch.cat(list(o)) for o in zip(*outputs))
    return torch.cat(outputs)
