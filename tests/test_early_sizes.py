"""Lengths and counts the config decides are refused before the pipeline's first stage, in the stages' words.

Before, each was refused by its stage once the stages before it had trained: sft.max_length and
sft.max_new_tokens after pretrain, collect.max_new_tokens after SFT, rm.max_length after collect, the PPO
ones after the RM, eval.max_new_tokens after every stage (some 12 minutes on the default config)."""

from __future__ import annotations

import pytest
from conftest import SMOKE, cli
from tiny_models import save_tiny_model

from instructrl.config import load_config
from instructrl.errors import UserError
from instructrl.pipeline import run_pipeline
from instructrl.pipeline.checks import check_lengths

ALL_SECTIONS = ("pretrain", "sft", "rm", "ppo")

# the smoke model's context is model.max_length = 128 tokens; its world has 400 * 31 // 77 = 161 PPO prompts
REFUSED = {
    "sft.max_length=200": r"config: sft.max_length = 200 exceeds the model's context length \(128 tokens\)",
    "rm.max_length=129": r"config: rm.max_length = 129 exceeds the model's context length \(128 tokens\)",
    "sft.max_new_tokens=128": r"sft.max_new_tokens = 128: any prompt and 128 new tokens exceed the model's context length \(128 tokens\)",
    "collect.max_new_tokens=300": r"collect.max_new_tokens = 300: any prompt and 300 new tokens exceed the model's context length \(128 tokens\)",
    "ppo.max_new_tokens=128": r"ppo.max_new_tokens = 128: any prompt and 128 new tokens exceed the model's context length \(128 tokens\)",
    "eval.max_new_tokens=200": r"eval.max_new_tokens = 200: any prompt and 200 new tokens exceed the model's context length \(128 tokens\)",
    "ppo.rollout_batch_size=168": r"ppo_ptx: the built-in world's PPO split has 161 prompts, fewer than one rollout batch "
                                  r"\(ppo.rollout_batch_size = 168\); add prompts or lower ppo.rollout_batch_size",
}


@pytest.mark.parametrize("override", REFUSED)
def test_a_length_the_config_rules_out_is_refused_before_the_first_stage(tmp_path, override):
    extra = ["ppo.episodes=168"] if "rollout" in override else []  # a whole number of rollout batches, so this is what is refused
    with pytest.raises(UserError, match=rf"^{REFUSED[override]}$"):
        run_pipeline(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", override, *extra]), log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # no pretrain/, no world/


def test_the_smoke_config_and_two_rounds_are_not_refused():
    for overrides in ([], ["pipeline.rounds=2"], ["sft.max_length=128", "rm.max_length=128", "sft.max_new_tokens=127",
                                                  "collect.max_new_tokens=127", "ppo.max_new_tokens=127", "eval.max_new_tokens=127",
                                                  "ppo.rollout_batch_size=161"]):
        check_lengths(load_config(SMOKE, overrides), ALL_SECTIONS)


def test_a_stage_that_will_not_train_is_not_asked():
    check_lengths(load_config(SMOKE, ["sft.max_length=200", "rm.max_length=200", "ppo.max_new_tokens=128"]), ("pretrain",))


def test_a_user_models_context_is_read_from_its_config_json(tmp_path):
    """The own model's context is 256 here; the given model's config.json says 128, and the stage says the same."""
    model = save_tiny_model("gpt2", tmp_path / "gpt2")  # 128 positions
    overrides = ["model.max_length=256", f"sft.model={model}", "sft.max_length=200"]
    with pytest.raises(UserError) as early:
        run_pipeline(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", *overrides]), log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    alone = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'alone'}", *overrides, check=False)  # the stage run by itself
    assert alone.returncode == 2 and f"error: {early.value}" in alone.stderr, alone.stderr
    assert str(early.value) == "config: sft.max_length = 200 exceeds the model's context length (128 tokens)"
    # the models after SFT are its own: the RM, collect and PPO learn its context from it
    for key in ("rm.max_length=200", "collect.max_new_tokens=128", "ppo.max_new_tokens=128", "eval.max_new_tokens=128"):
        with pytest.raises(UserError, match=r"\(128 tokens\)$"):
            check_lengths(load_config(SMOKE, ["model.max_length=256", f"sft.model={model}", key]), ALL_SECTIONS)
    # a model given by hub name is left to its stage (its config may need a download); so is one yet to be trained
    check_lengths(load_config(SMOKE, ["model.max_length=256", "sft.model=gpt2", "sft.max_length=200"]), ALL_SECTIONS)
    check_lengths(load_config(SMOKE, [f"eval.models.sft={tmp_path / 'run' / 'sft' / 'final'}", "eval.max_new_tokens=200"]), ALL_SECTIONS)
    with pytest.raises(UserError, match=r"^eval.max_new_tokens = 128: .*\(128 tokens\)$"):
        check_lengths(load_config(SMOKE, ["model.max_length=256", f"eval.models.mine={model}", "eval.max_new_tokens=128"]), ALL_SECTIONS)


def test_a_later_rounds_collect_samples_the_ppo_policy(tmp_path):
    """Round 2's collect ranks the answers of round 1's PPO policy, so its context counts too."""
    short = save_tiny_model("gpt2", tmp_path / "gpt2")  # 128 positions; the own models' are 256
    overrides = ["model.max_length=256", f"ppo.policy={short}", "collect.max_new_tokens=200", "ppo.max_new_tokens=8"]
    check_lengths(load_config(SMOKE, overrides), ALL_SECTIONS)
    with pytest.raises(UserError, match=r"^collect.max_new_tokens = 200: .*\(128 tokens\)$"):
        check_lengths(load_config(SMOKE, [*overrides, "pipeline.rounds=2"]), ALL_SECTIONS)


def test_too_few_prompts_in_a_users_file_are_refused_before_the_first_stage(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Say {w}."}}\n' for w in ("cat", "dog", "owl")))
    config = load_config(SMOKE, [f"ppo.prompts={prompts}", "ppo.ptx_coef=0"])
    with pytest.raises(UserError, match=rf"^ppo: {prompts} has 3 prompts, fewer than one rollout batch \(ppo.rollout_batch_size = 16\)"):
        check_lengths(config, ALL_SECTIONS)
    check_lengths(load_config(SMOKE, [f"ppo.prompts={tmp_path / 'prompts.csv'}", "ppo.ptx_coef=0"]), ALL_SECTIONS)  # no quick count: its stage tells


def test_the_pipeline_exits_2_with_one_line(tmp_path):
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", "eval.max_new_tokens=200", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: eval.max_new_tokens = 200: any prompt and 200 new tokens exceed the model's context length (128 tokens)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_a_models_config_gives_the_context_its_model_does(tmp_path, arch):
    """model_config reads config.json alone; a vision-language model's context is its language model's (text_config)."""
    from instructrl.models.base import base_model_config, context_length, load_causal_lm, model_config

    folder = save_tiny_model(arch, tmp_path / arch)
    assert context_length(model_config(str(folder))) == context_length(load_causal_lm(folder)) == 128
    assert model_config("gpt2") is None and model_config(str(tmp_path / "missing")) is None
    for own in ("gpt2", "llama"):
        assert context_length(base_model_config(load_config(SMOKE, [f"model.arch={own}", "model.max_length=96"]).model)) == 96
