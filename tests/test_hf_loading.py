"""Checkpoints are ordinary Hugging Face folders, and SFT takes any local HF causal LM and a user's JSONL."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE, cli
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from instructrl.config import load_config
from instructrl.evaluation.generate import generate_answers
from instructrl.training.loop import cosine_schedule


def test_base_checkpoint_loads_with_auto_classes(smoke_base):
    final = smoke_base / "pretrain" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    [answer] = generate_answers(model, tokenizer, [[{"role": "user", "content": "Reverse the word cat."}]], max_new_tokens=4)
    assert isinstance(answer, str)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sft_on_a_local_model_and_user_data(tmp_path, smoke_base, arch):
    tokenizer = AutoTokenizer.from_pretrained(smoke_base / "pretrain" / "final")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = (GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, **ids) if arch == "gpt2"
              else LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, **ids))
    torch.manual_seed(0)
    model_dir = tmp_path / f"tiny-{arch}"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    data = tmp_path / "mine.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]} for w in ["cat", "dog", "fox", "owl"] * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", f"sft.model={model_dir}", f"sft.data={data}", "sft.epochs=3", "sft.log_every=1", "sft.warmup_steps=3"]
    cli("sft", "-c", str(SMOKE), *overrides)
    final = run_dir / "sft" / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert type(reloaded).__name__ == type(AutoModelForCausalLM.from_config(config)).__name__
    assert AutoTokenizer.from_pretrained(final).chat_template == tokenizer.chat_template
    losses = [json.loads(l)["train/loss"] for l in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert losses[-1] < losses[0]
    sft = load_config(SMOKE, overrides).sft  # each step's logged rate is the one it took: lr/3 first, in warm-up
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=sft.lr)
    schedule, rates = cosine_schedule(optimizer, sft.warmup_steps, len(losses), sft.min_lr_ratio), []
    for _ in losses:
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [json.loads(l)["train/lr"] for l in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines() if "train/lr" in l] == pytest.approx(rates)
    assert rates[0] == pytest.approx(sft.lr / 3)
    lineage = json.loads((run_dir / "sft" / "lineage.json").read_text())
    assert lineage["inputs"]["demonstrations"]["path"] == str(data)
    assert not (run_dir / "world").exists(), "user data must not pull in the built-in world"
