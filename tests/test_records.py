"""Comparison records: a ranking survives writing and reading back, and bad records are named by line."""

from __future__ import annotations

import json

import pytest

from instructrl.data.inputs import read_comparisons
from instructrl.data.records import ComparisonRecord, write_comparisons
from instructrl.errors import UserError
from instructrl.stages.collect import judge_responses
from instructrl.world.labeler import SimulatedLabeler
from instructrl.world.tasks import Task


def judged_record(labeler: SimulatedLabeler) -> ComparisonRecord:
    task = Task("t1", "reverse_word", ({"role": "user", "content": "Reverse the word tiger."},), "regit", {"word": "tiger"})
    return judge_responses(labeler, task, ["Sure! regit.", "regit", "tiger", "regit"])


def test_round_trip_keeps_the_ranking(tmp_path):
    record = judged_record(SimulatedLabeler())
    # gold: "regit" twice (best, tied), "Sure! regit." verbose (second), "tiger" wrong (third)
    assert record.ranks == [1, 0, 2, 0]
    path = tmp_path / "comparisons.jsonl"
    write_comparisons(path, [record, record])
    assert read_comparisons(path) == [record, record]


@pytest.mark.parametrize("change, needle", [
    ({"ranks": [0, 1]}, "K = 4"),
    ({"likert": [9, 7, 1, 7]}, "1..7"),
    ({"prompt": [{"role": "assistant", "content": "x"}]}, "user turn"),
    ({"colour": "red"}, "colour"),
])
def test_bad_records_are_named_by_line(tmp_path, change, needle):
    good = judged_record(SimulatedLabeler()).model_dump(mode="json")
    path = tmp_path / "comparisons.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(UserError, match=rf"comparisons.jsonl:2: .*{needle}"):
        read_comparisons(path)


def test_true_and_false_are_no_ranks(tmp_path):
    """pydantic read true as rank 1 (the worse) and false as 0: [true, false] meant as 'the first is chosen' trained the pair inverted."""
    record = {"id": "p1", "prompt": [{"role": "user", "content": "Say cat."}], "responses": ["cat", "dog"], "ranks": [True, False], "labeler_id": "me"}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"{path}:1: not a comparison record \\(ranks: Value error, ranks are numbers, 0 = best, not true/false\\)"):
        read_comparisons(path)
