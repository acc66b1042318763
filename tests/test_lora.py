"""LoRA (peft): SFT, RM and PPO train adapters only, PPO's reference is the policy with its
adapter off (one base model), and every checkpoint is a merged full model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import SMOKE
from safetensors.torch import load_file
from tiny_models import save_tiny_model, user_data
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from instructrl.config import LoRAConfig, load_config
from instructrl.errors import UserError
from instructrl.serve.loading import load_engine
from instructrl.data.chat import render_ids
from instructrl.models.base import load_causal_lm, load_tokenizer, parameter_bytes
from instructrl.models.lora import adapter_disabled, add_lora, merged_state_dict, save_full


def test_merged_checkpoint_computes_what_the_adapter_model_computes(tmp_path):
    model_dir = save_tiny_model("qwen2", tmp_path / "qwen2")
    tokenizer = load_tokenizer(model_dir)
    base = load_causal_lm(model_dir, tokenizer=tokenizer)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_lora(base, LoRAConfig(enabled=True, r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # a non-zero update (B starts at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([tokenizer("Say cat.").input_ids])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with adapter_disabled(model):
            reference = model(input_ids=ids).logits
    assert not torch.allclose(adapted, reference)
    # the base model with the adapter off is the untouched original
    with torch.no_grad():
        assert torch.allclose(reference, load_causal_lm(model_dir, tokenizer=tokenizer)(input_ids=ids).logits, atol=1e-5)
    save_full(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").is_file()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)
    assert set(merged_state_dict(model)) == set(original)


def test_sft_rm_ppo_with_lora(tmp_path):
    from instructrl.stages.ppo import run_ppo
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    model_dir, data, run = save_tiny_model("llama", tmp_path / "llama"), user_data(tmp_path / "data"), tmp_path / "run"
    config = load_config(SMOKE, [
        f"run.dir={run}", f"sft.model={model_dir}", f"sft.data={data['sft']}", "sft.lora.enabled=true", "sft.lr=1e-2",
        f"rm.model={run / 'sft' / 'final'}", f"rm.data={data['rm']}", f"rm.demonstrations={data['sft']}", "rm.lora.enabled=true",
        f"ppo.policy={run / 'sft' / 'final'}", f"ppo.reward_model={run / 'rm' / 'final'}", f"ppo.prompts={data['prompts']}",
        f"ppo.ptx_data={data['text']}", "ppo.episodes=32", "ppo.lora.enabled=true", "ppo.lora.r=2", "ppo.lr=1e-2",
    ])
    quiet = lambda *_: None  # noqa: E731
    sft = run_sft(config, log=quiet)
    before, after = load_file(model_dir / "model.safetensors"), load_file(sft / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)  # the merged update is in the weights
    assert (sft / "adapter" / "adapter_model.safetensors").is_file()
    assert AutoConfig.from_pretrained(sft).attention_dropout == 0.0  # the model's own, not sft.dropout's 0.1
    # peft's way back, as the README gives it: the user's base model, grown to the tokenizer saved with the adapter (a PAD was added)
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(sft / "adapter")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter holds the grown embeddings
    adapted = PeftModel.from_pretrained(base, sft / "adapter").eval()
    ids = torch.tensor([render_ids(tokenizer, [{"role": "user", "content": "Say cat."}], add_generation_prompt=True)])
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, AutoModelForCausalLM.from_pretrained(sft).eval()(input_ids=ids).logits, atol=1e-5)
    # the adapter folder given where a model is expected (to serve, say) names the merged model beside it
    with pytest.raises(UserError, match=f"model '{sft / 'adapter'}' is a LoRA adapter, not a model: give the merged model beside it, {sft}$"):
        load_engine(str(sft / "adapter"))
    rm = run_rm(config, log=quiet)
    assert (rm / "reward_head.safetensors").is_file() and (rm / "adapter").is_dir()
    ppo = run_ppo(config, log=quiet)
    metrics = [json.loads(line) for line in (run / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]
    # iteration 1 samples from the policy whose adapter is still a no-op: the reference (adapter off) agrees exactly
    assert metrics[0]["rollout/kl"] == 0.0 and metrics[-1]["rollout/kl"] != 0.0
    full = load_config(SMOKE, [f"run.dir={tmp_path / 'full'}", f"ppo.policy={sft}", f"ppo.reward_model={rm}", f"ppo.prompts={data['prompts']}",
                               f"ppo.ptx_data={data['text']}", "ppo.episodes=16"])
    run_ppo(full, log=quiet)
    [full_metrics] = [json.loads(line) for line in (tmp_path / "full" / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]
    # one base model instead of two (policy + reference), and adapter-sized optimizer state
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    sft_model = AutoModelForCausalLM.from_pretrained(sft)
    base_mb = parameter_bytes(sft_model) / 2**20
    saved = full_metrics["memory/parameters_mb"] - metrics[0]["memory/parameters_mb"]
    assert 0.8 * base_mb < saved < base_mb  # the reference's copy, less the adapters' few parameters
    assert metrics[0]["memory/optimizer_state_mb"] < 0.5 * full_metrics["memory/optimizer_state_mb"]
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft_model.parameters()))
    # the PPO adapter belongs to the SFT model it started from, as the README says (not the user's base model)
    assert json.loads((ppo / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft)
    with torch.no_grad():
        assert torch.allclose(PeftModel.from_pretrained(sft_model, ppo / "adapter").eval()(input_ids=ids).logits,
                              policy.eval()(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("targets, message", [
    ("[]", "name at least one module, or give all-linear"),
    ("[all-linear,q_proj]", "all-linear already adapts every linear layer; give it alone"),
])
def test_target_modules_config_is_one_way_to_choose(targets, message):
    with pytest.raises(UserError, match=rf"override 'sft.lora.target_modules={re.escape(targets)}': bad value for 'sft.lora.target_modules': {message}"):
        load_config(SMOKE, [f"sft.lora.target_modules={targets}"])


def test_target_modules_may_be_one_string_as_peft_takes_them(tmp_path):
    # `target_modules: all-linear` (peft's spelling) was refused as "Input should be a valid list"
    path = tmp_path / "lora.yaml"
    path.write_text("sft:\n  lora:\n    target_modules: all-linear\n")
    config = load_config(path, ["rm.lora.target_modules=q_proj, v_proj"])
    assert (config.sft.lora.target_modules, config.rm.lora.target_modules) == (["all-linear"], ["q_proj", "v_proj"])


@pytest.mark.parametrize("target, found", [
    ("nonexistent", "'nonexistent' names no module of the model"),
    ("mlp", "'mlp' names LlamaMLP modules, which LoRA cannot wrap"),
    ("norm", "'norm' names LlamaRMSNorm modules, which LoRA cannot wrap"),
])
def test_a_target_module_lora_cannot_use_is_one_line_before_the_run_folder_is_written(tmp_path, target, found):
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    model_dir, data, run = save_tiny_model("llama", tmp_path / "llama"), user_data(tmp_path / "data"), tmp_path / "run"
    config = load_config(SMOKE, [f"run.dir={run}", f"sft.model={model_dir}", f"sft.data={data['sft']}", "sft.lora.enabled=true",
                                 f"sft.lora.target_modules=[{target}]", f"rm.model={model_dir}", f"rm.data={data['rm']}",
                                 "rm.lora.enabled=true", f"rm.lora.target_modules=[{target}]"])
    layers = "down_proj, embed_tokens, gate_proj, k_proj, {}o_proj, q_proj, up_proj, v_proj (or give all-linear)"
    with pytest.raises(UserError, match=re.escape(f"sft.lora.target_modules: {found}; its linear and embedding layers are {layers.format('lm_head, ')}")):
        run_sft(config, log=lambda *_: None)
    with pytest.raises(UserError, match=re.escape(f"rm.lora.target_modules: {found}; its linear and embedding layers are {layers.format('')}")):
        run_rm(config, log=lambda *_: None)
    assert not (run / "sft").exists() and not (run / "rm").exists()


def _tiny_ppo_config(tmp_path, *overrides: str):
    """PPO with LoRA from a tiny Llama and a reward model on its backbone (untrained: nothing is learnt)."""
    from instructrl.models.reward import RewardModel

    model_dir, data = save_tiny_model("llama", tmp_path / "llama"), user_data(tmp_path / "data")
    tokenizer = load_tokenizer(model_dir)
    RewardModel.from_causal_lm(model_dir, tokenizer).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"ppo.policy={model_dir}", f"ppo.reward_model={tmp_path / 'rm'}",
                               f"ppo.prompts={data['prompts']}", f"ppo.ptx_data={data['text']}", "ppo.episodes=16", "ppo.lora.enabled=true", *overrides])


def test_ppo_refuses_adapter_dropout_which_would_make_the_first_ratio_differ_from_one(tmp_path):
    # as the config loads (test_config), so before any stage runs
    with pytest.raises(UserError, match=r"bad value for 'ppo\.lora\.dropout': PPO runs every model without dropout.*; set it to 0 \(got 0\.1\)$"):
        _tiny_ppo_config(tmp_path, "ppo.lora.dropout=0.1")


def test_ppo_value_model_takes_the_targets_its_backbone_has(tmp_path):
    from instructrl.stages.ppo import run_ppo

    # the LM head is the policy's alone: the value model (a backbone and a scalar head) adapts q_proj only
    final = run_ppo(_tiny_ppo_config(tmp_path, "ppo.lora.target_modules=[q_proj,lm_head]"), log=lambda *_: None)
    targets = lambda folder: set(json.loads((folder / "adapter" / "adapter_config.json").read_text())["target_modules"])  # noqa: E731
    assert targets(final) == {"q_proj", "lm_head"} and targets(final.parent / "value") == {"q_proj"}
    with pytest.raises(UserError, match=r"^ppo\.lora\.target_modules \(on the value model's backbone\): 'lm_head' names no module of the model"):
        run_ppo(_tiny_ppo_config(tmp_path / "2", "ppo.lora.target_modules=[lm_head]"), log=lambda *_: None)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens", "q_proj"])
def test_an_adapter_on_a_tied_head_saves_a_model_whose_config_unties_it(tmp_path, target):
    from transformers import LlamaConfig
    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer("none", False)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                                        intermediate_size=64, vocab_size=len(tokenizer), tie_word_embeddings=True))
    model = add_lora(base, LoRAConfig(enabled=True, r=4, target_modules=[target]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([tokenizer("Say cat.").input_ids])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    save_full(model, tmp_path / "merged")
    tied = json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"]
    # a loader that ties head and embeddings by the config would otherwise drop the adapter's update of one of them
    assert tied is (target == "q_proj")
    assert model.get_base_model().config.tie_word_embeddings  # the model in training is left as it was
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


def test_lora_stages_log_how_many_parameters_train(tmp_path):
    from instructrl.stages.sft import run_sft

    model_dir, data = save_tiny_model("llama", tmp_path / "llama"), user_data(tmp_path / "data")
    config = load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"sft.model={model_dir}", f"sft.data={data['sft']}", "sft.lora.enabled=true", "sft.lora.r=2"])
    lines = []
    run_sft(config, log=lines.append)
    model = add_lora(load_causal_lm(model_dir, tokenizer=load_tokenizer(model_dir)), LoRAConfig(enabled=True, r=2))
    trainable, total = sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())
    assert any(line.endswith(f"; LoRA: {trainable:,} of {total:,} parameters train ({trainable / total:.2%})") for line in lines), lines
