"""Two processes on one stage folder: the second stops with one line and writes nothing; kill -9 of the first frees it."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOKE, cli

from instructrl.config import load_config
from instructrl.errors import UserError
from instructrl.rundir.run import RunDir

# a stage that has begun writing its folder and goes on training (as `instructrl pipeline` in a forgotten tmux)
HOLDER = """
import sys, time
from instructrl.config import load_config
from instructrl.rundir.run import RunDir

root = sys.argv[1]
sys.argv = ["instructrl", "pipeline", "-c", "configs/smoke.yaml", "run.dir=" + root]  # what run.json and the lock record
run = RunDir(load_config(overrides=["run.dir=" + root]), "sft", ("run", "sft"))
run.start()
run.record_start()
print("writing", flush=True)
time.sleep(600)
"""


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_of_a_stage_in_use_stops_with_one_line_and_changes_nothing(tmp_path, holder):
    config = load_config(overrides=[f"run.dir={tmp_path}"])
    before = _files(tmp_path)
    in_use = rf"^{tmp_path / 'sft'} is in use by another instructrl process \(pid {holder.pid}, started \d{{4}}-\d\d-\d\d \d\d:\d\d, " \
             r"`instructrl pipeline -c configs/smoke.yaml run.dir=.*`\); wait for it to finish or stop it$"
    for restart in (False, True):  # --restart would have emptied the folder under the running stage
        with pytest.raises(UserError, match=in_use):
            RunDir(config, "sft", ("run", "sft")).skip(restart, log=print)
        with pytest.raises(UserError, match=in_use):
            RunDir(config, "sft", ("run", "sft")).start(restart)
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path}", "--restart", check=False)
    assert proc.returncode == 2 and f"is in use by another instructrl process (pid {holder.pid}," in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _files(tmp_path) == before
    # another stage of the same run is free, and a reader needs no lock
    assert not RunDir(config, "rm", ("run", "rm")).skip(False, log=print)
    assert RunDir(config, "sft", ("run", "sft")).changed_inputs() == []

    holder.send_signal(signal.SIGKILL)  # no clean exit: the kernel drops the lock with the process
    holder.wait()
    run = RunDir(config, "sft", ("run", "sft"))
    run.start()
    run.finish({})
    assert (tmp_path / "sft" / "done.json").is_file()


def test_the_main_process_holds_the_folder_from_start_to_finish_and_other_ranks_take_nothing(tmp_path):
    from instructrl.rundir import locks

    def held() -> list[str]:  # this test's locks: earlier tests of the process may hold their own
        return [lock for lock in locks._held if lock.startswith(os.path.realpath(tmp_path))]

    config = load_config(overrides=[f"run.dir={tmp_path}"])
    rank1 = RunDir(config, "sft", ("run", "sft"), is_main=False)
    rank1.start()
    assert not held() and not (tmp_path / ".sft.lock").exists()
    run = RunDir(config, "sft", ("run", "sft"))
    run.start()
    assert held() == [os.path.realpath(tmp_path / ".sft.lock")]
    RunDir(config, "sft", ("run", "sft")).start()  # the same process again (a resumed stage in a test): no refusal
    run.finish({})
    assert not held()
    assert RunDir(config, "sft", ("run", "sft")).skip(False, log=print)  # finished: skipped, and nothing held
    assert not held()


def test_a_stage_that_fails_lets_go_of_its_folder(tmp_path):
    """From Python (a notebook) the caller lives on after a stage's error: another process must be able to run it."""
    from instructrl.rundir import locks

    config = load_config(overrides=[f"run.dir={tmp_path}"])

    @locks.releases_on_error
    def stage(fail: bool) -> None:
        RunDir(config, "sft", ("run", "sft")).start()
        if fail:
            raise KeyboardInterrupt  # any error, an interrupt included
        RunDir(config, "rm", ("run", "rm")).start()

    with pytest.raises(KeyboardInterrupt):
        stage(fail=True)
    assert os.path.realpath(tmp_path / ".sft.lock") not in locks._held
    with open(tmp_path / ".sft.lock") as other:  # another open of the file (as another process's) takes it at once
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    stage(fail=False)  # without an error, what it holds stays held until each run finishes
    assert {os.path.realpath(tmp_path / f".{name}.lock") for name in ("sft", "rm")} <= set(locks._held)
    for name in ("sft", "rm"):
        locks.release(tmp_path / name)
    for function in ("pretrain.run_pretrain", "sft.run_sft", "collect.run_collect", "rm.run_rm", "ppo.run_ppo"):
        module, name = function.split(".")
        assert getattr(importlib.import_module(f"instructrl.stages.{module}"), name).__wrapped__  # every stage lets go


def test_the_world_is_not_rebuilt_under_a_running_stage_of_its_run(tmp_path, holder):
    """`instructrl world --restart` (pretrain --restart on another world) would rewrite the prompts and corpus
    that the run's running stages read: it stops with the stage lock's one line, and the world keeps its bytes."""
    from instructrl.world.build import build_world

    smoke = load_config([SMOKE])
    build_world(smoke.world, tmp_path / "elsewhere" / "world")  # written while no stage of that run runs
    (tmp_path / "elsewhere" / "world").rename(tmp_path / "world")
    before = _files(tmp_path / "world")
    in_use = f"cannot rewrite {tmp_path / 'world'}, which the run's stages read: {tmp_path / 'sft'} is in use by another instructrl process (pid {holder.pid}, "
    for command in ("world", "pretrain"):
        proc = cli(command, "-c", str(SMOKE), f"run.dir={tmp_path}", "world.seed=7", "--restart", check=False)
        assert proc.returncode == 2 and in_use in " ".join(proc.stderr.split()), proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(UserError, match="wait for it to finish or stop it"):
        build_world(smoke.world.model_copy(update={"seed": 7}), tmp_path / "world", replace=True)
    assert _files(tmp_path / "world") == before and not (tmp_path / "pretrain").exists()
    assert build_world(smoke.world, tmp_path / "world").root == tmp_path / "world"  # the same world, not rewritten: reading it is free

    holder.kill()
    holder.wait()
    cli("world", "-c", str(SMOKE), f"run.dir={tmp_path}", "world.seed=7", "--restart")
    assert json.loads((tmp_path / "world" / "world.json").read_text())["config"]["seed"] == 7
    build_world(smoke.world, tmp_path / "world", replace=True)  # the lock it took in this process is let go
