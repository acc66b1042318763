"""`instructrl pipeline --check`: the pipeline's checks before its first stage and its plan, training and writing nothing."""

from __future__ import annotations

import hashlib
import os

import pytest
from conftest import SMOKE, cli

RUNS = ["pretrain", "sft", "collect", "rm", "ppo_ptx", "ppo"]


def _plan(run, *overrides, restart_from=None) -> dict[str, str]:
    from instructrl.config import load_config
    from instructrl.pipeline.checks import before_training
    from instructrl.pipeline.plan import plan

    redo, first = before_training(load_config(SMOKE, [f"run.dir={run}", *overrides]), restart_from, log=lambda _: None)
    return {where: words for where, _, words in plan(first, redo)}


def _finished_run(run, checkpoint_of: str | None = None, inputs: dict | None = None) -> None:
    """Every run of a one-round smoke pipeline in ``run`` finished with its config (not trained: begun and finished
    by RunDir), but ``checkpoint_of``, begun and left with a checkpoint at step 12. ``inputs``: by run, the inputs
    its lineage.json records (name: path)."""
    from instructrl.config import load_config
    from instructrl.pipeline.rounds import _ppo_configs
    from instructrl.rundir.run import RunDir

    config = load_config(SMOKE, [f"run.dir={run}"])
    configs = {"pretrain": config, "sft": config, "collect": config, "rm": config, **_ppo_configs(config)}  # plain PPO's ptx_coef is 0
    for name, cfg in configs.items():
        rundir = RunDir(cfg, name, _sections(name))
        rundir.start()
        rundir.write_lineage((inputs or {}).get(name, {}))
        if name == checkpoint_of:
            (rundir.path / "checkpoints" / "step-00000012").mkdir(parents=True)
        else:
            rundir.finish({})


def _sections(name: str) -> tuple[str, ...]:
    return ("run", "world", "ppo" if name.startswith("ppo") else name)


def _snapshot(folder) -> dict[str, tuple[str, int]]:
    """Every file's and folder's content hash (a folder's: none) and modification time under ``folder``."""
    return {str(p): (p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}


def test_a_fresh_run_folder_trains_every_run_and_nothing_is_written(tmp_path):
    proc = cli("pipeline", "-c", str(SMOKE), "run.dir=runs/x", "--check", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[:6] == [f"{name}: trains" for name in RUNS]
    assert [line.split(":")[0] for line in lines[6:8]] == ["eval", "report"]
    assert lines[-1] == "config OK: 6 runs to train, 0 finished (run.dir runs/x)"
    assert not list(tmp_path.iterdir())  # no run.dir, world, lock or TensorBoard folder
    # later rounds in round<r>/, after round 1's
    plan = _plan(tmp_path / "run", "pipeline.rounds=2")
    assert list(plan)[:10] == [*RUNS, *(f"round2/{name}" for name in RUNS[2:])] and set(list(plan.values())[:10]) == {"trains"}
    assert not list(tmp_path.iterdir())


def test_a_finished_run_is_skipped_and_left_as_it_was(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    before = _snapshot(run)
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={run}", "--check")
    assert proc.stdout.splitlines()[:6] == [f"{name}: finished: skipped (same config and inputs)" for name in RUNS]
    assert proc.stdout.splitlines()[-1] == f"config OK: 0 runs to train, 6 finished (run.dir {run})"
    assert _snapshot(run) == before  # byte-identical, not touched


def test_restart_from_redoes_that_stage_and_those_after_it(tmp_path):
    _finished_run(tmp_path)
    plan = _plan(tmp_path, restart_from="rm")
    assert [plan[name] for name in RUNS] == ["finished: skipped (same config and inputs)"] * 3 + ["is redone (--restart-from rm)"] * 3


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    _finished_run(tmp_path, checkpoint_of="rm")
    assert _plan(tmp_path)["rm"] == "resumes from checkpoint step 12"


def test_a_run_of_another_config_is_where_the_pipeline_would_stop(tmp_path):
    # the pipeline trains the stages before it, then refuses it: --check says so before any of them
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.rundir.run import RunDir

    _finished_run(tmp_path, checkpoint_of="rm")
    plan = _plan(tmp_path, "sft.lr=2e-4", "rm.lr=1e-3")
    assert plan["sft"] == "finished, config changed: sft.lr: 0.001 -> 0.0002 (the run would stop; --restart-from sft)"
    assert plan["rm"].startswith("unfinished, config changed: rm.lr: ")
    with pytest.raises(UserError, match=r"different config \(sft.lr: 0.001 -> 0.0002\)"):  # what the stage says
        RunDir(load_config(SMOKE, [f"run.dir={tmp_path}", "sft.lr=2e-4"]), "sft", ("run", "world", "sft")).start()
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "sft.lr=2e-4", "--check", check=False)
    assert proc.returncode == 2 and proc.stderr.endswith("error: the pipeline would stop at sft (see above)\n")
    assert "sft: finished, config changed" in proc.stdout and "config OK" not in proc.stdout


def test_a_refused_config_is_refused_as_the_pipeline_refuses_it(tmp_path):
    run = tmp_path / "run"
    args = ["pipeline", "-c", str(SMOKE), f"run.dir={run}", "collect.first_prompt=171"]
    checked, refused = cli(*args, "--check", check=False), cli(*args, check=False)
    assert checked.returncode == refused.returncode == 2 and checked.stdout == ""
    assert checked.stderr == refused.stderr == "error: collect.first_prompt = 171 is past the world's 171 RM prompts\n"
    assert not run.exists()


def test_plain_ppo_alone_is_not_asked_about_a_ppo_ptx_run_it_never_trains(tmp_path):
    # ppo.ptx_coef = 0 trains plain PPO only: with every run finished, a count of processes the batch sizes do not
    # divide over is not refused (a finished run is skipped whatever the count), as it was for a ppo_ptx/ never written
    from instructrl.config import load_config
    from instructrl.pipeline.checks import check_sizes, runs_to_train
    from instructrl.pipeline.rounds import STAGES

    config = load_config(SMOKE, [f"run.dir={tmp_path}", "ppo.ptx_coef=0"])
    redo = dict.fromkeys(STAGES, False)
    assert [run.folder.name for run in runs_to_train(config, redo)] == ["pretrain", "sft", "collect", "rm", "ppo"]
    for name in ("pretrain", "sft", "collect", "rm", "ppo"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "done.json").write_text("{}")
    assert runs_to_train(config, redo) == []
    check_sizes(config, redo, 3)  # ppo.minibatch_size (8) over micro_batch_size x 3 processes (12): not asked


def test_a_later_rounds_beta_is_not_read_from_a_ppo_run_the_pipeline_redoes(tmp_path):
    # round 1's PPO-ptx left a final state that is not one: --restart-from ppo trains it again before round 2 reads it
    from instructrl.errors import UserError

    state = tmp_path / "ppo_ptx" / "final" / "ppo_state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    (tmp_path / "round2").mkdir()  # which round 2 reads it through (round2/../ppo_ptx), as it does once begun
    overrides = ("pipeline.rounds=2", "ppo.adaptive_kl=true")
    assert _plan(tmp_path, *overrides, restart_from="ppo")["round2/ppo_ptx"] == "trains"
    with pytest.raises(UserError, match=r"ppo_state.json: not a PPO run's final state .*`instructrl pipeline --restart-from ppo`"):
        _plan(tmp_path, *overrides)  # refused before the first stage, not once round 1 has run


def test_a_run_begun_on_inputs_changed_since_is_where_the_pipeline_would_stop(tmp_path, monkeypatch):
    # --check hashed nothing and said "skipped if its inputs are unchanged"; the stage refuses a finished run whose
    # inputs changed, and the pipeline stopped there: --check now says so, by the stage's own comparison
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.rundir import run as rundir
    from instructrl.rundir.run import RunDir

    run, demonstrations = tmp_path / "run", tmp_path / "demos.jsonl"
    demonstrations.write_text('{"prompt": "a", "completion": "b"}\n')
    comparisons = run / "collect" / "comparisons.jsonl"
    comparisons.parent.mkdir(parents=True)
    comparisons.write_text("{}\n")
    _finished_run(run, checkpoint_of="rm", inputs={"sft": {"demonstrations": demonstrations}, "rm": {"comparisons": comparisons}})
    hashed = []
    monkeypatch.setattr(rundir, "content_hash", lambda path: hashed.append(path) or "not read")
    assert _plan(run)["sft"] == "finished: skipped (same config and inputs)" and hashed == []  # size and time as recorded: not read

    before = demonstrations.stat()
    demonstrations.write_text('{"prompt": "a", "completion": "c"}\n')
    os.utime(demonstrations, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    comparisons.write_text("{}\n{}\n")
    monkeypatch.undo()
    plan = _plan(run)
    assert plan["sft"] == f"finished, inputs changed since: demonstrations ({demonstrations}) (the run would stop; --restart-from sft)"
    assert plan["rm"] == f"unfinished, inputs changed since: comparisons ({comparisons}) (the run would stop; --restart-from rm)"
    config = load_config(SMOKE, [f"run.dir={run}"])
    with pytest.raises(UserError, match=rf"sft finished on inputs that have changed since: demonstrations \({demonstrations}\)"):
        RunDir(config, "sft", _sections("sft")).skip(False, log=lambda _: None)  # what the stage says
    with pytest.raises(UserError, match=rf"unfinished run begun on inputs that have changed since: comparisons \({comparisons}\)"):
        RunDir(config, "rm", _sections("rm")).write_lineage({"comparisons": comparisons})
    before = _snapshot(run)
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={run}", "--check", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: the pipeline would stop at sft (see above)\n"
    assert _snapshot(run) == before

    demonstrations.write_text('{"prompt": "a", "completion": "b"}\n')  # the same content again, at another time: hashed, and the same
    assert _plan(run)["sft"] == "finished: skipped (same config and inputs)"


def test_a_run_whose_earlier_stages_output_is_gone_goes_on_if_it_is_made_again_as_it_was(tmp_path):
    # sft discarded (--restart-from sft, stopped before it finished): the pipeline trains it again, then skips collect
    # only if the SFT model comes out byte for byte as it was, and else stops at collect (inputs changed)
    import shutil

    final = tmp_path / "sft" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_text("weights")
    _finished_run(tmp_path, inputs={"collect": {"policy": final}})
    shutil.rmtree(tmp_path / "sft")
    plan = _plan(tmp_path)
    assert plan["sft"] == "trains"
    assert plan["collect"] == f"finished: skipped if sft makes policy ({final}) again as it was, else the run would stop (--restart-from collect)"


def test_a_finished_run_of_sizes_that_do_not_divide_stops_as_its_stage_does(tmp_path):
    # --check said "config changed" while the stage went on to load its data and models and refused the batch size;
    # the stage now refuses the run of another config first, as --check says
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.rundir.run import RunDir
    from instructrl.stages import rm

    finished = RunDir(load_config(SMOKE, [f"run.dir={tmp_path}"]), "rm", rm.SECTIONS + rm.UPSTREAM + ("collect",))  # as run_rm records it
    finished.start()
    finished.finish({})
    assert _plan(tmp_path, "rm.batch_size=3")["rm"] == "finished, config changed: rm.batch_size: 8 -> 3 (the run would stop; --restart-from rm)"
    before = _snapshot(tmp_path / "rm")
    with pytest.raises(UserError, match=r"rm holds a run of a different config \(rm.batch_size: 8 -> 3\)"):
        rm.run_rm(load_config(SMOKE, [f"run.dir={tmp_path}", "rm.batch_size=3"]), log=lambda _: None)
    assert _snapshot(tmp_path / "rm") == before
    with pytest.raises(UserError, match=r"rm.batch_size \(3\) must be a multiple of rm.micro_batch_size"):  # then the sizes, before anything
        _plan(tmp_path, "rm.batch_size=3", restart_from="rm")


DAMAGED = [  # run, record, what it holds, what is said of it
    ("sft", "done.json", '{\n  "identity": {\n    "ru', 'not valid JSON: Unterminated string starting at line 3 column 5'),
    ("sft", "done.json", "[1, 2]", "a JSON array, where instructrl writes an object"),
    ("sft", "done.json", '{"finished": "2026-01-01T00:00:00"}', 'no "identity" object'),
    ("rm", "identity.json", '{"run": ', "not valid JSON: Expecting value at line 1 column 9"),
    ("rm", "lineage.json", '{"stage": "rm", "inputs": {"backbone": "sft/final"}}', """input 'backbone' is not an object with a "path" and a "sha256\""""),
]


@pytest.mark.parametrize("name,record,text,problem", DAMAGED, ids=["done-cut-short", "done-an-array", "done-no-identity", "identity-cut-short", "lineage-entry"])
def test_a_damaged_run_record_is_refused_in_one_line_and_left_as_it_is(tmp_path, name, record, text, problem):
    # --check, and the stage the pipeline runs, ended in a traceback (JSONDecodeError, AttributeError, KeyError)
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.rundir.run import RunDir

    _finished_run(tmp_path, checkpoint_of="rm")
    (tmp_path / name / record).write_text(text)
    before = _snapshot(tmp_path)
    said = (f"{tmp_path / name / record} is damaged ({problem}); pass --restart to run {name} again "
            f"(instructrl pipeline: --restart-from {name}), or set run.dir to another folder")
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "--check", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {said}\n")
    assert _snapshot(tmp_path) == before
    stage = RunDir(load_config(SMOKE, [f"run.dir={tmp_path}"]), name, _sections(name))
    with pytest.raises(UserError) as err:  # what the stage says, as the pipeline runs it
        stage.skip(False, log=lambda _: None)
        stage.start()
        stage.write_lineage({})
    assert str(err.value) == said
    assert _snapshot(tmp_path / name) == {k: v for k, v in before.items() if k.startswith(str(tmp_path / name))}  # the lock beside it aside
    # --restart-from discards it unread
    assert _plan(tmp_path, restart_from=name)[name] == f"is redone (--restart-from {name})"
    said = []
    RunDir(load_config(SMOKE, [f"run.dir={tmp_path}"]), name, _sections(name)).start(restart=True, log=said.append)
    assert said == [f"{name}: --restart discards {tmp_path / name}: "
                    + ("a finished run (done.json damaged)" if record == "done.json" else "an unfinished run, last checkpoint at step 12")]


def test_the_pipeline_refuses_a_damaged_run_record_as_check_does(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    (run / "pretrain" / "done.json").write_text("{")
    before = _snapshot(run / "pretrain")
    args = ["pipeline", "-c", str(SMOKE), f"run.dir={run}"]
    checked, refused = cli(*args, "--check", check=False), cli(*args, check=False)
    assert checked.returncode == refused.returncode == 2 and "Traceback" not in refused.stderr
    assert checked.stderr == refused.stderr.splitlines(keepends=True)[-1] == (
        f"error: {run / 'pretrain' / 'done.json'} is damaged (not valid JSON: Expecting property name enclosed in double quotes "
        "at line 1 column 2); pass --restart to run pretrain again (instructrl pipeline: --restart-from pretrain), or set run.dir to another folder\n")
    assert _snapshot(run / "pretrain") == before
