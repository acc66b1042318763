"""Reading and trimming files a user or a killed run left behind."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from instructrl.config import load_config
from instructrl.data.jsonl import read_jsonl, write_jsonl
from instructrl.errors import UserError
from instructrl.rundir.files import copy_dir, trim_step_log


def test_non_utf8_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff\xfe"}\n')
    with pytest.raises(UserError, match=r"data.jsonl:2: not UTF-8"):
        list(read_jsonl(path))


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.jsonl", "data.csv", "data.json", "corpus.txt"])
def test_a_compressed_file_says_so_and_how_to_decompress_it(tmp_path, name):
    # a .jsonl.gz was "not UTF-8 text", which sent people looking for a bad character
    import gzip

    from instructrl.data.inputs import read_data, read_texts

    path = tmp_path / name
    path.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n'))
    with pytest.raises(UserError) as err:
        read_texts(path) if name.endswith(".txt") else read_data(path, "sft")
    assert str(err.value) == f"{path}: a gzip file; decompress it first (gunzip -k {path})"


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"b": 2}\n')  # what some Windows editors write
    assert [r for _, r in read_jsonl(path)] == [{"a": 1}, {"b": 2}]


def test_two_writers_of_one_file_at_once_each_write_a_whole_file(tmp_path):
    # two exports at once (a double-clicked Export button) shared comparisons.jsonl.tmp: the
    # second truncated the first's file, and the first's rename then failed (a 500)
    path = tmp_path / "comparisons.jsonl"

    def first_writer():
        yield {"writer": 1, "n": 0}
        second = threading.Thread(target=write_jsonl, args=(path, [{"writer": 2, "n": n} for n in range(3)]))
        second.start()  # the other request's thread writes the whole file meanwhile
        second.join()
        assert [r for _, r in read_jsonl(path)] == [{"writer": 2, "n": n} for n in range(3)]
        yield {"writer": 1, "n": 1}

    write_jsonl(path, first_writer())
    assert [r for _, r in read_jsonl(path)] == [{"writer": 1, "n": 0}, {"writer": 1, "n": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["comparisons.jsonl"]


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



def test_an_option_added_since_a_run_finished_leaves_it_finished_at_its_default(tmp_path):
    """A run folder from before a version added sft.max_length is still complete while the new key
    holds its default, and is a different config once the key is set."""
    from instructrl.rundir.run import RunDir

    config = load_config(overrides=[f"run.dir={tmp_path}"])
    run = RunDir(config, "sft", ("run", "sft"))
    run.start()
    run.finish({})
    for name in ("identity.json", "done.json"):  # as the older version wrote them
        saved = json.loads((run.path / name).read_text())
        identity = saved.get("identity", saved)
        del identity["sft"]["max_length"]
        (run.path / name).write_text(json.dumps(saved))
    assert RunDir(config, "sft", ("run", "sft")).is_done()
    RunDir(config, "sft", ("run", "sft")).start()  # no "different config"
    changed = load_config(overrides=[f"run.dir={tmp_path}", "sft.max_length=64"])
    assert not RunDir(changed, "sft", ("run", "sft")).is_done()
    with pytest.raises(UserError, match=r"different config \(sft.max_length: None -> 64\)"):
        RunDir(changed, "sft", ("run", "sft")).start()


def test_restart_on_several_processes_lets_none_go_on_before_the_folder_is_discarded(tmp_path, monkeypatch):
    """Under a launcher, --restart's main process discards the old run folder while the others go on to look
    for a checkpoint to resume from: they used to find the old one (2-process FSDP SFT: "cannot resume from the
    checkpoint ... written by 1 process", 1 try in 3). Every process now waits in start until the folder is ready."""
    import accelerate

    from instructrl.rundir import run as run_module
    from instructrl.rundir.run import RunDir

    config = load_config(overrides=[f"run.dir={tmp_path}"])
    old = RunDir(config, "sft", ("run", "sft"))
    old.start()
    (old.path / "checkpoints" / "step-00000006").mkdir(parents=True)
    events = []
    monkeypatch.setattr(accelerate, "PartialState", lambda: SimpleNamespace(wait_for_everyone=lambda: events.append("wait")))
    monkeypatch.setattr(run_module.shutil, "rmtree", lambda path, rmtree=shutil.rmtree: (events.append("discard"), rmtree(path)))

    RunDir(config, "sft", ("run", "sft"), is_main=False, processes=2).start(restart=True)
    assert events == ["wait"]  # the other process returns only after the barrier the main one reaches once done
    events.clear()
    RunDir(config, "sft", ("run", "sft"), is_main=True, processes=2).start(restart=True)
    assert events == ["discard", "wait"]
    assert not (old.path / "checkpoints").exists()
    events.clear()
    RunDir(config, "sft", ("run", "sft")).start(restart=True)  # one process: nothing to wait for
    assert events == ["discard"]


def test_copy_dir_replaces_the_destination_whole(tmp_path):
    src, dest = tmp_path / "best", tmp_path / "final"
    src.mkdir()
    (src / "model.safetensors").write_text("new")
    dest.mkdir()
    (dest / "model.safetensors").write_text("old")
    (dest / "stale.json").write_text("{}")
    (tmp_path / "final.tmp").mkdir()  # left by a copy that was interrupted
    copy_dir(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]  # nothing of the old folder is left
    assert (dest / "model.safetensors").read_text() == "new"
    assert not (tmp_path / "final.tmp").exists()
    copy_dir(src, tmp_path / "linked", copy_function=os.link)
    assert (tmp_path / "linked" / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino


def test_metrics_lines_are_standard_json_and_tensorboard_keeps_the_nan(tmp_path):
    """A NaN (a diverged loss) is null in metrics.jsonl, which JSON parsers other than Python's accept
    (JSON has no NaN); TensorBoard, which has, shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from instructrl.rundir.run import RunDir

    run = RunDir(load_config(overrides=[f"run.dir={tmp_path}"]), "sft", ("run", "sft"))
    run.start()
    run.log(2, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/lr": 0.5})
    run.finish({})

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    [line] = (run.path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=strict) == {"step": 2, "train/loss": None, "train/grad_norm": None, "train/lr": 0.5}
    events = EventAccumulator(str(run.path / "tb"))
    events.Reload()
    [loss] = events.Scalars("train/loss")
    assert loss.step == 2 and loss.value != loss.value


def test_run_json_keeps_the_first_start_and_adds_each_resume(tmp_path, monkeypatch):
    """Resuming a killed run must not lose how it was first started; the record names the code that ran."""
    import subprocess
    import sys

    import instructrl
    from instructrl.rundir.run import RunDir

    import torch

    config = load_config(overrides=[f"run.dir={tmp_path / 'run'}"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["instructrl", "sft", "-c", "first.yaml"])
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # the CPU's numbers depend on it: another count, other last digits
    try:
        run = RunDir(config, "sft", ("run", "sft"))
        run.start()
        run.record_start()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(sys, "argv", ["instructrl", "sft", "-c", "first.yaml", "sft.log_every=5"])
    run = RunDir(config, "sft", ("run", "sft"))  # the same run, resumed
    run.start()
    run.record_start()
    record = json.loads((tmp_path / "run" / "sft" / "run.json").read_text())
    assert record["command"] == ["instructrl", "sft", "-c", "first.yaml"] and record["cwd"] == str(tmp_path)
    assert [r["command"][-1] for r in record["resumed"]] == ["sft.log_every=5"]
    package = Path(instructrl.__file__).resolve().parent  # the instructrl being tested
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a git checkout
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)
    assert record["instructrl"] and record["torch"]
    assert record["torch_threads"] == threads + 1 and record["resumed"][0]["torch_threads"] == threads


def test_run_json_s_git_dirty_is_of_the_whole_package_not_of_the_module_that_asks(monkeypatch):
    """run_info's module lies in a subpackage (rundir/): git status asked there would miss a change
    to any other module of instructrl, and git_dirty would say a changed checkout is clean."""
    import subprocess

    import instructrl
    from instructrl.rundir import run

    folders = []

    def git(command, **kwargs):
        folders.append(command[command.index("-C") + 1])
        return subprocess.CompletedProcess(command, 0, stdout="M stages/sft.py" if "status" in command else "abc")

    monkeypatch.setattr(run.subprocess, "run", git)
    assert run._source_revision() == {"git_commit": "abc", "git_dirty": True}
    assert set(folders) == {str(Path(instructrl.__file__).resolve().parent)}
