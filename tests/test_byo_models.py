"""Bring your own model: tiny random GPT-2, Llama, Qwen2, GPT-NeoX, Mistral (sliding-window), OPT and Gemma 3
(vision-language) checkpoints, whose
tokenizers lack a PAD (or use EOS as PAD) and a chat template, through SFT, RM and PPO."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import SMOKE
from tiny_models import ARCHS, save_tiny_classifier, save_tiny_model, tiny_model_config, tiny_tokenizer, user_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructrl.config import load_config
from instructrl.data.chat import tokenize_conversation
from instructrl.models.base import FALLBACK_CHAT_TEMPLATE, PAD_TOKEN, context_length, dropout_attributes, fit_embeddings, load_causal_lm, load_tokenizer, set_dropout


@pytest.mark.parametrize("pad", ["none", "eos"])
def test_load_tokenizer_adds_a_pad_distinct_from_eos(tmp_path, pad):
    tiny_tokenizer(pad, template=False).save_pretrained(tmp_path)
    told = []
    tokenizer = load_tokenizer(tmp_path, log=told.append)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id == len(tokenizer) - 1  # a new id, after the vocabulary the model knows
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    # both changes are said; a tokenizer saved after them loads with nothing to change
    assert len(told) == 2 and f"{PAD_TOKEN} is added as id {tokenizer.pad_token_id}" in told[0] and "no chat template" in told[1]
    tokenizer.save_pretrained(tmp_path / "saved")
    told.clear()
    load_tokenizer(tmp_path / "saved", log=told.append)
    assert told == []


def test_fit_embeddings_adds_a_mean_row_and_keeps_the_rest(tmp_path):
    save_tiny_model("llama", tmp_path)
    before = AutoModelForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight.detach().clone()
    tokenizer = load_tokenizer(tmp_path)
    model = load_causal_lm(tmp_path, tokenizer=tokenizer)
    after = model.get_input_embeddings().weight
    assert after.shape[0] == len(tokenizer) == before.shape[0] + 1
    assert torch.equal(after[:-1], before)
    assert torch.allclose(after[-1], before.mean(0))
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # fitting again changes nothing, and two loads are identical (no random initialisation)
    fit_embeddings(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    again = load_causal_lm(tmp_path, tokenizer=load_tokenizer(tmp_path))
    assert torch.equal(again.get_input_embeddings().weight, after)


def test_fallback_template_marks_only_the_assistant_turns(tmp_path):
    tiny_tokenizer("none", template=False).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"},
                {"role": "user", "content": "Say dog."}, {"role": "assistant", "content": "dog"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "User: Say cat.\n\nAssistant: cat<|endoftext|>\n\nUser: Say dog.\n\nAssistant: dog<|endoftext|>"
    conv = tokenize_conversation(tokenizer, messages)
    marked = tokenizer.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m])
    assert marked == " cat<|endoftext|> dog<|endoftext|>"


def test_fallback_template_starts_with_bos_for_a_tokenizer_that_puts_it_first(tmp_path):
    """Llama, Mistral, Gemma and OPT base tokenizers put BOS before the text they encode, and their
    models were trained so: conversations rendered with the fallback template start with it too."""
    tiny_tokenizer("none", template=False, bos=True).save_pretrained(tmp_path)
    told = []
    tokenizer = load_tokenizer(tmp_path, log=told.append)
    messages = [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<s>User: Say cat.\n\nAssistant: cat<|endoftext|>"
    conv = tokenize_conversation(tokenizer, messages)
    assert conv.input_ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id != tokenizer.eos_token_id
    assert tokenizer.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m]) == " cat<|endoftext|>"
    assert "after BOS" in told[-1]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sft_rm_ppo_on_a_tiny_model(tmp_path, arch):
    from instructrl.models.reward import RewardModel
    from instructrl.stages.ppo import run_ppo
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    model_dir = save_tiny_model(arch, tmp_path / f"tiny-{arch}")
    data = user_data(tmp_path / "data")
    run = tmp_path / "run"
    quiet = lambda *_: None  # noqa: E731
    config = load_config(SMOKE, [
        f"run.dir={run}", f"sft.model={model_dir}", f"sft.data={data['sft']}", "sft.epochs=2",
        f"rm.model={run / 'sft' / 'final'}", f"rm.data={data['rm']}", f"rm.demonstrations={data['sft']}",
        f"ppo.policy={run / 'sft' / 'final'}", f"ppo.reward_model={run / 'rm' / 'final'}", f"ppo.prompts={data['prompts']}",
        f"ppo.ptx_data={data['text']}", "ppo.episodes=32",
    ])
    sft = run_sft(config, log=quiet)
    tokenizer = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft)
    assert model.config.model_type == arch and context_length(model) == 128
    assert tokenizer.pad_token == PAD_TOKEN and model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert tokenizer.chat_template is not None  # the fallback is saved with the checkpoint
    losses = [json.loads(line)["train/loss"] for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]

    rm = run_rm(config, log=quiet)
    reward_model = RewardModel.from_pretrained(rm)
    assert reward_model.backbone.config.model_type == arch
    # the user's prompts are not the built-in world's: the held-out rankings are the reference, and the log says so
    diagnostics = json.loads((run / "rm" / "diagnostics.json").read_text())
    assert diagnostics["against"] == "the held-out rankings" and diagnostics["correlation_with"] == "rank"  # pairs have no Likert

    ppo = run_ppo(config, log=quiet)
    metrics = [json.loads(line) for line in (run / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["check/first_ratio"] == 1.0 for m in metrics)
    assert all(m["rollout/length"] >= 1 for m in metrics) and "ppo/ptx_loss" in metrics[0]
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), model.parameters()))
    # each checkpoint's config keeps the user's model's dropout, not the one a stage trained with (SFT 0.1, RM and PPO 0)
    source = dropout_of(model_dir)
    assert source and all(dropout_of(path) == source for path in (sft, rm, ppo))


def dropout_of(path) -> dict:
    from transformers import AutoConfig

    return dropout_attributes(AutoConfig.from_pretrained(path).get_text_config())


def test_set_dropout_switches_off_the_dropout_layers_apply_themselves():
    """OPT, Bloom, GPT-BigCode and Starcoder2 layers keep their probability as a float given to
    F.dropout, under names of their own: with dropout 0 two passes in train mode are equal (the
    first PPO epoch's ratio is 1), and the config saved with the model keeps the model's own."""
    from transformers import BloomConfig, GPTBigCodeConfig, OPTConfig, Starcoder2Config

    from instructrl.models.base import saved_dropout

    small = dict(vocab_size=64, num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    configs = [OPTConfig(ffn_dim=64, word_embed_proj_dim=32, dropout=0.3, attention_dropout=0.3, layerdrop=0.3, **small),
               BloomConfig(hidden_dropout=0.3, attention_dropout=0.3, **small),
               GPTBigCodeConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3),
               Starcoder2Config(intermediate_size=64, residual_dropout=0.3, embedding_dropout=0.3, attention_dropout=0.3, **small)]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for config in configs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).train()
        own = dropout_attributes(model.config)
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits), config.model_type  # dropout is on
        set_dropout(model, 0.0)
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits), config.model_type
        with saved_dropout(model):
            assert dropout_attributes(model.config) == own and set(own.values()) == {0.3}


def test_a_weights_file_cut_short_is_one_line(tmp_path):
    """An interrupted copy or download leaves a truncated model.safetensors: a message, not safetensors' traceback."""
    from instructrl.errors import UserError
    from instructrl.models.reward import RewardModel

    model_dir = save_tiny_model("gpt2", tmp_path / "tiny")
    with open(model_dir / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=f"cannot load model '{model_dir}': .*header"):
        load_causal_lm(model_dir)
    with pytest.raises(UserError, match=f"cannot load a backbone from '{model_dir}': .*header"):
        RewardModel.from_causal_lm(model_dir)
    reward_dir = tmp_path / "rm"
    RewardModel.from_causal_lm(save_tiny_model("gpt2", tmp_path / "tiny2")).save_pretrained(reward_dir)
    with open(reward_dir / "reward_head.safetensors", "r+b") as f:
        f.truncate(20)
    with pytest.raises(UserError, match=f"cannot load the reward model '{reward_dir}': .*header"):
        RewardModel.from_pretrained(reward_dir)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_folder_without_its_tokenizer_is_one_line(tmp_path, arch):
    """A checkpoint copied without its tokenizer files: transformers 5 failed on Llama and Mistral folders with
    "Couldn't instantiate the backend tokenizer from one of:" (and a word of sentencepiece), and on a Gemma folder
    built a tokenizer of five tokens that read every word as <unk>, which SFT would have trained on."""
    from instructrl.errors import UserError

    folder = tmp_path / arch
    AutoModelForCausalLM.from_config(tiny_model_config(arch, vocab_size=64, eos_id=0)).save_pretrained(folder)
    with pytest.raises(UserError, match=re.escape(f"tokenizer '{folder}' has no vocabulary file; is its tokenizer saved there")):
        load_tokenizer(folder)


def test_a_tokenizer_alone_is_no_model(tmp_path):
    """A run's pretrain/tokenizer given as a model: transformers said its config.json, which there is none of, lacks a model_type."""
    from instructrl.errors import UserError
    from instructrl.models.reward import RewardModel

    folder = tmp_path / "tokenizer"
    tiny_tokenizer("none", template=False).save_pretrained(folder)
    for load in (load_causal_lm, RewardModel.from_causal_lm):
        with pytest.raises(UserError, match=re.escape(f"model '{folder}' is a tokenizer alone, not a model (no config.json)")):
            load(folder)
    assert load_tokenizer(folder).eos_token is not None  # still a tokenizer


def test_a_chat_template_that_is_not_valid_jinja_is_refused_as_the_model_loads(tmp_path):
    """A chat_template.jinja edited by hand: every conversation failed on it, each named as the one at fault (SFT's
    first demonstration; every chat request to the server, answered 400). One that refuses some conversations loads."""
    from instructrl.errors import UserError

    tokenizer = tiny_tokenizer("none", template=True)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor"
    tokenizer.save_pretrained(tmp_path / "broken")
    for for_chat in (True, False):  # serving too
        with pytest.raises(UserError, match=re.escape(f"the chat template of '{tmp_path / 'broken'}' is not valid Jinja (line 1: ")):
            load_tokenizer(tmp_path / "broken", for_chat=for_chat)
    tokenizer.chat_template = "{{ raise_exception('a conversation starts with a system turn') }}"
    tokenizer.save_pretrained(tmp_path / "strict")
    assert load_tokenizer(tmp_path / "strict").chat_template == tokenizer.chat_template


def test_weights_of_other_shapes_than_the_config_gives_are_one_line(tmp_path):
    """A config.json edited, or copied from another model: transformers 5 raised a RuntimeError that points at
    a report it logs, hidden under the CLI's quiet libraries, so the user saw a traceback and no reason."""
    from instructrl.errors import UserError
    from instructrl.models.reward import RewardModel

    model_dir, classifier_dir = save_tiny_model("llama", tmp_path / "tiny"), save_tiny_classifier(tmp_path / "classifier")
    for folder in (model_dir, classifier_dir):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    shapes = "its weights do not have the shapes its config.json gives"
    with pytest.raises(UserError, match=re.escape(f"cannot load model '{model_dir}': {shapes}")):
        load_causal_lm(model_dir)
    with pytest.raises(UserError, match=re.escape(f"cannot load a backbone from '{model_dir}': {shapes}")):
        RewardModel.from_causal_lm(model_dir)
    with pytest.raises(UserError, match=re.escape(f"cannot load the reward model '{classifier_dir}': {shapes}")):
        RewardModel.from_pretrained(classifier_dir)


def test_examples_longer_than_the_context_or_max_length_are_skipped(tmp_path):
    """GPT-2's learned positions stop at n_positions (128 here): SFT and RM skip and count longer
    examples instead of failing inside the model; a max_length above the context is refused."""
    from instructrl.errors import UserError
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    model_dir = save_tiny_model("gpt2", tmp_path / "tiny")
    data = user_data(tmp_path / "data")
    long = " ".join(["cat dog"] * 80)  # well over 128 tokens
    with data["sft"].open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Say it all."}, {"role": "assistant", "content": long}]}) + "\n")
        f.write(json.dumps({"prompt": "Say nothing.", "completion": " "}) + "\n")  # line 34: an empty answer, warned of
    with data["rm"].open("a") as f:
        f.write(json.dumps({"prompt": "Say cat.", "chosen": "cat", "rejected": long}) + "\n")
        f.write(json.dumps({"prompt": "Say dog.", "chosen": "dog", "rejected": "dog"}) + "\n")  # a tie: nothing to learn
    run = tmp_path / "run"
    said = []
    overrides = [f"run.dir={run}", f"sft.model={model_dir}", f"sft.data={data['sft']}", "sft.epochs=1",
                 f"rm.model={run / 'sft' / 'final'}", f"rm.data={data['rm']}", f"rm.demonstrations={data['sft']}", "rm.heldout_fraction=0"]
    with pytest.raises(UserError, match=r"sft.max_length = 4096 exceeds the model's context length \(128 tokens\)"):
        run_sft(load_config(SMOKE, overrides + ["sft.max_length=4096"]), log=said.append)
    assert not (run / "sft").exists()

    config = load_config(SMOKE, overrides)
    run_sft(config, log=said.append)
    assert any("sft: 33 demonstrations" in line and "(1 longer than 128 tokens skipped)" in line for line in said)
    assert f"sft: warning: 1 demonstration of {data['sft']} has an empty answer (first at {data['sft']}:34)" in "\n".join(said)
    run_rm(config, log=said.append)
    assert any("rm: 33 comparisons" in line and "1 with a response longer than 128 tokens skipped" in line
               and "1 with every response tied" in line and "steps on 1 process," in line for line in said)
    assert any("the 33 demonstrations" in line and "1 longer than 128 tokens left out" in line for line in said)

    # a tighter cap of the user's own: only the prompt and a word fit
    with pytest.raises(UserError, match=r"prefs.jsonl: no comparison has every response within 4 tokens \(rm.max_length\)"):
        run_rm(load_config(SMOKE, overrides + [f"run.dir={tmp_path / 'run2'}", "rm.max_length=4"]), log=said.append)


def test_a_reward_model_trained_elsewhere_as_a_sequence_classifier_drives_ppo(tmp_path):
    """TRL's RewardTrainer and OpenRLHF save a reward model as AutoModelForSequenceClassification
    with one label: it loads as a RewardModel scoring what the classifier scores, and PPO runs on it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from instructrl.errors import UserError
    from instructrl.models.reward import RewardModel
    from instructrl.stages.ppo import run_ppo

    policy = save_tiny_model("llama", tmp_path / "policy")  # PAD = EOS: instructrl adds a PAD of its own
    tokenizer = AutoTokenizer.from_pretrained(policy)
    config = AutoConfig.from_pretrained(policy, num_labels=1, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    rm = RewardModel.from_pretrained(tmp_path / "rm")
    texts = [tokenizer(t)["input_ids"] for t in ("User: Say cat.\n\nAssistant: cat", "Say dog.")]
    width = max(map(len, texts))
    ids = torch.tensor([t + [tokenizer.eos_token_id] * (width - len(t)) for t in texts])  # right-padded, as HF reads it
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
    with torch.no_grad():
        assert torch.allclose(rm(ids, mask), classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1), atol=1e-5)
    assert rm.backbone.get_input_embeddings().weight.shape[0] == len(load_tokenizer(tmp_path / "rm"))  # a row for the added PAD

    data = user_data(tmp_path / "data")
    run_ppo(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"ppo.policy={policy}", f"ppo.reward_model={tmp_path / 'rm'}",
                                f"ppo.prompts={data['prompts']}", "ppo.ptx_coef=0", "ppo.episodes=32"]), log=lambda *_: None)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["check/first_ratio"] == 1.0 for m in metrics)
    assert RewardModel.from_pretrained(tmp_path / "run" / "ppo" / "value")  # the value model, initialised from it, saved as instructrl's

    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(policy, num_labels=3)).save_pretrained(tmp_path / "three")
    tokenizer.save_pretrained(tmp_path / "three")
    with pytest.raises(UserError, match="a sequence classifier with 3 labels; a reward model gives one score"):
        RewardModel.from_pretrained(tmp_path / "three")
    with pytest.raises(UserError, match=r"is not a reward model checkpoint: no reward_head.safetensors .*LlamaForCausalLM"):
        RewardModel.from_pretrained(policy)
