"""The CLI end to end on the smoke config, and its answers to bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import SMOKE, cli

from instructrl.rundir.files import content_hash
from instructrl.rundir.run import run_info


def test_pipeline_smoke_writes_every_record(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("pipeline", "-c", str(SMOKE), f"run.dir={run_dir}")
    # standard output holds the results alone, the table and the headline figures; bars and messages go to stderr
    assert "Mean gold Likert" in proc.stdout and "ppo_ptx: Likert" in proc.stdout
    assert "━" not in proc.stdout and "saved to" not in proc.stdout and "ppo_ptx ━" in proc.stderr
    for stage in ("pretrain", "sft", "collect", "rm", "ppo_ptx", "ppo"):
        folder = run_dir / stage
        outputs = ("comparisons.jsonl",) if stage == "collect" else ("final/config.json", "final/tokenizer.json")
        for name in ("config.yaml", "run.json", "metrics.jsonl", "lineage.json", "done.json") + outputs:
            assert (folder / name).exists(), f"{stage}/{name} missing"
        if stage != "collect":
            assert any((folder / "tb").iterdir()), "no TensorBoard events"
        assert json.loads((folder / "run.json").read_text())["seed"] == 0
    lineage = json.loads((run_dir / "sft" / "lineage.json").read_text())
    assert lineage["inputs"]["model"]["sha256"] == content_hash(run_dir / "pretrain" / "final")
    assert lineage["inputs"]["demonstrations"]["sha256"] == content_hash(run_dir / "world" / "demonstrations.jsonl")
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert set(results) == {"demonstrations", "base", "sft", "ppo", "ppo_ptx", "gold_answers"}
    assert (run_dir / "report.html").is_file()
    # the gold answers tie with SFT's exact answers (Likert 7) and beat the rest: no model can win more often
    sft_likert = [json.loads(line)["sft"]["likert"] for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    ceiling = results["gold_answers"]["win_rate_vs_sft"]["win_rate"]
    assert abs(ceiling - sum(0.5 if x == 7 else 1.0 for x in sft_likert) / len(sft_likert)) < 1e-12
    for name in ("base", "ppo", "ppo_ptx", "demonstrations"):
        assert results[name]["win_rate_vs_sft"]["win_rate"] <= ceiling
        assert results[name]["sampled"]["win_rate_vs_sft"]["win_rate"] <= results["gold_answers"]["sampled"]["win_rate_vs_sft"]["win_rate"]
    assert set(results["sft"]["families"]) >= {"reverse_word", "add_numbers"}
    # a second run finds every stage complete and trains nothing
    again = cli("pipeline", "-c", str(SMOKE), f"run.dir={run_dir}")
    assert "nothing to do" in again.stderr and "--restart-from rm" in again.stderr  # the pipeline's flag, beside the stage's
    # an eval of a mistyped model keeps the results it would have replaced; one of a model not named sft says what it lacks
    before = (run_dir / "eval" / "results.json").read_text()
    typo = cli("eval", "-c", str(SMOKE), f"run.dir={run_dir}", f"eval.models={{sft: {run_dir}/sft/final, x: {run_dir}/pp/final}}", check=False)
    assert typo.returncode == 2 and "eval.models.x: " in typo.stderr and "pp/final" in typo.stderr
    assert (run_dir / "eval" / "results.json").read_text() == before
    # (a model given relative to where the command runs is recorded where it is, for results.json read from anywhere)
    alone = cli("eval", "-c", str(SMOKE), f"run.dir={run_dir}", "eval.models={ppo: ppo/final}", "eval.n_prompts=4", cwd=run_dir)
    assert "no model is named 'sft'" in alone.stderr and "report:" in alone.stderr
    assert json.loads((run_dir / "eval" / "results.json").read_text())["models"] == {"ppo": str((run_dir / "ppo" / "final").resolve())}
    # the world is what the stages learnt from: another world's config is refused, not written over it
    other = cli("world", "-c", str(SMOKE), f"run.dir={run_dir}", "world.seed=1", check=False)
    assert other.returncode == 2 and "world.seed: 0 -> 1" in other.stderr


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lr: [1e-4\n  epochs: 2\n")  # the flow list opened on line 2 is never closed
    _assert_clean_error(cli("sft", "-c", str(bad), check=False), f"{bad}:3", "malformed YAML")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("run:\n  dir: x\nsft:\n  epoch: 2\n")  # 'epoch' is on line 4
    _assert_clean_error(cli("sft", "-c", str(cfg), check=False), f"{cfg}:4", "unknown config key 'sft.epoch'", "sft.epochs")
    _assert_clean_error(cli("config", "pretrain.lrr=1", check=False), "pretrain.lrr", "pretrain.lr")


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("--debug", "config", "sft.lrr=1", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("stage, keys, extra", [("sft", ["sft.model"], []), ("rm", ["rm.model"], [f"rm.data={SMOKE}"]),
                                                ("collect", ["collect.policy"], []), ("ppo", ["ppo.policy", "ppo.reward_model"], [])])
def test_missing_model_path_names_its_key(tmp_path, stage, keys, extra):
    # (rm.data: a file that exists, as the data is checked before the model is read)
    proc = cli(stage, "-c", str(SMOKE), f"run.dir={tmp_path}", *(f"{key}={tmp_path / 'nope'}" for key in keys), *extra, check=False)
    _assert_clean_error(proc, f"{keys[0]}: ", "nope", "does not exist")
    assert not any(tmp_path.iterdir()), "a failed start must not create the stage folder"


def test_rm_before_sft_says_to_run_sft(tmp_path):
    proc = cli("rm", "-c", str(SMOKE), f"run.dir={tmp_path}", f"rm.data={SMOKE}", check=False)
    _assert_clean_error(proc, "run `instructrl sft` first or set rm.model=PATH")


def test_a_folder_or_file_that_holds_no_model(tmp_path):
    # a stage's folder given for its final/ (runs/x/sft for runs/x/sft/final), and a file given for a folder
    (tmp_path / "sft" / "final").mkdir(parents=True)
    (tmp_path / "sft" / "final" / "config.json").write_text("{}")
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"sft.model={tmp_path / 'sft'}", check=False)
    _assert_clean_error(proc, f"'{tmp_path / 'sft'}' is a folder that holds no model", f"its final/: {tmp_path / 'sft' / 'final'}")
    assert not (tmp_path / "run" / "sft").exists()
    proc = cli("collect", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"collect.policy={tmp_path / 'sft' / 'final' / 'config.json'}", check=False)
    _assert_clean_error(proc, "config.json' is a file, not a model folder")
    # a run's folder given for one of its models: the stages' final/ folders are named
    (tmp_path / "ppo" / "final").mkdir(parents=True)
    (tmp_path / "ppo" / "final" / "config.json").write_text("{}")
    proc = cli("collect", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"collect.policy={tmp_path}", check=False)
    _assert_clean_error(proc, f"'{tmp_path}' is a folder that holds no model",
                        f"its stages' final/ folders: {tmp_path / 'ppo' / 'final'}, {tmp_path / 'sft' / 'final'}")


def test_a_reward_model_is_refused_where_a_language_model_is_loaded(tmp_path):
    # transformers would load its backbone as a causal LM with an untrained output head, and say nothing
    from instructrl.errors import UserError
    from instructrl.models.base import load_causal_lm
    from instructrl.models.reward import HEAD_FILE

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / HEAD_FILE).write_bytes(b"")
    with pytest.raises(UserError, match=f"'{tmp_path}' is a reward model .* not a policy"):
        load_causal_lm(tmp_path)


def test_model_name_that_is_neither_a_folder_nor_reachable(tmp_path, monkeypatch):
    # a typo for a local folder reads as a hub name; with no hub (offline here) it fails at once instead of retrying
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", "sft.model=my_modle", cwd=tmp_path, check=False)
    _assert_clean_error(proc, "sft.model: model 'my_modle' is not a folder under", "the Hub cannot be reached")  # a model's name, not its tokenizer's
    assert not (tmp_path / "run" / "sft").exists()


def test_the_hub_is_probed_without_an_http_client_we_do_not_depend_on(monkeypatch):
    # httpx came only with the dev extras: without them, a hub name not in the cache was a ModuleNotFoundError
    import http.server
    import sys
    import threading

    from huggingface_hub import constants
    from ports import free_port

    from instructrl.models.base import _hub_reachable

    monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` fails, as where it is not installed
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def reachable(endpoint: str) -> bool:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        _hub_reachable.cache_clear()
        return _hub_reachable()

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert reachable(f"http://127.0.0.1:{server.server_port}")  # an error status is still an answer
    finally:
        server.shutdown()
        server.server_close()
    assert not reachable(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert not reachable("not a url")
    _hub_reachable.cache_clear()


def test_model_folder_without_its_tokenizer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "model")
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"sft.model={tmp_path / 'model'}", check=False)
    _assert_clean_error(proc, f"tokenizer '{tmp_path / 'model'}'", "is its tokenizer saved there (tokenizer.save_pretrained)?")
    assert not (tmp_path / "run" / "sft").exists()


def test_llama_folder_without_its_tokenizer(tmp_path, smoke_base):
    # instructrl's own checkpoints are Llama's: their weights copied alone ended with transformers' half sentence,
    # "cannot load tokenizer ...: Couldn't instantiate the backend tokenizer from one of:"
    weights_only = tmp_path / "model"
    shutil.copytree(smoke_base / "pretrain" / "final", weights_only,
                    ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja"))
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"sft.model={weights_only}", check=False)
    _assert_clean_error(proc, f"tokenizer '{weights_only}' has no vocabulary file; is its tokenizer saved there")
    assert not (tmp_path / "run" / "sft").exists()


def test_broken_jsonl_line_is_named(tmp_path, smoke_base):
    data = tmp_path / "demos.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text(f"{good}\n{good}\n{{not json\n")
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"sft.model={smoke_base / 'pretrain' / 'final'}", f"sft.data={data}", check=False)
    _assert_clean_error(proc, f"{data}:3", "not valid JSON")
    data.write_text(f"{good}\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"sft.model={smoke_base / 'pretrain' / 'final'}", f"sft.data={data}", check=False)
    _assert_clean_error(proc, f"{data}:2", "messages[0]")
    assert not (tmp_path / "run" / "sft").exists(), "bad data must be caught before the stage folder is written"


def test_bad_input_never_touches_a_finished_run(tmp_path, smoke_base):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_base, run_dir)
    base = ("sft", "-c", str(SMOKE), f"run.dir={run_dir}")
    cli(*base)
    final = run_dir / "sft" / "final"
    before = content_hash(final)
    # a different config must not resume or overwrite the finished run
    # (the folder names the stage: it said "holds a sft run")
    _assert_clean_error(cli(*base, "sft.lr=0.01", check=False), f"{run_dir / 'sft'} holds a run of a different config (sft.lr: ", "--restart")
    # a broken override fails before anything is written
    _assert_clean_error(cli(*base, "sft.epochs=-1", check=False), "sft.epochs")
    assert content_hash(final) == before
    # an input that changed since the run finished: neither skipped as complete nor resumed, but refused
    demos = run_dir / "world" / "demonstrations.jsonl"
    lines = demos.read_text().splitlines(keepends=True)
    demos.write_text("".join(lines + lines[:1]))
    _assert_clean_error(cli(*base, check=False), "changed since", f"demonstrations ({demos})", "--restart")
    assert content_hash(final) == before
    assert "changed since" not in cli(*base, "--restart").stderr and content_hash(final) != before


def test_world_command_writes_the_world_and_reports_agreement(tmp_path):
    proc = cli("world", "-c", str(SMOKE), f"run.dir={tmp_path}")
    out = " ".join(proc.stderr.split())
    # smoke sizes: 400 training prompts split 13:33:31 -> 67 + 171 + 161, plus 1 for rounding to sft
    assert "68 sft, 171 rm, 161 ppo, 16 val, 24 eval" in out
    assert "agree on" in out
    for name in ("prompts/sft.jsonl", "prompts/eval.jsonl", "demonstrations.jsonl", "corpus.txt", "corpus_heldout.txt", "world.json"):
        assert (tmp_path / "world" / name).is_file(), name
    # world.json records what built it, as a stage's run.json does (it held the config and counts only)
    manifest = json.loads((tmp_path / "world" / "world.json").read_text())
    assert manifest["command"][1:] == ["world", "-c", str(SMOKE), f"run.dir={tmp_path}"]
    assert set(run_info(0)) <= set(manifest) and manifest["seed"] == manifest["config"]["seed"] and manifest["torch"]
    assert f"world written to {tmp_path / 'world'}" in out
    # run again, it keeps the world this config wrote: it said "written" all the same
    again = " ".join(cli("world", "-c", str(SMOKE), f"run.dir={tmp_path}").stderr.split())
    assert f"world unchanged in {tmp_path / 'world'} (written earlier with this config): 68 sft" in again
    assert json.loads((tmp_path / "world" / "world.json").read_text()) == manifest


def test_eval_in_a_log_file_prints_its_whole_table_alone_on_stdout(tmp_path, smoke_base):
    """A Slurm or CI job: no terminal and no COLUMNS. The table of many models was cut at 80 columns."""
    import os
    import subprocess
    import sys

    shutil.copytree(smoke_base / "world", tmp_path / "world")
    names = [f"base_model_copy_{i}" for i in range(6)]
    models = "{" + ", ".join(f"{name}: {smoke_base}/pretrain/final" for name in names) + "}"
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "instructrl", "eval", "-c", str(SMOKE), f"run.dir={tmp_path}", f"eval.models={models}",
                           "eval.n_prompts=2", "eval.samples=1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("greedy"))
    assert header.split() == ["greedy", "demonstrations", *names, "gold_answers"]  # each name whole, on one line
    assert "eval: answering" in proc.stderr and "eval:" not in proc.stdout


def test_too_few_demonstrations_for_one_batch(tmp_path, smoke_base):
    data = tmp_path / "tiny.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text((json.dumps(row) + "\n") * 3)  # 3 demonstrations, smoke sft.batch_size is 8
    proc = cli("sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"sft.model={smoke_base / 'pretrain' / 'final'}", f"sft.data={data}", check=False)
    _assert_clean_error(proc, "3 demonstrations are fewer than one batch", "sft.batch_size = 8")
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.parametrize("stage, key", [("sft", "sft"), ("collect", "collect")])
def test_answers_longer_than_the_context_are_refused_before_the_stage_starts(tmp_path, smoke_base, stage, key):
    # the smoke model's context is model.max_length = 128 tokens; its validation and RM prompts are up to 68 long.
    # A GPT-2 model (learned positions) failed with an IndexError at the first validation, mid-run
    base = smoke_base / "pretrain" / "final"
    proc = cli(stage, "-c", str(SMOKE), f"run.dir={tmp_path}", f"sft.model={base}", f"collect.policy={base}", f"{key}.max_new_tokens=100", check=False)
    _assert_clean_error(proc, f"{key}.max_new_tokens = 100: the longest prompt (", "exceed the model's context length (128 tokens)")
    assert not (tmp_path / stage).exists()


def test_generation_past_learned_positions_names_the_setting(tmp_path):
    from tiny_models import save_tiny_model

    from instructrl.errors import UserError
    from instructrl.evaluation.generate import generate_answers
    from instructrl.models.base import load_causal_lm, load_tokenizer

    path = save_tiny_model("gpt2", tmp_path / "gpt2")  # 128 positions
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer=tokenizer)
    hello = [[{"role": "user", "content": "Say cat."}]]
    assert len(generate_answers(model, tokenizer, hello, max_new_tokens=8)) == 1
    with pytest.raises(UserError, match=r"eval.max_new_tokens = 200: the longest prompt \(\d+ tokens\) and 200 new tokens exceed the model's context length \(128 tokens\)"):
        generate_answers(model, tokenizer, hello, max_new_tokens=200, key="eval.max_new_tokens")


def test_a_full_disk_is_one_line_and_exit_status_1(tmp_path, monkeypatch, capsys):
    import errno

    import pytest

    from instructrl import cli as cli_module
    from instructrl.world import build

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "world" / "corpus.txt"))

    monkeypatch.setattr(build, "build_world", full)
    monkeypatch.setattr("sys.argv", ["instructrl", "world", "-c", str(SMOKE), f"run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        cli_module.run()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert f"cannot write {tmp_path}/world/corpus.txt: No space left on device" in err


def test_a_file_where_a_folder_is_needed_is_named(tmp_path):
    # run.dir, or a folder on its way, that is a file: one line naming the file, and the file left as it was
    results = tmp_path / "results.txt"
    results.write_text("keep me")
    for folder in (results, results / "run"):
        _assert_clean_error(cli("world", "-c", str(SMOKE), f"run.dir={folder}", check=False), f"{results} is a file, where a folder is needed")
    _assert_clean_error(cli("label", "user", "ann", "--password", "secret", "--dir", str(results), check=False), f"{results} is a file")
    assert results.read_text() == "keep me"
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone" / "runs")  # a link to a folder since removed
    _assert_clean_error(cli("world", "-c", str(SMOKE), f"run.dir={link}", check=False), f"{link} is a link to {tmp_path}/gone/runs, which does not exist")


def test_brackets_in_paths_and_values_survive_in_errors(tmp_path):
    proc = cli("data", "check", str(tmp_path / "[exp1]" / "d.jsonl"), check=False)
    assert proc.returncode == 2 and f"{tmp_path}/[exp1]/d.jsonl: file not found" in proc.stderr
    proc = cli("config", "sft.epochs=.inf", check=False)
    assert proc.returncode == 2 and "bad value for 'sft.epochs': Input should be a finite number" in proc.stderr


def test_a_port_another_program_holds_is_named_before_anything_loads(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        # the model is checked after the port: the port's message comes first, before minutes of loading
        proc = cli("serve", "--model", str(tmp_path / "missing"), "--port", port, check=False, timeout=120)
        _assert_clean_error(proc, f"--host 127.0.0.1 --port {port}: cannot listen there", "choose another --port or --host")
        proc = cli("label", "-d", str(tmp_path / "label"), "--port", port, check=False, timeout=120)
        _assert_clean_error(proc, f"--port {port}: cannot listen there")
        assert "serving" not in proc.stderr


def test_a_port_out_of_range_is_named_before_anything_loads_or_is_written(tmp_path):
    # socket's bind raised OverflowError for 99999 and -1; 0 would listen on a port no one is told
    for port in ("99999", "-1", "0"):
        _assert_clean_error(cli("serve", "--model", str(tmp_path / "missing"), "--port", port, check=False), f"--port {port}: choose a port from 1 to 65535")
    _assert_clean_error(cli("label", "-d", str(tmp_path / "label"), "--port", "70000", check=False), "--port 70000: choose a port from 1 to 65535")
    assert not (tmp_path / "label").exists()


def test_help_paragraphs_are_not_broken_where_the_docstring_wraps():
    """A command's help is its docstring's paragraphs, each one line that the terminal wraps
    (typer would keep the source's line breaks and leave half-lines at any other width)."""
    import inspect
    import os
    import subprocess
    import sys

    from instructrl.cli.stages import rm

    assert any("\n" in p for p in inspect.getdoc(rm).split("\n\n")), "the docstring wraps inside a paragraph"
    env = dict(os.environ, COLUMNS="1000")  # wide enough for every paragraph on one line
    out = subprocess.run([sys.executable, "-m", "instructrl", "rm", "--help"], env=env, capture_output=True, text=True, check=True).stdout
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for paragraph in inspect.getdoc(rm).split("\n\n"):
        assert " ".join(paragraph.split()) in lines, f"help paragraph broken: {paragraph[:60]}"


def _help(*command: str) -> str:
    """A command's --help on one line per paragraph, its whitespace runs made single."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, COLUMNS="1000")
    return " ".join(subprocess.run([sys.executable, "-m", "instructrl", *command, "--help"], env=env, capture_output=True, text=True, check=True).stdout.split())


def test_top_level_help_says_what_instructrl_is_and_how_stages_are_configured():
    # the callback's empty docstring used to replace the app's help, leaving `instructrl --help` a bare list of commands
    out = _help()
    assert "InstructGPT's recipe end to end" in out
    assert "`instructrl STAGE --help` lists the stage's keys with their defaults" in out


def test_help_lists_the_stages_in_the_recipes_order_then_the_tools():
    # each module of instructrl.cli adds its commands as the package imports it: that import order is --help's
    import typer

    from instructrl.cli import app

    assert list(typer.main.get_command(app).commands) == [
        "world", "pretrain", "sft", "collect", "rm", "ppo", "eval", "pipeline", "bench", "serve", "chat", "config", "data", "label"]


def test_stage_help_lists_its_own_keys_first_with_defaults_as_yaml_writes_them():
    out = _help("sft")
    # not typer's [overrides]...; how typer brackets an optional, repeatable argument differs between its versions
    assert re.search(r"\[OPTIONS\] \[?KEY=VALUE\]?(\.\.\.)?", out)
    # the model and data a newcomer sets come before the training knobs every stage shares
    assert out.index("sft.model = -") < out.index("sft.data = -") < out.index("sft.batch_size = 32") < out.index("sft.attn_implementation = -")
    # as they are typed in a file or an override, not as Python prints them (False, ['all-linear']); rich read [all-linear] as markup
    assert "sft.gradient_checkpointing = false" in out and "sft.lora.target_modules = [all-linear]" in out


def test_version_names_instructrl_and_the_libraries_that_decide_its_numbers():
    from importlib.metadata import version

    import instructrl

    out = cli("--version").stdout.strip()
    assert out.startswith(f"instructrl {instructrl.__version__} (")
    for name in ("torch", "transformers", "accelerate", "peft"):
        assert f"{name} {version(name)}" in out


def test_the_cli_module_runs_as_before_it_became_a_package():
    import subprocess
    import sys

    # python -m instructrl.cli ran cli.py's `if __name__ == "__main__"`; as a package it needs its __main__.py
    proc = subprocess.run([sys.executable, "-m", "instructrl.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == cli("--version").stdout


def test_help_says_how_settings_are_given():
    import os
    import subprocess
    import sys

    env = dict(os.environ, COLUMNS="1000")
    out = " ".join(subprocess.run([sys.executable, "-m", "instructrl", "ppo", "--help"], env=env, capture_output=True, text=True, check=True).stdout.split())
    # where relative paths lead, what wins, and a list value: rich read [q_proj,v_proj] as markup and printed nothing
    assert "Relative paths in it are relative to the working directory, not to the file." in out
    assert "applied after the file" in out and "null, [q_proj,v_proj], {name: value}" in out
    assert "ppo.lr = 2e-05" in out  # every key of the stage with its default


def test_label_user_asks_the_password_that_its_help_does_not_call_required(tmp_path):
    import os
    import subprocess
    import sys

    # "--password ... (asked when not given). [required]" left a newcomer thinking it had to be typed on the command line
    out = _help("label", "user")
    assert "[required]" not in out[out.index("--password"):out.index("--reset <bool>")]
    asked = subprocess.run([sys.executable, "-m", "instructrl", "label", "user", "ann", "--dir", str(tmp_path)], input="secret\n",
                           env=dict(os.environ, COLUMNS="200"), capture_output=True, text=True)
    assert asked.returncode == 0 and "Password:" in asked.stdout and "label: user ann (labeler) created" in asked.stderr


def test_config_given_twice_layers_the_second_file_over_the_first(tmp_path):
    import yaml

    (tmp_path / "exp.yaml").write_text("ppo:\n  lr: 3.0e-06\n")
    shown = yaml.safe_load(cli("config", "-c", str(SMOKE), "-c", str(tmp_path / "exp.yaml")).stdout)
    smoke = yaml.safe_load(cli("config", "-c", str(SMOKE)).stdout)
    assert shown["ppo"]["lr"] == 3e-6 and smoke["ppo"]["lr"] != 3e-6
    shown["ppo"]["lr"] = smoke["ppo"]["lr"]
    assert shown == smoke  # the rest is the first file's


@pytest.fixture
def a_launch(tmp_path, monkeypatch):
    """This test as one process of a 2-process `accelerate launch` (torchrun's agent): the agent's
    store, in which the processes of the launch count who stops first, and this process's error file."""
    import signal
    from datetime import timedelta

    from torch.distributed import TCPStore

    from ports import free_port

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    for name, value in {"WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json")}.items():
        monkeypatch.setenv(name, value)
    sigterm = signal.getsignal(signal.SIGTERM)  # run() installs its own handlers in this test process
    yield store
    signal.signal(signal.SIGTERM, sigterm)


def _run_as(rank: int, failure: BaseException, monkeypatch, capsys) -> tuple[int, str]:
    """``instructrl.cli.run()`` as process ``rank`` of the launch, its command raising ``failure``: exit status and stderr."""
    from instructrl.cli import exits

    def command():
        raise failure

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(exits, "app", command)
    with pytest.raises(SystemExit) as exit_:
        exits.run()
    return exit_.value.code, capsys.readouterr().err


def test_under_a_launch_the_process_that_stops_first_says_why_and_the_others_follow_silently(a_launch, tmp_path, monkeypatch, capsys):
    from instructrl.errors import UserError

    # rank 1 alone meets bad input (a file only it reads): it says so, though it is not the main process
    status, err = _run_as(1, UserError("d.jsonl:7: not valid JSON"), monkeypatch, capsys)
    assert status == 2 and err.strip() == "error: d.jsonl:7: not valid JSON"
    # and the launcher's failure summary names it (torchrun's error file)
    assert json.loads((tmp_path / "error.json").read_text())["message"] == "error: d.jsonl:7: not valid JSON"
    # rank 0 then meets the same bad input, or its collective breaks as rank 1 leaves, or the launcher stops it: no second word
    assert _run_as(0, UserError("d.jsonl:7: not valid JSON"), monkeypatch, capsys) == (2, "")
    assert _run_as(0, RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4242"), monkeypatch, capsys) == (1, "")
    assert _run_as(0, KeyboardInterrupt(), monkeypatch, capsys) == (130, "")


def test_under_a_launch_an_interrupt_or_a_crash_on_one_process_is_said_once(a_launch, tmp_path, monkeypatch, capsys):
    status, err = _run_as(1, KeyboardInterrupt(), monkeypatch, capsys)
    assert status == 130 and err.strip() == "interrupted: run the same command again to resume from the last checkpoint"
    a_launch.set("instructrl/stopped/0", "0")  # a new launch: nobody has stopped yet
    with pytest.raises(RuntimeError, match="out of memory"):  # a crash keeps its traceback, and the launcher's summary names it
        _run_as(1, RuntimeError("CUDA out of memory"), monkeypatch, capsys)
    assert json.loads((tmp_path / "error.json").read_text())["message"] == "RuntimeError: CUDA out of memory"


def test_without_the_launchers_store_the_main_process_says_why(monkeypatch, capsys):
    from instructrl.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _run_as(1, UserError("bad"), monkeypatch, capsys) == (2, "")
    status, err = _run_as(0, UserError("bad"), monkeypatch, capsys)
    assert status == 2 and err.strip() == "error: bad"
    with pytest.raises(RuntimeError, match="out of memory"):  # any process's crash shows its traceback
        _run_as(1, RuntimeError("CUDA out of memory"), monkeypatch, capsys)


def test_ctrl_c_while_torch_imports_ends_with_the_one_line_of_any_interrupt(tmp_path):
    # on a loaded machine `import torch` takes seconds, and Ctrl-C (or a scheduler's SIGTERM) may land in it;
    # leaving, the CLI imported torch.distributed again and crashed on torch's half-made state (exit 1, a traceback)
    import subprocess
    import sys

    script = tmp_path / "interrupted.py"
    script.write_text(
        "import sys\n"
        "from instructrl.cli.exits import run\n"
        "class CtrlCDuringTorchImport:\n"
        "    fired = False\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch._export' and not self.fired:\n"
        "            self.fired = True\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlCDuringTorchImport())\n"
        f"sys.argv = ['instructrl', 'sft', '-c', {str(SMOKE)!r}, 'run.dir={tmp_path / 'run'}']\n"
        "run()\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr.strip()) == (130, "interrupted: run the same command again to resume from the last checkpoint")


@pytest.mark.parametrize("compare, expected", [
    (["a"], "label project: --compare takes NAME=CHECKPOINT"),
    (["a=x"], "label project: --compare needs two models with different names (NAME=CHECKPOINT twice), got 1"),
    (["a=x", "a=y"], "label project: --compare needs two models with different names (NAME=CHECKPOINT twice), got 1")])
def test_a_bad_compare_option_is_named_before_any_model_samples(tmp_path, compare, expected):
    # the --model that would sample for minutes is missing: had it been loaded first, its error would come instead
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse \'cat\'."}\n')
    args = [arg for name_path in compare for arg in ("--compare", name_path)]
    proc = cli("label", "project", "p", "-d", str(tmp_path / "d"), "--prompts", str(prompts), "--model", str(tmp_path / "nope"), *args, check=False)
    _assert_clean_error(proc, expected)
