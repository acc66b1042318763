"""Prompt-only files for PPO: ``{"messages": [...]}`` ending with a user turn, or ``{"prompt": "..."}``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instructrl.data.jsonl import read_jsonl
from instructrl.data.records import check_messages
from instructrl.errors import UserError


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]  # the conversation so far; the last turn is the user's


def prompt_from_record(record: dict, where: str, default_id: str) -> Prompt:
    """A Prompt from one JSONL record; ``where`` (file:line) prefixes any error."""
    if isinstance(record.get("prompt"), str) and "messages" not in record:
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        field = "messages" if "messages" in record else "prompt"
        if field not in record:
            raise UserError(f"{where}: expected 'messages' (a list of {{'role', 'content'}}) or 'prompt' (a string)")
        messages = check_messages(record[field], where, field)
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: the last message of a prompt must be the user's")
    return Prompt(str(record.get("id", default_id)), messages)


def read_prompts(path: Path) -> list[Prompt]:
    prompts = [prompt_from_record(record, f"{path}:{n}", f"{Path(path).name}:{n}") for n, record in read_jsonl(path)]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts
