"""What the launch rules out is refused before the pipeline's first stage, in the stages' words: PPO under DeepSpeed,
and LoRA on parameters sharded over the processes (FSDP, DeepSpeed ZeRO-3).

Before, PPO refused DeepSpeed and SFT, the RM and PPO refused LoRA under FSDP when their stage made its Accelerator,
after the stages before it had trained. The launch is simulated: the variables ``accelerate launch --config_file``
sets (as its own code prepares them), and the process state torchrun's processes would have."""

from __future__ import annotations

import os
import signal
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO, SMOKE
from test_plan_check import _finished_run

from instructrl.training import loop

DEEPSPEED_REFUSED = ("ppo under DeepSpeed is not supported: PPO trains two models (the policy and the value model) and Accelerate "
                     "steps one DeepSpeed engine; use configs/accelerate/fsdp.yaml or ddp.yaml (with ppo.lora.enabled=true for large models)")
LORA_REFUSED = ("LoRA under FSDP is not supported (a checkpoint merges the adapter from unsharded weights); {zero3}"
                "use the ddp config, or full fine-tuning under FSDP")


def _launch_variables(name: str) -> dict[str, str]:
    """The ACCELERATE_* and FSDP_* variables ``accelerate launch --config_file configs/accelerate/NAME.yaml`` gives
    its processes: its own command run with its launchers replaced by their preparation of the environment."""
    from accelerate.commands import launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    env = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "multi_gpu_launcher", lambda args: env.update(prepare_multi_gpu_env(args)))
        patch.setattr(launch, "deepspeed_launcher", lambda args: env.update(prepare_deepspeed_cmd_env(args)[1]))
        args = launch.launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate" / f"{name}.yaml"),
                                                          "-m", "instructrl", "pipeline"])
        launch.launch_command(args)
    return {key: value for key, value in env.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture
def launched(monkeypatch):
    """``launched(NAME, gpu)``: this process as one of 2 that ``accelerate launch`` started with configs/accelerate/NAME.yaml, on
    a machine with GPUs or without; accelerate's shared state is put back afterwards. One process only: nothing is launched,
    and the pipeline may not begin its first stage (which would make an Accelerator of the real, single process)."""
    import accelerate
    from accelerate.state import AcceleratorState, PartialState

    from instructrl.stages import pretrain

    def first_stage(*args, **kwargs):
        raise AssertionError("the pipeline began its first stage")

    monkeypatch.setattr(pretrain, "run_pretrain", first_stage)
    saved = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)

    def launch(name: str, gpu: bool) -> None:
        for key in [key for key in os.environ if key.startswith(("ACCELERATE_", "FSDP_"))]:  # an earlier launch's, or this shell's
            monkeypatch.delenv(key)
        for key, value in _launch_variables(name).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(loop, "without_gpu", lambda: not gpu)
        # torchrun's LOCAL_RANK makes a PartialState of several processes, MULTI_GPU with GPUs and MULTI_CPU (cpu=True) without
        monkeypatch.setattr(accelerate, "PartialState", lambda cpu: SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU" if cpu else "MULTI_GPU"))

    yield launch
    for state, before in zip((PartialState, AcceleratorState), saved):
        state._shared_state.clear()
        state._shared_state.update(before)


def _instructrl(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``instructrl ARGS`` in this process, as its entry point runs it (so that it meets the simulated launch): exit status, stdout, stderr."""
    from instructrl.cli import exits

    sigterm = signal.getsignal(signal.SIGTERM)  # run() installs its own handlers
    monkeypatch.setattr(sys, "argv", ["instructrl", *args])
    try:
        exits.run()
        status = 0
    except SystemExit as exit_:
        status = exit_.code or 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("name, gpu, expected", [
    ("ddp", False, ("MULTI_CPU", None, False)), ("ddp", True, ("MULTI_GPU", None, False)),
    ("fsdp", True, ("FSDP", None, True)), ("fsdp_cpu", False, ("FSDP", None, True)),  # on CPU make_accelerator turns FSDP on (_shard_on_cpu)
    ("zero2", True, ("DEEPSPEED", 2, False)), ("zero3", True, ("DEEPSPEED", 3, True)),
    ("zero3", False, ("MULTI_CPU", None, False)),  # Accelerate takes DeepSpeed on GPUs only (AcceleratorState, cpu=True)
])
def test_the_launch_tells_the_parallelism_the_stages_accelerator_will_have(launched, name, gpu, expected):
    import accelerate

    launched(name, gpu)
    parallelism = loop.launched_parallelism(accelerate.PartialState(cpu=loop.without_gpu()))
    assert (*parallelism, parallelism.shards_parameters) == expected


def test_one_process_under_fsdp_variables_is_not_sharded_as_its_accelerator_says(monkeypatch):
    """Accelerate shards several processes only: one process (no launcher's LOCAL_RANK) is told what its Accelerator has."""
    from accelerate.state import AcceleratorState, PartialState

    from instructrl.config import load_config

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    saved = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
    try:
        told = loop.launched_parallelism(PartialState(cpu=loop.without_gpu()))
        accelerator = loop.make_accelerator(load_config(None, ["sft.lora.enabled=true"]).sft, "sft")  # LoRA: not refused
        assert told == loop.parallelism_of(accelerator) and told.distributed_type == "NO"
    finally:
        for state, before in zip((PartialState, AcceleratorState), saved):
            state._shared_state.clear()
            state._shared_state.update(before)


def test_ppo_under_deepspeed_is_refused_before_the_first_stage_in_the_stages_words(tmp_path, launched, monkeypatch, capsys):
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.stages import ppo

    launched("zero2", gpu=True)
    run = tmp_path / "run"
    status, _, err = _instructrl(monkeypatch, capsys, "pipeline", "-c", str(SMOKE), f"run.dir={run}")
    assert (status, err) == (2, f"error: {DEEPSPEED_REFUSED}\n")
    assert not run.exists()  # refused before pretrain, not after the RM

    # the stage run on its own still refuses it, in the same words
    monkeypatch.setattr(ppo, "make_accelerator", lambda cfg, section: SimpleNamespace(distributed_type="DEEPSPEED", num_processes=2, is_main_process=True))
    with pytest.raises(UserError) as alone:
        ppo.run_ppo(load_config(SMOKE, [f"run.dir={run}"]), log=lambda line: None)
    assert str(alone.value) == DEEPSPEED_REFUSED and not run.exists()


@pytest.mark.parametrize("section", ["sft", "rm", "ppo"])
@pytest.mark.parametrize("name, gpu", [("fsdp_cpu", False), ("fsdp", True), ("zero3", True)])
def test_lora_on_sharded_parameters_is_refused_before_the_first_stage(tmp_path, launched, monkeypatch, capsys, section, name, gpu):
    launched(name, gpu)
    run = tmp_path / "run"
    status, _, err = _instructrl(monkeypatch, capsys, "pipeline", "-c", str(SMOKE), f"run.dir={run}", f"{section}.lora.enabled=true")
    zero3 = "it holds for DeepSpeed ZeRO-3 too; " if name == "zero3" else ""  # and before PPO's DeepSpeed refusal, as make_accelerator's
    assert (status, err) == (2, f"error: {LORA_REFUSED.format(zero3=zero3)}\n")
    assert not run.exists()


def test_lora_is_refused_on_sharded_parameters_only(tmp_path, launched):
    """The same config, LoRA in every stage, is refused under FSDP and ZeRO-3; not under data parallel, nor under
    ZeRO-2, which shards the optimizer state and gradients but not the parameters."""
    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.pipeline.checks import before_training

    run = tmp_path / "run"
    config = load_config(SMOKE, [f"run.dir={run}", "sft.lora.enabled=true", "rm.lora.enabled=true", "ppo.lora.enabled=true"])
    launched("fsdp_cpu", gpu=False)
    with pytest.raises(UserError, match=r"^LoRA under FSDP is not supported .*; use the ddp config"):
        before_training(config, None, log=lambda line: None)
    launched("ddp", gpu=False)
    before_training(config, None, log=lambda line: None)

    for stage in ("ppo_ptx", "ppo"):  # both PPO runs finished (PPO refuses DeepSpeed): the RM is the last run left to train
        (run / stage).mkdir(parents=True)
        (run / stage / "done.json").write_text("{}")
    launched("zero3", gpu=True)
    with pytest.raises(UserError, match=r"^LoRA under FSDP is not supported .*; it holds for DeepSpeed ZeRO-3 too; "):
        before_training(config, None, log=lambda line: None)
    launched("zero2", gpu=True)
    before_training(config, None, log=lambda line: None)
    assert sorted(p.name for p in run.iterdir()) == ["ppo", "ppo_ptx"]  # nothing written


def test_a_finished_run_evaluated_again_under_deepspeed_is_not_refused(tmp_path, launched, monkeypatch, capsys):
    """The pipeline run again on a finished run trains nothing (eval, which is always redone, makes no Accelerator);
    --restart-from ppo trains PPO again, and is refused."""
    run = tmp_path / "run"
    _finished_run(run)
    launched("zero3", gpu=True)
    status, out, err = _instructrl(monkeypatch, capsys, "pipeline", "-c", str(SMOKE), f"run.dir={run}", "--check")
    assert (status, err) == (0, "") and out.splitlines()[-1].startswith("config OK: 0 runs to train"), out
    status, _, err = _instructrl(monkeypatch, capsys, "pipeline", "-c", str(SMOKE), f"run.dir={run}", "--restart-from", "ppo", "--check")
    assert (status, err) == (2, f"error: {DEEPSPEED_REFUSED}\n")
