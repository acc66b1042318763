"""Device placement a GPU user relies on, checked on CPU: models that only answer go to the GPU
when there is one, and the tensors a stage makes follow its model's device."""

from __future__ import annotations

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
