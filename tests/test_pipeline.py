"""`instructrl pipeline` on the smoke world with two rounds, end to end, and the report."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import SMOKE, cli


def test_pipeline_two_rounds(tmp_path):
    args = ["pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "pipeline.rounds=2", "ppo.ptx_coef=1.0", "collect.n_prompts=56", "ppo.adaptive_kl=true"]
    run = cli(*args, timeout=1200)
    out = run.stdout + run.stderr
    assert "report:" in out and "wins vs SFT" in out

    # round 1 ranked 56 RM prompts, round 2 the next 56, with the round-1 PPO-ptx policy
    r1 = (tmp_path / "collect" / "comparisons.jsonl").read_text().splitlines()
    r2 = (tmp_path / "round2" / "collect" / "comparisons.jsonl").read_text().splitlines()
    assert {json.loads(x)["id"] for x in r1}.isdisjoint(json.loads(x)["id"] for x in r2)
    assert len((tmp_path / "round2" / "comparisons_all.jsonl").read_text().splitlines()) == len(r1) + len(r2)
    collect2 = json.loads((tmp_path / "round2" / "collect" / "lineage.json").read_text())["inputs"]
    assert collect2["policy"] == collect2["policy"] | {"path": "../ppo_ptx/final", "in_run": True}  # the run's own, from round2/
    # round 2 continues each PPO run from round 1, against the new RM, with SFT still the reference
    for stage in ("ppo_ptx", "ppo"):
        lineage = json.loads((tmp_path / "round2" / stage / "lineage.json").read_text())["inputs"]
        assert lineage["policy"]["path"] == f"../{stage}/final" and lineage["reference"]["path"] == "../sft/final"
        assert lineage["reward_model"] == lineage["reward_model"] | {"path": "rm/final", "in_run": True}  # round 2's own
    # and goes on from round 1's iteration count (its own prompts and sampling seeds): TensorBoard draws one curve
    steps = [[json.loads(x)["step"] for x in (folder / stage / "metrics.jsonl").read_text().splitlines()] for folder in (tmp_path, tmp_path / "round2")]
    assert steps == [[1, 2, 3], [4, 5, 6]]  # smoke: 3 iterations a round
    # with its adaptive β (it restarted from ppo.kl_coef), where round 1's controller left it; its AdamW and warm-up start again
    for stage in ("ppo_ptx", "ppo"):
        first, second = ([json.loads(x) for x in (folder / stage / "metrics.jsonl").read_text().splitlines()] for folder in (tmp_path, tmp_path / "round2"))
        reached = json.loads((tmp_path / stage / "final" / "ppo_state.json").read_text())["kl_coef"]
        assert second[0]["ppo/kl_coef"] == reached != first[0]["ppo/kl_coef"] and second[0]["ppo/lr"] == first[0]["ppo/lr"]

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["models"]["ppo_ptx"] == str(tmp_path / "round2" / "ppo_ptx" / "final")
    r = results["results"]
    assert set(r) == {"demonstrations", "base", "sft", "ppo", "ppo_ptx", "gold_answers"}
    for name in ("ppo", "ppo_ptx", "base", "demonstrations"):
        w = r[name]["win_rate_vs_sft"]
        assert w["ci95"][0] <= w["win_rate"] <= w["ci95"][1] and w["wins"] + w["ties"] + w["losses"] == w["n"]
        s = r[name]["sampled"]["win_rate_vs_sft"]  # samples per prompt: n counts prompts, the outcomes count samples
        assert s["n"] == w["n"] and s["wins"] + s["ties"] + s["losses"] == s["n"] * r[name]["sampled"]["samples"]
    assert r["sft"]["alignment_tax"] == 0.0 and r["ppo"]["pretraining_loss"] > 0

    report = (tmp_path / "report.html").read_text()
    for section in ("Held-out prompts", "Reward model", "over-optimisation", "Answers side by side", "data:image/png;base64"):
        assert section in report
    assert report.count("<figcaption>") == report.count("<img ") == 3  # every figure says what it shows
    assert "<th>base</th><th>sft</th><th>ppo</th><th>ppo_ptx</th>" in report  # every evaluated model's answers

    # everything is done: --check says so, and a second run skips every stage, in a copy of the run folder too
    checked = cli(*args, "--check").stdout.splitlines()
    assert sum(line.endswith(": finished: skipped (same config and inputs)") for line in checked) == 10
    assert checked[-1] == f"config OK: 0 runs to train, 10 finished (run.dir {tmp_path})"
    again = cli(*args, timeout=1200)
    assert (again.stdout + again.stderr).count("nothing to do") == 10
    copy = tmp_path.with_name(tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)
    moved = cli(*[f"run.dir={copy}" if a.startswith("run.dir=") else a for a in args], timeout=1200)
    assert (moved.stdout + moved.stderr).count("nothing to do") == 10, moved.stderr
    shutil.rmtree(copy)

    # a changed PPO config stops at the first PPO run, pointing at --restart-from, which reruns PPO and what follows it
    changed = [*args, "ppo.lr=3e-5"]
    refused = cli(*changed, check=False, timeout=1200)
    assert refused.returncode == 2 and "different config (ppo.lr: 2e-05 -> 3e-05)" in refused.stderr and "--restart-from ppo" in refused.stderr
    checked = cli(*changed, "--check", check=False)
    assert checked.returncode == 2 and "ppo_ptx: finished, config changed: ppo.lr: 2e-05 -> 3e-05 (the run would stop; --restart-from ppo)" in checked.stdout
    rerun = cli(*changed, "--restart-from", "ppo", timeout=1200)
    skipped = [line.split(":")[0] for line in (rerun.stdout + rerun.stderr).splitlines() if "nothing to do" in line]
    assert skipped == ["pretrain", "sft", "collect", "rm"]  # round 1's; round 2 follows from round 1's PPO and reruns
    assert f"ppo_ptx: --restart discards {tmp_path / 'ppo_ptx'}: a finished run" in rerun.stderr  # says what it threw away
    assert "  lr: 3.0e-05\n" in (tmp_path / "round2" / "ppo_ptx" / "config.yaml").read_text()

    # a third round adds to the finished two (collect.n_prompts is a round's): nothing of theirs runs again
    third = cli(*[a.replace("rounds=2", "rounds=3") for a in changed], timeout=1200)
    skipped = [line.split(":")[1].strip() for line in (third.stdout + third.stderr).splitlines() if "nothing to do" in line]
    assert len(skipped) == 10 and not any("round3" in s for s in skipped)
    assert len((tmp_path / "round3" / "comparisons_all.jsonl").read_text().splitlines()) == 3 * 56
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["models"]["ppo_ptx"] == str(tmp_path / "round3" / "ppo_ptx" / "final")


def test_what_later_rounds_cannot_do_is_refused_before_the_first_stage(tmp_path):
    people = tmp_path / "people.jsonl"  # there: a missing file is refused first (test_a_missing_file_or_model_you_gave...)
    people.write_text("")
    cases = {
        ("pipeline.rounds=2", f"collect.judgements={people}"): "pipeline.rounds = 2 with collect.judgements: each later round ranks samples of the previous round's",
        ("pipeline.rounds=2", "ppo.lora.enabled=true"): "pipeline.rounds = 2 with ppo.lora.enabled: a later round continues PPO",
        ("pipeline.rounds=2", "collect.n_prompts=100"): "pipeline.rounds = 2: the world has 171 RM prompts, too few for 2 rounds of collect.n_prompts = 100 a round",
        ("pipeline.rounds=20", "world.n_prompts=40"): "pipeline.rounds = 20: the world has 17 RM prompts, too few for 20 rounds of an equal share of them (0)",
    }
    for overrides, message in cases.items():
        run = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", *overrides, check=False)
        assert run.returncode == 2 and f"error: {message}" in " ".join(run.stderr.split()), run.stderr
        assert not (tmp_path / "run").exists()


def test_a_later_round_goes_on_from_the_previous_rounds_models_with_round_ones_reference(tmp_path):
    from instructrl.config import load_config, section
    from instructrl.pipeline.rounds import _ppo_configs, later_round, round_one

    def third_round(*overrides):
        return later_round(round_one(load_config(SMOKE, [f"run.dir={tmp_path}", "pipeline.rounds=3", *overrides]), log=lambda _: None), 3)

    rc, previous = third_round()
    assert os.path.normpath(rc.collect.policy) == str(tmp_path / "round2" / "ppo_ptx" / "final") and rc.collect.first_prompt == 2 * 57
    assert {stage: (os.path.normpath(c.ppo.policy), os.path.normpath(c.ppo.value_model)) for stage, c in _ppo_configs(rc, previous).items()} == {
        stage: (str(tmp_path / "round2" / stage / "final"), str(tmp_path / "round2" / stage / "value")) for stage in ("ppo_ptx", "ppo")}
    assert os.path.normpath(rc.ppo.reference) == str(tmp_path / "sft" / "final") and rc.ppo.first_iteration == 2 * 3
    # the run's folders are named from the round's in its identity: a moved or copied run folder holds the same run
    assert section(rc, "collect")["collect"]["policy"] == "<run.dir>/../round2/ppo_ptx/final"
    # plain PPO alone: the next round ranks its samples (there is no ppo_ptx/)
    assert os.path.normpath(third_round("ppo.ptx_coef=0")[0].collect.policy) == str(tmp_path / "round2" / "ppo" / "final")
    # a policy of one's own to start from stays every round's KL reference, as in round 1
    assert third_round("ppo.policy=/models/mine")[0].ppo.reference == "/models/mine"


def test_a_later_round_goes_on_from_the_adaptive_beta_its_previous_round_reached(tmp_path):
    # round 2 started the adaptive controller again from ppo.kl_coef, throwing away what round 1's had learnt
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.pipeline.rounds import _ppo_configs, later_round, round_one
    from instructrl.rundir.run import RunDir

    def round_two(*overrides, log=lambda _: None):
        rc, previous = later_round(round_one(load_config(SMOKE, [f"run.dir={tmp_path}", "pipeline.rounds=2", *overrides]), log=log), 2)
        return _ppo_configs(rc, previous, log)

    (tmp_path / "round2").mkdir()  # round 2 names round 1's folders from its own (round2/../ppo/final)
    reached = {"ppo_ptx": 0.0173, "ppo": 0.0251}  # each run's own controller
    for stage, beta in reached.items():
        (tmp_path / stage / "final").mkdir(parents=True)
        (tmp_path / stage / "final" / "ppo_state.json").write_text(json.dumps({"kl_coef": beta}))
    assert {stage: c.ppo.kl_coef for stage, c in round_two("ppo.adaptive_kl=true").items()} == reached
    assert {c.ppo.kl_coef for c in round_two().values()} == {0.02}  # a fixed β stays the config's
    # the β is part of round 2's identity: a round 2 run on another β is not taken for this one
    finished = RunDir(round_two("ppo.adaptive_kl=true")["ppo"], "ppo", ("run", "ppo")).identity
    (tmp_path / "ppo" / "final" / "ppo_state.json").write_text(json.dumps({"kl_coef": 0.03}))
    assert not RunDir(round_two("ppo.adaptive_kl=true")["ppo"], "ppo", ("run", "ppo")).matches(finished)
    # a round 1 finished before β was recorded: round 2 starts from ppo.kl_coef, and says so
    (tmp_path / "ppo" / "final" / "ppo_state.json").unlink()
    lines = []
    assert round_two("ppo.adaptive_kl=true", log=lines.append)["ppo"].ppo.kl_coef == 0.02
    assert lines[-1].startswith(f"ppo: {tmp_path / 'ppo' / 'final'} records no β")
    (tmp_path / "ppo_ptx" / "final" / "ppo_state.json").write_text("{")
    with pytest.raises(UserError, match=r"ppo_ptx/final/ppo_state.json: not a PPO run's final state"):
        round_two("ppo.adaptive_kl=true")


def _finished_round_two_ppo(root):
    """A RunDir of round 2's plain PPO in run folder ``root``, finished on root/sft/final as its reference; and
    a function that gives its RunDir in a run folder."""
    from instructrl.config import load_config
    from instructrl.pipeline.rounds import later_round, round_one
    from instructrl.rundir.run import RunDir

    def round_two(root):
        rc = later_round(round_one(load_config(SMOKE, [f"run.dir={root}", "pipeline.rounds=2"]), log=lambda _: None), 2)[0]
        return RunDir(rc, "ppo", ("run", "ppo"))

    (root / "sft" / "final").mkdir(parents=True)
    (root / "sft" / "final" / "model.safetensors").write_text("sft")
    run = round_two(root)
    run.start()
    run.write_lineage({"reference": run.config.ppo.reference})
    run.finish({})
    return run, round_two


def test_a_copied_runs_later_round_checks_the_copys_own_models_not_the_originals(tmp_path):
    # round 2's lineage named the run's SFT model by absolute path: a copy of the run compared its original's,
    # so it was refused (and eval left its PPO out) once the original was trained again, and counted as
    # present an SFT model the copy no longer had
    original, copy = tmp_path / "a", tmp_path / "b"
    _, round_two = _finished_round_two_ppo(original)
    shutil.copytree(original, copy)
    (original / "sft" / "final" / "model.safetensors").write_text("sft trained again")

    assert round_two(copy).is_done() and round_two(copy).changed_inputs() == []
    (copy / "sft" / "final" / "model.safetensors").write_text("sft trained again")  # the copy's own SFT model is what counts
    assert round_two(copy).changed_inputs() == [f"reference ({copy / 'sft' / 'final'})"]
    shutil.rmtree(copy / "sft")
    assert round_two(copy).missing_inputs(copy) == [
        f"reference ({copy / 'sft' / 'final'}; `instructrl pipeline --restart-from sft` trains it and the stages after it again)"]


def test_a_later_rounds_lineage_of_absolute_paths_still_counts(tmp_path):
    # as instructrl wrote it before it recorded the run's own folders from round2/: still finished, still checked
    run, _ = _finished_round_two_ppo(tmp_path)
    lineage = json.loads((run.path / "lineage.json").read_text())
    entry = lineage["inputs"]["reference"]
    assert entry.pop("in_run") and entry["path"] == "../sft/final"
    entry["path"] = str(tmp_path / "sft" / "final")
    (run.path / "lineage.json").write_text(json.dumps(lineage))
    assert run.is_done()
    (tmp_path / "sft" / "final" / "model.safetensors").write_text("sft trained again")
    assert run.changed_inputs() == [f"reference ({tmp_path / 'sft' / 'final'})"]


def test_a_first_prompt_past_the_rm_prompts_is_refused_before_the_first_stage(tmp_path):
    # the smoke world has 400 * 33 // 77 = 171 RM prompts; collect found it once pretrain and SFT had run
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "collect.first_prompt=171", check=False)
    assert proc.returncode == 2 and "collect.first_prompt = 171 is past the world's 171 RM prompts" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_own_eval_prompts_without_a_reward_model_are_refused_before_the_first_stage(tmp_path):
    # eval refused them once pretrain, SFT, the RM and both PPO runs had trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse the word cat."}\n')
    run = tmp_path / "run"
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={run}", f"eval.prompts={prompts}", check=False)
    assert proc.returncode == 2 and "eval.prompts: your own prompts need eval.reward_model" in proc.stderr, proc.stderr
    assert not run.exists()


def test_a_missing_file_or_model_you_gave_is_refused_before_the_first_stage(tmp_path):
    # each was refused by the stage that reads it, once the stages before it had trained (PPO's after pretrain, SFT, collect and the RM)
    from instructrl.config import load_config
    from instructrl.data.inputs import read_prompts
    from instructrl.errors import UserError, located
    from instructrl.models.base import load_tokenizer
    from instructrl.pipeline import run_pipeline

    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    cases = {
        ("ppo.prompts=missing.jsonl", "ppo.ptx_coef=0"): "missing.jsonl: file not found",
        (f"sft.data={missing}.jsonl",): f"{missing}.jsonl: file not found",
        (f"ppo.ptx_data={missing}.txt",): f"{missing}.txt: file not found",
        ("rm.data=org/comparisons",): "org/comparisons: file not found; data is read from local files only",
        (f"ppo.reward_model={missing}",): f"ppo.reward_model: reward model '{missing}' does not exist",
        (f"collect.policy={missing}",): f"collect.policy: model '{missing}' does not exist",
        (f"ppo.value_model={empty}",): f"ppo.value_model: '{empty}' is a folder that holds no model (no config.json)",
        (f"eval.models={{sft: {missing}}}",): f"eval.models.sft: model '{missing}' does not exist",
    }
    for overrides, message in cases.items():
        with pytest.raises(UserError) as err:
            run_pipeline(load_config(SMOKE, [f"run.dir={run}", *overrides]), log=lambda _: None)
        assert str(err.value).startswith(message) and not run.exists(), (overrides, str(err.value))

    # the message is the stage's own: the readers PPO calls give it
    with pytest.raises(UserError) as err:
        read_prompts("missing.jsonl")
    assert str(err.value) == cases[("ppo.prompts=missing.jsonl", "ppo.ptx_coef=0")]
    with pytest.raises(UserError) as err, located("ppo.reward_model"):
        load_tokenizer(missing, what="reward model")
    assert str(err.value) == cases[(f"ppo.reward_model={missing}",)]
    # and from the command line: exit status 2, nothing written
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={run}", "ppo.prompts=missing.jsonl", "ppo.ptx_coef=0", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: missing.jsonl: file not found\n" and not run.exists()


def test_the_runs_own_outputs_and_hub_names_are_not_refused_as_missing(tmp_path):
    # the pipeline fills these in as its stages write them; a path in run.dir is the run's own however it is spelt
    from instructrl.config import load_config
    from instructrl.pipeline.checks import check_before_training
    from instructrl.pipeline.rounds import STAGES
    from instructrl.training.loop import Parallelism

    redo, one_process = dict.fromkeys(STAGES, False), Parallelism("NO")
    run = tmp_path / "run"
    own = [f"sft.data={run}/world/demonstrations.jsonl", f"ppo.policy={run}/round2/../sft/final", f"eval.models={{sft: {run}/sft/final}}",
           f"rm.data={os.path.relpath(run)}/collect/comparisons.jsonl", "ppo.reward_model=someone/reward-model"]  # a hub name: PPO asks the Hub
    for overrides in ([], ["pipeline.rounds=2"], own):
        check_before_training(load_config(SMOKE, [f"run.dir={run}", *overrides]), redo, 1, one_process)
    check_before_training(load_config(SMOKE, [f"run.dir={os.path.relpath(run)}", f"sft.model={run}/pretrain/final"]), redo, 1, one_process)
    assert not run.exists()


def test_what_a_finished_stage_read_is_not_asked_for(tmp_path):
    # a finished stage is skipped: a file of yours it read may have moved since (RunDir.changed_inputs leaves it out too)
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.pipeline.checks import check_given_paths
    from instructrl.pipeline.rounds import STAGES

    run, moved = tmp_path / "run", tmp_path / "moved.jsonl"
    config = load_config(SMOKE, [f"run.dir={run}", f"sft.data={moved}", f"collect.judgements={moved}"])
    redo = dict.fromkeys(STAGES, False)
    for stage in ("sft", "collect"):
        with pytest.raises(UserError, match="moved.jsonl: file not found"):
            check_given_paths(config, redo)
        (run / stage).mkdir(parents=True)
        (run / stage / "done.json").write_text("{}")
    check_given_paths(config, redo)
    with pytest.raises(UserError, match="moved.jsonl: file not found"):  # unless --restart-from runs it again
        check_given_paths(config, dict(redo, collect=True))


def test_a_later_round_asks_only_for_what_it_reads_itself(tmp_path):
    # round 1 finished, round 2 to train: it reads rm.model, ppo.prompts and (where ppo.reference is unset) ppo.policy as
    # its KL reference; not rm.data, ppo.reward_model nor ppo.value_model, which later_round replaces with the run's own
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.pipeline.checks import check_given_paths
    from instructrl.pipeline.rounds import STAGES

    run, gone = tmp_path / "run", tmp_path / "gone"
    for stage in ("pretrain", "sft", "collect", "rm", "ppo_ptx", "ppo"):
        (run / stage).mkdir(parents=True)
        (run / stage / "done.json").write_text("{}")
    redo = dict.fromkeys(STAGES, False)

    def asks(*overrides):
        try:
            check_given_paths(load_config(SMOKE, [f"run.dir={run}", "pipeline.rounds=2", *overrides]), redo)
        except UserError as err:
            return str(err)

    assert asks(f"rm.data={gone}.jsonl", f"ppo.reward_model={gone}", f"ppo.value_model={gone}", f"collect.policy={gone}") is None
    assert asks(f"rm.model={gone}") == f"rm.model: model '{gone}' does not exist"
    assert asks(f"ppo.prompts={gone}.jsonl", "ppo.ptx_coef=0") == f"{gone}.jsonl: file not found"
    assert asks(f"ppo.policy={gone}") == f"ppo.policy: model '{gone}' does not exist"
    assert asks(f"ppo.policy={gone}", f"ppo.reference={run / 'sft' / 'final'}") is None  # the reference is given: round 2 reads it instead
    (run / "round2" / "rm").mkdir(parents=True)
    (run / "round2" / "rm" / "done.json").write_text("{}")
    assert asks(f"rm.model={gone}") is None  # round 2's RM is finished too


def test_later_rounds_rank_the_prompts_after_the_first_rounds(tmp_path, monkeypatch):
    from instructrl import pipeline
    from instructrl.config import load_config
    from instructrl.evaluation import evaluate, report
    from instructrl.stages import collect, ppo, pretrain, rm, sft

    ranked = []

    def fake_collect(cfg, restart=False, log=None, upstream=None):
        ranked.append((cfg.collect.first_prompt, cfg.collect.n_prompts))
        return cfg.run.dir / "comparisons.jsonl"

    for module, name in ((pretrain, "run_pretrain"), (sft, "run_sft"), (rm, "run_rm"), (ppo, "run_ppo"),
                         (evaluate, "run_eval"), (report, "write_report"), (pipeline, "_concatenate")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(collect, "run_collect", fake_collect)
    config = load_config(SMOKE, [f"run.dir={tmp_path}", "pipeline.rounds=3", "collect.first_prompt=10", "collect.n_prompts=20"])
    pipeline.run_pipeline(config, log=lambda line: None)
    # 20 prompts a round from prompt 10 on: 10-29, 30-49, 50-69 (round 2 began at 20, ranking 20-29 twice)
    assert ranked == [(10, 20), (30, 20), (50, 20)]


def _as_written_before_the_move(run, noise: float) -> None:
    """Make a run's records as instructrl wrote them while the labelers' noise was world.labeler_noise:
    in every stage's identity.json and done.json, and in world.json."""
    for record in [*run.glob("*/identity.json"), *run.glob("*/done.json")]:
        data = json.loads(record.read_text())
        identity = data.get("identity", data)  # done.json holds it under "identity"
        identity.get("collect", {}).pop("labeler_noise", None)
        identity["world"]["labeler_noise"] = noise
        record.write_text(json.dumps(data))
    manifest = json.loads((run / "world" / "world.json").read_text())
    manifest["config"]["labeler_noise"] = noise
    (run / "world" / "world.json").write_text(json.dumps(manifest))


def _skipped(proc) -> list[str]:
    return [line.split(":")[0] for line in (proc.stdout + proc.stderr).splitlines() if "nothing to do" in line]


def test_the_labelers_noise_is_collects_and_reruns_collect_and_what_follows_only(tmp_path):
    args = ["pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}"]
    cli(*args)
    old_key = cli(*args, "world.labeler_noise=0", check=False)
    assert old_key.returncode == 2 and "unknown config key 'world.labeler_noise' (it is now 'collect.labeler_noise')" in old_key.stderr
    # a run finished before the move is finished still, its noise compared as collect's
    _as_written_before_the_move(tmp_path, 0.5)
    refused = cli(*args, check=False)
    assert refused.returncode == 2 and _skipped(refused) == ["pretrain", "sft"]
    assert "collect holds a run of a different config (collect.labeler_noise: 0.5 -> 0.3)" in refused.stderr
    _as_written_before_the_move(tmp_path, 0.3)
    world = (tmp_path / "world" / "world.json").read_text()
    assert _skipped(cli(*args)) == ["pretrain", "sft", "collect", "rm", "ppo_ptx", "ppo"]

    # another noise: collect is refused, pointing at --restart-from collect, which reruns it and the stages that learn from it
    refused = cli(*args, "collect.labeler_noise=0", check=False)
    assert refused.returncode == 2 and "(collect.labeler_noise: 0.3 -> 0.0)" in refused.stderr and "--restart-from collect" in refused.stderr
    rerun = cli(*args, "collect.labeler_noise=0", "--restart-from", "collect")
    assert _skipped(rerun) == ["pretrain", "sft"]
    for stage in ("collect", "rm", "ppo_ptx", "ppo"):
        assert f"{stage}: --restart discards {tmp_path / stage}: a finished run" in rerun.stderr
    assert (tmp_path / "world" / "world.json").read_text() == world  # not rebuilt
    assert json.loads((tmp_path / "rm" / "done.json").read_text())["identity"]["collect"]["labeler_noise"] == 0.0
