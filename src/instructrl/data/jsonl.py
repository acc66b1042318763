"""JSONL files: one JSON object per line, errors reported as file:line."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Iterator

from instructrl.errors import UserError


# the first bytes of compressed files: what they are, and how to decompress one
COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip -k"), b"PK\x03\x04": ("zip", "unzip"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"),
              b"BZh": ("bzip2", "bunzip2 -k"), b"\xfd7zXZ": ("xz", "unxz -k")}


def not_text(path: Path, where: str | None = None) -> UserError:
    """The error for a file that is not UTF-8 text at ``where`` (default: the file); a compressed one is named as such."""
    with open(path, "rb") as f:
        start = f.read(6)
    for magic, (kind, command) in COMPRESSED.items():
        if start.startswith(magic):
            return UserError(f"{path}: a {kind} file; decompress it first ({command} {path})")
    return UserError(f"{where or path}: not UTF-8 text")


def read_jsonl(path: Path | str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for every non-blank line; a bad line raises a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the record
            except UnicodeDecodeError:
                raise not_text(path, f"{path}:{number}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
            if SURROGATE_ESCAPE.search(line):  # without one no walk, which took as long again as the parsing
                check_unicode(record, f"{path}:{number}")
            yield number, record


def complete_lines(path: Path | str) -> list[tuple[str, dict]]:
    """(line, record) of each line of a log this program appends to, up to the first line that
    does not parse: the one a crash cut short. A missing file has none."""
    path = Path(path)
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            lines.append((line, json.loads(line)))
        except json.JSONDecodeError:
            break
    return lines


def temp_beside(path: Path) -> Path:
    """Where to write ``path`` before renaming it into place: a name of this process and thread's
    own, so that two writers of one file at once (two exports of a project) never truncate or
    rename each other's half-written file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_jsonl(path: Path | str, records: Iterable[dict]) -> None:
    """Write records atomically: a reader never sees half a file, a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def nan_to_none(value):
    """JSON has no NaN nor infinity: a figure with nothing to measure (or an overflow) is written as
    null (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# JSON's escape of a surrogate (\uD800 to \uDFFF): only such an escape, unpaired, reads as text that is not valid Unicode
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_unicode(record: dict, where: str) -> None:
    """A UserError at ``where`` naming the field of a record read from JSON whose text is not valid Unicode
    (``encodable``), whatever the field: a tokenizer given a lone surrogate raises a TypeError of its own."""
    for field, text in _texts(record):
        try:
            encodable(text, field)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None


def _texts(value, field: str = ""):
    """(what, text) of every string in ``value``, its field names included, however nested; ``what``
    names the field as a message does (``'messages[0].content'``)."""
    if isinstance(value, str):
        yield f"'{field}'", value
    elif isinstance(value, dict):
        for key, item in value.items():
            name = f"{field}.{key}" if field else str(key)
            yield f"a field name in '{field}'" if field else "a field name", str(key)  # the name itself cannot be shown
            yield from _texts(item, name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _texts(item, f"{field}[{i}]")


def encodable(text: str, what: str = "the text") -> str:
    """``text``, if it can be written as UTF-8: JSON's ``"\\ud800"`` escape reads as a lone
    surrogate, which cannot be (nor stored in SQLite, nor tokenized)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} holds a character that is not valid Unicode ({err.object[err.start]!r} at {err.start})") from None
    return text
