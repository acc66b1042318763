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

Files: JSON lines (``.jsonl``, or any other name), a ``.json`` file of one JSON value (a list of
records, one record, or ``{"data": [...]}``) or of JSON lines, Parquet (``.parquet``), CSV
(``.csv``: a header naming the fields, then text cells, so no message lists), or a folder
written by ``datasets``' ``save_to_disk``. A file holds one format; a record that fits none, or
another than the first record's, is reported as file:line (file:row for Parquet and datasets
folders, file:record for a JSON list).
"""

from __future__ import annotations

import contextlib
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from pydantic import ValidationError

from instructrl.data.chat import control_token_in, control_tokens
from instructrl.data.jsonl import not_text, read_jsonl
from instructrl.data.preference import comparison_from_preference
from instructrl.data.records import ComparisonRecord, check_messages, is_learnt, is_tool_turn, validate_messages
from instructrl.errors import UserError
from instructrl.training.progress import counting

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


# ---------------------------------------------------------------- files


def read_records(path: Path | str) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for every record of a JSONL, JSON, Parquet file or a datasets folder;
    ``where`` is file:line (file:row, file:record) for error messages."""
    path = Path(path)
    if path.is_dir():
        yield from _arrow_rows(path, _dataset_rows(_load_from_disk(path)))
    elif not path.is_file():
        raise not_found(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".csv":
        yield from _csv_rows(path)
    elif path.suffix == ".json" and (records := _json_records(path)) is not None:
        for number, record in enumerate(records, start=1):
            if not isinstance(record, dict):
                raise UserError(f"{path}: record {number}: expected a JSON object, found {type(record).__name__}")
            yield f"{path}: record {number}", record
    else:
        for number, record in read_jsonl(path):
            yield f"{path}:{number}", record


def not_found(path: Path) -> UserError:
    """A missing data file; a name like a Hub dataset's ("org/name") is told that only local files are read."""
    hub_like = not path.is_absolute() and len(path.parts) == 2 and not path.suffix and not str(path).startswith(".")
    return UserError(f"{path}: file not found" + ("; data is read from local files only: save a Hub dataset first "
                                                    "(datasets' save_to_disk, to_json or to_parquet) and give that" if hub_like else ""))


RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # any other file is plain text to ppo.ptx_data


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """The rows of a CSV file as records whose fields the header names; every cell is text as
    written (``42``, ``NA`` and an empty cell are text, not a number, a null or a missing field)."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" begins with a byte-order mark
            reader = csv.DictReader(f)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                extra, missing = row.pop(None, []), sum(value is None for value in row.values())
                if extra or missing:
                    cells = len(reader.fieldnames) + len(extra) - missing
                    raise UserError(f"{where}: {cells} cells, but the header ({', '.join(reader.fieldnames)}) names {len(reader.fieldnames)}")
                yield where, row
    except UnicodeDecodeError:
        raise not_text(path) from None
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


def _json_records(path: Path) -> list | None:
    """The records of a ``.json`` file holding one JSON value: a list of records, one record (even
    pretty-printed), or an object whose only value is the list (``{"data": [...]}``). None when
    the file is JSON lines under a .json name, as ``datasets`` writes them."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the JSON
    except UnicodeDecodeError:
        raise not_text(path) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip()[:1] == "[":
            raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        return None
    if isinstance(value, dict):
        if len(value) == 1:
            key, inner = next(iter(value.items()))
            if isinstance(inner, list) and key not in KNOWN_FIELDS:  # {"data": [...]}, but {"messages": [...]} is one record
                return inner
        return [value]
    return value if isinstance(value, list) else [value]


def _load_from_disk(path: Path):
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError, or pyarrow's errors for a damaged folder
        raise UserError(f"{path}: not a folder written by datasets' save_to_disk ({str(err).splitlines()[0]})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise UserError(f"{path}: a DatasetDict with splits {sorted(dataset)} and no 'train'; save the split to use")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return dataset


def _dataset_rows(dataset) -> Iterator[dict]:
    """A dataset's rows, formatted a batch at a time: a row at a time took 7 times as long (2.2 s for 200k rows)."""
    for batch in dataset.iter(batch_size=1024):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """The rows of a Parquet file, read a batch at a time: a file larger than memory streams."""
    yield from _arrow_rows(path, (row for batch in _parquet_file(path).iter_batches(batch_size=1024) for row in batch.to_pylist()))


def count_records(path: Path | str) -> int | None:
    """How many records ``read_records`` yields, where that is quick to know (a progress bar's
    total): the rows of Parquet files and datasets folders, the non-blank lines of JSON lines;
    None for .json and .csv files (a record there may span lines)."""
    path = Path(path)
    if path.is_dir():
        return len(_load_from_disk(path))
    if not path.is_file() or path.suffix in (".json", ".csv"):
        return None
    if path.suffix == ".parquet":
        return _parquet_file(path).metadata.num_rows
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _arrow_rows(path: Path, rows) -> Iterator[tuple[str, dict]]:
    """Each row (of a dataset, or a Parquet file's batches) named by its number, its nulls dropped."""
    for number, row in enumerate(rows, start=1):
        yield f"{path}: row {number}", _without_nulls(row)


def _without_nulls(value):
    """Arrow gives every struct the union of the fields of all rows, missing ones as None: drop them."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------- formats


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


# ---------------------------------------------------------------- reading a file for one use


class DataFile(NamedTuple):
    """What ``read_data`` reads of a file."""

    formats: list[str]  # the formats found, in the order met
    items: list  # Demonstrations, ComparisonRecords, Prompts or texts
    control_tokens: tuple[int, str | None]  # the records holding the tokenizer's control tokens, and where the first is


def read_data(path: Path | str, use: str, data_format: str = "auto", key: str | None = None, tokenizer=None,
              progress: str | None = None, on_item: Callable[[dict, object], None] | None = None, keep: bool = True) -> DataFile:
    """The formats and items of a data file read for ``use`` (a key of USES): Demonstrations,
    ComparisonRecords, Prompts or texts. Each record's format is detected from its fields (a file
    may mix formats the use accepts, e.g. K-way comparisons and preference pairs), or is
    ``data_format``. Every record is checked; the first bad one is a UserError naming its file and line,
    and for a record of a format the use does not take, the input it was given as (``key``; default: the stage's).
    With a ``tokenizer``, also the records that hold its control tokens (``record_control_token``),
    in the same pass. ``progress``: the description of a bar counting the records read (None: no bar).
    ``on_item(record, item)`` is called with each record and its item, for what else a caller keeps of
    a record in the same pass (PPO: the built-in world's gold answers). ``keep=False``: the items are
    given to ``on_item`` only, not held (``DataFile.items`` is empty), for a caller that keeps less of each (SFT: its token ids)."""
    path = Path(path)
    formats, items, control, number = [], [], (0, None), 0
    tokens = control_tokens(tokenizer) if tokenizer is not None else None
    with counting(progress or "", count_records(path) if progress else None, "record", enabled=progress is not None) as done:
        for number, (where, record) in enumerate(read_records(path), start=1):
            fmt = record_format(record, where, data_format)
            if fmt not in formats:
                formats.append(fmt)
            item = to_item(use, fmt, record, where, f"{path.name}:{number}", key)
            if keep:
                items.append(item)
            if on_item is not None:
                on_item(record, item)
            if tokens and (token := record_control_token(record, tokens)) is not None:
                control = (control[0] + 1, control[1] or f"{where}: {token!r}")
            if number % 1000 == 0:
                done(number)
    if not number:
        raise UserError(f"{path}: no records")
    return DataFile(formats, items, control)


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


def read_comparisons(path: Path | str, data_format: str = "auto", key: str = "rm.data") -> list[ComparisonRecord]:
    """Comparison records (K-way, or TRL preference pairs as K = 2) from any supported file; ``key``
    names the input in an error (collect.judgements)."""
    return read_data(path, "comparison", data_format, key).items


def read_prompts(path: Path | str, data_format: str = "auto", key: str = "ppo.prompts", progress: str | None = None) -> list[Prompt]:
    """The prompts of any records that hold one; ``key`` names the input in an error (eval.prompts, --prompts).
    ``progress``: the description of a bar counting the records read (None: no bar)."""
    return read_data(path, "prompt", data_format, key, progress=progress).items


def read_texts(path: Path | str, progress: str | None = None) -> list[str]:
    """Documents for PPO-ptx: ``text`` records of a data file (``progress``: the description of a
    bar counting them; None: no bar), or a plain-text file's lines."""
    path = Path(path)
    if path.is_dir() or path.suffix in RECORD_SUFFIXES:
        return read_data(path, "text", progress=progress).items
    if not path.is_file():
        raise not_found(path)
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise not_text(path) from None


def record_control_token(record: dict, tokens: list[str]) -> str | None:
    """The first of the control ``tokens`` (``control_tokens``) written in ``record``'s text, or None. Tokenizing
    reads such a string as the token itself, not as text: inside a message it can end the turn
    early. Records in the "text" format are left out: their text is the whole sequence, templates
    and control tokens included."""
    if detect_format(record) == "text":
        return None
    return next((t for text in _strings(record) if (t := control_token_in(text, tokens))), None)


def warn_of_control_tokens(path: Path | str, found: tuple[int, str | None], what: str, log) -> None:
    """Tell ``log`` when ``path``'s records hold control tokens: ``found`` is how many, and where
    the first is (``DataFile.control_tokens``)."""
    count, first = found
    if count:
        log(f"warning: {count} {what} of {path} hold the tokenizer's control tokens in their text (first at {first}); "
            f"they are read as those tokens, not as text")


def _strings(value) -> Iterator[str]:
    """Every string inside a record's values, however nested."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@dataclass
class _Verdict:
    """How the records of a file fare as one stage input (a key of USES), for data check."""

    use: str
    taken: int = 0  # records read as this input so far
    error: UserError | None = None  # the first record it cannot take: the file is not this input
    refused_format: bool = False  # that record's format is not one the input takes (rather than a bad record of one it does)
    stats: dict = field(default_factory=dict)  # what data check reports of the records taken (``_count``)


def check_file(path: Path | str, data_format: str = "auto", tokenizer=None, progress=None) -> dict:
    """What ``instructrl data check`` reports: the format, the record count, the stage inputs the
    file can be, why it cannot be an input that took some of its records (``not_usable_as``), and a
    summary; every record is validated for each input, in one pass that keeps no record, so a file
    of any size checks in constant memory. With a ``tokenizer``, also the records that hold its
    control tokens (``record_control_token``). ``progress(n)`` is told every 1000 records read."""
    path = Path(path)
    if path.is_file() and path.suffix not in RECORD_SUFFIXES:  # plain text: PPO-ptx's documents, one per line
        return {"file": str(path), "format": "plain text", "records": sum(1 for line in read_texts(path) if line.strip()),
                "usable_as": [STAGE_OF_USE["text"]]}
    verdicts = [_Verdict(use) for use in USES]
    formats, misspelt, style, control = [], {}, None, [0, None]
    tokens = control_tokens(tokenizer) if tokenizer is not None else None
    number = 0
    for number, (where, record) in enumerate(read_records(path), start=1):
        fmt = record_format(record, where, data_format)
        if fmt not in formats:
            formats.append(fmt)
        live, default_id = [v for v in verdicts if v.error is None], f"{path.name}:{number}"
        for verdict in live:
            try:
                _count(verdict.stats, to_item(verdict.use, fmt, record, where, default_id))
                verdict.taken += 1
            except UserError as err:
                verdict.error, verdict.refused_format = err, fmt not in USES[verdict.use]
        if all(v.error is not None for v in live):  # no input takes the file: say why the input that read furthest stops here
            raise next((v.error for v in live if not v.refused_format), live[0].error)
        for name, known in misspelt_fields(record).items():
            misspelt.setdefault(name, f"{where}: did you mean '{known}'?")
        if fmt == "preference" and style is None:
            style = ("conversational" if isinstance(record.get("chosen"), list) else "plain text") + \
                (", explicit prompt" if "prompt" in record else ", implicit prompt")
        if tokens and (token := record_control_token(record, tokens)) is not None:
            control = [control[0] + 1, control[1] or f"{where}: {token!r}"]
        if progress is not None and number % 1000 == 0:
            progress(number)
    if not number:
        raise UserError(f"{path}: no records")
    rankings = verdicts[list(USES).index("comparison")]
    if rankings.error is None and not rankings.stats.get("pairs", 1):  # as rm refuses it
        rankings.error = UserError(f"{path}: every comparison ranks all its responses equal: no pair to learn from")
    usable = [v for v in verdicts if v.error is None]
    summary: dict = {"file": str(path), "format": "+".join(formats), "records": number, "usable_as": [STAGE_OF_USE[v.use] for v in usable]}
    # an input that took some records, or refused a bad record of a format it takes: the file was likely meant for it
    if refused := {STAGE_OF_USE[v.use]: str(v.error) for v in verdicts if v.error is not None and (v.taken or not v.refused_format)}:
        summary["not_usable_as"] = refused
    figures = next(v for v in verdicts if v.taken == number).stats  # of the first input that took every record
    summary.update({name: sorted(value) if isinstance(value, set) else value for name, value in figures.items()})
    if misspelt:  # such a record may still fit some format, just not the one meant
        summary["misspelt_fields"] = misspelt
    if style is not None:
        summary["style"] = style
    if tokenizer is not None:
        summary["control_tokens"] = {"records": control[0], "first": control[1]}
    return summary


def _count(stats: dict, item) -> None:
    """Add what data check reports of one item to ``stats``: a comparison's K and its pairs, tied
    or not (a tie is no pair to learn from); a conversation's assistant turns, an empty answer,
    its turns of weight 0 (context only) and its tool calls and results."""
    if isinstance(item, ComparisonRecord):
        tied = [a == b for i, a in enumerate(item.ranks) for b in item.ranks[i + 1:]]
        stats.setdefault("k", set()).add(len(item.responses))
        stats["pairs"] = stats.get("pairs", 0) + tied.count(False)
        stats["tied_pairs"] = stats.get("tied_pairs", 0) + tied.count(True)
    elif isinstance(item, Demonstration) and item.messages is not None:
        stats["assistant_turns"] = stats.get("assistant_turns", 0) + sum(m["role"] == "assistant" for m in item.messages)
        counts = {"empty_answers": int(has_empty_answer(item)), "weight_0_turns": sum(m.get("weight") == 0 for m in item.messages),
                  "tool_turns": sum(is_tool_turn(m) for m in item.messages)}
        for name, count in counts.items():
            if count:
                stats[name] = stats.get(name, 0) + count
