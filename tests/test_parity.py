"""Several processes: SFT, RM and PPO under `accelerate launch` with 2 CPU processes (gloo) end
where a single-process run with the same global batch ends, within float tolerance; and the
index arithmetic that makes PPO's episodes and minibatches independent of the process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOKE, cli
from safetensors.torch import load_file
from tiny_models import save_tiny_model, user_data

from instructrl.rl.episodes import rank_episodes, shuffled_local_order
from instructrl.rl.rollout import GumbelNoise
from ports import free_port

ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_process_holds_its_share_of_every_global_minibatch(world_size):
    rollout, minibatch = 16, 8
    local = [rank_episodes(rollout, minibatch, world_size, r) for r in range(world_size)]
    assert sorted(sum(local, [])) == list(range(rollout))
    m = minibatch // world_size
    for b in range(rollout // minibatch):  # local minibatch b of every process together = global minibatch b
        assert sorted(j for eps in local for j in eps[b * m : (b + 1) * m]) == list(range(b * minibatch, (b + 1) * minibatch))


def test_later_epochs_shuffle_alike_for_any_number_of_processes():
    rollout, minibatch = 24, 8

    def global_minibatches(world_size):
        m = minibatch // world_size
        per_rank = []
        for r in range(world_size):
            order = shuffled_local_order(rollout, minibatch, world_size, r, torch.Generator().manual_seed(5))
            episodes = rank_episodes(rollout, minibatch, world_size, r)
            per_rank.append([episodes[i] for i in order.tolist()])
        return [sorted(j for eps in per_rank for j in eps[b * m : (b + 1) * m]) for b in range(rollout // minibatch)]

    one = global_minibatches(1)
    assert one == global_minibatches(2) == global_minibatches(4)
    assert one != [list(range(b * minibatch, (b + 1) * minibatch)) for b in range(3)]  # it does shuffle
    assert sorted(sum(one, [])) == list(range(rollout))


def test_gumbel_noise_samples_the_softmax_and_depends_only_on_the_row_seed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 20000
    draws = GumbelNoise(list(range(n)), temperature=2.0, device="cpu")(None, logits.expand(n, 4)).argmax(-1)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.01)
    # row 7's noise is the same alone or in a batch with other rows
    alone = GumbelNoise([7], 1.0, "cpu")(None, logits)
    batched = GumbelNoise([3, 7], 1.0, "cpu")(None, logits.expand(2, 4))
    assert torch.equal(alone[0], batched[1])


def _launch(*args: str, config: str = "ddp", check: bool = True) -> subprocess.CompletedProcess:
    """``ARGS`` (a script and its arguments, or ``-m instructrl ...``) under ``accelerate launch``
    with our shipped ``configs/accelerate/CONFIG.yaml`` and 2 processes."""
    command = [str(ACCELERATE), "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-4, rtol=1e-4), (name, key, (wa[key] - wb[key]).abs().max())


def _assert_same_update(start: Path, a: Path, b: Path, name: str = "model.safetensors") -> None:
    """PPO's Adam steps turn last-bit gradient differences (an all-reduced mean against one sum)
    into differences of up to ~lr on parameters whose gradients are near zero, so compare each
    tensor's difference with how far training moved it (norms), rather than element-wise with a
    fixed tolerance. Runs that differ in data or updates differ by about the update itself."""
    w0, wa, wb = load_file(start / name), load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    for key in wa:
        moved = (wa[key] - w0[key]).norm()
        assert moved > 0, key
        assert (wa[key] - wb[key]).norm() <= 0.1 * moved, (name, key, float((wa[key] - wb[key]).norm() / moved))


def _assert_runs_match(one: Path, two: Path) -> None:
    for stage in ("sft", "rm", "ppo_ptx"):
        assert json.loads((two / stage / "run.json").read_text())["processes"] == 2
    _assert_same_weights(one / "sft" / "final", two / "sft" / "final")
    _assert_same_weights(one / "rm" / "final", two / "rm" / "final")
    _assert_same_weights(one / "rm" / "final", two / "rm" / "final", "reward_head.safetensors")
    _assert_same_update(one / "sft" / "final", one / "ppo_ptx" / "final", two / "ppo_ptx" / "final")
    _assert_same_weights(one / "ppo_ptx" / "value", two / "ppo_ptx" / "value", "reward_head.safetensors")
    rows = lambda run: [json.loads(line) for line in (run / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(rows(one), rows(two), strict=True):
        # the same episodes were sampled (same lengths, scores, KL) and the same updates made
        for key in ("rollout/length", "rollout/score", "rollout/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/ptx_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def _stage_overrides(run: Path, model: Path, data: dict[str, Path]) -> list[str]:
    """SFT (no dropout), RM and PPO-ptx (2 iterations, 2 epochs each) on a user's files."""
    return [f"run.dir={run}", f"sft.model={model}", f"sft.data={data['sft']}", "sft.dropout=0", "sft.epochs=2",
            f"rm.model={run / 'sft' / 'final'}", f"rm.data={data['rm']}", f"rm.demonstrations={data['sft']}",
            f"ppo.policy={run / 'sft' / 'final'}", f"ppo.reward_model={run / 'rm' / 'final'}", f"ppo.prompts={data['prompts']}",
            f"ppo.ptx_data={data['text']}", "ppo.episodes=32", "ppo.ptx_batch_size=4", "ppo.ppo_epochs=2"]


def test_sft_rm_ppo_in_two_processes_match_one(tmp_path):
    from run_stages import run_ppo, run_rm, run_sft

    from instructrl.config import load_config

    model, data = save_tiny_model("llama", tmp_path / "llama"), user_data(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    config = load_config(SMOKE, _stage_overrides(one, model, data))
    for run in (run_sft, run_rm, run_ppo):
        run(config, log=lambda *_: None)
    _launch(str(Path(__file__).with_name("run_stages.py")), str(SMOKE), *_stage_overrides(two, model, data))
    _assert_runs_match(one, two)


@pytest.mark.slow
def test_each_cli_stage_under_accelerate_launch_matches_one_process(tmp_path):
    model, data = save_tiny_model("gpt2", tmp_path / "gpt2"), user_data(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    for stage in ("sft", "rm", "ppo"):
        cli(stage, "-c", str(SMOKE), *_stage_overrides(one, model, data))
        _launch("-m", "instructrl", stage, "-c", str(SMOKE), *_stage_overrides(two, model, data))
    _assert_runs_match(one, two)


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("fsdp_cpu", "FSDP"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes >= 2
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if kind == "FSDP":
        # every process loads real weights: the reward model's bias buffer breaks Accelerate's
        # broadcast from rank 0, and PPO's frozen reference and reward model are not prepared
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
