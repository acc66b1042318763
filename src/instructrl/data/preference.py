"""Pairwise preference data in TRL's conventions, read as comparisons of K = 2.

    explicit prompt, plain text:      {"prompt": "...", "chosen": "...", "rejected": "..."}
    explicit prompt, conversational:  {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}
    implicit prompt, conversational:  {"chosen": [whole conversation], "rejected": [whole conversation]}
    implicit prompt, plain text:      {"chosen": "whole text", "rejected": "whole text"}

An implicit prompt is what the two sides share, also where a text 'prompt' stands beside two whole
conversations (HF's ultrafeedback_binarized: the prompt is the first user turn's text), as TRL reads it;
a conversational 'prompt' that both sides repeat before their answers is read once: the messages before the first one that differs,
or for plain text the longest common prefix, cut back to a whitespace. Plain-text prompts become
one user turn, so the reward model sees every pair through the same chat template. A pair whose
two answers are the same is read as a tie, which the ranking loss leaves out.
"""

from __future__ import annotations

import os

from instructrl.data.records import ComparisonRecord, check_messages
from instructrl.errors import UserError


def _answer(messages: list[dict], where: str, field: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message of '{field}' must be the assistant's")
    return messages[-1]["content"]


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two texts that share their beginning."""
    common = os.path.commonprefix([chosen, rejected])
    cut = max(common.rfind(" "), common.rfind("\n")) + 1 if common and not common[-1].isspace() else len(common)
    return chosen[:cut].strip(), chosen[cut:].strip(), rejected[cut:].strip()


def comparison_from_preference(record: dict, where: str, default_id: str) -> ComparisonRecord:
    """A K = 2 comparison (chosen ranked 0, rejected 1; a tie when they are the same) from one TRL preference record."""
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    if isinstance(chosen, str):
        if prompt is None:
            prompt, chosen, rejected = split_implicit_text(chosen, rejected)
            if not prompt:
                raise UserError(f"{where}: 'chosen' and 'rejected' share no prompt; give one as 'prompt'")
        elif not isinstance(prompt, str):
            raise UserError(f"{where}: with text 'chosen'/'rejected', 'prompt' must be text too")
        messages = [{"role": "user", "content": prompt}]
    else:
        chosen_messages = check_messages(chosen, where, "chosen")
        rejected_messages = check_messages(rejected, where, "rejected")
        if prompt is None or isinstance(prompt, str) and max(len(chosen_messages), len(rejected_messages)) > 1:
            shared = 0  # implicit: the shared turns are the prompt
            while shared < min(len(chosen_messages), len(rejected_messages)) - 1 and chosen_messages[shared] == rejected_messages[shared]:
                shared += 1
            messages = chosen_messages[:shared]
            chosen_messages, rejected_messages = chosen_messages[shared:], rejected_messages[shared:]
        elif isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = check_messages(prompt, where, "prompt")
            if chosen_messages[: len(messages)] == messages == rejected_messages[: len(messages)]:
                chosen_messages, rejected_messages = chosen_messages[len(messages):], rejected_messages[len(messages):]
        if not messages or messages[-1]["role"] != "user":
            raise UserError(f"{where}: the prompt must end with a user turn")
        if len(chosen_messages) != 1 or len(rejected_messages) != 1:
            raise UserError(f"{where}: 'chosen' and 'rejected' must each hold one assistant turn after the prompt")
        chosen, rejected = _answer(chosen_messages, where, "chosen"), _answer(rejected_messages, where, "rejected")
    ranks = [0, 0] if chosen == rejected else [0, 1]  # the same answer on both sides is a tie: no pair to learn from
    return ComparisonRecord(id=str(record.get("id", default_id)), prompt=messages, responses=[chosen, rejected], ranks=ranks,
                            labeler_id=str(record.get("labeler_id", "preference-data")))
