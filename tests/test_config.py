"""Config loading and its error messages (config/), and the data order (training/data_order.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import SMOKE, cli

from instructrl.config import PipelineConfig, PretrainConfig, TrainConfig, load_config
from instructrl.errors import UserError
from instructrl.training.data_order import DataOrder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading


def test_the_shipped_default_yaml_is_the_code_defaults():
    # `make demo` runs configs/default.yaml, the README's commands run with no file: one run, not two that drift apart
    assert load_config(CONFIGS / "default.yaml") == load_config() == PipelineConfig()
    # and it lists every key, as its header says, in the order `instructrl config` prints them
    from instructrl.config import dump_config

    body = "".join(line for line in (CONFIGS / "default.yaml").read_text().splitlines(keepends=True) if not line.startswith("#"))
    assert body.strip() == dump_config(PipelineConfig()).strip()


def test_overrides_take_effect_and_are_coerced():
    config = load_config(overrides=["sft.lr=1e-4", "pretrain.epochs=2"])
    # YAML 1.1 reads '1e-4' (no dot) as a string; the field makes it the float 0.0001
    assert config.sft.lr == 0.0001 and type(config.sft.lr) is float
    assert config.pretrain.epochs == 2.0 and type(config.pretrain.epochs) is float
    # the other sections keep their defaults
    assert config.pretrain.lr == PretrainConfig().lr == 1e-3


def test_an_override_of_a_path_or_name_keeps_the_text_as_typed():
    # YAML reads 2024 and 1.10 as numbers (1.10 as 1.1) and 2024-01-01 as a date: "Input is not a valid path"
    config = load_config(overrides=["run.dir=2024", "sft.model=1.10", "ppo.prompts=2024-01-01", "ppo.ptx_coef=0", "eval.models={sft: /tmp/a}"])
    assert (config.run.dir, config.sft.model, config.ppo.prompts) == (Path("2024"), "1.10", Path("2024-01-01"))
    # a number's key still takes a number, and null is still the default
    config = load_config(overrides=["ppo.lr=1e-5", "run.seed=7", "sft.model=null"])
    assert (config.ppo.lr, config.run.seed, config.sft.model) == (1e-5, 7, None)


def test_none_on_the_command_line_is_null_where_a_key_takes_null():
    # YAML's null is null or ~; 'None' was a model named None, and eval.temperature=none "unable to parse string as a number"
    config = load_config(overrides=["sft.model=x", "sft.model=None", "eval.temperature=none"])
    assert (config.sft.model, config.eval.temperature) == (None, None)
    with pytest.raises(UserError, match="bad value for 'run.seed'"):  # a key that cannot be null still says so
        load_config(overrides=["run.seed=None"])


def test_yaml_then_override(tmp_path):
    path = write(tmp_path, "sft:\n  lr: 0.01\n  epochs: 3\n")
    config = load_config(path, overrides=["sft.lr=0.02"])
    # the override wins over the file; the file wins over the default (8.0)
    assert (config.sft.lr, config.sft.epochs) == (0.02, 3.0)


def test_empty_yaml_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == PipelineConfig()


# ---------------------------------------------------------------- errors


def test_unknown_override_key_is_named_with_a_suggestion():
    with pytest.raises(UserError) as err:
        load_config(overrides=["sft.lrr=1"])
    message = str(err.value)
    assert "'sft.lrr'" in message
    assert "did you mean 'sft.lr'" in message
    assert "override 'sft.lrr=1'" in message


def test_unknown_section_in_an_override_names_the_override():
    with pytest.raises(UserError) as err:
        load_config(overrides=["sfft.epochs=1"])
    assert "override 'sfft.epochs=1': unknown config key 'sfft' (did you mean 'sft'?)" in str(err.value)


def test_a_mapping_written_without_a_space_after_its_colon_says_so():
    # YAML reads {sft:/path} as a key 'sft:/path' with no value
    with pytest.raises(UserError) as err:
        load_config(overrides=["eval.models={sft:/tmp/a,ppo:/tmp/b}"])
    assert "needs a space after each colon" in str(err.value)
    assert load_config(overrides=["eval.models={sft: /tmp/a}"]).eval.models == {"sft": "/tmp/a"}


def test_a_mapping_key_given_one_value_says_how_a_mapping_is_written():
    with pytest.raises(UserError) as err:
        load_config(overrides=["eval.models=runs/x/sft/final"])
    assert str(err.value) == ("override 'eval.models=runs/x/sft/final': bad value for 'eval.models': "
                              "expected a mapping, written {name: value} (got 'runs/x/sft/final')")


def test_a_config_file_given_without_its_flag_says_to_use_c():
    with pytest.raises(UserError) as err:
        load_config(overrides=["configs/smoke.yaml"])
    assert str(err.value) == "override 'configs/smoke.yaml': expected KEY=VALUE, e.g. sft.lr=1e-4; a config file is given as -c configs/smoke.yaml"


def test_other_trainers_key_names_suggest_ours():
    # transformers' and TRL's names are too far from ours for a spelling match
    for key, ours in (("sft.learning_rate", "sft.lr"), ("ppo.cliprange", "ppo.clip"), ("rm.num_train_epochs", "rm.epochs")):
        with pytest.raises(UserError, match=f"did you mean '{ours}'"):
            load_config(overrides=[f"{key}=1"])


def test_a_key_given_without_its_section_names_the_sections_that_hold_it(tmp_path):
    # `instructrl sft lr=1e-4`: the key is right, its section is missing (an alias is resolved too)
    for override, hint in (("lr=1e-4", "pretrain.lr, sft.lr, rm.lr or ppo.lr"), ("learning_rate=1e-4", "pretrain.lr, sft.lr, rm.lr or ppo.lr"),
                           ("kl_coef=0.1", "ppo.kl_coef")):
        with pytest.raises(UserError) as err:
            load_config(overrides=[override])
        assert f"unknown config key '{override.partition('=')[0]}' (a key goes under its section: {hint})" in str(err.value)
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, "epochs: 2\n"))
    assert "config.yaml:1: unknown config key 'epochs' (a key goes under its section: pretrain.epochs, sft.epochs or rm.epochs)" in str(err.value)
    with pytest.raises(UserError) as err:
        load_config(overrides=["nonsense=1"])
    assert str(err.value) == "override 'nonsense=1': unknown config key 'nonsense'"


def test_a_moved_key_names_where_it_is_now(tmp_path):
    # the labelers' noise is collect's, the stage that reads it (the world's files never depended on it)
    moved = "unknown config key 'world.labeler_noise' (it is now 'collect.labeler_noise')"
    with pytest.raises(UserError) as err:
        load_config(overrides=["world.labeler_noise=0"])
    assert str(err.value) == f"override 'world.labeler_noise=0': {moved}"
    path = write(tmp_path, "world:\n  seed: 1\n  labeler_noise: 0.5\n")  # a config file written before the move
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:3: {moved}"
    assert load_config(overrides=["collect.labeler_noise=0"]).collect.labeler_noise == 0
    assert PipelineConfig().collect.labeler_noise == 0.3


def test_unknown_yaml_key_names_file_and_line(tmp_path):
    path = write(tmp_path, "run:\n  dir: runs/x\nsft:\n  epochs: 2\n  lrr: 0.1\n")
    # line 1 run:, 2 dir, 3 sft:, 4 epochs, 5 lrr
    with pytest.raises(UserError) as err:
        load_config(path)
    assert f"{path}:5: unknown config key 'sft.lrr'" in str(err.value)


def test_unknown_section_is_rejected(tmp_path):
    path = write(tmp_path, "run:\n  seed: 1\nsftt:\n  lr: 0.1\n")
    # 'sftt' is on line 3
    with pytest.raises(UserError) as err:
        load_config(path)
    assert f"{path}:3: unknown config key 'sftt'" in str(err.value)
    assert "did you mean 'sft'" in str(err.value)


def test_bad_value_names_the_key():
    with pytest.raises(UserError) as err:
        load_config(overrides=["world.n_prompts=-5"])
    # n_prompts must be > 0
    assert "bad value for 'world.n_prompts'" in str(err.value)
    assert "-5" in str(err.value)


@pytest.mark.parametrize("override, allowed", [("sft.data_format=preference", "'auto', 'messages', 'prompt_completion' or 'text'"),
                                               ("rm.data_format=messages", "'auto', 'comparison' or 'preference'")])
def test_a_stage_takes_only_the_data_formats_it_can_train_on(override, allowed):
    with pytest.raises(UserError, match=f"bad value for '{override.split('=')[0]}': Input should be {allowed}"):
        load_config(overrides=[override])


def test_the_configs_format_names_are_the_data_readers():
    """config/schema.py spells the format names out (importing the readers would make loading a config
    heavy); they must stay the ones data/formats.py reads and each stage accepts."""
    from typing import get_args

    from instructrl.config import DataFormat, RMFormat, SFTFormat
    from instructrl.data.formats import FORMATS, USES

    assert get_args(DataFormat) == ("auto", *FORMATS)
    assert set(get_args(SFTFormat)) == {"auto", *USES["demonstration"]}
    assert set(get_args(RMFormat)) == {"auto", *USES["comparison"]}


@pytest.mark.parametrize("override, expected", [("run.seed=true", "expected a number, not the boolean true"),
                                                ("ppo.lr=yes", "expected a number, not the boolean true"),
                                                ("model.arch=false", "expected 'gpt2' or 'llama', not the boolean false"),
                                                ("sft.model=no", "expected a path or name in quotes, not the boolean false")])
def test_a_yaml_boolean_is_never_read_as_a_number_or_a_name(override, expected):
    # YAML reads true/yes/no as booleans, and pydantic would take true as 1 for a seed or a learning rate
    with pytest.raises(UserError, match=f"bad value for '{override.split('=')[0]}': {expected}"):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, expected", [
    ("sft.lora=true", "'sft.lora' is a section, not a value; set its keys as sft.lora.KEY=VALUE (enabled, r, alpha, dropout, target_modules)"),
    ("sft=3", "'sft' is a section, not a value; set its keys as sft.KEY=VALUE (`instructrl config` lists them)")])
def test_a_value_given_to_a_section_says_it_is_one(override, expected):
    # 'sft.lora=true' read as a number ("expected a number, not the boolean true") or a class name told nothing
    with pytest.raises(UserError) as err:
        load_config(overrides=[override])
    assert str(err.value) == f"override '{override}': {expected}"


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_refused_before_anything_is_written(tmp_path, seed):
    # accelerate's set_seed seeds numpy, which takes 0 to 2**32 - 1: a traceback once pretrain had started
    proc = cli("pretrain", "-c", str(SMOKE), f"run.dir={tmp_path}", f"run.seed={seed}", check=False)
    assert proc.returncode == 2 and f"override 'run.seed={seed}': bad value for 'run.seed'" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_word_no_is_a_precision_and_booleans_stay_booleans(tmp_path):
    # mixed_precision's documented value 'no' is a boolean to YAML, unquoted in a file or on the command line
    config = load_config(write(tmp_path, "sft:\n  mixed_precision: no\n"), overrides=["ppo.mixed_precision=no", "ppo.adaptive_kl=yes"])
    assert (config.sft.mixed_precision, config.ppo.mixed_precision, config.ppo.adaptive_kl) == ("no", "no", True)


def test_numbers_are_read_as_yaml_1_2_reads_them(tmp_path):
    # PyYAML reads YAML 1.1: `seed: 010` was the octal 8 and `1:30` the sexagesimal 90, silently
    config = load_config(write(tmp_path, "run:\n  seed: 010\nsft:\n  lr: 1e-4\n  batch_size: 0x10\nrm:\n  batch_size: 1_024\n"),
                         overrides=["ppo.lr=3.0e-6", "world.seed=0o17"])
    assert (config.run.seed, config.sft.lr, config.sft.batch_size, config.rm.batch_size) == (10, 1e-4, 16, 1024)
    assert (config.ppo.lr, config.world.seed) == (3e-6, 15)
    with pytest.raises(UserError, match="bad value for 'run.seed'"):
        load_config(overrides=["run.seed=1:30"])


def test_bad_value_in_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "world:\n  seed: 1\n  n_prompts: 0\n")
    # n_prompts is on line 3
    with pytest.raises(UserError) as err:
        load_config(path)
    assert f"{path}:3: bad value for 'world.n_prompts'" in str(err.value)


def test_a_key_written_twice_in_yaml_is_named(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("sft:\n  lr: 0.001\nrm:\n  lr: 0.0001\nsft:\n  epochs: 2\n")  # the second sft would silently replace the first
    with pytest.raises(UserError, match=rf"{path}:5:1: malformed YAML: duplicate key 'sft'"):
        load_config(path)


def test_anchors_and_merge_keys_share_settings(tmp_path):
    # the duplicate-key loader read the key '<<' itself, and refused every merge: "could not determine a constructor"
    shared = "sft: &train\n  lr: 0.01\n  epochs: 2\nrm:\n  <<: *train\n  lr: 0.02\n"
    config = load_config(write(tmp_path, shared))
    # rm takes sft's epochs; its own lr beside the merge wins over the merged one
    assert (config.sft.lr, config.sft.epochs, config.rm.lr, config.rm.epochs) == (0.01, 2.0, 0.02, 2.0)
    path = write(tmp_path, shared + "  lr: 0.03\n")  # a key written twice beside a merge is still refused
    with pytest.raises(UserError, match=rf"{path}:7:3: malformed YAML: duplicate key 'lr'"):
        load_config(path)


def test_a_section_with_its_keys_commented_out_changes_nothing(tmp_path):
    # 'sft:' alone is YAML's null: "'sft' is a section, not a value", and an override into it "'sft' is not a section"
    config = load_config(write(tmp_path, "sft:\n#  lr: 0.1\nrm:\n  lora:\n"), overrides=["sft.epochs=3", "rm.lora.r=4"])
    assert config.sft.epochs == 3.0 and config.rm.lora.r == 4
    assert config.model_copy(update={"sft": PipelineConfig().sft, "rm": PipelineConfig().rm}) == PipelineConfig()


def test_a_mapping_given_to_a_section_keeps_its_other_keys(tmp_path):
    path = write(tmp_path, "sft:\n  epochs: 3\n  lora:\n    enabled: true\neval:\n  models: {a: /tmp/a}\n")
    config = load_config(path, overrides=["sft={lr: 0.01, lora: {r: 4}}", "eval.models={b: /tmp/b}"])
    # as sft.lr=0.01 sft.lora.r=4 would: the file's sft.epochs and sft.lora.enabled stay (they were dropped)
    assert (config.sft.epochs, config.sft.lr, config.sft.lora.enabled, config.sft.lora.r) == (3.0, 0.01, True, 4)
    # eval.models is a value, not a section: a new mapping replaces it
    assert config.eval.models == {"b": "/tmp/b"}


def test_values_given_as_a_mapping_go_between_the_files_and_the_overrides(tmp_path):
    config = load_config(write(tmp_path, "rm:\n  lr: 0.5\n  epochs: 3\n  log_every: 7\n"), ["rm.epochs=4"],
                         values={"rm": {"lr": 0.25, "epochs": 5}, "sft": {"lr": 0.125}})
    assert (config.rm.lr, config.rm.epochs, config.rm.log_every, config.sft.lr) == (0.25, 4, 7, 0.125)


def test_one_override_given_as_a_string_is_one_override():
    """From Python, load_config(path, "run.seed=1") read each letter as an override: "override 'r': expected KEY=VALUE"."""
    assert load_config(None, "run.seed=1").run.seed == 1
    with pytest.raises(UserError, match=r"^override 'run.seed=x': bad value for 'run.seed'"):
        load_config(None, "run.seed=x")


@pytest.mark.parametrize("values, expected", [
    ({"rm": {"lrr": 0.1}}, "config values: unknown config key 'rm.lrr' (did you mean 'rm.lr'?)"),
    ({"rm": {"lr": "fast"}}, "config values: bad value for 'rm.lr': "),
    ({"lr": 0.1}, "config values: unknown config key 'lr' (a key goes under its section: "),
])
def test_a_bad_key_or_value_in_values_is_named_there_not_in_the_file(tmp_path, values, expected):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, "rm:\n  lr: 0.5\n"), values=values)
    assert str(err.value).startswith(expected)


def test_config_files_given_in_turn_layer_a_later_files_keys_over_the_earlier(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("run:\n  seed: 3\nsft:\n  epochs: 3\n  lora:\n    enabled: true\neval:\n  models: {a: /tmp/a}\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("sft:\n  lr: 0.01\n  lora:\n    r: 4\nrm:\neval:\n  models: {b: /tmp/b}\n")
    config = load_config([base, exp], overrides=["run.seed=5"])
    assert (config.sft.epochs, config.sft.lr, config.sft.lora.enabled, config.sft.lora.r) == (3.0, 0.01, True, 4)
    assert config.eval.models == {"b": "/tmp/b"} and config.rm == PipelineConfig().rm and config.run.seed == 5
    # an error names the file and line that set the key, whichever layer it is in
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lr: 0.01\n  epochs: -1\n")
    with pytest.raises(UserError, match=rf"^{bad}:3: bad value for 'sft.epochs'"):
        load_config([base, bad])
    with pytest.raises(UserError, match=rf"^{bad}:3: bad value for 'sft.epochs'"):
        load_config([bad, exp])


@pytest.mark.parametrize("files, overrides, expected", [
    # a later file or an override cannot set keys in a section an earlier file gave one value (sft: 5):
    # the file is named as a file (it was "override 'b.yaml'"), and the section as one (it was "not a section")
    (["a.yaml", "b.yaml"], [], "{tmp}/b.yaml: 'sft' is a section, but was given the value 5 before"),
    (["a.yaml"], ["sft.lr=0.1"], "override 'sft.lr=0.1': 'sft' is a section, but was given the value 5 before"),
    ([], ["sft.lr=0.1", "sft.lr.x=1"], "override 'sft.lr.x=1': 'sft.lr' is not a section"),
])
def test_keys_set_under_a_section_given_one_value_name_their_source_and_the_section(tmp_path, files, overrides, expected):
    (tmp_path / "a.yaml").write_text("sft: 5\n")
    (tmp_path / "b.yaml").write_text("sft:\n  lr: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config([tmp_path / name for name in files], overrides)
    assert str(err.value) == expected.format(tmp=tmp_path)


def test_ppo_episodes_are_whole_rollout_batches():
    with pytest.raises(UserError, match=r"ppo.episodes \(100\) must be a multiple of ppo.rollout_batch_size \(64\)"):
        load_config(overrides=["ppo.episodes=100"]).ppo.check_sizes(1)


def test_every_stage_size_that_does_not_divide_is_named_at_once(tmp_path):
    config = load_config(overrides=["sft.batch_size=30", "ppo.episodes=100", "ppo.minibatch_size=48"])
    with pytest.raises(UserError) as err:
        config.check_sizes(1)
    assert str(err.value) == ("config: sft.batch_size (30) must be a multiple of sft.micro_batch_size x 1 processes (16); "
                              "ppo.episodes (100) must be a multiple of ppo.rollout_batch_size (64); "
                              "ppo.rollout_batch_size (64) must be a multiple of ppo.minibatch_size (48)")
    # the pipeline says so before its first stage, not after pretraining and SFT
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={tmp_path}", "ppo.episodes=100", check=False)
    assert proc.returncode == 2 and "ppo.episodes (100) must be a multiple" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "run:\n  dir: a: b\n")
    # line 2 is '  dir: a: b'; the second ':' (a mapping inside a plain scalar) is at
    # 0-based column 8 (2 spaces, 'dir' 2-4, ':' 5, ' ' 6, 'a' 7, ':' 8), so 2:9 1-based
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:2:9: malformed YAML")


def test_yaml_list_is_rejected(tmp_path):
    path = write(tmp_path, "- sft\n- rm\n")
    with pytest.raises(UserError, match="must be a mapping of sections, found list"):
        load_config(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_heads_must_divide_width():
    # 30 is not a multiple of 4
    with pytest.raises(UserError, match=r"model.hidden_size \(30\) must be a multiple of model.n_head \(4\)"):
        load_config(overrides=["model.hidden_size=30", "model.n_head=4"])


# ---------------------------------------------------------------- batch arithmetic


def test_grad_accum():
    # 32 examples per step / (8 per micro-batch x 2 processes) = 2 micro-batches each
    assert TrainConfig(batch_size=32, micro_batch_size=8).grad_accum(2) == 2
    # one process: 32 / 8 = 4
    assert TrainConfig(batch_size=32, micro_batch_size=8).grad_accum(1) == 4


def test_grad_accum_rejects_an_uneven_batch():
    # 30 is not a multiple of 8
    with pytest.raises(UserError, match=r"batch_size \(30\)"):
        TrainConfig(batch_size=30, micro_batch_size=8).grad_accum(1)
    # a stage's sizes are named with their section
    with pytest.raises(UserError, match=r"sft.batch_size \(30\) must be a multiple of sft.micro_batch_size x 2 processes \(16\)"):
        TrainConfig(batch_size=30, micro_batch_size=8).check_fits(100, 2, "demos.jsonl", "demonstrations", "sft")


# ---------------------------------------------------------------- shipped configs


# every shipped config: smoke.yaml, and default.yaml and others once they exist
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), PipelineConfig)


def test_smoke_config_values():
    config = load_config(CONFIGS / "smoke.yaml")
    # as written in configs/smoke.yaml; unset keys stay default
    assert (config.world.n_prompts, config.model.n_layer, config.sft.batch_size) == (400, 2, 8)
    assert config.sft.lr == PipelineConfig().sft.lr  # not set in smoke.yaml


# ---------------------------------------------------------------- data order


def orders(world_size, grad_accum, seed=0):
    return [DataOrder(20, 8, 2, grad_accum, rank, world_size, seed) for rank in range(world_size)]


def test_ranks_split_the_global_batch():
    rank0, rank1 = orders(world_size=2, grad_accum=2)
    for step in range(4):
        flat = [i for order in (rank0, rank1) for mb in order.micro_batches(step) for i in mb]
        # 2 ranks x 2 micro-batches x 2 examples = 8 = the batch, with no example twice
        assert len(flat) == 8 and len(set(flat)) == 8
        assert sorted(flat) == sorted(rank0.global_batch(step))


def test_two_processes_see_what_one_process_sees():
    (single,) = orders(world_size=1, grad_accum=4)
    rank0, rank1 = orders(world_size=2, grad_accum=2)
    for step in range(4):
        r0, r1 = rank0.micro_batches(step), rank1.micro_batches(step)
        # micro-batch a of rank r is slice a * 2 + r: r0a0, r1a0, r0a1, r1a1 = slices 0, 1, 2, 3
        assert single.micro_batches(step) == [r0[0], r1[0], r0[1], r1[1]]


def test_lengths_group_each_steps_examples_without_changing_them():
    lengths = [(7 * i) % 11 for i in range(20)]
    (plain,) = orders(world_size=1, grad_accum=4)
    grouped = [DataOrder(20, 8, 2, 2, rank, 2, 0, lengths) for rank in range(2)]
    for step in range(4):
        micro = [grouped[r].micro_batches(step)[a] for a in range(2) for r in range(2)]  # slices 0, 1, 2, 3
        flat = [i for mb in micro for i in mb]
        assert sorted(flat) == sorted(plain.global_batch(step))  # the step's examples, so its gradient, are unchanged
        assert [lengths[i] for i in flat] == sorted((lengths[i] for i in flat), reverse=True)  # longest first, across ranks


def test_steps_per_epoch_drops_the_partial_batch():
    (order,) = orders(world_size=1, grad_accum=4)
    # 20 // 8 = 2 full batches; the last 4 examples of each epoch are dropped
    assert order.steps_per_epoch == 2
    # 1.5 epochs x 2 steps = 3 steps
    assert order.total_steps(1.5) == 3


def test_an_epoch_has_no_repeats():
    (order,) = orders(world_size=1, grad_accum=4)
    epoch0 = order.global_batch(0) + order.global_batch(1)
    # 2 steps x 8 = 16 distinct examples out of 20
    assert len(set(epoch0)) == 16 and all(0 <= i < 20 for i in epoch0)


def test_consecutive_epochs_are_shuffled_differently():
    (order,) = orders(world_size=1, grad_accum=4)
    # steps 0-1 are epoch 0, steps 2-3 epoch 1
    assert order.global_batch(0) + order.global_batch(1) != order.global_batch(2) + order.global_batch(3)


def test_same_seed_same_order():
    a, b = orders(1, 4, seed=7)[0], orders(1, 4, seed=7)[0]
    assert [a.global_batch(s) for s in range(6)] == [b.global_batch(s) for s in range(6)]
    c = orders(1, 4, seed=8)[0]
    assert [a.global_batch(s) for s in range(6)] != [c.global_batch(s) for s in range(6)]


def test_too_few_examples_for_one_batch():
    with pytest.raises(ValueError):
        DataOrder(5, 8, 2, 4, 0, 1, 0)


def test_adaptive_kl_needs_a_coefficient_to_adapt():
    """ppo.adaptive_kl=true with ppo.kl_coef=0 ran the whole pipeline with β = 0 at every iteration: the
    controller multiplies β, so the option changed nothing."""
    with pytest.raises(UserError, match=r"'ppo\.adaptive_kl': the adaptive controller scales ppo\.kl_coef by a factor, so from 0 it stays 0"):
        load_config(None, ["ppo.kl_coef=0", "ppo.adaptive_kl=true"])
    assert load_config(None, ["ppo.kl_coef=0.1", "ppo.adaptive_kl=true"]).ppo.adaptive_kl  # from any β > 0 it adapts
    assert load_config(None, ["ppo.kl_coef=0"]).ppo.kl_coef == 0  # and a fixed β may be 0 (no KL penalty)


def test_ppo_rules_of_the_values_alone_are_refused_as_the_config_loads():
    """ppo.lora.dropout > 0 and ppo.prompts without ppo.ptx_data were refused only when PPO started: the pipeline
    trained pretrain, SFT, collect and the RM first. The schema refuses them wherever the config is loaded
    (`instructrl config`, the pipeline and every stage command), naming the key, so no stage writes anything."""
    with pytest.raises(UserError, match=r"^override 'ppo\.lora\.dropout=0\.1': bad value for 'ppo\.lora\.dropout': PPO runs every model "
                                        r"without dropout, .*; set it to 0 \(got 0\.1\)$"):
        load_config(SMOKE, ["ppo.lora.enabled=true", "ppo.lora.dropout=0.1"])
    assert load_config(SMOKE, ["ppo.lora.dropout=0.1"]).ppo.lora.dropout == 0.1  # unused without ppo.lora, as before
    assert load_config(SMOKE, ["sft.lora.enabled=true", "sft.lora.dropout=0.1"]).sft.lora.dropout == 0.1  # SFT's adapters may drop out
    with pytest.raises(UserError, match=r"^override 'ppo\.prompts=mine\.jsonl': bad value for 'ppo\.prompts': PPO-ptx mixes pretraining text "
                                        r"into every update: set ppo\.ptx_data=FILE .* to go with ppo\.prompts, or ppo\.ptx_coef=0 for plain PPO "
                                        r"\(got 'mine\.jsonl'\)$"):
        load_config(SMOKE, ["ppo.prompts=mine.jsonl"])
    assert load_config(SMOKE, ["ppo.prompts=mine.jsonl", "ppo.ptx_coef=0"]).ppo.ptx_data is None  # plain PPO needs no text
    assert load_config(SMOKE, ["ppo.prompts=mine.jsonl", "ppo.ptx_data=text.txt"]).ppo.ptx_data == Path("text.txt")


def test_eval_models_have_names_of_their_own(tmp_path):
    """A model named gold_answers or demonstrations shared its row of results.json with eval's own (one written over the
    other, exit 0); a model named '' was answered and reported under an empty name."""
    for name, reason in (("gold_answers", "'gold_answers' is the name of eval's row of the built-in world's gold answers"),
                         ("demonstrations", "'demonstrations' is the name of eval's row of the built-in world's demonstrations"),
                         ("''", "every model needs a name")):
        override = f"eval.models={{sft: runs/a/sft/final, {name}: runs/a/ppo/final}}"
        with pytest.raises(UserError, match=re.escape(f"override '{override}': bad value for 'eval.models': {reason}")):
            load_config(SMOKE, [override])
    mine = write(tmp_path, "eval:\n  models:\n    sft: runs/a/sft/final\n    gold_answers: runs/a/ppo/final\n")
    with pytest.raises(UserError, match=re.escape(f"{mine}:2: bad value for 'eval.models'")):
        load_config(mine)
    assert list(load_config(SMOKE, ["eval.models={sft: a, gold: b}"]).eval.models) == ["sft", "gold"]


def test_ppo_prompts_without_ptx_data_are_told_where_the_prompts_were_set(tmp_path):
    # the error was at ppo.ptx_data, which nothing sets: "defaults:" with no file, else the line of a file's `ppo:`
    # section whatever set the prompts (smoke.yaml's, for ppo.prompts given on the command line)
    mine = tmp_path / "mine.yaml"
    mine.write_text("ppo:\n  lr: 1.0e-5\n  prompts: mine.jsonl\n")
    later = tmp_path / "later.yaml"
    later.write_text("ppo:\n  episodes: 64\n")
    told = {(None, ("ppo.prompts=mine.jsonl",)): "override 'ppo.prompts=mine.jsonl'",
            (SMOKE, ("ppo.prompts=mine.jsonl", "ppo.lr=1e-5")): "override 'ppo.prompts=mine.jsonl'",
            (SMOKE, ("ppo.ptx_coef=0.5", "ppo.prompts=mine.jsonl")): "override 'ppo.prompts=mine.jsonl'",  # in any order
            ((SMOKE, mine, later), ()): f"{mine}:3"}
    for (files, overrides), where in told.items():
        with pytest.raises(UserError) as err:
            load_config(list(files) if isinstance(files, tuple) else files, list(overrides))
        assert str(err.value).startswith(f"{where}: bad value for 'ppo.prompts': PPO-ptx mixes pretraining text"), str(err.value)


def test_a_path_from_your_home_folder_is_found_there(tmp_path, monkeypatch):
    """`sft.data=~/mine.jsonl` (the shell leaves a ~ after = alone) and `run.dir: ~/runs/a` in a file name your home folder,
    as a model path does, not a folder called ~ in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.jsonl").write_text("")
    layer = tmp_path / "mine.yaml"
    layer.write_text("run:\n  dir: ~/runs/a\n")
    cfg = load_config([SMOKE, layer], ["sft.data=~/mine.jsonl"])
    assert cfg.run.dir == tmp_path / "runs" / "a" and cfg.sft.data == tmp_path / "mine.jsonl" and cfg.sft.data.is_file()
    cfg.rm.data = Path("~/c.jsonl")  # and set from Python
    assert cfg.rm.data == tmp_path / "c.jsonl"
