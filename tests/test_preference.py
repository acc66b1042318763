"""TRL-style pairwise preference records read as K = 2 comparisons, in all four shapes."""

from __future__ import annotations

import json
import re

import pytest

from instructrl.data.preference import comparison_from_preference, split_implicit_text
from instructrl.data.inputs import read_comparisons
from instructrl.errors import UserError

USER = {"role": "user", "content": "Add 2 and 3."}


def _read(tmp_path, *records):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_comparisons(path)


def test_explicit_plain_text(tmp_path):
    [r] = _read(tmp_path, {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"})
    assert [m.model_dump() for m in r.prompt] == [USER]
    assert r.responses == ["5", "6"] and r.ranks == [0, 1] and r.likert is None


def test_the_same_answer_on_both_sides_is_a_tie(tmp_path):
    answer = [{"role": "assistant", "content": "5"}]
    plain, chat = _read(tmp_path, {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "5"},
                        {"prompt": [USER], "chosen": answer, "rejected": answer})
    assert plain.ranks == chat.ranks == [0, 0]


def test_explicit_conversational(tmp_path):
    [r] = _read(tmp_path, {"prompt": [USER], "chosen": [{"role": "assistant", "content": "5"}],
                           "rejected": [{"role": "assistant", "content": "6"}]})
    assert [m.model_dump() for m in r.prompt] == [USER] and r.responses == ["5", "6"]


def test_implicit_conversational_takes_the_shared_turns_as_prompt(tmp_path):
    earlier = [{"role": "user", "content": "Add 1 and 1."}, {"role": "assistant", "content": "2"}, USER]
    [r] = _read(tmp_path, {"chosen": earlier + [{"role": "assistant", "content": "5"}],
                           "rejected": earlier + [{"role": "assistant", "content": "6"}]})
    assert [m.model_dump() for m in r.prompt] == earlier and r.responses == ["5", "6"]


def test_implicit_plain_text_splits_at_the_last_shared_space():
    # the texts share "Q: sum? A: 1" but the prompt is cut back to the whitespace before "12"/"13"
    assert split_implicit_text("Q: sum? A: 12", "Q: sum? A: 13") == ("Q: sum? A:", "12", "13")
    r = comparison_from_preference({"chosen": "Q: sum? A: 12", "rejected": "Q: sum? A: 13"}, "f:1", "f:1")
    assert r.prompt[0].content == "Q: sum? A:" and r.responses == ["12", "13"]


def test_mixed_with_kway_records_in_one_file(tmp_path):
    kway = {"id": "x", "prompt": [USER], "responses": ["5", "6", "7"], "ranks": [0, 1, 1], "likert": [7, 2, 2],
            "flags": [[], ["incorrect"], ["incorrect"]], "labeler_id": "a"}
    records = _read(tmp_path, kway, {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"})
    assert [len(r.responses) for r in records] == [3, 2]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be text"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no prompt"),
    ({"prompt": [USER], "chosen": [{"role": "user", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}, "assistant"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": [{"role": "assistant", "content": "5"}],
      "rejected": [{"role": "assistant", "content": "6"}]}, "prompt[0]"),
])
def test_bad_preference_records_name_the_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl:2: .*{re.escape(message)}"):
        read_comparisons(path)


# ---------------------------------------------------------------- PPO prompt files


def test_prompt_files_take_messages_or_a_prompt_string(tmp_path):
    from instructrl.data.inputs import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": [USER]}) + "\n" + json.dumps({"prompt": "Add 1 and 1."}) + "\n")
    first, second = read_prompts(path)
    assert (first.id, first.messages) == ("a", [USER])
    assert second.id == "prompts.jsonl:2" and second.messages == [{"role": "user", "content": "Add 1 and 1."}]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "5"}]}, "last message of a prompt must be the user's"),
    ({"text": "hello"}, "a text record (fields: text) cannot be used as ppo.prompts"),
    ({"colour": "red"}, "fits no known format (fields: colour)"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
])
def test_bad_prompt_lines_name_the_line(tmp_path, record, message):
    from instructrl.data.inputs import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"p.jsonl:2: .*{re.escape(message)}"):
        read_prompts(path)
