"""``instructrl data check``: what a data file holds and which stage inputs it can be."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from instructrl.data.chat import control_tokens
from instructrl.data.formats import STAGE_OF_USE, USES, Demonstration, has_empty_answer, misspelt_fields, record_format, to_item
from instructrl.data.inputs import read_texts, record_control_token
from instructrl.data.readers import RECORD_SUFFIXES, read_records
from instructrl.data.records import ComparisonRecord, is_tool_turn
from instructrl.errors import UserError


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
