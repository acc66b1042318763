"""Every kind of data file, read as (where, record) pairs; ``where`` names the record in an error.

Files: JSON lines (``.jsonl``, or any other name), a ``.json`` file of one JSON value (a list of
records, one record, or ``{"data": [...]}``) or of JSON lines, Parquet (``.parquet``), CSV
(``.csv``: a header naming the fields, then text cells, so no message lists), or a folder
written by ``datasets``' ``save_to_disk``. A file holds one format; a record that fits none, or
another than the first record's, is reported as file:line (file:row for Parquet and datasets
folders, file:record for a JSON list).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from instructrl.data.formats import KNOWN_FIELDS
from instructrl.data.jsonl import SURROGATE_ESCAPE, check_unicode, not_text, read_jsonl
from instructrl.errors import UserError


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
    the file is JSON lines under a .json name, as ``datasets`` writes them. Each record must be an object of valid Unicode text (``check_unicode``)."""
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
    records = value if isinstance(value, list) else [value]
    if isinstance(value, dict) and len(value) == 1:
        key, inner = next(iter(value.items()))
        if isinstance(inner, list) and key not in KNOWN_FIELDS:  # {"data": [...]}, but {"messages": [...]} is one record
            records = inner
    escaped = SURROGATE_ESCAPE.search(text) is not None  # as read_jsonl: without such an escape no record needs the walk
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {number}: expected a JSON object, found {type(record).__name__}")
        if escaped:
            check_unicode(record, f"{path}: record {number}")
    return records


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
