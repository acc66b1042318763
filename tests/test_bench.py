"""`instructrl bench` on smoke-sized random models: the figures it reports are there and consistent."""

from __future__ import annotations

import json

from conftest import SMOKE, cli

from instructrl.models.base import count_text


def test_bench_ppo(tmp_path):
    proc = cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "-n", "3")
    result = json.loads((tmp_path / "bench.json").read_text())
    assert json.loads(proc.stdout) == result  # standard output is the file's JSON alone (`bench | jq`); the table, bar and log on stderr
    phases = set(result["seconds_per_iteration"])
    assert {"generate", "score_policy", "score_reference", "score_value", "score_reward", "train"} <= phases
    assert abs(sum(result["share"].values()) - 1.0) < 1e-9
    assert result["iterations_timed"] == 2 and result["episodes_per_s"] > 0 and result["peak_rss_mb"] > 0
    # the table adds up: episodes per second are an iteration's episodes over the seconds of its phases
    seconds = sum(result["seconds_per_iteration"].values())
    assert abs(result["episodes_per_s"] - result["rollout_batch_size"] / seconds) < 1e-9 * result["episodes_per_s"]
    table = proc.stderr
    assert f"{result['episodes_per_s']:.1f}" in table and f"{result['tokens_per_s']:.0f}" in table
    for phase, s in result["seconds_per_iteration"].items():
        assert f"{s:.3f}" in table and f"{result['share'][phase]:.0%}" in table
    assert result["parameters_mb"] > 0 and result["optimizer_state_mb"] > 0 and result["lora"] is False
    # the smoke policy's ~46k parameters were "0.0M"
    assert f"PPO bench: {count_text(result['policy_parameters'])}-parameter policy" in table and "k-parameter" in table


def test_a_parameter_count_reads_as_model_sizes_are_written():
    assert [count_text(n) for n in (7, 999, 1000, 45_728, 99_949, 123_456)] == ["7", "999", "1.0k", "45.7k", "99.9k", "123k"]
    assert [count_text(n) for n in (1_234_567, 34_000_000, 123_400_000, 1_200_000_000, 175 * 10**9)] == ["1.2M", "34.0M", "123M", "1.2B", "175B"]
    # a count that rounds up to 1000 of one unit is 1.0 of the next
    assert [count_text(n) for n in (999_500, 999_950, 999_960_000)] == ["1.0M", "1.0M", "1.0B"]


def test_bench_rm_kway_forwards_fewer_sequences(tmp_path):
    proc = cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "rm", "--k", "4", "--comparisons", "32")
    result = json.loads((tmp_path / "bench_rm.json").read_text())
    table, printed = proc.stderr, json.loads(proc.stdout)
    assert printed == result  # a table on stderr, and the same figures as JSON alone on stdout
    for mode in ("kway", "pairwise"):
        assert f"{result[mode]['comparisons_per_s']:.1f}" in table and str(result[mode]["sequences_forwarded"]) in table
    assert f"{result['speedup']:.2f}x" in table
    assert f"RM bench: {count_text(result['model_parameters'])}-parameter reward model" in table
    # K-way forwards each of the K responses once; pairs forward 2 per ranked pair
    assert result["kway"]["sequences_forwarded"] == 4 * result["comparisons"]
    assert result["pairwise"]["sequences_forwarded"] > result["kway"]["sequences_forwarded"]
    assert result["speedup"] > 0


def test_bench_rm_trains_the_rm_sections_lora_and_records_its_config_and_seed(tmp_path):
    from instructrl.config import load_config

    cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "rm", "--k", "4", "--comparisons", "16", "rm.lora.enabled=true", "run.seed=3")
    result = json.loads((tmp_path / "bench_rm.json").read_text())
    assert result["lora"] is True and 0 < result["trainable_parameters"] < result["model_parameters"] / 2
    assert result["kway"]["sequences_forwarded"] == 4 * result["comparisons"]
    # the figures' config and seed, in the record every run writes
    recorded = load_config(tmp_path / "bench_rm" / "config.yaml")
    assert recorded.rm.lora.enabled is True and recorded.run.seed == 3 and recorded.model == load_config(SMOKE).model
    assert json.loads((tmp_path / "bench_rm" / "run.json").read_text())["seed"] == 3


def test_bench_unknown_stage(tmp_path):
    proc = cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "nope", check=False)
    assert proc.returncode == 2 and "unknown --stage" in proc.stderr


def test_bench_rm_bad_arguments_are_one_line(tmp_path):
    # a comparison of one response has no pair, fewer comparisons than one batch train nothing: both divided by zero
    one = cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "rm", "--k", "1", check=False)
    assert one.returncode == 2 and "--k" in one.stderr and "Traceback" not in one.stderr
    few = cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "rm", "--comparisons", "4", check=False)
    assert few.returncode == 2 and "fewer than one batch (rm.batch_size = 8)" in few.stderr and "Traceback" not in few.stderr


def test_bench_rm_on_one_batch_of_comparisons_trains_every_pair_once(tmp_path):
    # 8 comparisons of K = 6 hold 85 ranked pairs; a batch of them, rounded to micro-batches of 8, was 88: no step, divided by zero
    cli("bench", "-c", str(SMOKE), f"run.dir={tmp_path}", "--stage", "rm", "--k", "6", "--comparisons", "8")
    result = json.loads((tmp_path / "bench_rm.json").read_text())
    assert result["comparisons"] == 8 and result["ranked_pairs"] % 8 != 0
    assert result["pairwise"]["sequences_forwarded"] == 2 * result["ranked_pairs"] and result["speedup"] > 0


def test_bench_never_writes_over_a_trained_run(smoke_base):
    before = sorted(p.name for p in smoke_base.iterdir())
    proc = cli("bench", "-c", str(SMOKE), f"run.dir={smoke_base}", "-n", "2", check=False)
    # the session's smoke folder holds pretrain/, and rm/ too once a test has asked for the smoke RM
    assert proc.returncode == 2 and "holds a trained run (pretrain" in proc.stderr
    assert sorted(p.name for p in smoke_base.iterdir()) == before


def test_the_benchmark_scripts_the_readme_names_start():
    import subprocess
    import sys

    from conftest import REPO

    # no other test runs them: label_agreement.py still imported read_comparisons from where it had moved away
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), f"{script.name}: {proc.stderr}"
