"""Conversations as token ids with a mask of the assistant's tokens (the SFT targets)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from instructrl.data.records import is_learnt, is_tool_turn
from instructrl.errors import UserError


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 on every token an assistant turn wrote, its closing EOS included


def control_tokens(tokenizer) -> list[str]:
    """``tokenizer``'s control tokens (``<|im_end|>``, ``</s>``, ...). Get them once for many texts:
    transformers builds the list anew at each call."""
    return [t for t in tokenizer.all_special_tokens if t]


def control_token_in(text: str, tokens: list[str]) -> str | None:
    """The first of the control ``tokens`` written inside ``text``, or None. Tokenizing reads such
    a string as the token itself, not as text."""
    return next((t for t in tokens if t in text), None)


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """``messages`` (and the ``tools`` they may call) as text, under the tokenizer's chat template;
    a conversation the template refuses (``raise_exception``: a system turn, roles that do not
    alternate; a TypeError of its own, such as joining a tool call's arguments of the other JSON
    type) is a UserError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, TypeError) as err:
        raise UserError(f"the model's chat template refuses this conversation ({err})") from None


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template."""
    return tokenizer(render_text(tokenizer, messages, add_generation_prompt, tools), add_special_tokens=False)["input_ids"]


# a conversation whose tool definition, call and result each carry a mark of their own, to see whether a template writes them
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "description": "instructrl-tool-definition", "parameters": {"type": "object"}}}]
_PROBE = [{"role": "user", "content": "hi"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "call00001", "type": "function",
                                                               "function": {"name": "probe", "arguments": '{"a": "instructrl-tool-call"}'}}]},
          {"role": "tool", "tool_call_id": "call00001", "name": "probe", "content": "instructrl-tool-result"},
          {"role": "assistant", "content": "ok"}]


def check_renders_tools(tokenizer) -> None:
    """A UserError unless the chat template writes tool definitions, tool calls and tool results
    into the text (many Hugging Face templates do); one that knows only system, user and assistant
    turns would drop them, and the model would learn answers to results it never saw."""
    refusal = _tool_rendering_refusal(tokenizer, str(tokenizer.chat_template))
    if refusal is not None:
        raise UserError(refusal)


@functools.cache  # once per tokenizer and template, not once per conversation that calls tools
def _tool_rendering_refusal(tokenizer, template: str) -> str | None:
    try:
        text = render_text(tokenizer, _PROBE, add_generation_prompt=False, tools=_PROBE_TOOLS)
    except UserError as err:
        return f"the model's chat template cannot render tool calls and results: {err}"
    missing = [f"{what}s" for what in ("definition", "call", "result") if f"instructrl-tool-{what}" not in text]
    if missing:
        return (f"the model's chat template does not render tool {' and '.join(missing)} (it would drop them); "
                "give a model whose template renders tools, or leave the tool turns out")
    return None


def tokenize_conversation(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> TokenizedConversation:
    """Tokenize a conversation and mark the tokens of every assistant turn whose ``weight`` is not 0
    (OpenAI's: a turn of weight 0 is context). Tool calls and results, and the ``tools`` they
    call, go to the chat template, which must render them (``check_renders_tools``); a tool's
    result is not learnt, an assistant's call is.

    Turn i's tokens are those between the rendering of ``messages[:i]`` with the generation
    prompt and the rendering of ``messages[:i + 1]``; this works for any chat template whose
    renderings of a conversation's prefixes are prefixes of each other. A turn is learnt up to its
    EOS: what a template writes after it ("\n" after ChatML's <|im_end|>) is the template's, not
    the model's. A conversation that ends with an assistant turn ends with that EOS, as a sampled
    response does (the rest is cut), and EOS is appended where the template writes none.
    """
    learnt = [is_learnt(m) for m in messages]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]  # ours, not the template's
    if tools or any(is_tool_turn(m) for m in messages):
        check_renders_tools(tokenizer)
    full_text = render_text(tokenizer, messages, add_generation_prompt=False, tools=tools)
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    # (before turn i with the generation prompt, up to turn i's end) of each assistant turn
    spans = [(render_text(tokenizer, messages[:i], add_generation_prompt=True, tools=tools),
              render_text(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)) for i in turns]
    ids = token_ids(tokenizer, [full_text, *(text for span in spans for text in span)])
    full = ids[full_text]
    mask = [0] * len(full)
    start = 0
    for i, (before, upto_text) in zip(turns, spans):
        start, upto = len(ids[before]), ids[upto_text]
        if full[: len(upto)] != upto or start > len(upto):
            raise UserError("the tokenizer's chat template renders a conversation's prefix differently from the whole; cannot find assistant turns")
        end = _after_last(full, tokenizer.eos_token_id, start, len(upto))
        mask[start:end] = [int(learnt[i])] * (end - start)
    if messages and messages[-1]["role"] == "assistant":
        eos = tokenizer.eos_token_id
        if eos in full[start:]:
            end = _after_last(full, eos, start, len(full))
            full, mask = full[:end], mask[:end]
        else:
            full, mask = full + [eos], mask + [int(learnt[-1])]
    return TokenizedConversation(full, mask)


def response_ids(tokenizer, messages: list[dict], response: str) -> list[int]:
    """Token ids of the conversation ``messages`` answered by ``response``, ending at the answer's EOS:
    what a reward model scores."""
    return tokenize_conversation(tokenizer, [*messages, {"role": "assistant", "content": response}]).input_ids


def token_ids(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    """The token ids of each distinct text of ``texts``, in one call of the tokenizer: a
    conversation's last turn ends where the whole does, and one call of a fast tokenizer with
    several texts costs less than one call each (the ids are the same)."""
    distinct = list(dict.fromkeys(texts))
    return dict(zip(distinct, tokenizer(distinct, add_special_tokens=False, return_attention_mask=False)["input_ids"]))


def _after_last(ids: list[int], token: int, start: int, stop: int) -> int:
    """The position after the last ``token`` in ``ids[start:stop]``, or ``stop`` when there is none."""
    span = ids[start:stop]
    return stop - span[::-1].index(token) if token in span else stop


def tokenize_text(tokenizer, text: str) -> TokenizedConversation:
    """Plain text (SFT on ``text`` records) ending with EOS; every token is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TokenizedConversation(ids, [1] * len(ids))
