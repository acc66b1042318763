"""FSDP on CPU: under `accelerate launch` with configs/accelerate/fsdp_cpu.yaml the stages run in 2
gloo processes with their parameters really sharded (PyTorch FSDP2), write checkpoints that reload
with ``from_pretrained``, and end where one process with the same global batch ends."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import SMOKE
from safetensors.torch import load_file
from test_parity import _assert_runs_match, _assert_same_weights, _launch, _stage_overrides
from tiny_models import save_tiny_model, user_data

from instructrl.config import load_config
from instructrl.training.checkpoint import LAYOUTS

SHARDED = re.compile(r"(\w+): parameters sharded over 2 processes \(FSDP\): this one holds (\d+) of (\d+) parameters")


def _fsdp(stage: str, *overrides: str) -> str:
    """``instructrl STAGE -c smoke.yaml OVERRIDES`` in 2 CPU processes under FSDP; its log (stderr), lines unwrapped."""
    return " ".join(_launch("-m", "instructrl", stage, "-c", str(SMOKE), *overrides, config="fsdp_cpu").stderr.split())


def _assert_sharded(log: str, stage: str) -> None:
    """The stage's log says the main process holds about half of the parameters (the first rank
    holds the larger half of a tensor with an odd first dimension)."""
    found = {name: (int(held), int(total)) for name, held, total in SHARDED.findall(log)}
    assert stage in found, log[-2000:]
    held, total = found[stage]
    assert total / 2 <= held < 0.6 * total, (held, total)


def test_sft_under_fsdp_on_cpu_shards_and_matches_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from instructrl.stages.sft import run_sft

    model, data = save_tiny_model("llama", tmp_path / "llama"), user_data(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    run_sft(load_config(SMOKE, _stage_overrides(one, model, data)), log=lambda *_: None)
    _assert_sharded(_fsdp("sft", *_stage_overrides(two, model, data)), "sft")
    assert json.loads((two / "sft" / "run.json").read_text())["processes"] == 2
    # the gathered full weights reload as a plain model and equal the one-process run's
    reloaded = AutoModelForCausalLM.from_pretrained(two / "sft" / "final").state_dict()
    expected = load_file(one / "sft" / "final" / "model.safetensors")
    assert set(expected) <= set(reloaded)
    for key, tensor in expected.items():
        assert torch.allclose(reloaded[key], tensor, atol=1e-4, rtol=1e-4), key
    moved = "model.layers.0.mlp.down_proj.weight"  # and training moved them
    assert not torch.allclose(reloaded[moved], AutoModelForCausalLM.from_pretrained(model).state_dict()[moved])


def test_lora_under_fsdp_is_refused_with_a_clear_message(tmp_path):
    model, data = save_tiny_model("llama", tmp_path / "llama"), user_data(tmp_path / "data")
    proc = _launch("-m", "instructrl", "sft", "-c", str(SMOKE), *_stage_overrides(tmp_path / "run", model, data), "sft.lora.enabled=true",
                   config="fsdp_cpu", check=False)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: LoRA under FSDP is not supported")]
    assert len(said) == 1  # said once, not per process; and the launcher's failure summary names it as the root cause
    assert f"traceback : {said[0]}" in proc.stderr
    assert not (tmp_path / "run" / "sft" / "final").exists()


@pytest.mark.slow
def test_sft_rm_ppo_under_fsdp_on_cpu_match_one_process_and_resume(tmp_path):
    from instructrl.models.reward import RewardModel
    from instructrl.stages.ppo import run_ppo
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    model, data = save_tiny_model("gpt2", tmp_path / "gpt2"), user_data(tmp_path / "data")  # GPT-2 ties its LM head to the embeddings
    one, two = tmp_path / "one", tmp_path / "two"
    config = load_config(SMOKE, _stage_overrides(one, model, data))
    for run in (run_sft, run_rm, run_ppo):
        run(config, log=lambda *_: None)
    for stage in ("sft", "rm"):
        _assert_sharded(_fsdp(stage, *_stage_overrides(two, model, data)), stage)
    _fsdp("ppo", *_stage_overrides(two, model, data))
    _assert_runs_match(one, two)
    # PPO's optimizer state is sharded too: the main process holds about half of it
    state_mb = lambda run: json.loads((run / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()[0])["memory/optimizer_state_mb"]  # noqa: E731
    assert state_mb(two) < 0.6 * state_mb(one)
    reward_model = RewardModel.from_pretrained(two / "rm" / "final")
    assert torch.allclose(reward_model.head.weight, load_file(one / "rm" / "final" / "reward_head.safetensors")["weight"], atol=1e-4)

    # resume: the sharded checkpoint of step 6 (of 8) restored reproduces the uninterrupted run
    shutil.move(two / "sft" / "final", tmp_path / "uninterrupted")
    (two / "sft" / "done.json").unlink()
    log = _fsdp("sft", *_stage_overrides(two, model, data))
    assert "resuming from the checkpoint of step 6" in log
    _assert_same_weights(tmp_path / "uninterrupted", two / "sft" / "final")


def test_sft_choosing_its_checkpoint_by_the_labeler_under_fsdp_scores_as_one_process(smoke_base, tmp_path):
    """On the built-in world every process generates answers in step: 129 validation prompts give
    the processes 65 and 64, two generation batches of 64 and one, so the second answers an
    unscored extra (without it the first waits for the second forever)."""
    from instructrl.stages.sft import run_sft

    overrides = lambda run: [f"run.dir={run}", f"sft.model={smoke_base / 'pretrain' / 'final'}", "sft.dropout=0", "world.n_val=129"]  # noqa: E731
    one, two = tmp_path / "one", tmp_path / "two"
    run_sft(load_config(SMOKE, overrides(one)), log=lambda *_: None)
    log = _fsdp("sft", *overrides(two))
    _assert_sharded(log, "sft")
    assert "chose the checkpoint of step" in log
    scores = lambda run: [row["select/score"] for row in map(json.loads, (run / "sft" / "metrics.jsonl").read_text().splitlines()) if "select/score" in row]  # noqa: E731
    assert len(scores(two)) == 2 and scores(two) == pytest.approx(scores(one))
    _assert_same_weights(one / "sft" / "final", two / "sft" / "final")


@pytest.mark.slow
def test_a_checkpoint_written_under_fsdp_is_refused_under_ddp_on_as_many_processes_and_the_reverse(tmp_path, smoke_base):
    """One line naming how the checkpoint was written and how the run is launched, not a missing file."""
    from test_multiprocess import STOP_AFTER_FIRST_CHECKPOINT

    script = tmp_path / "stop_after_first_checkpoint.py"
    script.write_text(STOP_AFTER_FIRST_CHECKPOINT)
    sft = ["sft", "-c", str(SMOKE), f"sft.model={smoke_base / 'pretrain' / 'final'}", f"sft.data={smoke_base / 'world' / 'demonstrations.jsonl'}"]
    for written, resumed, was, now in [("fsdp_cpu", "ddp", "FSDP", "DDP"), ("ddp", "fsdp_cpu", "DDP", "FSDP")]:
        run_dir = tmp_path / written
        _launch(str(script), *sft, f"run.dir={run_dir}", config=written)
        checkpoint = next((run_dir / "sft" / "checkpoints").glob("step-*"))
        assert json.loads((checkpoint / "trainer_state.json").read_text())["layout"] == was.lower()
        proc = _launch("-m", "instructrl", *sft, f"run.dir={run_dir}", config=resumed, check=False)
        assert proc.returncode != 0
        said = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert said == [f"error: cannot resume from the checkpoint {checkpoint}: it was written by 2 processes under {was} and this run has "
                        f"2 processes under {now}, which cannot load it; resume {LAYOUTS[was.lower()][1]}, or pass --restart to start over"]
        assert not (run_dir / "sft" / "final").exists()
