"""Conversations as token ids with a mask of the assistant's tokens (the SFT targets)."""

from __future__ import annotations

from dataclasses import dataclass

from instructrl.errors import UserError


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 on every token an assistant turn wrote, its closing EOS included


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict]) -> TokenizedConversation:
    """Tokenize a conversation and mark the tokens of every assistant turn.

    Turn i's tokens are those between the rendering of ``messages[:i]`` with the generation
    prompt and the rendering of ``messages[:i + 1]``; this works for any chat template whose
    renderings of a conversation's prefixes are prefixes of each other. The last assistant turn
    always ends with EOS (appended if the template does not write it).
    """
    full = render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_ids(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(upto)] != upto or start > len(upto):
            raise UserError("the tokenizer's chat template renders a conversation's prefix differently from the whole; cannot find assistant turns")
        mask[start : len(upto)] = [1] * (len(upto) - start)
    if messages and messages[-1]["role"] == "assistant" and full[-1] != tokenizer.eos_token_id:
        full, mask = full + [tokenizer.eos_token_id], mask + [1]
    return TokenizedConversation(full, mask)



def tokenize_text(tokenizer, text: str) -> TokenizedConversation:
    """Plain text (SFT on ``text`` records) ending with EOS; every token is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TokenizedConversation(ids, [1] * len(ids))
