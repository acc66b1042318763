"""`instructrl pipeline` on the smoke world with two rounds, end to end, and the report."""

from __future__ import annotations

import json

import pytest
from conftest import SMOKE, cli


def test_pipeline_two_rounds(tmp_path):
    run = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "pipeline.rounds=2", "ppo.ptx_coef=1.0", timeout=1200)
    out = run.stdout + run.stderr
    assert "report:" in out and "wins vs SFT" in out

    # round 1 ranked half the RM prompts, round 2 the other half, with the round-1 PPO-ptx policy
    r1 = (tmp_path / "collect" / "comparisons.jsonl").read_text().splitlines()
    r2 = (tmp_path / "round2" / "collect" / "comparisons.jsonl").read_text().splitlines()
    assert {json.loads(x)["id"] for x in r1}.isdisjoint(json.loads(x)["id"] for x in r2)
    assert len((tmp_path / "round2" / "comparisons_all.jsonl").read_text().splitlines()) == len(r1) + len(r2)
    collect2 = json.loads((tmp_path / "round2" / "collect" / "lineage.json").read_text())["inputs"]
    assert collect2["policy"]["path"] == str(tmp_path / "ppo_ptx" / "final")
    # round 2 continues each PPO run from round 1, against the new RM, with SFT still the reference
    for stage in ("ppo_ptx", "ppo"):
        lineage = json.loads((tmp_path / "round2" / stage / "lineage.json").read_text())["inputs"]
        assert lineage["policy"]["path"] == str(tmp_path / stage / "final")
        assert lineage["reference"]["path"] == str(tmp_path / "sft" / "final")
        assert lineage["reward_model"] == lineage["reward_model"] | {"path": "rm/final", "in_run": True}  # round 2's own

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

    # everything is done: a second run skips every stage
    again = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "pipeline.rounds=2", "ppo.ptx_coef=1.0", timeout=1200)
    assert (again.stdout + again.stderr).count("nothing to do") >= 9

    # a changed PPO config stops at the first PPO run, pointing at --restart-from, which reruns PPO and what follows it
    changed = ["pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "pipeline.rounds=2", "ppo.ptx_coef=1.0", "ppo.lr=3e-5"]
    refused = cli(*changed, check=False, timeout=1200)
    assert refused.returncode == 2 and "different config (ppo.lr: 2e-05 -> 3e-05)" in refused.stderr and "--restart-from ppo" in refused.stderr
    rerun = cli(*changed, "--restart-from", "ppo", timeout=1200)
    skipped = [line.split(":")[0] for line in (rerun.stdout + rerun.stderr).splitlines() if "nothing to do" in line]
    assert skipped == ["pretrain", "sft", "collect", "rm"]  # round 1's; round 2 follows from round 1's PPO and reruns
    assert f"ppo_ptx: --restart discards {tmp_path / 'ppo_ptx'}: a finished run" in rerun.stderr  # says what it threw away
    assert "  lr: 3.0e-05\n" in (tmp_path / "round2" / "ppo_ptx" / "config.yaml").read_text()


@pytest.mark.parametrize("overrides, expected", [
    (["pipeline.rounds=20", "collect.n_prompts=5"], "there are 5 to share (collect.n_prompts = 5)"),
    # the smoke world has 400 * 33 // 77 = 171 RM prompts
    (["collect.first_prompt=171"], "there are 0 to share (the world's RM prompts from collect.first_prompt = 171 on)")])
def test_rounds_without_a_prompt_each_are_refused_before_the_first_stage(tmp_path, overrides, expected):
    # n_prompts // rounds = 0 was a pydantic traceback once pretrain and SFT had run
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", *overrides, check=False)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


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
    config = load_config(SMOKE, [f"run.dir={tmp_path}", "pipeline.rounds=3", "collect.first_prompt=10", "collect.n_prompts=60"])
    pipeline.run_pipeline(config, log=lambda line: None)
    # 60 prompts from prompt 10 on, 20 a round: 10-29, 30-49, 50-69 (round 2 began at 20, ranking 20-29 twice)
    assert ranked == [(10, 20), (30, 20), (50, 20)]
