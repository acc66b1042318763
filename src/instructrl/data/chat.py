"""Conversations as token ids with a mask of the assistant's tokens (the SFT targets)."""

from __future__ import annotations

from dataclasses import dataclass

from instructrl.errors import UserError


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 on every token an assistant turn wrote, its closing EOS included


def control_token_in(text: str, tokenizer) -> str | None:
    """The first of ``tokenizer``'s control tokens (``<|im_end|>``, ``</s>``, ...) written inside
    ``text``, or None. Tokenizing reads such a string as the token itself, not as text."""
    return next((t for t in tokenizer.all_special_tokens if t and t in text), None)


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """``messages`` as text, under the tokenizer's chat template; a conversation the template
    refuses (``raise_exception``: a system turn, roles that do not alternate) is a UserError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise UserError(f"the model's chat template refuses this conversation ({err})") from None


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template."""
    return tokenizer(render_text(tokenizer, messages, add_generation_prompt), add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict]) -> TokenizedConversation:
    """Tokenize a conversation and mark the tokens of every assistant turn.

    Turn i's tokens are those between the rendering of ``messages[:i]`` with the generation
    prompt and the rendering of ``messages[:i + 1]``; this works for any chat template whose
    renderings of a conversation's prefixes are prefixes of each other. A turn is learnt up to its
    EOS: what a template writes after it ("\n" after ChatML's <|im_end|>) is the template's, not
    the model's. A conversation that ends with an assistant turn ends with that EOS, as a sampled
    response does (the rest is cut), and EOS is appended where the template writes none.
    """
    full = render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    start = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_ids(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(upto)] != upto or start > len(upto):
            raise UserError("the tokenizer's chat template renders a conversation's prefix differently from the whole; cannot find assistant turns")
        end = _after_last(full, tokenizer.eos_token_id, start, len(upto))
        mask[start:end] = [1] * (end - start)
    if messages and messages[-1]["role"] == "assistant":
        eos = tokenizer.eos_token_id
        if eos in full[start:]:
            end = _after_last(full, eos, start, len(full))
            full, mask = full[:end], mask[:end]
        else:
            full, mask = full + [eos], mask + [1]
    return TokenizedConversation(full, mask)


def _after_last(ids: list[int], token: int, start: int, stop: int) -> int:
    """The position after the last ``token`` in ``ids[start:stop]``, or ``stop`` when there is none."""
    span = ids[start:stop]
    return stop - span[::-1].index(token) if token in span else stop


def tokenize_text(tokenizer, text: str) -> TokenizedConversation:
    """Plain text (SFT on ``text`` records) ending with EOS; every token is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TokenizedConversation(ids, [1] * len(ids))
