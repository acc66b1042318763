"""The GPU switches (attention kernel, gradient checkpointing, bf16 autocast) reach the model and,
on CPU, change how a step is computed but not (beyond bf16 rounding) what it computes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import SMOKE, cli
from safetensors.torch import load_file
from tiny_models import save_tiny_model, user_data

from instructrl.config import load_config
from instructrl.errors import UserError
from instructrl.models.base import apply_switches, load_causal_lm


@pytest.mark.filterwarnings("error::FutureWarning")  # transformers' deprecated gradient_checkpointing_enable warned every user
def test_switches_reach_the_model(tmp_path):
    model = load_causal_lm(save_tiny_model("qwen2", tmp_path / "m"))
    config = load_config(None, ["sft.attn_implementation=eager", "sft.gradient_checkpointing=true"]).sft
    apply_switches(model, config)
    assert model.config._attn_implementation == "eager"
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # the layers recompute in backward
    apply_switches(model, load_config(None, ["sft.attn_implementation=sdpa"]).sft)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match="bad value for 'ppo.attn_implementation'"):  # one line, not pydantic's error
        load_config(None, ["ppo.attn_implementation=fast"])


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """SFT of one tiny Llama three ways: plain (eager attention), with SDPA and gradient
    checkpointing, and under bf16 autocast."""
    from instructrl.stages.sft import run_sft

    root = tmp_path_factory.mktemp("switches")
    model, data = save_tiny_model("llama", root / "llama"), user_data(root / "data")
    runs = {"plain": ["sft.attn_implementation=eager"], "sdpa_checkpointing": ["sft.attn_implementation=sdpa", "sft.gradient_checkpointing=true"],
            "bf16": ["sft.mixed_precision=bf16"]}
    for name, switches in runs.items():
        args = [f"run.dir={root / name}", f"sft.model={model}", f"sft.data={data['sft']}", "sft.dropout=0", *switches]
        if name == "bf16":  # a process of its own: Accelerator(cpu=True) in later tests would take its precision
            cli("sft", "-c", str(SMOKE), *args)
        else:
            run_sft(load_config(SMOKE, args), log=lambda *_: None)
    return root


def _losses(run):
    return [json.loads(line)["train/loss"] for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]


def test_sdpa_and_gradient_checkpointing_train_the_same_weights(sft_runs):
    a, b = load_file(sft_runs / "plain" / "sft" / "final" / "model.safetensors"), load_file(sft_runs / "sdpa_checkpointing" / "sft" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert _losses(sft_runs / "plain") == pytest.approx(_losses(sft_runs / "sdpa_checkpointing"), rel=1e-5)


def test_bf16_autocast_runs_on_cpu(sft_runs):
    plain, bf16 = _losses(sft_runs / "plain"), _losses(sft_runs / "bf16")
    assert plain != bf16  # autocast did compute in bf16
    assert bf16 == pytest.approx(plain, rel=0.05)  # and the same thing within its rounding
    weights = load_file(sft_runs / "bf16" / "sft" / "final" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay float32


def test_a_stage_may_take_another_precision_than_the_one_before_it_in_the_process():
    """The pipeline runs every stage in one process, as a notebook runs one run after another: with
    sft.mixed_precision=bf16 after pretrain's "no", Accelerate refused ("restart your runtime completely")."""
    from accelerate.state import AcceleratorState

    from instructrl.training.loop import make_accelerator

    before = dict(AcceleratorState._shared_state)
    try:
        precisions = [make_accelerator(load_config(None, [f"sft.mixed_precision={p}"]).sft).mixed_precision for p in ("no", "bf16", "no")]
    finally:  # the tests after this one make Accelerators of their own
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(before)
    assert precisions == ["no", "bf16", "no"]


def test_fp16_without_a_gpu_is_refused_before_any_stage_trains(tmp_path, monkeypatch):
    """Accelerate autocasts to fp16 on GPUs only: on CPU rm.mixed_precision=fp16 trained in fp32, the
    checkpoints byte for byte those of "no", while the run's config said fp16."""
    from instructrl.pipeline import run_pipeline
    from instructrl.training import loop

    monkeypatch.setattr(loop, "without_gpu", lambda: True)  # as on a machine without one, wherever the test runs
    with pytest.raises(UserError, match=r"^rm\.mixed_precision = fp16 needs a GPU .*; use bf16, which CPUs autocast to, or no$"):
        run_pipeline(load_config(SMOKE, [f"run.dir={tmp_path}", "rm.mixed_precision=fp16"]), log=lambda *_: None)
    assert not (tmp_path / "pretrain").exists()  # refused before the first stage, not after SFT
    with pytest.raises(UserError, match=r"^sft\.mixed_precision = fp16 needs a GPU"):  # a stage run on its own
        loop.make_accelerator(load_config(None, ["sft.mixed_precision=fp16"]).sft, "sft")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_an_attention_kernel_that_cannot_run_here_is_one_line(tmp_path):
    """sft/rm/ppo.attn_implementation=flash_attention_2 without its package ended the pipeline in an ImportError's traceback."""
    model = load_causal_lm(save_tiny_model("qwen2", tmp_path / "m"))
    with pytest.raises(UserError, match=r"^ppo\.attn_implementation = flash_attention_2: .*FlashAttention2.*not.*installed"):
        apply_switches(model, load_config(None, ["ppo.attn_implementation=flash_attention_2"]).ppo, "ppo")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
@pytest.mark.parametrize("section", ["sft", "rm", "ppo"])
def test_an_attention_kernel_that_cannot_run_here_is_refused_before_any_stage_trains(tmp_path, section):
    """The pipeline trained pretrain (and SFT, collect and the RM for rm. and ppo.) before the stage loaded its model
    and was refused the kernel. It is refused before the first stage now, in the words the stage uses."""
    from instructrl.pipeline import run_pipeline

    key = f"{section}.attn_implementation"
    with pytest.raises(UserError, match=rf"^{section}\.attn_implementation = flash_attention_2: .*FlashAttention2.*not.*installed") as refused:
        run_pipeline(load_config(SMOKE, [f"run.dir={tmp_path}", f"{key}=flash_attention_2"]), log=lambda *_: None)
    assert not (tmp_path / "pretrain").exists()
    with pytest.raises(UserError) as by_the_stage:  # as the stage itself refuses it, on its model
        apply_switches(load_causal_lm(save_tiny_model("llama", tmp_path / "m")), getattr(load_config(None, [f"{key}=flash_attention_2"]), section), section)
    assert str(refused.value) == str(by_the_stage.value)
