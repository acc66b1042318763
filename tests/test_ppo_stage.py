"""PPO's rollout passes on a real model, one update's direction, and `instructrl ppo` on the smoke world."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SMOKE, cli
from safetensors.torch import load_file

from instructrl.config import load_config
from instructrl.data import readers
from instructrl.data.chat import render_ids
from instructrl.data.formats import Prompt
from instructrl.data.sequences import TokenSequences
from instructrl.models.base import load_causal_lm, load_tokenizer
from instructrl.padding import pad_sequences
from instructrl.rl.episodes import prompt_order
from instructrl.rl.rollout import (GumbelNoise, Rollout, left_pad_prompts, response_logits, response_logprobs, response_values, sample_responses,
                                   score_episodes, takes_logits_to_keep)
from instructrl.rl.update import ppo_epochs
from instructrl.stages.ppo import encode_prompts, load_prompts
from instructrl.training.loop import make_accelerator
from instructrl.world import build
from instructrl.world.build import load_tasks


def _rows(smoke_base):
    model = load_causal_lm(smoke_base / "pretrain" / "final", dropout=0.0).eval()
    tok = load_tokenizer(smoke_base / "pretrain" / "final")
    prompts = [tok("the cat sees", add_special_tokens=False).input_ids, tok("red", add_special_tokens=False).input_ids]
    responses = [tok(" the dog", add_special_tokens=False).input_ids, tok(" blue sky is", add_special_tokens=False).input_ids]
    return model, tok, prompts, responses


def test_response_logprobs_same_alone_or_left_padded(smoke_base):
    model, tok, prompts, responses = _rows(smoke_base)
    q, qm = pad_sequences(prompts, tok.pad_token_id, side="left")
    r, rm = pad_sequences(responses, tok.pad_token_id, side="right")
    with torch.no_grad():
        batched, _ = response_logprobs(model, q, qm, r, rm, temperature=1.0)
        for row in range(2):
            alone, _ = response_logprobs(model, torch.tensor([prompts[row]]), torch.ones(1, len(prompts[row]), dtype=torch.long),
                                         torch.tensor([responses[row]]), torch.ones(1, len(responses[row]), dtype=torch.long), 1.0)
            n = len(responses[row])
            # the short prompt is left-padded: with position ids from the mask its log-probs match the unpadded row
            assert torch.allclose(batched[row, :n], alone[0], atol=1e-5)


def test_response_logprobs_same_with_or_without_logits_to_keep(smoke_base):
    """The policy computes the response's logits only (transformers' logits_to_keep); a model
    without that argument computes them all, and both give the same log-probs."""
    model, tok, prompts, responses = _rows(smoke_base)

    class AllLogits(torch.nn.Module):  # a causal LM whose forward does not take logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    assert takes_logits_to_keep(model) and not takes_logits_to_keep(AllLogits(model))
    q, qm = pad_sequences(prompts, tok.pad_token_id, side="left")
    r, rm = pad_sequences(responses, tok.pad_token_id, side="right")
    with torch.no_grad():
        kept, _ = response_logprobs(model, q, qm, r, rm, temperature=0.7)
        every, _ = response_logprobs(AllLogits(model), q, qm, r, rm, temperature=0.7)
    assert kept.shape == every.shape == r.shape
    assert torch.allclose(kept, every, atol=1e-5)


def test_scoring_without_shared_padding_gives_the_full_passes_values(smoke_base):
    """Scoring drops the padding columns every row of a micro-batch shares; on real tokens its
    log-probs, values and scores equal one pass over the whole padded batch."""
    from instructrl.models.reward import RewardModel

    model, tok, prompts, responses = _rows(smoke_base)
    prompts.append(tok("the cat sees the red dog and", add_special_tokens=False).input_ids)  # pads the others' prompts more
    responses.append(tok(" a sky is blue and the cat is red", add_special_tokens=False).input_ids)  # and their responses
    q, qm = pad_sequences(prompts, tok.pad_token_id, side="left")
    r, rm = pad_sequences(responses, tok.pad_token_id, side="right")
    value_model = RewardModel.from_causal_lm(smoke_base / "pretrain" / "final", tok).eval()
    ended = torch.tensor([True, False, True])  # the second response ran out of tokens before its EOS
    # micro-batches of 2 rows: the first two rows share padding the third row's length put there
    shared_query = len(prompts[2]) - max(map(len, prompts[:2]))
    shared_response = len(responses[2]) - max(map(len, responses[:2]))
    assert shared_query > 0 and shared_response > 0
    rollout, _ = score_episodes(model, model, value_model, value_model, q, qm, r, rm, ended, temperature=1.0,
                                micro_batch_size=2, missing_eos_score=-1.0)
    with torch.no_grad():
        full_logprobs, _ = response_logprobs(model, q, qm, r, rm, temperature=1.0)
        full_values = response_values(value_model, q, qm, r, rm)
        full_scores = value_model(torch.cat([q, r], 1), torch.cat([qm, rm], 1))
    real = rm.bool()
    assert rollout.logprobs.shape == rm.shape and rollout.values.shape == rm.shape
    assert torch.allclose(rollout.logprobs[real], full_logprobs[real], atol=1e-5)
    assert torch.allclose(rollout.values[real], full_values[real], atol=1e-5)
    # the RM's own score is logged for every response; PPO's score of one without EOS is ppo.missing_eos_score
    assert torch.allclose(rollout.rm_scores, full_scores, atol=1e-5)
    assert torch.allclose(rollout.scores, torch.where(ended, full_scores, torch.tensor(-1.0)), atol=1e-5)
    assert torch.allclose(rollout.ref_logprobs[real], rollout.logprobs[real]) and rollout.exact_kl[real].abs().max() < 1e-6
    # the update's micro-batches drop the same columns, so they see the shapes scoring saw
    trimmed = rollout.select([0, 1]).trimmed()
    assert trimmed.query_ids.shape[1] == q.shape[1] - shared_query
    assert trimmed.logprobs.shape[1] == trimmed.response_mask.shape[1] == r.shape[1] - shared_response


def test_generate_samples_from_the_distribution_ppo_scores(smoke_base, monkeypatch):
    """The log-probs of the tokens under the logits generate sampled from (KV cache, left padding)
    equal those of the full forward pass PPO scores with; if they drifted apart, the mean k1 KL
    estimate could go negative (RLHF-DETAILS: sampling/log-prob mismatch)."""
    model, tok, prompts, _ = _rows(smoke_base)
    q, qm = left_pad_prompts(prompts, tok.pad_token_id, "cpu")
    seen = []
    original = GumbelNoise.__call__

    def recording(self, input_ids, scores):
        seen.append(torch.log_softmax(scores.float() / self.temperature, -1))
        return original(self, input_ids, scores)

    monkeypatch.setattr(GumbelNoise, "__call__", recording)
    with torch.no_grad():
        r, rm, _ = sample_responses(model, q, qm, temperature=0.7, max_new_tokens=6, eos_id=tok.eos_token_id,
                                    pad_id=tok.pad_token_id, seeds=[1, 2])
        scored, _ = response_logprobs(model, q, qm, r, rm, temperature=0.7)
    sampled = torch.stack(seen[: r.shape[1]], 1).gather(-1, r.unsqueeze(-1)).squeeze(-1)
    real = rm.bool()
    assert real.sum() >= 4 and real[0].any() and real[1].any()  # both rows, the left-padded one included
    assert torch.allclose(sampled[real], scored[real], atol=1e-4)


@pytest.mark.parametrize("setting", [{"repetition_penalty": 1.5}, {"min_new_tokens": 6}, {"suppress_tokens": list(range(3, 200))},
                                     {"no_repeat_ngram_size": 1}])
def test_a_checkpoints_generation_settings_do_not_reach_the_rollouts_sampler(smoke_base, monkeypatch, setting):
    """A checkpoint's generation_config.json (Qwen2.5-Instruct's sets repetition_penalty 1.05) fills in
    every setting generate's own config leaves unset; the rollout must sample from the logits PPO
    scores all the same, and leave the model's settings as they were."""
    model, tok, prompts, _ = _rows(smoke_base)
    for key, value in setting.items():
        setattr(model.generation_config, key, value)
    before = model.generation_config.to_dict()
    q, qm = left_pad_prompts(prompts, tok.pad_token_id, "cpu")
    seen = []
    original = GumbelNoise.__call__
    monkeypatch.setattr(GumbelNoise, "__call__", lambda self, input_ids, scores: seen.append(scores.float()) or original(self, input_ids, scores))
    with torch.no_grad():
        r, rm, _ = sample_responses(model, q, qm, temperature=1.0, max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seeds=[1, 2])
        scored = response_logits(model, q, qm, r, rm, temperature=1.0)
    sampled_from = torch.stack(seen[: r.shape[1]], 1)  # (B, Tr, V): the logits each token was drawn from
    real = rm.bool()
    gap = (sampled_from[real].log_softmax(-1) - scored[real].log_softmax(-1)).abs().max()
    assert gap < 1e-4, gap
    assert model.generation_config.to_dict() == before


def test_response_logprobs_divide_by_temperature(smoke_base):
    model, tok, prompts, responses = _rows(smoke_base)
    q, r = torch.tensor([prompts[0]]), torch.tensor([responses[0]])
    ones_q, ones_r = torch.ones_like(q), torch.ones_like(r)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([q, r], 1)).logits[:, q.shape[1] - 1 : -1]
        expected = torch.log_softmax(logits / 2.0, -1).gather(-1, r.unsqueeze(-1)).squeeze(-1)
        got, _ = response_logprobs(model, q, ones_q, r, ones_r, temperature=2.0)
    assert torch.allclose(got, expected, atol=1e-5)


def test_rewards_and_advantages_fill_the_rollout_over_real_tokens_only():
    from types import SimpleNamespace

    from instructrl.stages.ppo import add_rewards_and_advantages

    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    zeros = torch.zeros(2, 3)
    rollout = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), mask,
                      torch.tensor([True, True]), logprobs=torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -9.0, -9.0]]),
                      ref_logprobs=torch.tensor([[-1.5, -1.0, -1.0], [-2.0, 0.0, 0.0]]), values=zeros, scores=torch.tensor([1.0, -1.0]),
                      rm_scores=torch.tensor([1.0, -1.0]), entropy=zeros)
    cfg = SimpleNamespace(kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=1.0)
    add_rewards_and_advantages(rollout, cfg, kl_coef=0.1, over_processes=lambda t: t)
    # k1 = logprobs - ref_logprobs on real tokens: [0.5, 0, 0] and [0, -, -]; padding's -9 vs 0 never counts
    assert torch.allclose(rollout.kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # rewards -0.1·KL, the score on the last real token: [-0.05, 0, 1] and [-1, 0, 0]
    assert torch.allclose(rollout.rewards, torch.tensor([[-0.05, 0.0, 1.0], [-1.0, 0.0, 0.0]]))
    # γ = λ = 1, V = 0: returns are the rewards to go, [0.95, 1, 1] and [-1, 0, 0]
    assert torch.allclose(rollout.returns, torch.tensor([[0.95, 1.0, 1.0], [-1.0, 0.0, 0.0]]))
    # advantages whitened over the 4 real tokens: mean 0, padding 0
    assert abs(float(rollout.advantages[mask.bool()].mean())) < 1e-6
    assert torch.equal(rollout.advantages[1, 1:], torch.zeros(2))


def test_whitened_rewards_keep_their_mean_and_feed_gae():
    from types import SimpleNamespace

    from instructrl.stages.ppo import add_rewards_and_advantages

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    zeros = torch.zeros(2, 3)
    same = torch.full((2, 3), -1.0)  # log π = log π_SFT: KL 0, so the rewards are the scores alone
    rollout = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), mask,
                      torch.tensor([True, True]), logprobs=same, ref_logprobs=same.clone(), values=zeros, scores=torch.tensor([6.0, 3.0]),
                      rm_scores=torch.tensor([6.0, 3.0]), entropy=zeros)
    cfg = SimpleNamespace(kl_estimator="k1", whiten_rewards=True, gamma=1.0, lam=1.0)
    add_rewards_and_advantages(rollout, cfg, kl_coef=0.1, over_processes=lambda t: t)
    # rewards on real tokens [0, 6] and [3]: mean 3, unbiased variance (9 + 9 + 0) / 2 = 9, std 3;
    # whitened without the shift: (x - 3) / 3 + 3 = [2, 4] and [3]; padding 0
    assert torch.allclose(rollout.rewards, torch.tensor([[2.0, 4.0, 0.0], [3.0, 0.0, 0.0]]), atol=1e-5)
    # γ = λ = 1, V = 0: returns are the whitened rewards to go, [6, 4] and [3] (unwhitened: [6, 6] and [3])
    assert torch.allclose(rollout.returns, torch.tensor([[6.0, 4.0, 0.0], [3.0, 0.0, 0.0]]), atol=1e-5)


def test_rollout_metrics_sum_each_response_over_its_real_tokens_and_average_the_episodes():
    """The logged KL is nats per response (summed over its tokens up to EOS), entropy a per-token mean,
    each averaged over episodes; what follows EOS (garbage here: 9, 50) never counts."""
    import math

    from instructrl.rl.metrics import rollout_metrics

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    zeros = torch.zeros(2, 3)
    rollout = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), mask,
                      ended=torch.tensor([True, False]), logprobs=torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -9.0, -9.0]]),
                      ref_logprobs=torch.tensor([[-1.5, -1.5, 0.0], [-2.0, 0.0, 0.0]]), values=zeros, scores=torch.tensor([1.0, -3.0]),
                      rm_scores=torch.tensor([1.0, 2.0]), entropy=torch.tensor([[2.0, 1.0, 50.0], [3.0, 50.0, 50.0]]),
                      exact_kl=torch.tensor([[0.5, 0.25, 9.0], [1.0, 9.0, 9.0]]))
    m = rollout_metrics(rollout, ["a", "b"], ["x", "y"], {}, None, SimpleNamespace(reduce=lambda t, op: t))
    # exact KL per response 0.75 and 1.0: mean 0.875; log π - log π_ref on real tokens: [0.5, -0.5] and [1.0]
    assert m["rollout/kl"] == pytest.approx(0.875) and m["rollout/sqrt_kl"] == pytest.approx(math.sqrt(0.875))
    assert m["rollout/kl_k1"] == pytest.approx((0.0 + 1.0) / 2)
    k3 = lambda log_ratio: math.expm1(-log_ratio) + log_ratio  # noqa: E731  (ρ - 1) - log ρ, ρ = π_ref / π
    assert m["rollout/kl_k3"] == pytest.approx((k3(0.5) + k3(-0.5) + k3(1.0)) / 2)  # (0.1065 + 0.1487 + 0.3679) / 2
    # entropy per token 1.5 and 3.0: mean 2.25; lengths 2 and 1; one response of two ended
    assert m["rollout/entropy"] == pytest.approx(2.25) and m["rollout/length"] == 1.5 and m["rollout/eos_rate"] == 0.5
    # the RM's scores 1 and 2; the reward's, with the missing-EOS score -3 for the second
    assert m["rollout/score"] == 1.5 and m["rollout/score_in_reward"] == -1.0
    assert "rollout/gold_likert" not in m  # no gold tasks given


def test_prompt_order_covers_every_prompt_once_per_epoch():
    seen = [i for it in range(5) for i in prompt_order(10, 4, it, seed=3)]
    # 20 draws over 10 prompts: the first 10 are a permutation, and so are the next 10
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert prompt_order(10, 4, 2, seed=3) == prompt_order(10, 4, 2, seed=3)


def test_encoded_prompts_are_token_sequences_of_the_prompts_that_leave_room_for_a_response(smoke_base):
    """PPO held its prompts' token ids as lists of Python ints (117 MB of the stage's 1 GB at 200k
    smoke prompts, twice that with a real vocabulary, whose ids are no cached small ints); a
    TokenSequences holds the same ids in 4 bytes each."""
    tokenizer = load_tokenizer(smoke_base / "pretrain" / "final")
    prompts = [Prompt(t.id, list(t.messages)) for t in load_tasks(smoke_base / "world" / "prompts" / "ppo.jsonl")]
    ids = [render_ids(tokenizer, p.messages, add_generation_prompt=True) for p in prompts]
    cfg = load_config(SMOKE).ppo
    max_length = sorted(map(len, ids))[len(ids) // 2] + cfg.max_new_tokens  # about half of them leave room
    fits = [i for i, prompt_ids in enumerate(ids) if len(prompt_ids) + cfg.max_new_tokens <= max_length]
    assert cfg.rollout_batch_size <= len(fits) < len(prompts)
    kept, encoded = encode_prompts(prompts, tokenizer, cfg, max_length, "ppo")
    assert isinstance(encoded, TokenSequences)
    assert kept == [prompts[i] for i in fits] and list(encoded) == [ids[i] for i in fits]


def test_a_world_format_prompts_file_is_read_once_with_its_gold_tasks(tmp_path, smoke_base, monkeypatch):
    """The gold tasks of ppo.prompts in the world's own format were read in a pass of their own over
    the file, each with a copy of its messages (4 s and 240 MB at 200k prompts); they come from
    read_data's pass, sharing the prompts' messages."""
    world_prompts = smoke_base / "world" / "prompts" / "ppo.jsonl"
    tasks = load_tasks(world_prompts)
    path = tmp_path / "prompts.jsonl"
    path.write_text(world_prompts.read_text() + json.dumps({"id": "mine", "prompt": "Say cat."}) + "\n")  # no gold answer
    reads = []
    for module in (readers, build):
        monkeypatch.setattr(module, "read_jsonl", lambda p, read=module.read_jsonl: reads.append(p) or read(p))
    config = load_config(SMOKE, [f"ppo.prompts={path}", "ppo.ptx_coef=0"])
    tokenizer = load_tokenizer(smoke_base / "pretrain" / "final")
    prompts, gold, _ = load_prompts(config, "ppo", tokenizer, SimpleNamespace(is_main_process=False), lambda line: None)
    assert reads == [path]
    assert [p.id for p in prompts] == [t.id for t in tasks] + ["mine"]
    assert gold == {t.id: t for t in tasks}
    assert all(gold[p.id].messages[-1] is p.messages[-1] for p in prompts[:-1])


class _Value(torch.nn.Module):
    """A value model stand-in: per-token values from a tiny embedding, as RewardModel.values gives them."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 1)

    def forward(self, input_ids, attention_mask, per_token=False):
        return self.emb(input_ids).squeeze(-1)


def test_one_ppo_update_raises_the_logprob_of_the_advantaged_response(smoke_base):
    model, tok, prompts, responses = _rows(smoke_base)
    q, qm = pad_sequences([prompts[0], prompts[0]], tok.pad_token_id, side="left")
    r, rm = pad_sequences(responses, tok.pad_token_id, side="right")
    with torch.no_grad():
        old, _ = response_logprobs(model, q, qm, r, rm, 1.0)
    mask = rm.float()
    # response 0 gets advantage +1 on every token, response 1 gets -1
    adv = torch.stack([torch.ones(r.shape[1]), -torch.ones(r.shape[1])]) * mask
    zeros = torch.zeros_like(old)
    rollout = Rollout(q, qm, r, rm, torch.tensor([True, True]), old, old, zeros, torch.zeros(2), torch.zeros(2), zeros,
                      kl=zeros, rewards=zeros, advantages=adv, returns=zeros)
    cfg = load_config(SMOKE, ["ppo.minibatch_size=2", "ppo.micro_batch_size=1", "ppo.rollout_batch_size=2", "ppo.ppo_epochs=1",
                              "ppo.lr=1e-3", "ppo.warmup_steps=0"]).ppo
    accelerator = make_accelerator(cfg)
    value = _Value(len(tok))
    with torch.no_grad():
        values_before = response_values(value, q, qm, r, rm)
    policy_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    value_opt = torch.optim.AdamW(value.parameters(), lr=1e-3)
    model.train()
    stats = ppo_epochs(accelerator, cfg, rollout, model, value, policy_opt, value_opt, [], None, iteration=0, seed=0)
    # first minibatch of the first epoch: the policy has not moved yet
    assert stats["check/first_ratio"] == 1.0 and stats["check/first_approx_kl"] == 0.0
    with torch.no_grad():
        new, _ = response_logprobs(model.eval(), q, qm, r, rm, 1.0)
    gain = ((new - old) * mask).sum(-1)
    assert gain[0] > 0 > gain[1]
    # and the value model moved towards the returns (0 here), from where it stood
    with torch.no_grad():
        assert ((response_values(value, q, qm, r, rm) ** 2) * mask).sum() < ((values_before ** 2) * mask).sum()


def test_the_ppo_ptx_term_alone_lowers_the_pretraining_loss(smoke_base):
    """PPO-ptx (InstructGPT eq. 2) adds γ · the pretraining NLL to the policy's loss. With every
    advantage 0 the clipped policy loss has no gradient, so one update that lowers the NLL of the
    pretraining blocks did so through that term alone (the smoke PPO-ptx run only logs it)."""
    from instructrl.data.inputs import read_texts
    from instructrl.data.packing import pack_documents
    from instructrl.rlmath import next_token_nll

    model, tok, prompts, responses = _rows(smoke_base)
    q, qm = pad_sequences([prompts[0], prompts[0]], tok.pad_token_id, side="left")
    r, rm = pad_sequences(responses, tok.pad_token_id, side="right")
    with torch.no_grad():
        old, _ = response_logprobs(model, q, qm, r, rm, 1.0)
    zeros = torch.zeros_like(old)
    rollout = Rollout(q, qm, r, rm, torch.tensor([True, True]), old, old, zeros, torch.zeros(2), torch.zeros(2), zeros,
                      kl=zeros, rewards=zeros, advantages=zeros, returns=zeros)
    blocks = pack_documents(tok, read_texts(smoke_base / "world" / "corpus.txt"), 64)[:4]

    def pretraining_nll() -> float:
        with torch.no_grad():
            total, count = next_token_nll(model(input_ids=blocks).logits, blocks, torch.ones_like(blocks))
        return (total / count).item()

    cfg = load_config(SMOKE, ["ppo.minibatch_size=2", "ppo.micro_batch_size=1", "ppo.rollout_batch_size=2", "ppo.ppo_epochs=1",
                              "ppo.lr=1e-3", "ppo.warmup_steps=0", "ppo.ptx_coef=1.0", "ppo.ptx_batch_size=4"]).ppo
    value = _Value(len(tok))
    before = pretraining_nll()
    stats = ppo_epochs(make_accelerator(cfg), cfg, rollout, model.train(), value, torch.optim.AdamW(model.parameters(), lr=1e-3),
                       torch.optim.AdamW(value.parameters(), lr=1e-3), [], blocks, iteration=0, seed=0)
    assert stats["ppo/policy_loss"] == 0.0 and stats["ppo/ptx_loss"] > 0
    # one Adam step of lr 1e-3 along the NLL gradient: by hundredths (without the term the NLL stays within 1e-4)
    assert pretraining_nll() < before - 0.01, before


def test_a_reward_model_with_another_tokenizer_is_refused_before_the_run_folder_is_written(tmp_path, smoke_base):
    """Token ids mean other words to such a reward model: it would score text the policy never wrote."""
    from tiny_models import save_tiny_model

    from instructrl.errors import UserError
    from instructrl.stages.ppo import run_ppo

    policy, other = smoke_base / "pretrain" / "final", save_tiny_model("gpt2", tmp_path / "gpt2")  # its own BPE
    config = load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"ppo.policy={policy}", f"ppo.reward_model={other}"])
    with pytest.raises(UserError, match=f"^ppo_ptx: the reward model {other} and the policy {policy} use different tokenizers$"):
        run_ppo(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_a_broken_line_of_ptx_data_is_refused_before_the_prompts_are_encoded_and_the_models_loaded(tmp_path, smoke_rm, monkeypatch):
    """A user's pretraining text is read first: a bad line deep in it costs seconds, not the whole setup."""
    from instructrl.errors import UserError
    from instructrl.stages import ppo

    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text('{"text": "one"}\n{"text": \n')
    monkeypatch.setattr(ppo, "encode_prompts", lambda *a, **k: pytest.fail("the prompts were encoded before the text was read"))
    config = load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"ppo.policy={smoke_rm / 'pretrain' / 'final'}",
                                 f"ppo.reward_model={smoke_rm / 'rm' / 'final'}", f"ppo.ptx_data={ptx}"])
    with pytest.raises(UserError, match="ptx.jsonl.*2"):
        ppo.run_ppo(config, log=lambda *_: None)
    assert not (tmp_path / "run" / "ppo_ptx").exists()


@pytest.mark.parametrize("ptx", [0.0, 1.0])
def test_ppo_stage_on_smoke(tmp_path, smoke_rm, ptx):
    base = smoke_rm / "pretrain" / "final"
    args = ["-c", str(SMOKE), f"run.dir={tmp_path}", f"ppo.policy={base}", f"ppo.reward_model={smoke_rm / 'rm' / 'final'}",
            f"ppo.ptx_coef={ptx}", f"ppo.ptx_data={smoke_rm / 'world' / 'corpus.txt'}"]
    cli("ppo", *args)
    stage = tmp_path / ("ppo_ptx" if ptx else "ppo")
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        # the policy and the rollout agree before the first update: ratio exactly 1, approx-KL 0
        assert m["check/first_ratio"] == 1.0 and m["check/first_approx_kl"] == 0.0
        assert ("ppo/ptx_loss" in m) == bool(ptx)
        assert 0.0 <= m["rollout/eos_rate"] <= 1.0 and 1 <= m["rollout/gold_likert"] <= 7
    assert metrics[0]["rollout/kl"] == 0.0  # iteration 1 samples from the SFT policy itself
    # the logged KL is exact over the vocabulary: never negative, unlike the sampled-token k1 next to it
    assert all(m["rollout/kl"] >= 0.0 and m["rollout/kl_k3"] >= 0.0 and "rollout/kl_k1" in m for m in metrics)
    assert metrics[-1]["rollout/kl"] != 0.0
    # the policy moved, and both models reload
    before = load_file(base / "model.safetensors")
    after = load_file(stage / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from instructrl.models.reward import RewardModel

    RewardModel.from_pretrained(stage / "value")
    lineage = json.loads((stage / "lineage.json").read_text())["inputs"]
    assert set(lineage) >= {"policy", "reward_model", "prompts"}
    # a second run with the same config does nothing
    again = cli("ppo", *args)
    assert "nothing to do" in again.stdout + again.stderr


def test_ppo_killed_and_resumed_ends_with_the_same_weights(tmp_path, smoke_rm):
    from conftest import kill_after_first_checkpoint

    def args(run_dir):
        return ["ppo", "-c", str(SMOKE), f"run.dir={run_dir}", f"ppo.policy={smoke_rm / 'pretrain' / 'final'}",
                f"ppo.reward_model={smoke_rm / 'rm' / 'final'}", f"ppo.ptx_data={smoke_rm / 'world' / 'corpus.txt'}",
                "ppo.episodes=96", "ppo.ptx_coef=1.0", "ppo.adaptive_kl=true"]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli(*args(straight))
    kill_after_first_checkpoint(args(killed), killed / "ppo_ptx" / "checkpoints")
    resumed = cli(*args(killed))
    assert "resuming from the checkpoint of iteration" in resumed.stderr
    for folder in ("final", "value"):
        name = "model.safetensors"
        a, b = load_file(straight / "ppo_ptx" / folder / name), load_file(killed / "ppo_ptx" / folder / name)
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    rows = lambda d: [json.loads(line) for line in (d / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(straight), rows(killed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 7))
    # the adaptive β carried over the restart: every iteration's coefficient matches
    assert [r["ppo/kl_coef"] for r in b] == [r["ppo/kl_coef"] for r in a]
    # and it adapts: iteration 1 samples from the reference itself (KL 0), so the error is clipped to -0.2
    # and β falls to β · (1 - 0.2 · rollout_batch_size / kl_horizon) for iteration 2
    cfg = load_config(SMOKE, args(straight)[3:]).ppo
    assert a[0]["rollout/kl"] == 0.0 and a[0]["ppo/kl_coef"] == cfg.kl_coef
    assert a[1]["ppo/kl_coef"] == pytest.approx(cfg.kl_coef * (1 - 0.2 * cfg.rollout_batch_size / cfg.kl_horizon), rel=1e-12)
    # final/ records the β after the last iteration's update, which a later pipeline round goes on from; resumed or not
    error = min(max(a[-1]["rollout/kl"] / cfg.target_kl - 1, -0.2), 0.2)
    reached = [json.loads((d / "ppo_ptx" / "final" / "ppo_state.json").read_text())["kl_coef"] for d in (straight, killed)]
    assert reached[0] == reached[1] == pytest.approx(a[-1]["ppo/kl_coef"] * (1 + error * cfg.rollout_batch_size / cfg.kl_horizon), rel=1e-12)
    # the logged learning rate (of an iteration's first update) warms up over ppo.warmup_steps updates, ppo_epochs x minibatches an iteration
    updates = cfg.ppo_epochs * cfg.rollout_batch_size // cfg.minibatch_size
    assert [r["ppo/lr"] for r in b] == [r["ppo/lr"] for r in a] == pytest.approx(
        [cfg.lr * min(1.0, (i * updates + 1) / cfg.warmup_steps) for i in range(len(a))], rel=1e-12)


def _four_episode_rollout(smoke_base, advantage_scale: float = 1.0):
    """Four episodes (two prompts' two responses each way), with ±``advantage_scale`` advantages."""
    model, tok, prompts, responses = _rows(smoke_base)
    q, qm = pad_sequences([prompts[0], prompts[1], prompts[0], prompts[1]], tok.pad_token_id, side="left")
    r, rm = pad_sequences(responses + responses[::-1], tok.pad_token_id, side="right")
    with torch.no_grad():
        old, _ = response_logprobs(model, q, qm, r, rm, 1.0)
    zeros = torch.zeros_like(old)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0]).unsqueeze(1) * rm.float() * advantage_scale
    rollout = Rollout(q, qm, r, rm, torch.tensor([True] * 4), old, old, zeros, torch.zeros(4), torch.zeros(4), zeros,
                      kl=zeros, rewards=zeros, advantages=adv, returns=zeros + 1.0)
    return model, tok, rollout


def test_each_epoch_visits_every_episode_once_and_later_epochs_make_new_minibatches(smoke_base, monkeypatch):
    """Epoch 1 keeps the rollout's order (so its first ratio is 1); later epochs shuffle episodes
    between minibatches, each episode still once per epoch."""
    model, tok, rollout = _four_episode_rollout(smoke_base)
    cfg = load_config(SMOKE, ["ppo.minibatch_size=2", "ppo.micro_batch_size=1", "ppo.rollout_batch_size=4", "ppo.ppo_epochs=4"]).ppo
    seen: list[int] = []
    select = Rollout.select
    monkeypatch.setattr(Rollout, "select", lambda self, rows: seen.extend(torch.as_tensor(rows).tolist()) or select(self, rows))
    ppo_epochs(make_accelerator(cfg), cfg, rollout, model.train(), _Value(len(tok)), torch.optim.AdamW(model.parameters(), lr=1e-5),
               torch.optim.AdamW(_Value(len(tok)).parameters()), [], None, iteration=0, seed=0)
    epochs = [seen[i : i + 4] for i in range(0, 16, 4)]
    assert epochs[0] == [0, 1, 2, 3]
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs)
    minibatches = [{frozenset(e[:2]), frozenset(e[2:])} for e in epochs]
    assert any(m != minibatches[0] for m in minibatches[1:])  # episodes changed minibatch in some later epoch


def test_the_optimizers_step_with_gradients_clipped_to_grad_clip(smoke_base):
    """ppo.grad_clip bounds the gradient norm each optimizer steps with; the logs keep the norm before clipping."""
    model, tok, rollout = _four_episode_rollout(smoke_base, advantage_scale=100.0)
    cfg = load_config(SMOKE, ["ppo.minibatch_size=4", "ppo.micro_batch_size=2", "ppo.rollout_batch_size=4", "ppo.ppo_epochs=1",
                              "ppo.grad_clip=0.01"]).ppo
    value = _Value(len(tok))
    policy_opt, value_opt = torch.optim.AdamW(model.parameters(), lr=1e-5), torch.optim.AdamW(value.parameters(), lr=1e-5)
    stepped_with: list[float] = []

    def spy(optimizer, params):
        step = optimizer.step

        def clipped_step(*args, **kwargs):
            stepped_with.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
            return step(*args, **kwargs)
        optimizer.step = clipped_step

    spy(policy_opt, list(model.parameters()))
    spy(value_opt, list(value.parameters()))
    stats = ppo_epochs(make_accelerator(cfg), cfg, rollout, model.train(), value, policy_opt, value_opt, [], None, iteration=0, seed=0)
    assert stats["ppo/policy_grad_norm"] > 0.01 and stats["ppo/value_grad_norm"] > 0.01  # the clip had work to do
    assert len(stepped_with) == 2 and all(norm <= 0.01 * (1 + 1e-4) for norm in stepped_with), stepped_with


def test_a_reference_beside_ppo_lora_is_refused_before_the_run_folder_is_written(tmp_path, smoke_rm):
    """With ppo.lora the KL reference is the policy's base model with the adapter off; another reference would be ignored."""
    from instructrl.errors import UserError
    from instructrl.stages.ppo import run_ppo

    base = smoke_rm / "pretrain" / "final"
    config = load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"ppo.policy={base}", f"ppo.reward_model={smoke_rm / 'rm' / 'final'}",
                                 f"ppo.reference={smoke_rm / 'rm' / 'final'}", "ppo.lora.enabled=true", "ppo.ptx_coef=0"])
    with pytest.raises(UserError, match="^ppo: with ppo.lora the KL reference is the policy's base model; leave ppo.reference unset$"):
        run_ppo(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_a_reference_beside_ppo_lora_is_refused_before_the_pipeline_trains(tmp_path, monkeypatch):
    """The pipeline trained pretrain, SFT, collect and the RM before PPO refused the reference."""
    from instructrl.errors import UserError
    from instructrl.pipeline import run_pipeline
    from instructrl.stages.ppo import check_config

    config = load_config(SMOKE, [f"run.dir={tmp_path}", "ppo.lora.enabled=true", f"ppo.reference={tmp_path / 'other'}"])
    with pytest.raises(UserError, match="^ppo_ptx: with ppo.lora the KL reference is the policy's base model; leave ppo.reference unset$"):
        run_pipeline(config, log=lambda *_: None)
    assert not (tmp_path / "pretrain").exists()
    config.ppo.reference = str(tmp_path / "sft" / "final")  # the policy PPO is given by default: no other model
    check_config(config)
    monkeypatch.chdir(tmp_path)
    config.ppo.reference = "./sft/../sft/final"  # the same folder, spelt otherwise
    check_config(config)


def test_a_later_round_goes_on_from_the_iterations_before_it(tmp_path, smoke_rm, monkeypatch):
    """ppo.first_iteration = 3 (a pipeline round after one of 3 iterations): iterations 3-5's prompts and
    seeds, logged as steps 4-6, not the first round's prompts sampled with the first round's seeds again."""
    import instructrl.stages.ppo as ppo_stage

    seen = []
    monkeypatch.setattr(ppo_stage, "prompt_order", lambda n, batch, iteration, seed: seen.append(iteration) or prompt_order(n, batch, iteration, seed))
    config = load_config(SMOKE, [f"run.dir={tmp_path}", f"ppo.policy={smoke_rm / 'pretrain' / 'final'}",
                                 f"ppo.reward_model={smoke_rm / 'rm' / 'final'}", "ppo.ptx_coef=0", "ppo.first_iteration=3"])
    said = []
    ppo_stage.run_ppo(config, log=said.append)
    assert seen == [3, 4, 5]
    metrics = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["episodes"]) for m in metrics] == [(4, 64), (5, 80), (6, 96)]  # smoke: 16 episodes per iteration
    assert any("3 iterations of 16 episodes after 3 earlier ones" in line for line in said)


def test_values_are_read_at_the_token_before_each_response_token():
    """V(s_t) is the value model's output at the last token of s_t = prompt + response[:t], the
    column before response token t (the value head reads a state, not the action taken in it)."""

    class Columns(torch.nn.Module):  # per-token output = the column's index
        def forward(self, input_ids, attention_mask, per_token=False):
            return torch.arange(input_ids.shape[1], dtype=torch.float32).expand(input_ids.shape)

    q, qm = torch.tensor([[0, 7, 8]]), torch.tensor([[0, 1, 1]])  # left-padded prompt 7 8: columns 0-2
    r, rm = torch.tensor([[9, 10, 0]]), torch.tensor([[1, 1, 0]])  # response 9 10, then padding: columns 3-5
    # token 9 is chosen after 8 (column 2), token 10 after 9 (column 3); the padding's column 4 is never read by GAE
    assert response_values(Columns(), q, qm, r, rm).tolist() == [[2.0, 3.0, 4.0]]


def test_the_optimizers_use_the_rl_epsilon_no_weight_decay_and_a_linear_warmup():
    from instructrl.stages.ppo import make_optimizers

    cfg = load_config(SMOKE, ["ppo.lr=1e-3", "ppo.value_lr=4e-3", "ppo.warmup_steps=4", "ppo.adam_eps=1e-5"]).ppo
    policy, value = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    policy.bias.requires_grad_(False)  # a frozen tensor (LoRA's base weights) is not the optimizer's
    policy_opt, value_opt, schedulers = make_optimizers(cfg, policy, value)
    assert [p for g in policy_opt.param_groups for p in g["params"]] == [policy.weight]
    for opt in (policy_opt, value_opt):
        assert all(g["eps"] == 1e-5 and g["weight_decay"] == 0.0 for g in opt.param_groups)
    lrs = []
    for _ in range(6):
        lrs.append((policy_opt.param_groups[0]["lr"], value_opt.param_groups[0]["lr"]))
        policy_opt.step(), value_opt.step()
        for s in schedulers:
            s.step()
    # step k of 4 warm-up steps uses (k + 1) / 4 of the rate, then the whole rate, constant
    expected = [(1e-3 * f, 4e-3 * f) for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]
    assert all(a == pytest.approx(e, rel=1e-12) for got, want in zip(lrs, expected) for a, e in zip(got, want)), lrs


def test_a_minibatch_in_one_micro_batch_or_in_four_makes_the_same_update(smoke_base):
    """Each loss is a token sum over the minibatch's token count, not a mean of micro-batch means: the
    responses have different lengths, so a mean of means would weigh a short response's tokens more."""
    updates = []
    for micro in (4, 1):
        model, tok, rollout = _four_episode_rollout(smoke_base)
        assert len(set(rollout.response_mask.sum(-1).tolist())) > 1
        torch.manual_seed(0)
        value = _Value(len(tok))
        start = [p.detach().clone() for p in (*model.parameters(), *value.parameters())]
        cfg = load_config(SMOKE, ["ppo.minibatch_size=4", f"ppo.micro_batch_size={micro}", "ppo.rollout_batch_size=4", "ppo.ppo_epochs=1",
                                  "ppo.grad_clip=1e9"]).ppo
        # SGD with lr 1: each parameter moves by minus its gradient
        ppo_epochs(make_accelerator(cfg), cfg, rollout, model.train(), value, torch.optim.SGD(model.parameters(), lr=1.0),
                   torch.optim.SGD(value.parameters(), lr=1.0), [], None, iteration=0, seed=0)
        updates.append(torch.cat([(p.detach() - s).flatten() for p, s in zip((*model.parameters(), *value.parameters()), start)]))
    assert updates[0].abs().max() > 1e-3
    assert torch.allclose(updates[0], updates[1], atol=1e-5, rtol=1e-4)


def test_gradients_are_synced_on_a_minibatchs_last_backward_only(smoke_base):
    """Every backward of a minibatch but its last micro-batch's (PPO-ptx's too) runs where syncing is
    off (``accumulating``). FSDP decides at backward time (FSDP2's set_requires_gradient_sync, FSDP1's
    no_sync): a backward made after leaving the context reduce-scattered every micro-batch's gradients."""
    model, tok, rollout = _four_episode_rollout(smoke_base)
    cfg = load_config(SMOKE, ["ppo.minibatch_size=4", "ppo.micro_batch_size=2", "ppo.rollout_batch_size=4", "ppo.ppo_epochs=1",
                              "ppo.ptx_coef=1.0", "ppo.ptx_batch_size=2"]).ppo
    accelerator = make_accelerator(cfg)
    synced, backward = [], accelerator.backward
    accelerator.backward = lambda loss, **kwargs: synced.append(accelerator.sync_gradients) or backward(loss, **kwargs)
    value = _Value(len(tok))
    blocks = torch.randint(len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    ppo_epochs(accelerator, cfg, rollout, model.train(), value, torch.optim.AdamW(model.parameters(), lr=1e-5),
               torch.optim.AdamW(value.parameters(), lr=1e-5), [], blocks, iteration=0, seed=0)
    # one minibatch: the ptx term, then micro-batch 1's policy and value backward with syncing off; micro-batch 2's on
    assert synced == [False, False, False, True, True]


def test_the_ppo_ptx_term_is_gamma_times_the_gradient_of_the_mean_pretraining_nll(smoke_base):
    """PPO-ptx adds γ · E_pretrain[-log π(x)] per token (InstructGPT eq. 2): with every block the same,
    whichever blocks are drawn, the gradient is γ times that of one block's mean NLL."""
    from instructrl.data.inputs import read_texts
    from instructrl.data.packing import pack_documents
    from instructrl.rl.update import ptx_backward
    from instructrl.rlmath import next_token_nll

    model, tok, _, _ = _rows(smoke_base)
    block = pack_documents(tok, read_texts(smoke_base / "world" / "corpus.txt"), 32)[:1]
    cfg = load_config(SMOKE, ["ppo.ptx_coef=2.5", "ppo.ptx_batch_size=2"]).ppo
    nll = ptx_backward(make_accelerator(cfg), model.train(), block.repeat(3, 1), cfg, seed=0, iteration=0, step=0)
    ptx_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total, count = next_token_nll(model(input_ids=block).logits, block, torch.ones_like(block))
    (total / count).backward()
    assert nll == pytest.approx((total / count).item(), rel=1e-5)
    assert all(torch.allclose(g, 2.5 * p.grad, atol=1e-6) for g, p in zip(ptx_grads, model.parameters()))


def test_the_value_model_starts_as_the_reward_model_head_and_bias_included(smoke_rm):
    """InstructGPT initialises the value function from the RM (§3.5): its head and the bias that centres
    the rewards, so that its first values are on the scale of the scores GAE compares them with."""
    from instructrl.stages.ppo import ModelPaths, load_models

    cfg = load_config(SMOKE, []).ppo
    base, rm = str(smoke_rm / "pretrain" / "final"), str(smoke_rm / "rm" / "final")
    tok = load_tokenizer(base)
    _, _, reward_model, value_model = load_models(cfg, ModelPaths(base, rm, rm, base), load_causal_lm(base, dropout=0.0, tokenizer=tok), tok, "ppo")
    assert float(reward_model.reward_bias) != 0.0 and float(value_model.reward_bias) == float(reward_model.reward_bias)
    assert torch.equal(value_model.head.weight, reward_model.head.weight) and torch.equal(value_model.head.bias, reward_model.head.bias)
    ids, mask = pad_sequences([tok("the cat sees the dog").input_ids + [tok.eos_token_id], tok("red").input_ids + [tok.eos_token_id]],
                              tok.pad_token_id, side="right")
    with torch.no_grad():
        assert torch.allclose(value_model.eval()(ids, mask), reward_model(ids, mask))
    assert all(p.requires_grad for p in value_model.parameters())


def test_the_ppo_ptx_blocks_are_drawn_afresh_for_every_optimizer_step(smoke_base):
    """Each update's pretraining blocks are a new draw (of iteration and step), never one batch over and over."""
    from instructrl.rl.update import ptx_backward

    class Recording(torch.nn.Module):  # a causal LM stand-in that records which blocks it was given (block i holds i)
        def __init__(self):
            super().__init__()
            self.weight, self.seen = torch.nn.Parameter(torch.zeros(())), []

        def forward(self, input_ids):
            self.seen.append(tuple(input_ids[:, 0].tolist()))
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 100) + self.weight)

    cfg = load_config(SMOKE, ["ppo.ptx_coef=1.0", "ppo.ptx_batch_size=4"]).ppo
    policy, blocks = Recording(), torch.arange(100).unsqueeze(1).repeat(1, 8)
    accelerator = make_accelerator(cfg)
    for iteration in range(3):
        for step in range(8):
            ptx_backward(accelerator, policy, blocks, cfg, seed=0, iteration=iteration, step=step)
    assert len(policy.seen) == 24 and all(len(draw) == 4 for draw in policy.seen)
    assert len(set(policy.seen)) == 24


def test_the_reference_and_the_reward_model_are_frozen_and_out_of_the_optimizers(smoke_rm):
    from instructrl.stages.ppo import ModelPaths, load_models, make_optimizers

    cfg = load_config(SMOKE, []).ppo
    base, rm = str(smoke_rm / "pretrain" / "final"), str(smoke_rm / "rm" / "final")
    tok = load_tokenizer(base)
    policy, reference, reward_model, value_model = load_models(cfg, ModelPaths(base, rm, rm, base), load_causal_lm(base, dropout=0.0, tokenizer=tok),
                                                               tok, "ppo")
    for frozen in (reference, reward_model):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    policy_opt, value_opt, _ = make_optimizers(cfg, policy, value_model)
    trained = {id(p) for opt in (policy_opt, value_opt) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in (*policy.parameters(), *value_model.parameters())}
    assert trained.isdisjoint(id(p) for m in (reference, reward_model) for p in m.parameters())
