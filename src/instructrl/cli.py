"""The ``instructrl`` command: one sub-command per stage.

Every stage reads the pipeline config (defaults < ``--config FILE`` < ``section.key=value``
overrides) and writes under ``run.dir``/<stage>. Bad input ends with one line naming the file,
line or key and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from instructrl.config import PipelineConfig, WorldConfig, describe_fields, dump_config, load_config
from instructrl.errors import UserError
from instructrl.training.progress import log_console, quiet_libraries, results_console

app = typer.Typer(
    help="InstructGPT's recipe end to end: pretrain, SFT, collect rankings, reward model, PPO-ptx, evaluate, serve.\n\n"
         "Every stage reads the defaults, then -c FILE, then KEY=VALUE overrides (sft.lr=1e-4); "
         "`instructrl STAGE --help` lists the stage's keys with their defaults. Every stage in seconds, on a tiny model: "
         "`instructrl pipeline -c configs/smoke.yaml`.",
    no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
)
console = log_console()  # messages and bars; standard output holds the results alone (results_console)
_state = {"debug": bool(os.environ.get("INSTRUCTRL_DEBUG"))}

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config file; it only needs the keys it changes. Relative paths in it are "
                             "relative to the working directory, not to the file. Give -c again to layer files: a later file's keys win.",
                             exists=False, metavar="FILE")
OVERRIDES_ARGUMENT = typer.Argument(None, metavar="KEY=VALUE", help="Config overrides as section.key=value, applied after the file, e.g. sft.lr=1e-4 run.dir=runs/try2; "
                                    "values are read as YAML: null, \\[q_proj,v_proj], {name: value}.", show_default=False)
RESTART_OPTION = typer.Option(False, "--restart", help="Discard this stage's earlier run (checkpoints included) instead of resuming it.")


def _config_help(*sections: str) -> str:
    lines = ["[bold]Config keys[/bold] (set in the YAML file or as KEY=VALUE):"]
    for name in sections:
        model = PipelineConfig.model_fields[name].annotation
        for key, default, description in describe_fields(model, name):
            lines.append(f"[cyan]{key}[/cyan] = {escape(default) or '-'}  {escape(description)}")  # [all-linear] is no markup
    return "\n\n".join(lines)


def _load(config: Optional[list[Path]], overrides: Optional[list[str]]) -> PipelineConfig:
    return load_config(config or None, overrides or [])


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _log(message: str) -> None:
    if _is_main_process():
        # one line per message: paths stay whole when copied or grepped; no markup, so [brackets] in a path or value stay
        console.print(message, highlight=False, soft_wrap=True, markup=False)


def _print_version(wanted: bool) -> None:
    """instructrl's version and the libraries' that decide its numbers, read without importing them."""
    if not wanted:
        return
    from importlib.metadata import PackageNotFoundError, version

    from instructrl import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    print(f"instructrl {__version__} (" + ", ".join(f"{n} {installed(n)}" for n in ("torch", "transformers", "accelerate", "peft")) + ")")
    raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")) -> None:
    _state["debug"] = _state["debug"] or debug
    quiet_libraries()


@app.command(epilog=_config_help("run", "world"))
def world(
    config: Optional[list[Path]] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    restart: bool = typer.Option(False, "--restart", help="Replace a world of another config in run.dir (the stages trained on it are then stale)."),
) -> None:
    """Write the built-in instruction world: prompt splits, demonstrations, pretraining corpus."""
    from instructrl.world.build import build_world

    cfg = _load(config, overrides)
    files = build_world(cfg.world, Path(cfg.run.dir) / "world", replace=restart)
    counts = json.loads(files.manifest.read_text())["counts"]
    _log(f"world written to {files.root}: " + ", ".join(f"{n} {split}" for split, n in counts.items()) + " prompts")
    rate, n_pairs = _labeler_agreement(cfg.world, files.prompts("rm"))
    _log(f"two simulated labelers at noise {cfg.world.labeler_noise} agree on {rate:.1%} of {n_pairs} comparisons (InstructGPT's labelers: ~73%)")


def _labeler_agreement(world_cfg: WorldConfig, rm_prompts: Path) -> tuple[float, int]:
    """How often two simulated labelers agree, and on how many comparisons: two distinct
    demonstrations of one RM prompt each (of the first 1500), so that world.labeler_noise can be
    set against InstructGPT's ~73% inter-labeler agreement."""
    import random

    from instructrl.world.build import demo_labeler, demonstration, load_tasks
    from instructrl.world.labeler import SimulatedLabeler, agreement_rate

    rng, writer = random.Random(world_cfg.seed), demo_labeler(world_cfg)
    pairs = [(t, demonstration(world_cfg, t), writer.demonstrate(t, rng)) for t in load_tasks(rm_prompts)[:1500]]
    pairs = [p for p in pairs if p[1] != p[2]]
    noise = world_cfg.labeler_noise
    return agreement_rate(SimulatedLabeler("a", noise), SimulatedLabeler("b", noise), pairs), len(pairs)


@app.command(epilog=_config_help("run", "world", "tokenizer", "model", "pretrain"))
def pretrain(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Train the BPE tokenizer and pretrain the small base model on the world's corpus.

    A killed run resumes from its last checkpoint when the same command is run again.
    """
    from instructrl.stages.pretrain import run_pretrain

    run_pretrain(_load(config, overrides), restart=restart, log=_log)


@app.command(epilog=_config_help("run", "sft"))
def sft(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Supervised fine-tuning of any Hugging Face causal LM on demonstrations.

    Loss on assistant tokens (every token of text records). On the built-in world the output is
    the checkpoint the simulated labeler scores best on validation prompts; on your own
    sft.data, the last one. A killed run resumes when the same command is run again.
    """
    from instructrl.stages.sft import run_sft

    run_sft(_load(config, overrides), restart=restart, log=_log)


@app.command(epilog=_config_help("run", "collect"))
def collect(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Sample K responses per RM prompt from the SFT policy and have labelers rank them.

    The simulated labelers judge by default; collect.judgements=FILE takes people's rankings
    instead. Writes comparisons.jsonl (the record format of instructrl.data.records). A killed
    collection resumes when the same command is run again.
    """
    from instructrl.stages.collect import run_collect

    if _is_main_process():
        run_collect(_load(config, overrides), restart=restart, log=_log)


@app.command(epilog=_config_help("run", "rm"))
def rm(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Train the reward model on ranked comparisons with InstructGPT's K-way ranking loss.

    Starts from the SFT model's backbone, scores each response at its last real token, sets a
    bias so the demonstrations average 0, and reports held-out accuracy against the gold labeler
    (on your own rm.data: against its held-out rankings).
    """
    from instructrl.stages.rm import run_rm

    run_rm(_load(config, overrides), restart=restart, log=_log)


@app.command(epilog=_config_help("run", "ppo"))
def ppo(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Optimise the SFT policy against the reward model with PPO; with ppo.ptx_coef > 0, PPO-ptx.

    Per-token KL penalty against the frozen SFT model, a value model initialised from the RM,
    GAE, clipped policy and value losses; PPO-ptx mixes the pretraining log-likelihood into every
    update. Writes to ppo_ptx/ (ptx_coef > 0) or ppo/ under run.dir.
    """
    from instructrl.stages.ppo import run_ppo

    run_ppo(_load(config, overrides), restart=restart, log=_log)


@app.command("eval", epilog=_config_help("run", "eval"))
def evaluate(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT) -> None:
    """Judge models' answers to held-out prompts: the built-in world's, by its gold labeler, or your own, by a reward model.

    Any causal LM can be judged (eval.models). eval.reward_model=PATH (or hub name) scores every answer
    with a reward model as well; eval.prompts=FILE answers your own prompts, which only a reward model
    can judge. To have people judge, use `instructrl label`'s A/B comparisons."""
    from instructrl.evaluation.evaluate import results_table, run_eval
    from instructrl.evaluation.report import write_report

    cfg = _load(config, overrides)
    if not _is_main_process():
        return  # evaluation runs in one process
    results = run_eval(cfg, log=_log)
    results_console().print(results_table(results))
    _log(f"eval: results in {Path(cfg.run.dir) / 'eval' / 'results.json'}; report: {write_report(Path(cfg.run.dir), cfg.pipeline.rounds)}")


@app.command(epilog=_config_help("run", "world", "tokenizer", "model", "pretrain", "sft", "collect", "rm", "ppo", "pipeline", "eval"))
def pipeline(
    config: Optional[list[Path]] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    restart_from: Optional[str] = typer.Option(None, "--restart-from", help="Discard the earlier runs of this stage and every later one and run them again: pretrain, sft, collect, rm or ppo (both PPO runs; ppo_ptx says the same). For a run folder whose config you changed. Evaluation and the report are always redone."),
) -> None:
    """Run the whole recipe: pretrain, SFT, collect comparisons, RM, PPO-ptx and plain PPO, eval, report.

    A stage whose outputs exist with the same config and inputs is skipped, so running the same
    command again after a crash resumes where it stopped; a stage whose config changed stops
    the run unless --restart-from names it or an earlier stage. Plain PPO (ppo.ptx_coef = 0)
    runs beside PPO-ptx to measure the alignment tax the pretraining mix removes.

    pipeline.rounds=N repeats collect, RM and PPO as InstructGPT iterated them, each later round in
    run.dir/round<r>/ ranking collect.n_prompts new prompts; collect.judgements=FILE trains on people's
    rankings (instructrl label export) instead of the simulated labelers', in one round.
    """
    from instructrl.evaluation.evaluate import results_table
    from instructrl.evaluation.report import headline
    from instructrl.pipeline import run_pipeline

    cfg = _load(config, overrides)
    start = time.perf_counter()
    results = run_pipeline(cfg, log=_log, is_main=_is_main_process(), restart_from=restart_from)
    if results is None:
        return  # evaluation runs in one process
    out = results_console()
    out.print(results_table(results))
    for line in headline(results):
        out.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
    _log(f"pipeline: finished in {time.perf_counter() - start:.0f} s; report: {Path(cfg.run.dir) / 'report.html'}")


@app.command(epilog=_config_help("run", "model", "ppo", "rm"))
def bench(
    config: Optional[list[Path]] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    stage: str = typer.Option("ppo", "--stage", help="ppo: time a short PPO run; rm: reward-model throughput, K-way against independent pairs."),
    iterations: int = typer.Option(6, "--iterations", "-n", min=2, help="ppo: iterations to run; the first is a warm-up and is not counted."),
    k: int = typer.Option(4, "--k", min=2, help="rm: responses per comparison."),
    comparisons: int = typer.Option(512, "--comparisons", min=1, help="rm: comparisons to train on in each mode (at least rm.batch_size)."),
) -> None:
    """Measure speed on random models shaped by the config's model section; no earlier stage needed.

    --stage ppo prints the time split of a PPO iteration (generation, each scoring pass,
    training), episodes/s, tokens/s and peak memory; --stage rm prints reward-model training
    throughput in comparisons/s with InstructGPT's K-way batches and with the same comparisons
    expanded into independent pairs. Results go to RUN_DIR/bench.json or bench_rm.json (run.dir:
    runs/bench unless the config or an override names another folder; never a trained run's) and
    are printed as a table and as JSON.
    """
    from instructrl.bench import bench_rm, bench_rm_table, bench_table, run_bench

    cfg = _load(config, overrides)
    if cfg.run.dir == PipelineConfig().run.dir:
        cfg.run.dir = Path("runs/bench")
    if stage == "rm":
        result = bench_rm(cfg, k, comparisons, log=_log)
        console.print(bench_rm_table(result))  # on stderr: standard output is the JSON
    elif stage == "ppo":
        result = run_bench(cfg, iterations, log=_log)
        console.print(bench_table(result))
    else:
        raise UserError(f"bench: unknown --stage {stage!r}; choose ppo or rm")
    typer.echo(json.dumps(result, indent=2))


data_app = typer.Typer(help="Check data files before a run.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="A JSONL, JSON, Parquet or CSV file, a datasets save_to_disk folder, or plain text (ppo.ptx_data)."),
    data_format: str = typer.Option("auto", "--format", help="auto (from the fields), text, prompt_completion, messages, preference, comparison, prompt, unpaired_preference or stepwise_supervision."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A checkpoint or tokenizer: also count the records whose text holds its control tokens (<|im_end|>, </s>, ...), which tokenizing reads as those tokens."),
) -> None:
    """Validate a data file and print its format, its record count and the stage inputs it can be.

    Every record is checked; the first that fits no format (or not the file's) is reported as
    file:line and the exit status is 2.
    """
    from instructrl.data.formats import FORMATS, check_file, count_records, warn_of_control_tokens
    from instructrl.training.progress import counting

    if data_format != "auto" and data_format not in FORMATS:
        raise UserError(f"data check: unknown --format {data_format!r}; choose auto or one of {', '.join(FORMATS)}")
    tokenizer = None
    if model is not None:
        from instructrl.models.base import load_tokenizer

        tokenizer = load_tokenizer(model)
    with counting("data check", count_records(file), "record") as done:
        summary = check_file(file, data_format, tokenizer, progress=done)
        done(summary["records"], total=summary["records"])
    details = ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("file", "format", "records", "usable_as", "not_usable_as", "control_tokens"))
    _log(f"{file}: {summary['records']} {summary['format']} records" + (f" ({details})" if details else "")
         + f"; usable as {', '.join(summary['usable_as'])}")
    for stage, reason in summary.get("not_usable_as", {}).items():
        _log(f"not usable as {stage}: {reason}")
    if "control_tokens" in summary:
        found = summary["control_tokens"]
        warn_of_control_tokens(file, (found["records"], found["first"]), "records", _log)
        if not found["records"]:
            _log(f"{file}: no record holds a control token of {model}'s tokenizer")
    typer.echo(json.dumps(summary))


MODEL_OPTION = typer.Option(..., "--model", "-m", help="A checkpoint folder (instructrl stage's final/ or any HF causal LM), or NAME=PATH; repeat for several.")
QUANTIZE_OPTION = typer.Option("none", "--quantize", help="none, or int8: dynamic int8 quantisation of the Linear layers for CPU serving.")


def _check_port_free(host: str, port: int) -> None:
    """One line naming the port another program holds (serve and label both default to 8000),
    rather than uvicorn's error after the start was announced."""
    import socket

    if not 1 <= port <= 65535:  # socket's bind would raise OverflowError; 0 would listen on a port no one is told
        raise UserError(f"--port {port}: choose a port from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port left in TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); choose another --port or --host") from None


@app.command()
def serve(
    model: list[str] = MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for every one)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="INSTRUCTRL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes (or set INSTRUCTRL_API_KEY)."),
    quantize: str = QUANTIZE_OPTION,
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most sequences decoded together (a request with n choices takes n)."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Most requests waiting for a place in the batch; more are answered 429."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Tokens generated when a request sets no max_tokens."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda (cuda:N) or mps (default: cuda when there is one)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights' dtype: auto (the checkpoint's own on a GPU, float32 on the CPU), float32, bfloat16 or float16."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for requests that bring none (default: fresh each start)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for generation (default: all cores but one, left to the HTTP loop)."),
) -> None:
    """Serve checkpoints behind an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

    Concurrent requests are decoded in one batch; point any OpenAI client at
    http://HOST:PORT/v1 with the model's name (its folder, or the stage for a stage's final/).
    """
    import uvicorn

    from instructrl.serve.app import create_app
    from instructrl.serve.loading import load_engine, parse_model_specs, set_serving_threads

    specs = parse_model_specs(model)
    _check_port_free(host, port)  # now, not after loading the models
    set_serving_threads(threads)
    engines = {name: load_engine(path, quantize, device, dtype, max_batch=max_batch, max_queue=max_queue, seed=seed) for name, path in specs.items()}
    server_app = create_app(engines, api_key=api_key, default_max_tokens=max_tokens)
    for name, path in specs.items():
        one_at_a_time = " (recurrent layers: one sequence at a time, n = 1)" if engines[name].one_at_a_time else ""
        _log(f"serve: model {name} from {path}" + (" (int8)" if quantize == "int8" else "") + one_at_a_time)
    _log(f"serve: OpenAI-compatible API at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(server_app, host=host, port=port, log_level="warning")


@app.command()
def chat(
    model: list[str] = MODEL_OPTION,
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start each conversation with."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 answers greedily."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Most tokens per answer."),
    quantize: str = QUANTIZE_OPTION,
    seed: int = typer.Option(0, "--seed", help="Sampling seed (with --temperature > 0)."),
) -> None:
    """Chat with a checkpoint in the terminal; give two --model to see them answer side by side (e.g. sft and ppo_ptx).

    Each model keeps its own history. /reset starts a new conversation, /quit (or Ctrl-D) leaves.
    """
    from instructrl.serve.terminal_chat import run_chat
    from instructrl.serve.loading import load_engine, parse_model_specs, set_serving_threads

    set_serving_threads(None)
    engines = {name: load_engine(path, quantize) for name, path in parse_model_specs(model).items()}
    for name, engine in engines.items():
        if engine.tokenizer.chat_template is None:
            raise UserError(f"chat: the model '{name}' has no chat template (serve it and use /v1/completions instead)")
    run_chat(engines, Console(), system=system, temperature=temperature, max_tokens=max_tokens, seed=seed)


label_app = typer.Typer(no_args_is_help=False, rich_markup_mode="rich")
app.add_typer(label_app, name="label")
LABEL_DIR_OPTION = typer.Option(Path("runs/label"), "--dir", "-d", help="The feedback project directory (feedback.db, exports/).")


@label_app.callback(invoke_without_command=True)
def label(
    ctx: typer.Context,
    project_dir: Path = LABEL_DIR_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
) -> None:
    """Start the feedback web app on a project directory (SQLite, WAL). Sub-commands manage it.

    [bold]instructrl label user[/bold] adds accounts, [bold]label project[/bold] creates a project from a prompts
    file and a model, [bold]label export[/bold] writes the training files, [bold]label status[/bold] shows
    progress and agreement.
    """
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from instructrl.feedback.app import create_app

    _check_port_free(host, port)
    _log(f"label: serving {project_dir} on http://{host}:{port} (Ctrl-C stops; nothing submitted is lost)")
    uvicorn.run(create_app(project_dir), host=host, port=port, log_level="warning")


@label_app.command("user")
def label_user(
    name: str = typer.Argument(..., help="Login name."),
    role: str = typer.Option("labeler", "--role", help="admin or labeler."),
    password: str = typer.Option(..., "--password", prompt=True, hide_input=True, help="Password (asked when not given)."),
    reset: bool = typer.Option(False, "--reset", help="Give an existing account this new password and a new API token; its old token and browser sessions stop working."),
    project_dir: Path = LABEL_DIR_OPTION,
) -> None:
    """Add an account, or --reset one; prints its API token (Authorization: Bearer TOKEN)."""
    from instructrl.feedback.accounts import create_user, reset_user
    from instructrl.feedback.db import connect

    if reset:
        user = reset_user(connect(project_dir), name, password)
        _log(f"label: user {user.name} ({user.role}) has a new password and API token; the old token no longer works")
    else:
        user = create_user(connect(project_dir), name, role, password)
        _log(f"label: user {user.name} ({user.role}) created")
    typer.echo(user.token)


@label_app.command("project")
def label_project(
    name: str = typer.Argument(..., help="Project name."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts: any records that hold one ({'prompt': ...}, {'messages': [...]}, ...), in JSONL, JSON, Parquet or CSV: a file `instructrl data check` finds usable as ppo.prompts."),
    write: bool = typer.Option(False, "--write", help="A write task (a demonstration) per prompt."),
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint whose K sampled responses per prompt are ranked."),
    k: int = typer.Option(4, "--k", min=2, max=9, help="Responses per rank task (InstructGPT: 4 to 9)."),
    responses: Optional[Path] = typer.Option(None, "--responses", help="Rank the responses of a comparisons file (instructrl collect's) instead of sampling."),
    compare: Optional[list[str]] = typer.Option(None, "--compare", help="NAME=CHECKPOINT, twice: compare tasks between the two models' answers."),
    overlap: int = typer.Option(1, "--overlap", help="Different labelers per task."),
    guidelines: Optional[Path] = typer.Option(None, "--guidelines", help="Text file of guidelines shown beside every task."),
    guideline_version: Optional[str] = typer.Option(None, "--guideline-version", help="Stored on each answer (default: a hash of the guidelines)."),
    lease_minutes: float = typer.Option(30.0, "--lease-minutes", help="How long an opened task stays reserved for its labeler."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use the first N prompts (or comparisons) only. Default: all."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest generated response."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled responses."),
    project_dir: Path = LABEL_DIR_OPTION,
) -> None:
    """Create a project: write tasks, rank tasks (K responses from a model or a file) and/or compare tasks."""
    from instructrl.feedback import projects
    from instructrl.feedback.db import DB_NAME, connect
    from instructrl.feedback.tasks import TaskError, check_new_name, check_tasks, create_project, progress

    settings = _project_settings(name, guidelines, guideline_version, overlap, lease_minutes)
    compared_models = _compared_models(compare)  # now, not after sampling responses for minutes
    wanted = {"--write": write, "--model": model, "--compare": compare}
    if prompts is None and any(wanted.values()):
        raise UserError(f"label project: {', '.join(k for k, v in wanted.items() if v)} need --prompts FILE")
    if not any(wanted.values()) and responses is None:
        raise UserError("label project: say which tasks to make: --write, --model CHECKPOINT, --responses FILE or --compare NAME=PATH (twice)")
    prompt_list = projects.load_prompts(prompts, limit) if prompts else []
    new_tasks = projects.write_tasks(prompt_list) if write else []
    if (project_dir / DB_NAME).is_file():  # a new folder is made once the tasks are: bad input leaves none behind
        try:
            with contextlib.closing(connect(project_dir)) as existing:
                check_new_name(existing, name)  # now, not after sampling responses for minutes
        except TaskError as err:
            raise UserError(f"label project: {err}") from None
    generation = {}  # recorded with the project: the responses alone do not say what made them
    if model:
        sampling = {"k": k, "seed": seed, "temperature": 1.0, "max_new_tokens": max_new_tokens}
        new_tasks += projects.rank_tasks_from_model(prompt_list, model, **sampling)
        generation["rank"] = {"model": model, **sampling}
    if responses:
        new_tasks += projects.rank_tasks_from_comparisons(responses)[:limit]  # their sources name the file
    if compared_models:
        new_tasks += projects.compare_tasks(prompt_list, compared_models, max_new_tokens=max_new_tokens)
        generation["compare"] = {"models": compared_models, "greedy": True, "max_new_tokens": max_new_tokens}
    try:
        check_tasks(new_tasks)  # before the database is made: a project refused leaves no folder behind
        conn = connect(project_dir)
        project_id = create_project(conn, settings.model_copy(update={"generation": generation}), new_tasks)
    except TaskError as err:
        raise UserError(f"label project: {err}") from None
    counts = {kind: sum(t["kind"] == kind for t in new_tasks) for kind in ("write", "rank", "compare")}
    identical = progress(conn, project_id)["kinds"].get("compare", {}).get("identical_answers")
    _log(f"label: project {name} (id {project_id}) in {project_dir}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
         + f" tasks, overlap {overlap}, guidelines {settings.version()}"
         + (f"; {identical} compare tasks have two identical answers: ties, never shown to labelers" if identical else ""))


def _project_settings(name: str, guidelines: Optional[Path], guideline_version: Optional[str], overlap: int, lease_minutes: float):
    """``label project``'s options as the project's ProjectSettings; a UserError naming the bad option."""
    from pydantic import ValidationError

    from instructrl.feedback.tasks import ProjectSettings

    if guidelines is not None and not guidelines.is_file():
        raise UserError(f"--guidelines {guidelines}: " + ("a folder, not a text file" if guidelines.is_dir() else "file not found"))
    if lease_minutes <= 0:
        raise UserError(f"label project: --lease-minutes must be more than 0, got {lease_minutes}")
    try:
        return ProjectSettings(name=name, guidelines=guidelines.read_text(encoding="utf-8") if guidelines else "",
                               guideline_version=guideline_version, overlap=overlap, lease_seconds=max(1, round(lease_minutes * 60)))
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"label project: --{'-'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def _compared_models(compare: Optional[list[str]]) -> dict[str, str]:
    """The two models of ``--compare NAME=CHECKPOINT`` (given twice), by name; none without --compare."""
    pairs = [c.partition("=") for c in compare or []]
    if any(not sep or not n or not p for n, sep, p in pairs):
        raise UserError("label project: --compare takes NAME=CHECKPOINT")
    models = {n: p for n, _, p in pairs}
    if compare and len(models) != 2:
        raise UserError(f"label project: --compare needs two models with different names (NAME=CHECKPOINT twice), got {len(models)}")
    return models


@label_app.command("export")
def label_export(
    name: str = typer.Argument(..., help="Project name."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the files. Default: DIR/exports/<project id>."),
    project_dir: Path = LABEL_DIR_OPTION,
) -> None:
    """Write demonstrations.jsonl (sft.data), comparisons.jsonl (rm.data), comparisons_aggregated.jsonl,
    preference_pairs.jsonl (TRL), compare.jsonl and quality.json."""
    from instructrl.feedback.export import export_project

    conn, project_id = _open_project(project_dir, name, "label export")
    folder = out or project_dir / "exports" / str(project_id)
    counts = export_project(conn, project_id, folder)
    _log(f"label: exported {name} to {folder}: " + ", ".join(f"{file} {n}" for file, n in counts.items()))


@label_app.command("status")
def label_status(name: str = typer.Argument(..., help="Project name."), project_dir: Path = LABEL_DIR_OPTION) -> None:
    """Progress per task kind and per labeler, agreement and win rates, as JSON."""
    from instructrl.data.jsonl import nan_to_none
    from instructrl.feedback.export import quality

    conn, project_id = _open_project(project_dir, name, "label status")
    typer.echo(json.dumps(nan_to_none(quality(conn, project_id)), indent=2))


def _open_project(project_dir: Path, name: str, command: str) -> tuple[sqlite3.Connection, int]:
    """The connection to an existing project folder and the id of its project ``name``; a UserError
    naming ``command`` when there is no such project."""
    from instructrl.feedback.db import connect
    from instructrl.feedback.tasks import TaskError, project_by_name

    conn = connect(project_dir, create=False)
    try:
        return conn, project_by_name(conn, name)["id"]
    except TaskError as err:
        raise UserError(f"{command}: {err} in {project_dir}") from None


@app.command("config")
def show_config(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT) -> None:
    """Print the resolved config (defaults, file and overrides) as YAML."""
    typer.echo(dump_config(_load(config, overrides)), nl=False)


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Join each docstring's hard-wrapped lines into paragraphs. Typer keeps a single line break
    after the first paragraph, and the terminal then wraps the long lines again, leaving ragged
    half-lines in every --help."""
    infos = list(typer_app.registered_commands) + ([typer_app.registered_callback] if typer_app.registered_callback else [])
    for info in infos:
        text = info.help or inspect.getdoc(info.callback)
        if text:  # an empty help would hide the one given to typer.Typer(help=...), as the callback `main` has none
            info.help = "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in text.split("\n\n"))
    for group in typer_app.registered_groups:
        _unwrap_help(group.typer_instance)


_unwrap_help(app)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler pre-empting the job) is met as Ctrl-C is: checkpoints are written
    whole and the run resumes, so one line says so; the exit status is 143, the signal's."""
    _state["terminated"] = True
    raise KeyboardInterrupt


def run() -> None:
    """Entry point: turn a UserError into one line on stderr and exit status 2; of several processes, the
    first to stop says why (``_first_to_stop``)."""
    signal.signal(signal.SIGTERM, _on_sigterm)  # serve and label: uvicorn installs its own while it runs
    _state.pop("first_to_stop", None)
    _import_before_the_process_group()
    try:
        _run_app()
    except Exception as crash:
        # a bug or running out of memory shows its traceback; a collective broken because another process
        # of the launch stopped first (gloo: "Connection closed by peer") follows from that one's message
        if _first_to_stop() is False:
            sys.exit(1)
        _tell_launcher(f"{type(crash).__name__}: {crash}")
        raise
    finally:
        _close_process_group()


def _run_app() -> None:
    try:
        app()
    except UserError as err:
        if _state["debug"]:
            raise
        _say_why(str(err))
        sys.exit(2)
    except OSError as err:  # a full disk, a read-only or forbidden folder: checkpoints written so far are whole
        in_the_way = _not_a_folder(err)
        if _state["debug"] or (in_the_way is None and err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)):
            raise
        if in_the_way is not None:  # run.dir=results.txt, --dir of a file: bad input, not a full disk
            _say_why(f"{in_the_way}; give a folder's path")
            sys.exit(2)
        where = f" {err.filename}" if err.filename else ""
        _say_why(f"cannot write{where}: {err.strerror or err}; make room or fix the folder, then {_how_to_resume()}")
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit) as exit_:
        # typer turns Ctrl-C into exit status 130
        if isinstance(exit_, KeyboardInterrupt) or exit_.code == 130:
            terminated = _state.get("terminated", False)
            _say_why(f"{'terminated' if terminated else 'interrupted'}: {_how_to_resume()} from the last checkpoint", error=False)
            sys.exit(143 if terminated else 130)
        raise


def _not_a_folder(err: OSError) -> str | None:
    """What stands where ``err`` needed a folder (a folder to make, or one on the way to a file to write:
    os.makedirs says EEXIST for the first, any write ENOTDIR for the second): a file, or a link to nothing."""
    if err.errno not in (errno.EEXIST, errno.ENOTDIR) or not err.filename:
        return None
    path = Path(os.fsdecode(err.filename))
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return f"{p} is a link to {os.readlink(p)}, which does not exist"
        if p.exists() and not p.is_dir():
            return f"{p} is a file, where a folder is needed"
    return None


def _say_why(message: str, error: bool = True) -> None:
    """One line on stderr saying why the command stops, from the first process of its launch to stop
    (and in the failure summary ``accelerate launch`` prints last)."""
    first = _first_to_stop()
    if not (_is_main_process() if first is None else first):  # without the launcher's store, the main process speaks
        return
    console.print(("[bold red]error:[/bold red] " if error else "") + escape(message), highlight=False, soft_wrap=True)
    _tell_launcher(("error: " if error else "") + message)


def _tell_launcher(message: str) -> None:
    """Write ``message`` to torchrun's error file, whose failure summary then names it as the root cause."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):  # the full disk this may report
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def _first_to_stop() -> bool | None:
    """Whether this process, stopping early, is the first of its launch to stop, and so the one to say why;
    None when it cannot know (several processes, and no launcher's store to count them in).

    Under `accelerate launch` every process meets the same bad input, or one process alone fails (a
    checkpoint only the main process writes, a file only its own rank reads); either way the launcher
    then stops the others (SIGTERM) or their collectives break, and one message says why, from the
    process that knows. The first to stop is counted in the store of torchrun's agent."""
    if "first_to_stop" not in _state:
        # this process is leaving: the launcher's SIGTERM to the others must not cut its message short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _state["first_to_stop"] = _claim_first_stop()
    return _state["first_to_stop"]


def _claim_first_stop() -> bool | None:
    if not _launched():
        return True
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # not launched by torchrun's agent (accelerate launch's)
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    try:
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=10))
        # the agent's store outlives the workers; a restarted worker group counts afresh
        return store.add(f"instructrl/stopped/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", 1) == 1
    except (RuntimeError, OSError, KeyError, ValueError):  # the launcher is gone
        return None


def _how_to_resume() -> str:
    """What to run to resume: the same command, less a --restart or --restart-from, which would
    discard the progress just made once more."""
    if any(arg == "--restart" or arg.startswith("--restart-from") for arg in sys.argv[1:]):
        return "run the same command without --restart or --restart-from to resume"
    return "run the same command again to resume"


def _import_before_the_process_group() -> None:
    """Import torch.distributed.nn before Accelerate creates the process group, so that
    ``_close_process_group`` frees it. Imported later (transformers does, loading a tokenizer), its
    functions keep the group as a default argument (``group=group.WORLD``): gloo's worker threads then
    outlive destroy_process_group, and one still releasing the last collective's tensors when the
    interpreter shuts down takes the GIL and aborts the process (the pipeline's rank 1, leaving just
    after its last PPO step while rank 0 evaluates)."""
    if _launched():  # one process has no group
        import torch.distributed.nn  # noqa: F401


def _launched() -> bool:
    """Whether this is one of several processes a launcher (torchrun, accelerate launch) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _close_process_group() -> None:
    """Destroy the process group of ``accelerate launch`` before the interpreter exits: left to
    the interpreter's teardown, gloo's worker threads can abort a finished process ("terminate
    called without an active exception"); see ``_import_before_the_process_group``."""
    if "torch.distributed" in sys.modules:  # nothing to close, and no torch to import, after --help
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run()
