"""Device placement a GPU user relies on, checked on CPU: models that only answer go to the GPU
when there is one, and the tensors a stage makes follow its model's device."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from tiny_models import save_tiny_model


def pretend_gpu(monkeypatch) -> list:
    """Make torch report a GPU and record where models are sent (they stay on the CPU)."""
    sent = []
    real_to = nn.Module.to

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if str(device).startswith("cuda"):
            sent.append(type(self).__name__)
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nn.Module, "to", to)
    return sent


def test_the_feedback_app_samples_and_compares_on_the_gpu(tmp_path, monkeypatch):
    from instructrl.data.formats import Prompt
    from instructrl.feedback.projects import compare_tasks, rank_tasks_from_model

    model = str(save_tiny_model("gpt2", tmp_path / "m"))
    prompts = [Prompt("p1", [{"role": "user", "content": "Say cat."}])]
    sent = pretend_gpu(monkeypatch)
    rank_tasks_from_model(prompts, model, k=2, max_new_tokens=2)
    assert sent == ["GPT2LMHeadModel"]  # before: sampled on the CPU beside an idle GPU
    compare_tasks(prompts, {"a": model, "b": model}, max_new_tokens=2)
    assert sent == ["GPT2LMHeadModel"] * 3


def test_collect_samples_on_the_gpu(tmp_path, smoke_base, monkeypatch):
    from conftest import SMOKE

    from instructrl.config import load_config
    from instructrl.stages.collect import run_collect

    config = load_config(SMOKE, [f"run.dir={tmp_path}", f"collect.policy={smoke_base / 'pretrain' / 'final'}", "collect.n_prompts=4"])
    sent = pretend_gpu(monkeypatch)
    run_collect(config, log=lambda line: None)
    assert len(sent) == 1  # the policy; before: none, it sampled on the CPU


def test_eval_answers_on_the_gpu(tmp_path, smoke_base, monkeypatch):
    from conftest import SMOKE

    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import run_eval

    config = load_config(SMOKE, [f"run.dir={tmp_path}", "eval.n_prompts=2"])
    config.eval.models = {"base": str(smoke_base / "pretrain" / "final")}
    sent = pretend_gpu(monkeypatch)
    run_eval(config, log=lambda line: None)
    assert len(sent) == 1


class DeviceCheckingLM(nn.Module):
    """A causal LM on the meta device that refuses input from elsewhere, as a GPU model refuses CPU tensors."""

    def __init__(self, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, device="meta"))

    def forward(self, input_ids):
        assert input_ids.device == self.weight.device, f"input on {input_ids.device}, model on {self.weight.device}"
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.weight.shape[0])})()


def test_pretraining_loss_feeds_the_model_on_its_device(monkeypatch):
    from instructrl.evaluation import evaluate

    monkeypatch.setattr(evaluate, "pack_documents", lambda tokenizer, docs, block: torch.zeros(3, 4, dtype=torch.long))
    monkeypatch.setattr(evaluate, "next_token_nll", lambda logits, ids, mask: (torch.tensor(6.0), torch.tensor(3.0)))
    assert evaluate.pretraining_loss(DeviceCheckingLM(5), None, ["a text"]) == 2.0


def test_deepspeed_steps_once_per_optimizer_step_not_once_per_micro_batch():
    """Accelerate's DeepSpeed engine steps the optimizer inside ``accelerator.backward`` whenever
    ``sync_gradients`` is set; the loop clears it on all but an optimizer step's last micro-batch."""
    from accelerate import Accelerator

    from instructrl.training.loop import backward_micro_batches

    accelerator = Accelerator(cpu=True)
    model = nn.Linear(2, 1)
    seen = []

    def loss_fn(model, batch):
        seen.append(accelerator.sync_gradients)
        return model(batch["x"]).sum()

    backward_micro_batches(accelerator, model, loss_fn, [{"x": torch.ones(1, 2)}] * 3, global_targets=3.0)
    assert seen == [False, False, True]  # before: [True, True, True], an optimizer step per micro-batch
    assert accelerator.sync_gradients


def test_deepspeed_gets_the_micro_batch_size_and_gradient_clip_of_the_stage():
    from instructrl.config import TrainConfig
    from instructrl.training.loop import configure_deepspeed

    # what Accelerate's plugin holds for configs/accelerate/zero3.yaml: prepare() refuses "auto" without a DataLoader
    deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}
    configure_deepspeed(deepspeed_config, TrainConfig(micro_batch_size=4, grad_clip=0.5))
    assert deepspeed_config["train_micro_batch_size_per_gpu"] == 4 and deepspeed_config["gradient_clipping"] == 0.5


def test_zero3_counts_as_sharded_zero2_does_not():
    """ZeRO-3 partitions parameters: saving must gather them (else save_pretrained writes empty
    tensors) and generation must keep every process stepping (else the others hang)."""
    from instructrl.training.loop import shards_parameters

    def deepspeed(stage):
        return SimpleNamespace(distributed_type="DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    assert shards_parameters(deepspeed(3)) and not shards_parameters(deepspeed(2))
    assert shards_parameters(SimpleNamespace(distributed_type="FSDP")) and not shards_parameters(SimpleNamespace(distributed_type="MULTI_GPU"))


def test_ppo_under_deepspeed_is_refused_in_one_line(tmp_path, monkeypatch):
    """Accelerate steps one DeepSpeed engine (the last prepared, the value model): the policy would never train."""
    import pytest
    from conftest import SMOKE

    from instructrl.config import load_config
    from instructrl.errors import UserError
    from instructrl.stages import ppo

    monkeypatch.setattr(ppo, "make_accelerator", lambda cfg, section: SimpleNamespace(distributed_type="DEEPSPEED", num_processes=1, is_main_process=True))
    with pytest.raises(UserError, match="ppo under DeepSpeed is not supported"):
        ppo.run_ppo(load_config(SMOKE, [f"run.dir={tmp_path}"]), log=lambda line: None)
    assert not (tmp_path / "ppo_ptx").exists()


def test_ppo_under_bf16_scores_the_reference_in_the_policys_precision(tmp_path, smoke_rm):
    """The frozen reference is not prepared by Accelerate, so it ran in float32 while the policy
    ran under bf16 autocast: before any update (policy = reference) the KL was bf16 rounding, not 0."""
    import json

    from conftest import SMOKE, cli

    cli("ppo", "-c", str(SMOKE), f"run.dir={tmp_path}", f"ppo.policy={smoke_rm / 'pretrain' / 'final'}",
        f"ppo.reward_model={smoke_rm / 'rm' / 'final'}", "ppo.ptx_coef=0", "ppo.episodes=16", "ppo.mixed_precision=bf16")
    first = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert first["rollout/kl"] == 0.0 and first["rollout/kl_k1"] == 0.0
