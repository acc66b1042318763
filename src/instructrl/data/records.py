"""The label schema, defined once: what a demonstration and a comparison record are
(InstructGPT §3.4, Appendix B).

Comparison collection (the simulated labeler) and the feedback app (people) are to write these,
and the reward-model stage to read them (issues 3 and 5), through instructrl.data.formats. One JSON object per line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from instructrl.data.jsonl import encodable, write_jsonl
from instructrl.errors import UserError

GUIDELINE_VERSION = "world-v1"  # the simulated labeler's scoring rules (world/labeler.py)


class Message(BaseModel):
    """A turn as the label schema stores it; files are read through ``check_messages``."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


# how a chat template reads OpenAI's roles: its developer turn is the system's (as the server reads it)
TEMPLATE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# the fields a message of a demonstration may hold beside role and content (OpenAI's chat fine-tuning
# format, TRL's tool-calling datasets), each with the roles that may hold it
TURN_FIELDS = {"name": ("system", "user", "assistant", "tool"), "weight": ("assistant",), "tool_calls": ("assistant",),
               "tool_call_id": ("tool",)}


def content_text(content) -> str:
    """A message's ``content`` as text: a string, or OpenAI's list of content parts
    (``[{"type": "text", "text": ...}]``) joined; None (a turn that only calls tools) is no text.
    A ValueError names a part the model cannot read (an image, audio) and text that is not valid Unicode."""
    if content is None:
        return ""
    if isinstance(content, str):
        return encodable(content)
    if not isinstance(content, list):
        raise ValueError(f"must be a string or a list of text parts, not {type(content).__name__}")
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise ValueError(f"part {i} is of type {kind!r}; only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part {i} needs a 'text' string")
        encodable(part["text"], f"part {i}")
    return "".join(part["text"] for part in content)


def check_messages(messages, where: str, field: str = "messages", tool_turns: bool = False) -> list[dict]:
    """Check a non-empty list of messages; ``where`` (file:line) and ``field`` name the culprit in
    the error. Returns them as a chat template reads them: text content (``content_text``), a
    developer turn as the system's.

    With ``tool_turns`` (a demonstration), OpenAI's ``name``, ``weight`` (0: the turn is context,
    not learnt), tool calls and tool results are kept. Prompts and comparisons, which the RL stages
    and the feedback app store as role and content only, drop a name and a weight, and refuse
    tool turns. A null field is an absent one, as in Arrow's rows."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{field}' must be a non-empty list of {{'role', 'content'}} objects")
    return [_message(m, f"{where}: {field}[{j}]", tool_turns) for j, m in enumerate(messages)]


def _message(m, where: str, tool_turns: bool) -> dict:
    roles = "system|developer|user|assistant" + ("|tool" if tool_turns else "")
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in TEMPLATE_ROLES:
        raise UserError(f"{where} must be {{'role': {roles}, 'content': str}}, got {m!r}")
    m = {k: v for k, v in m.items() if v is not None}
    role, calls = m["role"], m.get("tool_calls")
    if (role == "tool" or calls is not None) and not tool_turns:
        raise UserError(f"{where}: tool calls and tool results are read in demonstrations (sft.data) only, not in prompts or comparisons")
    for key in m:
        if key not in ("role", "content") and role not in TURN_FIELDS.get(key, ()):
            known = [k for k, roles_of in TURN_FIELDS.items() if role in roles_of]
            raise UserError(f"{where}: a message of role {role} has no field '{key}' (it may hold role, content{''.join(', ' + k for k in known)})")
    if "content" not in m and calls is None:  # a turn of calls alone may have no content
        raise UserError(f"{where}.content is missing: only an assistant turn that calls tools may have none")
    try:
        message = {"role": TEMPLATE_ROLES[role], "content": content_text(m.get("content"))}
    except ValueError as err:
        raise UserError(f"{where}.content: {err}") from None
    if "weight" in m and (isinstance(m["weight"], bool) or m["weight"] not in (0, 1)):
        raise UserError(f"{where}.weight must be 0 (the turn is context, not learnt) or 1, got {m['weight']!r}")
    if calls is not None and not (isinstance(calls, list) and calls and all(_is_call(c) for c in calls)):
        raise UserError(f"{where}.tool_calls must be a non-empty list of {{'type': 'function', 'function': {{'name', 'arguments'}}}}, got {calls!r}")
    return (message | {k: m[k] for k in TURN_FIELDS if k in m}) if tool_turns else message


def _is_call(call) -> bool:
    return isinstance(call, dict) and isinstance(call.get("function"), dict) and isinstance(call["function"].get("name"), str)


def is_tool_turn(message: dict) -> bool:
    """A tool's result, or an assistant turn that calls tools."""
    return message["role"] == "tool" or "tool_calls" in message


def is_learnt(message: dict) -> bool:
    """An assistant turn SFT learns: OpenAI's weight 0 makes it context only."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def validate_messages(messages, where: str, tool_turns: bool = False) -> list[dict]:
    """Check a demonstration's ``messages``: a conversation (``check_messages``) ending with the
    assistant's turn. ``where`` (file:line) prefixes the error."""
    messages = check_messages(messages, where, tool_turns=tool_turns)
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's (the demonstration)")
    return messages


class ComparisonRecord(BaseModel):
    """K responses to one prompt, ranked by one labeler, each with its Likert score and flags."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="Identifier of the prompt.")
    prompt: list[Message] = Field(min_length=1, description="The conversation so far; it ends with a user turn.")
    responses: list[str] = Field(min_length=2, description="The K sampled responses.")
    ranks: list[int] = Field(description="Rank of each response: 0 = best, equal ranks = a tie.")
    likert: list[int] | None = Field(None, description="1-7 Likert score of each response (absent in pairwise data from elsewhere).")
    flags: list[list[str]] | None = Field(None, description="Flags of each response (fails_to_follow, incorrect, ...).")
    labeler_id: str
    guideline_version: str = GUIDELINE_VERSION
    none_acceptable: bool = Field(False, description="The labeler found no response acceptable (the feedback app's 'none is acceptable').")

    @field_validator("ranks", mode="before")
    @classmethod
    def _not_booleans(cls, ranks):
        # JSON's true would read as rank 1, the worse of a pair: [true, false] meaning "the first is chosen" would invert it
        if isinstance(ranks, list) and any(isinstance(r, bool) for r in ranks):
            raise ValueError("ranks are numbers, 0 = best, not true/false")
        return ranks

    @model_validator(mode="after")
    def _consistent(self) -> "ComparisonRecord":
        k = len(self.responses)
        if any(len(field) != k for field in (self.ranks, self.likert or self.ranks, self.flags or self.ranks)):
            raise ValueError(f"responses, ranks, likert and flags must all have K = {k} entries")
        if any(r < 0 for r in self.ranks) or any(not 1 <= s <= 7 for s in self.likert or ()):
            raise ValueError("ranks must be >= 0 and likert scores within 1..7")
        if self.prompt[-1].role != "user":
            raise ValueError("the prompt must end with a user turn")
        return self


def write_comparisons(path: Path | str, records: Iterable[ComparisonRecord]) -> None:
    write_jsonl(path, (r.model_dump(mode="json") for r in records))


def comparison_line(record: ComparisonRecord) -> str:
    """A record as one JSONL line, as ``write_comparisons`` writes it."""
    return json.dumps(record.model_dump(mode="json"), ensure_ascii=False) + "\n"
