"""The reward model reads each sequence's reward at its last real token, saves with one call, and
loads from a folder or by hub name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SMOKE, cli
from safetensors.torch import load_file
from tiny_models import into_hub_cache, newer_hub_commit, save_tiny_classifier, save_tiny_model, tiny_tokenizer, user_data
from transformers import AutoModelForCausalLM, LlamaConfig

from instructrl.data.chat import response_ids
from instructrl.data.records import ComparisonRecord
from instructrl.errors import UserError
from instructrl.evaluation.evaluate import RewardJudge
from instructrl.models.reward import RewardModel, score_responses
from instructrl.padding import pad_sequences
from instructrl.stages.rm import encode_comparison


def tiny_reward_model(tmp_path, vocab_size: int = 50) -> RewardModel:
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64, vocab_size=vocab_size, pad_token_id=0, eos_token_id=1)
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


def test_a_reloaded_reward_model_is_in_eval_mode_as_transformers_loads_models(tmp_path):
    tiny_reward_model(tmp_path).save_pretrained(tmp_path / "rm")
    again = RewardModel.from_pretrained(tmp_path / "rm")
    assert [name or "the model" for name, module in again.named_modules() if module.training] == []


def test_a_missing_reward_model_folder_is_named_as_missing(tmp_path):
    with pytest.raises(UserError, match=r"reward model '.*nope' does not exist"):
        RewardModel.from_pretrained(tmp_path / "nope")


@torch.no_grad()
def test_score_responses_scores_each_pair_as_the_rm_stage_encodes_it(tmp_path):
    tokenizer = tiny_tokenizer(pad="eos", template=True)
    model = tiny_reward_model(tmp_path, vocab_size=len(tokenizer)).eval()
    prompt = [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"}, {"role": "user", "content": "Say dog."}]
    responses = ["dog", "Sure! dog dog dog, owl and yak.", ""]  # three lengths: the batch is padded
    record = ComparisonRecord(id="1", prompt=prompt, responses=responses, ranks=[0, 1, 2], labeler_id="test")
    encoded = encode_comparison(tokenizer, record)
    assert encoded == [response_ids(tokenizer, prompt, r) for r in responses] and all(s[-1] == tokenizer.eos_token_id for s in encoded)
    alone = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in encoded]
    assert score_responses(model, tokenizer, [prompt] * 3, responses) == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ValueError):  # a response without its conversation is a mistake, not a shorter batch
        score_responses(model, tokenizer, [prompt], responses)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no Hub (HF_HUB_OFFLINE), in this process and the CLI's."""
    from huggingface_hub import constants

    from instructrl.models.base import _hub_reachable

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when huggingface_hub was imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _hub_reachable.cache_clear()
    yield cache
    _hub_reachable.cache_clear()


@torch.no_grad()
def test_a_reward_model_loads_by_hub_name_from_the_cache(tmp_path, offline_hub):
    # ppo.reward_model=Skywork/Skywork-Reward-V2-Qwen3-0.6B was "reward model '...' does not exist", as any name but a folder's
    from instructrl.models.base import load_tokenizer

    tokenizer = load_tokenizer(save_tiny_model("llama", tmp_path / "lm"))  # with the PAD it adds, as the RM stage saves it
    model = RewardModel.from_causal_lm(tmp_path / "lm", tokenizer)
    model.reward_bias.fill_(-0.25)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    into_hub_cache(tmp_path / "rm", offline_hub, "org/instructrl-rm")  # one of ours, pushed to the Hub
    into_hub_cache(save_tiny_classifier(tmp_path / "classifier"), offline_hub, "org/classifier-rm")  # TRL's, OpenRLHF's

    ids, mask = pad_sequences(SEQUENCES, pad_id=0, side="left")
    for name, folder in (("org/instructrl-rm", tmp_path / "rm"), ("org/classifier-rm", tmp_path / "classifier")):
        assert torch.equal(RewardModel.from_pretrained(name)(ids, mask), RewardModel.from_pretrained(folder)(ids, mask)), name
    # eval.reward_model: the judge reads the answers with the tokenizer of the same name
    prompt = [{"role": "user", "content": "Say cat."}]
    assert RewardJudge("org/instructrl-rm").score([prompt] * 2, ["cat", "dog"]) == RewardJudge(str(tmp_path / "rm")).score([prompt] * 2, ["cat", "dog"])


def test_a_reward_model_name_neither_cached_nor_reachable_is_one_line(offline_hub):
    with pytest.raises(UserError, match=r"^reward model 'org/absent' is not a folder under .*, not in the Hugging Face cache, "
                                        r"and the Hub cannot be reached to download it$"):
        RewardModel.from_pretrained("org/absent")


@pytest.mark.parametrize("stage, key", [("ppo", "ppo.reward_model"), ("ppo", "ppo.value_model"), ("eval", "eval.reward_model")])
def test_an_uncached_reward_model_name_offline_names_its_role(tmp_path, offline_hub, stage, key):
    # the reward model's tokenizer is loaded first, and the line named it: "ppo.reward_model: tokenizer 'org/absent' ..."
    policy = save_tiny_model("llama", tmp_path / "policy")
    into_hub_cache(save_tiny_classifier(tmp_path / "classifier"), offline_hub, "org/classifier-rm")  # the policy's tokenizer
    models = {"ppo": [f"ppo.policy={policy}", "ppo.reward_model=org/classifier-rm"], "eval": [f"eval.models={{sft: {policy}}}"]}[stage]
    proc = cli(stage, "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", *models, f"{key}=org/absent", cwd=tmp_path, check=False)
    role = "value model" if key == "ppo.value_model" else "reward model"
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        f"error: {key}: {role} 'org/absent' is not a folder under {tmp_path}, not in the Hugging Face cache, "
        "and the Hub cannot be reached to download it"), proc.stderr


def test_ppo_takes_a_reward_model_by_hub_name(tmp_path, offline_hub):
    policy = save_tiny_model("llama", tmp_path / "policy")  # the classifier's tokenizer, as PPO requires
    snapshot = into_hub_cache(save_tiny_classifier(tmp_path / "classifier"), offline_hub, "org/classifier-rm")
    data = user_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ("ppo", "-c", str(SMOKE), f"run.dir={run_dir}", f"ppo.policy={policy}", "ppo.reward_model=org/classifier-rm",
            f"ppo.prompts={data['prompts']}", "ppo.ptx_coef=0", "ppo.episodes=32")
    cli(*args, cwd=tmp_path)
    assert RewardModel.from_pretrained(run_dir / "ppo" / "value")  # the value model, started from it
    lineage = json.loads((run_dir / "ppo" / "lineage.json").read_text())["inputs"]
    for key in ("reward_model", "value_model"):  # the name as given, not a folder of that name under the working directory
        assert lineage[key] == {"path": "org/classifier-rm", "commit": snapshot.name, "sha256": None, "stamp": None}
    # the repository updated since, as a changed folder would be: refused, not skipped as complete; its model card alone changes nothing
    newer_hub_commit(offline_hub, "org/classifier-rm", "b" * 40, {"README.md": b"a model card"})
    assert "complete with this config and inputs; nothing to do" in cli(*args, cwd=tmp_path).stderr
    other = (save_tiny_classifier(tmp_path / "other", seed=2) / "model.safetensors").read_bytes()
    newer_hub_commit(offline_hub, "org/classifier-rm", "c" * 40, {"model.safetensors": other})
    proc = cli(*args, cwd=tmp_path, check=False)
    changed = f"org/classifier-rm: commit {snapshot.name[:12]}, now cccccccccccc in the Hugging Face cache"
    assert proc.returncode == 2 and f"finished on inputs that have changed since: reward_model ({changed}), value_model ({changed})" in proc.stderr


def test_an_interrupted_run_on_a_hub_name_is_not_resumed_on_other_weights(tmp_path, offline_hub):
    # lineage.json held the name alone: a run resumed after the repository was updated went on with other weights, silently
    from instructrl.config import load_config
    from instructrl.rundir.run import RunDir

    into_hub_cache(save_tiny_classifier(tmp_path / "rm"), offline_hub, "org/rm")
    config = load_config(overrides=[f"run.dir={tmp_path / 'run'}"])
    (tmp_path / "run" / "ppo").mkdir(parents=True)
    RunDir(config, "ppo", ("run",)).write_lineage({"reward_model": "org/rm"})  # the interrupted run's record
    newer_hub_commit(offline_hub, "org/rm", "b" * 40, {"README.md": b"a model card"})
    RunDir(config, "ppo", ("run",)).write_lineage({"reward_model": "org/rm"})  # resumed: the same weights
    assert json.loads((tmp_path / "run" / "ppo" / "lineage.json").read_text())["inputs"]["reward_model"]["commit"] == "b" * 40
    newer_hub_commit(offline_hub, "org/rm", "c" * 40, {"model.safetensors": b"other weights"})
    with pytest.raises(UserError, match=r"holds an unfinished run begun on inputs that have changed since: "
                                        r"reward_model \(org/rm: commit bbbbbbbbbbbb, now cccccccccccc in the Hugging Face cache\); pass --restart"):
        RunDir(config, "ppo", ("run",)).write_lineage({"reward_model": "org/rm"})
    shutil.rmtree(offline_hub / "models--org--rm")  # no longer cached: not compared, as a folder no longer there is not
    assert RunDir(config, "ppo", ("run",)).changed_inputs() == []


@pytest.mark.parametrize("reachable", [False, True])
def test_a_reward_model_by_hub_name_is_refused_where_a_policy_is_loaded(tmp_path, monkeypatch, offline_hub, reachable):
    # ppo.policy=org/rm (sft.model, eval's models, serve, chat): only a folder was looked into, so a hub name's
    # backbone loaded with an untrained LM head and answered gibberish, silently
    from instructrl.models import base

    RewardModel.from_causal_lm(save_tiny_model("llama", tmp_path / "lm")).save_pretrained(tmp_path / "rm")
    into_hub_cache(tmp_path / "rm", offline_hub, "org/instructrl-rm")
    into_hub_cache(tmp_path / "lm", offline_hub, "org/policy")
    monkeypatch.setattr(base, "_hub_reachable", lambda: reachable)  # reachable: refused before transformers asks the Hub
    with pytest.raises(UserError, match=r"^model 'org/instructrl-rm' is a reward model \(it holds reward_head.safetensors\), not a policy"):
        base.load_causal_lm("org/instructrl-rm")
    if not reachable:
        assert base.load_causal_lm("org/policy")


def test_a_cached_model_loads_at_once_where_the_hub_cannot_be_reached(tmp_path, monkeypatch, offline_hub):
    # HF_HUB_OFFLINE unset on a machine without internet access: the hub client retried each file for two minutes
    import socket

    from huggingface_hub import constants
    from ports import free_port

    from instructrl.models.base import _hub_reachable, load_causal_lm, load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    _hub_reachable.cache_clear()
    assert not _hub_reachable()

    def connect(address, *args, **kwargs):
        raise AssertionError(f"a connection to {address} after the Hub was found unreachable")

    monkeypatch.setattr(socket, "create_connection", connect)
    into_hub_cache(save_tiny_model("llama", tmp_path / "policy"), offline_hub, "org/policy")
    into_hub_cache(save_tiny_classifier(tmp_path / "classifier"), offline_hub, "org/classifier-rm")
    assert load_tokenizer("org/policy").get_vocab() == load_tokenizer("org/classifier-rm").get_vocab()
    assert load_causal_lm("org/policy") and RewardModel.from_pretrained("org/classifier-rm")
    assert RewardModel.from_causal_lm("org/policy")  # rm.model


@torch.no_grad()
def test_a_reward_model_is_downloaded_with_only_the_files_it_loads(tmp_path, monkeypatch, offline_hub):
    # a repository may hold its weights twice (.bin beside .safetensors, Mistral's consolidated file) and other frameworks' too
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from instructrl.models import base

    repos = {"org/both": save_tiny_classifier(tmp_path / "both"), "org/bin-only": save_tiny_classifier(tmp_path / "bin-only")}
    weights = load_file(tmp_path / "both" / "model.safetensors")
    for repo in repos.values():
        torch.save(weights, repo / "pytorch_model.bin")
        (repo / "onnx").mkdir()
        (repo / "onnx" / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "both" / "consolidated.safetensors").write_bytes(b"mistral")
    (tmp_path / "bin-only" / "model.safetensors").unlink()

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, local_files_only=False):  # the Hub, in tmp_path
        snapshot = offline_hub / repo_id / "snapshot"
        files = [str(f.relative_to(repos[repo_id])) for f in repos[repo_id].rglob("*") if f.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes((repos[repo_id] / name).read_bytes())
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(base, "_hub_reachable", lambda: True)
    ids, mask = pad_sequences(SEQUENCES, pad_id=0, side="left")
    expected = RewardModel.from_pretrained(tmp_path / "both")(ids, mask)
    for name, weights_file in (("org/both", "model.safetensors"), ("org/bin-only", "pytorch_model.bin")):
        assert torch.equal(RewardModel.from_pretrained(name)(ids, mask), expected), name
        fetched = {f.name for f in (offline_hub / name / "snapshot").rglob("*")}
        assert weights_file in fetched and not fetched & {"consolidated.safetensors", "onnx", "model.onnx"} and len(fetched & {"model.safetensors", "pytorch_model.bin"}) == 1
