"""The label schema, defined once: what a demonstration and a comparison record are
(InstructGPT §3.4, Appendix B).

Comparison collection (the simulated labeler) and the feedback app (people) are to write these,
and the reward-model stage to read them (issues 3 and 5), through instructrl.data.formats. One JSON object per line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instructrl.data.jsonl import write_jsonl
from instructrl.errors import UserError

GUIDELINE_VERSION = "world-v1"  # the simulated labeler's scoring rules (world/labeler.py)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


def check_messages(messages, where: str, field: str = "messages") -> list[dict]:
    """Check a non-empty list of {'role', 'content'} messages; ``where`` (file:line) and ``field``
    name the culprit in the error. Returns the messages as plain dicts."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{field}' must be a non-empty list of {{'role', 'content'}} objects")
    for j, m in enumerate(messages):
        try:
            Message.model_validate(m)
        except ValidationError:
            raise UserError(f"{where}: {field}[{j}] must be {{'role': system|user|assistant, 'content': str}}, got {m!r}") from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def validate_messages(messages, where: str) -> list[dict]:
    """Check a demonstration's ``messages``: a conversation of Messages ending with the assistant's
    turn. ``where`` (file:line) prefixes the error."""
    messages = check_messages(messages, where)
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
