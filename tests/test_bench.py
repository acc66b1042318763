"""`instructrl bench` on smoke-sized random models: the figures it reports are there and consistent."""

from __future__ import annotations

import json

from conftest import SMOKE, cli


def test_bench_ppo(tmp_path):
    cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "-n", "2")
    result = json.loads((tmp_path / "bench.json").read_text())
    phases = set(result["seconds_per_iteration"])
    assert {"generate", "score_policy", "score_reference", "score_value", "score_reward", "train"} <= phases
    assert abs(sum(result["share"].values()) - 1.0) < 1e-9
    assert result["iterations_timed"] == 1 and result["episodes_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert result["parameters_mb"] > 0 and result["optimizer_state_mb"] > 0 and result["lora"] is False


def test_bench_rm_kway_forwards_fewer_sequences(tmp_path):
    cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "rm", "--k", "4", "--comparisons", "32")
    result = json.loads((tmp_path / "bench_rm.json").read_text())
    # K-way forwards each of the K responses once; pairs forward 2 per ranked pair
    assert result["kway"]["sequences_forwarded"] == 4 * result["comparisons"]
    assert result["pairwise"]["sequences_forwarded"] > result["kway"]["sequences_forwarded"]
    assert result["speedup"] > 0


def test_bench_unknown_stage(tmp_path):
    proc = cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "nope", check=False)
    assert proc.returncode == 2 and "unknown --stage" in proc.stderr


def test_bench_never_writes_over_a_trained_run(smoke_base):
    before = sorted(p.name for p in smoke_base.iterdir())
    proc = cli("bench", "-c", str(SMOKE), f"run.dir={smoke_base}", "-n", "2", check=False)
    assert proc.returncode == 2 and "holds a trained run (pretrain)" in proc.stderr
    assert sorted(p.name for p in smoke_base.iterdir()) == before
