"""Reading and trimming files a user or a killed run left behind."""

from __future__ import annotations

import json

import pytest

from instructrl.config import load_config
from instructrl.data.jsonl import read_jsonl
from instructrl.errors import UserError
from instructrl.rundir import trim_step_log


def test_non_utf8_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff\xfe"}\n')
    with pytest.raises(UserError, match=r"data.jsonl:2: not UTF-8"):
        list(read_jsonl(path))


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"b": 2}\n')  # what some Windows editors write
    assert [r for _, r in read_jsonl(path)] == [{"a": 1}, {"b": 2}]


def test_control_character_in_a_string_is_named_once(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": "one\ttwo"}\n')  # a raw tab inside a JSON string
    with pytest.raises(UserError) as err:
        list(read_jsonl(path))
    assert str(err.value) == f"{path}:1: not valid JSON (Invalid control character at column 11)"


def test_non_utf8_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"sft:\n  lr: \xff\n")
    with pytest.raises(UserError, match=r"c.yaml: not UTF-8"):
        load_config(path)


def test_trim_step_log_drops_replayed_and_half_written_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (2, 4, 6)] + ['{"step": 8, "lo']  # the last cut by kill -9
    path.write_text("\n".join(lines))
    trim_step_log(path, resume_step=4, keep_equal=True)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [2, 4]
    trim_step_log(path, resume_step=4, keep_equal=False)  # data-order logs: step 4 is replayed
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [2]

