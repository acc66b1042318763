"""Every data format the stages read, detected from a record's fields (or named in the config).

    format             fields of one record                                  read by
    text               {"text": "..."}                                       sft (loss on every token), ppo.ptx_data
    prompt_completion  {"prompt": str | [messages], "completion": str | [messages]}   sft (loss on the completion)
    messages           {"messages": [..., {"role": "assistant", ...}]}       sft (loss on assistant turns), rm.demonstrations
                       (also OpenAI's chat fine-tuning records: weights, content parts, tools)
    preference         {"prompt"?, "chosen", "rejected"} (TRL; see preference.py)     rm (K = 2)
    comparison         a ComparisonRecord: {"id", "prompt", "responses", "ranks", ...}  rm (K-way)
    prompt             {"prompt": str | [messages]} or {"messages": [..., user turn]}  ppo.prompts
    unpaired_preference   {"prompt", "completion", "label": bool} (TRL's KTO data)          ppo.prompts
    stepwise_supervision  {"prompt", "completions": [...], "labels": [bool, ...]} (TRL's PRM data)  ppo.prompts

These are the Hugging Face ecosystem's (TRL's) dataset formats plus our K-way comparison record.
Messages are read by ``records.check_messages`` wherever they appear: OpenAI's content parts and
developer role; in demonstrations also an assistant turn's ``weight`` (0: context, not learnt),
tool calls and tool results, with the record's ``tools``, which the chat template must render.
PPO also takes its prompts from any format that holds one (the prompt of a prompt/completion,
preference or comparison record, a conversation without its last assistant turn). Unpaired
preferences and stepwise labels are no demonstrations (a completion labelled false is a bad
answer) nor rankings (no two answers are compared), so SFT and the RM refuse them.

Files of every kind are read by ``readers``, a file for one stage input by ``inputs``, ``data check`` by ``check``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
from dataclasses import dataclass, field

from pydantic import ValidationError

from instructrl.data.preference import comparison_from_preference
from instructrl.data.records import ComparisonRecord, check_messages, is_learnt, validate_messages
from instructrl.errors import UserError

FORMATS = ("text", "prompt_completion", "messages", "preference", "comparison", "prompt", "unpaired_preference", "stepwise_supervision")

# what each kind of input a stage reads accepts
USES = {
    "demonstration": ("messages", "prompt_completion", "text"),  # sft.data
    "conversation": ("messages", "prompt_completion"),  # rm.demonstrations (scored through the chat template)
    "comparison": ("comparison", "preference"),  # rm.data, collect.judgements
    "prompt": ("prompt", "prompt_completion", "preference", "comparison", "messages", "unpaired_preference", "stepwise_supervision"),  # ppo.prompts
    "text": ("text",),  # ppo.ptx_data
}
STAGE_OF_USE = {"demonstration": "sft.data", "conversation": "rm.demonstrations", "comparison": "rm.data",
                "prompt": "ppo.prompts", "text": "ppo.ptx_data"}


@dataclass(frozen=True)
class Demonstration:
    """One SFT example: a conversation (loss on its assistant turns) or plain text (loss on every token)."""

    messages: list[dict] | None = None  # ends with the assistant's turn
    text: str | None = None
    tools: list[dict] | None = None  # the tool definitions the chat template renders (OpenAI's and TRL's 'tools')
    where: str = field(default="", compare=False)  # file:line it was read from, for error messages


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]  # the conversation so far; the last turn is the user's



def detect_format(record: dict) -> str | None:
    """The format a record's fields say it is in, or None."""
    keys = set(record)  # one field of a pair is enough: a record missing the other is reported, not taken for a prompt
    if keys & {"responses", "ranks"}:
        return "comparison"
    if keys & {"chosen", "rejected"}:
        return "preference"
    if keys & {"completions", "labels"}:
        return "stepwise_supervision"
    if keys >= {"completion", "label"}:
        return "unpaired_preference"
    if "completion" in keys:
        return "prompt_completion"
    if "messages" in keys:
        messages = record["messages"]
        ends_with_user = isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "user"
        return "prompt" if ends_with_user else "messages"
    if "prompt" in keys:
        return "prompt"
    if "text" in keys:
        return "text"
    return None


def _require(fmt: str, record: dict, where: str) -> None:
    missing = [field for field in REQUIRED[fmt] if field not in record]
    if missing:
        raise UserError(f"{where}: {_a(fmt)} record needs '{missing[0]}' ({_fields(record)})")


def _turns(value, where: str, field: str, role: str, tool_turns: bool = False) -> list[dict]:
    """A text field as one turn of ``role``, or a list of messages checked as such (``check_messages``)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise UserError(f"{where}: '{field}' must be text or a list of {{'role', 'content'}} messages, not {type(value).__name__}")
    return check_messages(value, where, field, tool_turns)


def _tools(record: dict, where: str) -> list[dict] | None:
    """A demonstration's tool definitions, or None; a JSON string (as datasets store them, their
    schemas differing) is parsed."""
    tools = record.get("tools")
    if isinstance(tools, str):
        with contextlib.suppress(json.JSONDecodeError):  # not JSON: refused below
            tools = json.loads(tools)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise UserError(f"{where}: 'tools' must be a list of tool definitions ({{'type': 'function', 'function': {{'name', ...}}}}), "
                        f"got {str(record['tools'])[:80]!r}")
    return tools or None


def _no_tools(record: dict, where: str) -> None:
    """Prompts and comparisons are stored as role and content only: tools would be dropped."""
    if record.get("tools"):
        raise UserError(f"{where}: 'tools' (tool definitions) are read in demonstrations (sft.data) only, not in prompts or comparisons")


def to_demonstration(fmt: str, record: dict, where: str) -> Demonstration:
    if fmt == "text":
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            raise UserError(f"{where}: 'text' must be a non-empty string")
        return Demonstration(text=record["text"], where=where)
    if fmt == "prompt_completion":
        _require(fmt, record, where)
        prompt = _turns(record.get("prompt"), where, "prompt", "user", tool_turns=True)
        completion = _turns(record.get("completion"), where, "completion", "assistant", tool_turns=True)
        if any(m["role"] not in ("assistant", "tool") for m in completion) or completion[-1]["role"] != "assistant":
            raise UserError(f"{where}: every message of 'completion' must be the assistant's (or a tool's result), the last the assistant's")
        # the loss is on the completion (TRL's, and this table's, reading): the prompt's answers are context
        messages = [m | {"weight": 0} if m["role"] == "assistant" else m for m in prompt] + completion
    else:
        messages = validate_messages(record.get("messages"), where, tool_turns=True)
    if not any(is_learnt(m) for m in messages):
        raise UserError(f"{where}: every assistant turn has weight 0: nothing to learn")
    return Demonstration(messages=messages, tools=_tools(record, where), where=where)


REQUIRED = {"prompt_completion": ("prompt", "completion"), "preference": ("chosen", "rejected"),
            "unpaired_preference": ("prompt", "completion", "label"), "stepwise_supervision": ("prompt", "completions", "labels")}
# every field a record of some format may hold: others are reported as possible misspellings
KNOWN_FIELDS = frozenset({"id", "text", "prompt", "completion", "messages", "chosen", "rejected", "label", "completions", "labels",
                          "prompt_id", "family", "answer", "args", "tools", "parallel_tool_calls"}
                         | set(ComparisonRecord.model_fields))


def misspelt_fields(record: dict) -> dict[str, str]:
    """{field: the known field it is likely a misspelling of} among ``record``'s unknown fields."""
    unknown = [k for k in record if k not in KNOWN_FIELDS]
    return {k: close[0] for k in unknown if (close := difflib.get_close_matches(k, KNOWN_FIELDS, n=1, cutoff=0.75))}


def _a(fmt: str) -> str:
    """'a text', 'an unpaired_preference'."""
    return f"{'an' if fmt[0] in 'aeiou' else 'a'} {fmt}"


def _fields(record: dict) -> str:
    """'fields: a, b' and a did-you-mean for each misspelt one, for error messages."""
    hints = "".join(f"; did you mean '{known}' for '{field}'?" for field, known in misspelt_fields(record).items())
    return f"fields: {', '.join(sorted(record)) or 'none'}{hints}"


def to_comparison(fmt: str, record: dict, where: str, default_id: str) -> ComparisonRecord:
    _no_tools(record, where)
    if fmt == "preference":
        _require(fmt, record, where)
        comparison = comparison_from_preference(record, where, default_id)
    else:
        if isinstance(record.get("prompt"), (str, list)):  # messages read as everywhere; a text prompt is one user turn
            record = {**record, "prompt": _turns(record["prompt"], where, "prompt", "user")}
        try:
            comparison = ComparisonRecord.model_validate(record)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "record"
            raise UserError(f"{where}: not a comparison record ({field}: {first['msg']})") from None
    if not comparison.prompt[-1].content.strip():
        raise UserError(f"{where}: the prompt is empty")
    return comparison


def to_prompt(fmt: str, record: dict, where: str, default_id: str) -> Prompt:
    """The prompt of a record of any format that holds one."""
    if fmt in ("preference", "comparison"):
        comparison = to_comparison(fmt, record, where, default_id)
        return Prompt(comparison.id, [m.model_dump() for m in comparison.prompt])
    _no_tools(record, where)
    if fmt == "messages":
        messages = validate_messages(record.get("messages"), where)[:-1]
    else:
        if fmt in REQUIRED:
            _require(fmt, record, where)
        field = "prompt" if "prompt" in record else "messages"
        messages = _turns(record.get(field), where, field, "user")
    if not messages or messages[-1]["role"] != "user":
        raise UserError(f"{where}: the last message of a prompt must be the user's")
    if not messages[-1]["content"].strip():  # a PPO episode, or a labeling task, with nothing asked
        raise UserError(f"{where}: the prompt is empty")
    return Prompt(str(record.get("id", default_id)), messages)


def has_empty_answer(demo: Demonstration) -> bool:
    """Whether the demonstration has an empty or blank assistant turn that is learnt (of weight 1,
    calling no tool): SFT teaches the model to stop at once there."""
    return any(is_learnt(m) and not m["content"].strip() and "tool_calls" not in m for m in demo.messages or ())


def to_text(fmt: str, record: dict, where: str) -> str:
    return to_demonstration("text", record, where).text


def record_format(record: dict, where: str, data_format: str = "auto") -> str:
    """``data_format``, or unless given the format ``record``'s fields say it is in; a UserError when none."""
    fmt = data_format if data_format != "auto" else detect_format(record)
    if fmt is None:
        raise UserError(f"{where}: fits no known format ({_fields(record)}); expected one of: {describe_fields()}")
    return fmt


def to_item(use: str, fmt: str, record: dict, where: str, default_id: str, key: str | None = None):
    """A record of format ``fmt`` read for ``use`` (given as ``key``): a Demonstration, ComparisonRecord, Prompt or text."""
    if fmt not in USES[use]:
        unanswered = "; its last message is the user's, with no answer after it" if fmt == "prompt" and "messages" in record else ""
        raise UserError(f"{where}: {_a(fmt)} record ({_fields(record)}{unanswered}) cannot be used as {key or STAGE_OF_USE[use]}, "
                        f"which takes {', '.join(USES[use])} records")
    if use in ("demonstration", "conversation"):
        return to_demonstration(fmt, record, where)
    if use == "comparison":
        return to_comparison(fmt, record, where, default_id)
    if use == "prompt":
        return to_prompt(fmt, record, where, default_id)
    return to_text(fmt, record, where)


def describe_fields() -> str:
    return ("text; prompt + completion; messages; prompt + chosen + rejected (or chosen + rejected); "
            "prompt + responses + ranks (comparison); prompt, or messages ending with a user turn (prompt-only); "
            "prompt + completion + label (unpaired preference); prompt + completions + labels (stepwise supervision)")
