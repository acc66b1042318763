"""Batched answers from a causal LM to chat prompts."""

from __future__ import annotations

import torch

from instructrl.data.chat import render_ids
from instructrl.errors import UserError
from instructrl.models.base import context_length, own_generation_config_aside
from instructrl.padding import pad_sequences


@torch.no_grad()
def generate_answers(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 64,
    num_samples: int = 1, temperature: float | None = None, synced: bool = False, key: str = "max_new_tokens",
) -> list[str] | list[list[str]]:
    """Answers to the last user turn of each conversation, cut at the first EOS.

    Greedy when ``temperature`` is None. Otherwise ``num_samples`` answers per conversation,
    sampled from the full distribution at ``temperature`` (no top-k or top-p truncation, which
    would make the samples' log-probs disagree with the policy's, nor any other setting of the
    checkpoint's generation_config), returned as a list per conversation. Prompts are left-padded (generation appends on the right) and grouped by
    length so a batch holds little padding; answers come back in the input order.
    ``synced``: the model is sharded (FSDP) and every process calls this with as many conversations,
    so each goes on forwarding until all are done. ``key``: the setting that chose ``max_new_tokens``, for an error.
    """
    prompts = [render_ids(tokenizer, list(c), add_generation_prompt=True) for c in conversations]
    _check_room(model, prompts, max_new_tokens, key)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    sampling = {"do_sample": False} if temperature is None else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": num_samples}
    answers: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(by_length), batch_size):
        rows = by_length[start : start + batch_size]
        ids, mask = pad_sequences([prompts[i] for i in rows], tokenizer.pad_token_id, side="left")
        with own_generation_config_aside(model):
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced, **sampling,
            )
        # generate returns the samples of one prompt next to each other
        per_row = 1 if temperature is None else num_samples
        for k, tokens in enumerate(out[:, ids.shape[1] :].tolist()):
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            answers[rows[k // per_row]].append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    model.train(was_training)
    return [a[0] for a in answers] if temperature is None else answers


def check_room(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, key: str) -> None:
    """A UserError naming ``key`` when the longest prompt and ``max_new_tokens`` exceed the model's context,
    before a run starts: a model with learned positions (GPT-2) fails at the first position past it."""
    _check_room(model, [render_ids(tokenizer, list(c), add_generation_prompt=True) for c in conversations], max_new_tokens, key)


def _check_room(model, prompts: list[list[int]], max_new_tokens: int, key: str) -> None:
    longest, context = max(map(len, prompts), default=0), context_length(model)
    if longest + max_new_tokens > context:
        raise UserError(f"{key} = {max_new_tokens}: the longest prompt ({longest} tokens) and {max_new_tokens} new tokens "
                        f"exceed the model's context length ({context} tokens)")


def check_room_for_a_prompt(model, max_new_tokens: int, key: str) -> None:
    """``check_room``'s refusal where it follows from the config alone: ``max_new_tokens`` leaves no room for a prompt
    in the context of ``model`` (a model or its config). Only this much is known before the pipeline's first stage:
    the prompts' lengths need the tokenizer pretrain trains, so the stage still checks the longest prompt."""
    context = context_length(model)
    if max_new_tokens >= context:
        raise UserError(f"{key} = {max_new_tokens}: any prompt and {max_new_tokens} new tokens exceed the model's context length ({context} tokens)")
