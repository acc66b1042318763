"""The reward model reads each sequence's reward at its last real token, and saves with one call."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from instructrl.models.reward import RewardModel
from instructrl.padding import pad_sequences


def tiny_reward_model(tmp_path) -> RewardModel:
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64, vocab_size=50, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")
    return RewardModel.from_causal_lm(tmp_path / "lm").eval()


SEQUENCES = [[5, 6, 7, 8, 1], [9, 10, 1], [11, 12, 13, 14, 15, 16, 1]]


@torch.no_grad()
def test_reward_is_the_same_alone_and_in_a_padded_batch(tmp_path):
    model = tiny_reward_model(tmp_path)
    alone = torch.stack([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in SEQUENCES])
    for side in ("left", "right"):
        ids, mask = pad_sequences(SEQUENCES, pad_id=0, side=side)
        assert torch.allclose(model(ids, mask), alone, atol=1e-5), side


@torch.no_grad()
def test_reward_ignores_what_follows_the_last_real_token(tmp_path):
    model = tiny_reward_model(tmp_path)
    ids, mask = pad_sequences(SEQUENCES, pad_id=0, side="right")
    garbage = ids.clone()
    garbage[mask == 0] = 42  # a padding position filled with a real token id must change nothing
    assert torch.allclose(model(ids, mask), model(garbage, mask), atol=1e-6)


@torch.no_grad()
def test_per_token_values_are_on_the_rewards_scale(tmp_path):
    """PPO's value model starts from the RM (InstructGPT §3.5) and reads its per-token outputs: they
    include the bias that centres the rewards, as the reward read at the last real token does
    (Huang et al.'s critic is the RM's scalar model, bias and all). Without it every initial value
    is off by the bias from the rewards GAE compares it with."""
    model = tiny_reward_model(tmp_path)
    ids, mask = pad_sequences(SEQUENCES, pad_id=0, side="right")
    raw = model(ids, mask, per_token=True)
    model.reward_bias.fill_(-0.25)
    values = model(ids, mask, per_token=True)
    assert torch.allclose(values, raw - 0.25)  # every position moves with the bias, padding included
    last = torch.tensor([len(s) - 1 for s in SEQUENCES])
    assert torch.equal(values[torch.arange(len(SEQUENCES)), last], model(ids, mask))


@torch.no_grad()
def test_save_and_reload_keeps_head_and_bias(tmp_path):
    model = tiny_reward_model(tmp_path)
    model.reward_bias.fill_(-0.25)
    model.save_pretrained(tmp_path / "rm")
    again = RewardModel.from_pretrained(tmp_path / "rm").eval()
    ids, mask = pad_sequences(SEQUENCES, pad_id=0, side="left")
    assert torch.equal(model(ids, mask), again(ids, mask))
    assert float(again.reward_bias) == -0.25


def test_the_backbone_starts_from_the_causal_lm(tmp_path):
    model = tiny_reward_model(tmp_path)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert torch.equal(model.backbone.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(model.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
