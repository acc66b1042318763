"""A run killed with SIGKILL and started again with the same command ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import shutil

import torch
from conftest import SMOKE, cli, kill_after_first_checkpoint
from safetensors.torch import load_file


def _sft_args(run_dir, base):
    # 4 epochs of the smoke demonstrations: 32 optimizer steps, a checkpoint every 2
    return ["sft", "-c", str(SMOKE), f"run.dir={run_dir}", f"sft.model={base / 'pretrain' / 'final'}", "sft.epochs=4"]


def test_kill_and_resume_reaches_the_same_weights(tmp_path, smoke_base):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli(*_sft_args(straight, smoke_base))

    kill_after_first_checkpoint(_sft_args(killed, smoke_base), killed / "sft" / "checkpoints")
    assert not (killed / "sft" / "final").exists()

    resumed = cli(*_sft_args(killed, smoke_base))
    assert "resuming from the checkpoint of step" in resumed.stderr

    a = load_file(straight / "sft" / "final" / "model.safetensors")
    b = load_file(killed / "sft" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the metrics of the resumed run have one line per logged step, none twice
    steps = [json.loads(line)["step"] for line in (killed / "sft" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s, line in zip(steps, (killed / "sft" / "metrics.jsonl").read_text().splitlines()) if "train/loss" in line]
    assert train_steps == sorted(set(train_steps))
    straight_steps = [json.loads(l)["step"] for l in (straight / "sft" / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert train_steps == straight_steps


def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path, smoke_base):
    """Ctrl-C ends with one line, no traceback; after --restart that line must not say to run the
    same command again, which would discard the checkpoints once more."""
    import signal

    run_dir = tmp_path / "run"
    stderr = kill_after_first_checkpoint([*_sft_args(run_dir, smoke_base), "--restart"], run_dir / "sft" / "checkpoints", signal.SIGINT)
    assert "Traceback" not in stderr
    assert "interrupted: run the same command without --restart or --restart-from to resume from the last checkpoint" in stderr
    assert "resuming from the checkpoint of step" in cli(*_sft_args(run_dir, smoke_base)).stderr


def test_sigterm_is_met_as_ctrl_c_is(tmp_path, smoke_base):
    """A scheduler pre-empting the job sends SIGTERM: one line, no traceback, exit 143, and the run resumes."""
    import signal

    run_dir = tmp_path / "run"
    stderr = kill_after_first_checkpoint(_sft_args(run_dir, smoke_base), run_dir / "sft" / "checkpoints", signal.SIGTERM)
    assert "Traceback" not in stderr
    assert "terminated: run the same command again to resume from the last checkpoint" in stderr
    assert "resuming from the checkpoint of step" in cli(*_sft_args(run_dir, smoke_base)).stderr


def test_an_interrupted_run_whose_inputs_changed_is_refused_not_resumed(tmp_path, smoke_base):
    """Resumed on other data, a run would end with weights that follow from neither its old data nor its new."""
    run_dir, demos = tmp_path / "run", tmp_path / "demos.jsonl"
    shutil.copy(smoke_base / "world" / "demonstrations.jsonl", demos)
    args = [*_sft_args(run_dir, smoke_base), f"sft.data={demos}"]
    kill_after_first_checkpoint(args, run_dir / "sft" / "checkpoints")
    demos.write_text("".join(demos.read_text().splitlines(keepends=True)[1:]))  # one demonstration fewer
    proc = cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"holds an unfinished run begun on inputs that have changed since: demonstrations ({demos}); pass --restart" in message
    assert "resuming" not in cli(*args, "--restart").stderr


def test_a_refused_resume_adds_no_start_to_run_json(tmp_path, smoke_base):
    """run.json lists the starts that resumed the run: one refused, for inputs changed since or a checkpoint of
    another layout (refused after the folder is checked, once the data is read or the checkpoint opened), is none."""
    run_dir, demos = tmp_path / "run", tmp_path / "demos.jsonl"
    shutil.copy(smoke_base / "world" / "demonstrations.jsonl", demos)
    args = [*_sft_args(run_dir, smoke_base), f"sft.data={demos}"]
    kill_after_first_checkpoint(args, run_dir / "sft" / "checkpoints")
    record, config = (run_dir / "sft" / "run.json").read_text(), (run_dir / "sft" / "config.yaml").read_text()
    kept = demos.read_text()
    demos.write_text("".join(kept.splitlines(keepends=True)[1:]))
    assert "changed since" in cli(*args, check=False).stderr
    demos.write_text(kept)
    state = next((run_dir / "sft" / "checkpoints").glob("step-*")) / "trainer_state.json"
    written = state.read_text()
    state.write_text(json.dumps(json.loads(written) | {"layout": "fsdp"}))
    assert "under FSDP" in cli(*args, "sft.log_every=4", check=False).stderr
    assert (run_dir / "sft" / "run.json").read_text() == record and (run_dir / "sft" / "config.yaml").read_text() == config
    state.write_text(written)
    assert "resuming from the checkpoint" in cli(*args, "sft.log_every=4").stderr
    assert [start["command"][-1] for start in json.loads((run_dir / "sft" / "run.json").read_text())["resumed"]] == ["sft.log_every=4"]
    assert "log_every: 4" in (run_dir / "sft" / "config.yaml").read_text()


def test_a_checkpoint_cut_short_is_one_line_and_left_as_it_is(tmp_path):
    """A weights, optimizer or RNG file of a checkpoint cut short (a run folder copied in part): a
    message naming the checkpoint, not safetensors' or torch's traceback, nor a resumed run that
    no longer reproduces."""
    import pytest
    from accelerate import Accelerator

    from instructrl.errors import UserError
    from instructrl.training.checkpoint import TrainState, load_latest_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    saved = save_checkpoint(accelerator, tmp_path, TrainState(step=3))
    assert load_latest_checkpoint(accelerator, tmp_path, seed=0).step == 3
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):  # Accelerate skips the last silently
        whole = (saved / name).read_bytes()
        (saved / name).write_bytes(whole[: len(whole) // 2])
        with pytest.raises(UserError, match=f"cannot resume from the checkpoint {saved}: .*; pass --restart to start over"):
            load_latest_checkpoint(accelerator, tmp_path, seed=0)
        assert (saved / name).stat().st_size == len(whole) // 2  # nothing rewritten: the user decides
        (saved / name).write_bytes(whole)


def _one_step_checkpoint(root):
    """A checkpoint of step 3 of a one-process run of a tiny model (its Accelerator, model, checkpoint)."""
    from accelerate import Accelerator

    from instructrl.training.checkpoint import TrainState, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return accelerator, model, save_checkpoint(accelerator, root, TrainState(step=3))


def _as_if_written_by(checkpoint, processes: int | None) -> None:
    """Make ``checkpoint`` look written by ``processes`` (None: by 2, in a version that did not record
    it: one RNG state per process)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.pop("processes")
    if processes is not None:
        state["processes"] = processes
    else:
        shutil.copy(checkpoint / "random_states_0.pkl", checkpoint / "random_states_1.pkl")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def test_a_checkpoint_of_another_process_count_resumes_with_fresh_random_states_and_says_so(tmp_path):
    """Resumed on another number of processes, a checkpoint restores the weights and the step, and
    each process's RNG starts from the run's seed, the step and its rank, the same way every time
    (the checkpoint holds no state for it); one line says so. On its own number, its RNG state is restored."""
    from instructrl.training.checkpoint import load_latest_checkpoint

    accelerator, model, checkpoint = _one_step_checkpoint(tmp_path)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 1
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    said = []
    assert load_latest_checkpoint(accelerator, tmp_path, seed=5, log=said.append).step == 3
    assert said == []
    saved_draw = torch.rand(4)

    for recorded in (2, None):  # recorded in trainer_state.json, or counted from the RNG files of an older checkpoint
        _as_if_written_by(checkpoint, recorded)
        draws = []
        for _ in range(2):
            with torch.no_grad():
                model.weight.zero_()
            said = []
            assert load_latest_checkpoint(accelerator, tmp_path, seed=5, log=said.append).step == 3
            draws.append(torch.rand(4))
            assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
            assert said == [f"{checkpoint} was written by 2 processes and this run has 1: weights, optimizer, schedule and data position "
                            "carry over; each process's random state (dropout masks) starts afresh from run.seed"]
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], saved_draw)


def test_a_checkpoint_another_process_count_cannot_load_says_which_to_resume_with(tmp_path):
    """FSDP's checkpoint files are not one process's: the message names both counts, not a missing file."""
    import pytest

    from instructrl.errors import UserError
    from instructrl.training.checkpoint import load_latest_checkpoint

    accelerator, _, checkpoint = _one_step_checkpoint(tmp_path)
    _as_if_written_by(checkpoint, 2)
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model_fsdp.bin")
    with pytest.raises(UserError) as err:
        load_latest_checkpoint(accelerator, tmp_path, seed=0)
    assert str(err.value).startswith(f"cannot resume from the checkpoint {checkpoint}: it was written by 2 processes and this run has 1, "
                                     "which cannot load it (")
    assert str(err.value).endswith("); resume with 2 processes as it was launched, or pass --restart to start over")


def _as_if_under_fsdp(checkpoint, recorded: bool) -> None:
    """Make ``checkpoint`` look written under FSDP: its model file named as FSDP names it, and the
    layout recorded (or, as in a version that did not record it, not)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.pop("layout")
    if recorded:
        state["layout"] = "fsdp"
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model_fsdp.bin")


def test_a_checkpoint_of_another_layout_at_the_same_process_count_is_refused_naming_both(tmp_path):
    """FSDP's checkpoint resumed without FSDP (and the reverse) on as many processes: a message naming
    how it was written and how this run is launched, not a missing file; nothing is loaded."""
    import types

    import pytest

    from instructrl.errors import UserError
    from instructrl.training.checkpoint import load_latest_checkpoint

    accelerator, model, checkpoint = _one_step_checkpoint(tmp_path)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["layout"] == "ddp"
    under_fsdp = types.SimpleNamespace(distributed_type="FSDP", num_processes=1, process_index=0, load_state=accelerator.load_state)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(UserError) as err:  # a one-process checkpoint, this run under FSDP
        load_latest_checkpoint(under_fsdp, tmp_path, seed=0)
    assert str(err.value) == (f"cannot resume from the checkpoint {checkpoint}: it was written by 1 process and this run has 1 process "
                              "under FSDP, which cannot load it; resume without FSDP or DeepSpeed as it was launched "
                              "(configs/accelerate/ddp.yaml, or one process), or pass --restart to start over")
    assert not model.weight.any()  # nothing loaded

    for recorded in (True, False):  # recorded in trainer_state.json, or told by the model file of an older checkpoint
        _as_if_under_fsdp(checkpoint, recorded)
        with pytest.raises(UserError) as err:
            load_latest_checkpoint(accelerator, tmp_path, seed=0)
        assert str(err.value) == (f"cannot resume from the checkpoint {checkpoint}: it was written by 1 process under FSDP and this run "
                                  "has 1 process, which cannot load it; resume under FSDP as it was launched (an accelerate config "
                                  "with distributed_type: FSDP), or pass --restart to start over")
        (checkpoint / "pytorch_model_fsdp.bin").rename(checkpoint / "model.safetensors")
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        (checkpoint / "trainer_state.json").write_text(json.dumps(state | {"layout": "ddp"}))


def test_sizes_that_do_not_divide_on_a_resume_name_the_checkpoint_and_its_process_count(tmp_path):
    import pytest

    from instructrl.config import TrainConfig
    from instructrl.errors import UserError
    from instructrl.training.checkpoint import sizes_for_resuming

    cfg = TrainConfig(batch_size=8, micro_batch_size=4)
    with pytest.raises(UserError) as err, sizes_for_resuming(tmp_path, 3):  # nothing to resume: the config's message alone
        cfg.check_fits(16, 3, "demos.jsonl", "demonstrations", "sft")
    alone = str(err.value)
    assert alone == "config: sft.batch_size (8) must be a multiple of sft.micro_batch_size x 3 processes (12)"
    checkpoint = tmp_path / "step-00000002"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "processes": 1}))
    with pytest.raises(UserError) as err, sizes_for_resuming(tmp_path, 3):
        cfg.check_fits(16, 3, "demos.jsonl", "demonstrations", "sft")
    assert str(err.value) == (f"{alone}; the checkpoint {checkpoint} was written by 1 process and this run has 3: "
                              "resume it with 1 process, or pass --restart with sizes that divide")


def _checkpoint_written_by(folder, processes: int):
    """A checkpoint of step 2 in ``folder`` (a stage's run folder) as a run of ``processes`` processes records it."""
    checkpoint = folder / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "processes": processes, "layout": "ddp"}))
    return checkpoint


def test_the_pipelines_and_pretrains_size_checks_name_the_checkpoint_as_the_stages_do(tmp_path, monkeypatch):
    """Both check the sizes before a stage's own check: a batch that does not divide over 3 processes,
    with a checkpoint of 1 process to resume, names it and how to start over there."""
    from types import SimpleNamespace

    import accelerate
    import pytest

    from instructrl import pipeline
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.stages import pretrain

    monkeypatch.setattr(accelerate, "PartialState", lambda cpu: SimpleNamespace(num_processes=3, distributed_type="MULTI_CPU"))
    monkeypatch.setattr(pretrain, "make_accelerator", lambda cfg, section: SimpleNamespace(num_processes=3, is_main_process=True))
    config = load_config(SMOKE, [f"run.dir={tmp_path}"])
    with pytest.raises(UserError) as err:
        pipeline.run_pipeline(config, log=lambda line: None)
    alone = str(err.value)  # nothing to resume: the config's message alone
    assert alone.startswith("config: pretrain.batch_size (16) must be a multiple of pretrain.micro_batch_size x 3 processes (24); "
                            "sft.batch_size (8) must be a multiple of sft.micro_batch_size x 3 processes (12)")

    unfinished = _checkpoint_written_by(tmp_path / "pretrain", 2)  # until done.json says it finished: not resumed
    (tmp_path / "pretrain" / "done.json").write_text("{}")
    after_pretrain = "config: " + alone.split("; ", 1)[1]  # a finished stage's sizes are not checked
    checkpoint = _checkpoint_written_by(tmp_path / "sft", 1)
    with pytest.raises(UserError) as err:
        pipeline.run_pipeline(config, log=lambda line: None)
    assert str(err.value) == (f"{after_pretrain}; the checkpoint {checkpoint} was written by 1 process and this run has 3: "
                              "resume it with 1 process, or pass --restart-from sft with sizes that divide")
    with pytest.raises(UserError) as err:  # which --restart-from discards
        pipeline.run_pipeline(config, log=lambda line: None, restart_from="sft")
    assert str(err.value) == after_pretrain

    (tmp_path / "pretrain" / "done.json").unlink()
    with pytest.raises(UserError) as err:
        pretrain.run_pretrain(config, log=lambda line: None)
    assert str(err.value) == ("config: pretrain.batch_size (16) must be a multiple of pretrain.micro_batch_size x 3 processes (24); "
                              f"the checkpoint {unfinished} was written by 2 processes and this run has 3: "
                              "resume it with 2 processes, or pass --restart with sizes that divide")


def test_a_finished_stage_relaunched_on_a_count_its_sizes_do_not_divide_over_is_skipped(tmp_path, monkeypatch):
    """Finished on 1 process (its last checkpoint kept) and relaunched on 3 that its batches do not divide
    over: pretrain and PPO skip it as on 1 (nothing is trained), and so does the pipeline's up-front check,
    which still checks every stage left to train, and those --restart-from redoes."""
    from types import SimpleNamespace

    import accelerate
    import pytest

    from instructrl import pipeline
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.pipeline.checks import check_sizes
    from instructrl.pipeline.rounds import STAGES
    from instructrl.rundir.run import RunDir
    from instructrl.stages import ppo, pretrain

    three = lambda cfg, section: SimpleNamespace(num_processes=3, is_main_process=True, distributed_type="MULTI_CPU")  # noqa: E731
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu: SimpleNamespace(num_processes=3, distributed_type="MULTI_CPU"))
    monkeypatch.setattr(pretrain, "make_accelerator", three)
    monkeypatch.setattr(ppo, "make_accelerator", three)
    config = load_config(SMOKE, [f"run.dir={tmp_path}"])

    def finish(stage, sections):
        _checkpoint_written_by(tmp_path / stage, 1)
        run = RunDir(config, stage, sections)
        run.start()
        run.finish({})

    finish("pretrain", pretrain.SECTIONS)
    finish("ppo_ptx", ppo.SECTIONS + ppo.UPSTREAM)
    said = []
    assert pretrain.run_pretrain(config, log=said.append) == tmp_path / "pretrain" / "final"
    assert ppo.run_ppo(config, log=said.append) == tmp_path / "ppo_ptx" / "final"
    assert [line.split(": ")[0] for line in said] == ["pretrain", "ppo_ptx"] and all("nothing to do" in line for line in said)

    with pytest.raises(UserError) as err:  # SFT, the RM and plain PPO are left to train
        pipeline.run_pipeline(config, log=said.append)
    assert str(err.value) == ("config: sft.batch_size (8) must be a multiple of sft.micro_batch_size x 3 processes (12); "
                              "rm.batch_size (8) must be a multiple of rm.micro_batch_size x 3 processes (12); "
                              "ppo.minibatch_size (8) must be a multiple of ppo.micro_batch_size x 3 processes (12)")
    finish("sft", ("run", "world", "sft"))
    finish("rm", ("run", "world", "rm"))
    finish("ppo", ppo.SECTIONS)
    check_sizes(config, dict.fromkeys(STAGES, False), 3)  # every one finished
    with pytest.raises(UserError) as err:
        check_sizes(config, {stage: stage in ("rm", "ppo") for stage in STAGES}, 3)  # --restart-from rm
    assert str(err.value).startswith("config: rm.batch_size (8) must be a multiple of rm.micro_batch_size x 3 processes (12); ppo.")


def test_restart_discards_the_old_run(tmp_path, smoke_base):
    run_dir = tmp_path / "run"
    cli(*_sft_args(run_dir, smoke_base)[:-1], "sft.epochs=1")
    proc = cli(*_sft_args(run_dir, smoke_base), "--restart")
    assert "resuming" not in proc.stderr
    assert f"sft: --restart discards {run_dir / 'sft'}: a finished run (20" in proc.stderr  # says what it threw away
    assert json.loads((run_dir / "sft" / "identity.json").read_text())["sft"]["epochs"] == 4
    shutil.rmtree(run_dir)


def test_a_moved_or_respelt_run_folder_is_the_same_run(tmp_path, smoke_base):
    """run.dir is where a run lives, not what it is: a copy, or a relative spelling, of a finished
    run has nothing to do; nor does a change of how often it logs or saves. A moved run checks its
    own inputs, from any working directory."""
    copy = tmp_path / "copy"
    shutil.copytree(smoke_base, copy)
    for where, run_dir, extra in [(None, copy, []), (tmp_path, "copy", []), (None, copy, ["pretrain.log_every=7", "pretrain.checkpoint_every=3"])]:
        proc = cli("pretrain", "-c", str(SMOKE), f"run.dir={run_dir}", *extra, cwd=where)
        assert "nothing to do" in proc.stderr, (run_dir, extra)
    proc = cli("pretrain", "-c", str(SMOKE), f"run.dir={copy}", "pretrain.lr=0.002", check=False)
    assert proc.returncode == 2 and "different config (pretrain.lr: 0.001 -> 0.002)" in proc.stderr
    # its inputs are its own: a change to the copy's corpus is noticed, not compared with the original's
    moved = tmp_path / "moved"
    copy.rename(moved)
    corpus = moved / "world" / "corpus.txt"
    corpus.write_text(corpus.read_text() + "one more document\n")
    proc = cli("pretrain", "-c", str(SMOKE), "run.dir=moved", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "changed since: corpus (moved/world/corpus.txt)" in proc.stderr


def test_a_restart_names_what_it_discards(tmp_path):
    from instructrl.config import PipelineConfig
    from instructrl.rundir.run import RunDir

    config = PipelineConfig.model_validate({"run": {"dir": str(tmp_path)}})
    said = []
    for stage, make, expected in [
        ("sft", lambda p: (p / "checkpoints" / "step-00000012").mkdir(parents=True), "an unfinished run, last checkpoint at step 12"),
        ("collect", lambda p: (p / "comparisons.partial.jsonl").write_text("{}\n{}\n"), "an unfinished run, 2 records written"),
        ("rm", lambda p: (p / "identity.json").write_text("{}"), "an unfinished run with no checkpoint"),
    ]:
        run = RunDir(config, stage, ("run",))
        run.path.mkdir()
        make(run.path)
        run.start(restart=True, log=said.append)
        assert said[-1] == f"{stage}: --restart discards {run.path}: {expected}"
        assert not list(run.path.glob("checkpoints/*")) and not list(run.path.glob("*.partial.jsonl"))
    RunDir(config, "ppo", ("run",)).start(restart=True, log=said.append)  # nothing there: nothing to say
    assert len(said) == 3


def test_sft_keeps_the_checkpoint_the_labeler_scored_best(tmp_path, smoke_base, monkeypatch):
    """Scored 1, 3, 3, 2 at steps 4, 8, 12 and 16 (smoke: 2 epochs of 8 steps, select_every 4), the
    final model is step 8's weights: the first of the best, not the last step's (the smoke model's
    own scores are all alike, so the runs above cannot tell)."""
    from instructrl.config import load_config
    from instructrl.stages import sft

    scores, seen = iter([1.0, 3.0, 3.0, 2.0]), []

    def scripted(*args, **kwargs):
        def select(model):
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return next(scores)
        return select

    monkeypatch.setattr(sft, "labeler_selection", scripted)
    shutil.copytree(smoke_base / "world", tmp_path / "world")
    said = []
    final = sft.run_sft(load_config(SMOKE, [f"run.dir={tmp_path}", f"sft.model={smoke_base / 'pretrain' / 'final'}", "sft.epochs=2"]),
                        log=said.append)
    assert len(seen) == 4 and "sft: chose the checkpoint of step 8 (validation Likert 3.00)" in said
    weights = load_file(final / "model.safetensors")
    assert all(torch.equal(weights[k], seen[1][k]) for k in weights)
    assert not all(torch.equal(weights[k], seen[3][k]) for k in weights)  # training moved on after step 8


def test_pretrain_refused_for_a_corpus_of_less_than_one_batch_writes_no_run(tmp_path, smoke_base):
    """The corpus was checked after the run folder was made: the fixed config found it holding a run of
    another config and needed --restart. Refused now before it is written, the fixed config just starts."""
    import pytest

    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.stages.pretrain import run_pretrain

    with pytest.raises(UserError, match=r"corpus.txt: \d+ corpus blocks are fewer than one batch \(pretrain.batch_size = 4096\)"):
        run_pretrain(load_config(SMOKE, [f"run.dir={tmp_path}", "pretrain.batch_size=4096"]), log=lambda line: None)
    assert not (tmp_path / "pretrain").exists()
    said = []
    run_pretrain(load_config(SMOKE, [f"run.dir={tmp_path}"]), log=said.append)
    assert any(line.startswith("pretrain: base model saved to") for line in said)
    for name in ("tokenizer/tokenizer.json", "final/model.safetensors"):  # as a first start of the fixed config writes them
        assert (tmp_path / "pretrain" / name).read_bytes() == (smoke_base / "pretrain" / name).read_bytes(), name
