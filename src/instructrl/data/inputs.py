"""A data file read as one stage input (a use: ``sft.data``, ``rm.data``, ``ppo.prompts``, ...): every record
checked in one pass, with the records that hold a tokenizer's control tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from instructrl.data.chat import control_token_in, control_tokens
from instructrl.data.formats import Prompt, detect_format, record_format, to_item
from instructrl.data.jsonl import not_text
from instructrl.data.readers import RECORD_SUFFIXES, count_records, not_found, read_records
from instructrl.data.records import ComparisonRecord
from instructrl.errors import UserError
from instructrl.training.progress import counting


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

