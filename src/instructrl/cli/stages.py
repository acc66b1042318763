"""The commands of the recipe's stages: world, pretrain, sft, collect, rm, ppo, eval, the whole pipeline,
and bench (their speed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from instructrl.cli.root import CONFIG_OPTION, OVERRIDES_ARGUMENT, RESTART_OPTION, app, config_help, console, is_main_process, load_options, log
from instructrl.config import PipelineConfig, WorldConfig
from instructrl.errors import UserError
from instructrl.training.progress import results_console


@app.command(epilog=config_help("run", "world"))
def world(
    config: Optional[list[Path]] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    restart: bool = typer.Option(False, "--restart", help="Replace a world of another config in run.dir (the stages trained on it are then stale)."),
) -> None:
    """Write the built-in instruction world: prompt splits, demonstrations, pretraining corpus.

    Also says how often two simulated labelers at collect.labeler_noise (collect's setting, not the
    world's) agree, to set it against InstructGPT's labelers.
    """
    from instructrl.world.build import WorldFiles, build_world

    cfg = load_options(config, overrides)
    manifest = WorldFiles(Path(cfg.run.dir) / "world").manifest
    before = manifest.read_text() if manifest.is_file() else None
    files = build_world(cfg.world, manifest.parent, replace=restart)
    after = files.manifest.read_text()  # a rebuild writes a new one: its record says when it started
    where = f"unchanged in {files.root} (written earlier with this config)" if after == before else f"written to {files.root}"
    log(f"world {where}: " + ", ".join(f"{n} {split}" for split, n in json.loads(after)["counts"].items()) + " prompts")
    rate, n_pairs = _labeler_agreement(cfg.world, cfg.collect.labeler_noise, files.prompts("rm"))
    log(f"two simulated labelers at noise {cfg.collect.labeler_noise} agree on {rate:.1%} of {n_pairs} comparisons (InstructGPT's labelers: ~73%)")


def _labeler_agreement(world_cfg: WorldConfig, noise: float, rm_prompts: Path) -> tuple[float, int]:
    """How often two simulated labelers at ``noise`` agree, and on how many comparisons: two distinct
    demonstrations of one RM prompt each (of the first 1500), so that collect.labeler_noise can be
    set against InstructGPT's ~73% inter-labeler agreement."""
    import random

    from instructrl.world.build import demo_labeler, demonstration, load_tasks
    from instructrl.world.labeler import SimulatedLabeler, agreement_rate

    rng, writer = random.Random(world_cfg.seed), demo_labeler(world_cfg)
    pairs = [(t, demonstration(world_cfg, t), writer.demonstrate(t, rng)) for t in load_tasks(rm_prompts)[:1500]]
    pairs = [p for p in pairs if p[1] != p[2]]
    return agreement_rate(SimulatedLabeler("a", noise), SimulatedLabeler("b", noise), pairs), len(pairs)


@app.command(epilog=config_help("run", "world", "tokenizer", "model", "pretrain"))
def pretrain(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Train the BPE tokenizer and pretrain the small base model on the world's corpus.

    A killed run resumes from its last checkpoint when the same command is run again.
    """
    from instructrl.stages.pretrain import run_pretrain

    run_pretrain(load_options(config, overrides), restart=restart, log=log)


@app.command(epilog=config_help("run", "sft"))
def sft(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Supervised fine-tuning of any Hugging Face causal LM on demonstrations.

    Loss on assistant tokens (every token of text records). On the built-in world the output is
    the checkpoint the simulated labeler scores best on validation prompts; on your own
    sft.data, the last one. A killed run resumes when the same command is run again.
    """
    from instructrl.stages.sft import run_sft

    run_sft(load_options(config, overrides), restart=restart, log=log)


@app.command(epilog=config_help("run", "collect"))
def collect(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Sample K responses per RM prompt from the SFT policy and have labelers rank them.

    The simulated labelers judge by default; collect.judgements=FILE takes people's rankings
    instead. Writes comparisons.jsonl (the record format of instructrl.data.records). A killed
    collection resumes when the same command is run again.
    """
    from instructrl.stages.collect import run_collect

    if is_main_process():
        run_collect(load_options(config, overrides), restart=restart, log=log)


@app.command(epilog=config_help("run", "rm"))
def rm(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Train the reward model on ranked comparisons with InstructGPT's K-way ranking loss.

    Starts from the SFT model's backbone, scores each response at its last real token, sets a
    bias so the demonstrations average 0, and reports held-out accuracy against the gold labeler
    (on your own rm.data: against its held-out rankings).
    """
    from instructrl.stages.rm import run_rm

    run_rm(load_options(config, overrides), restart=restart, log=log)


@app.command(epilog=config_help("run", "ppo"))
def ppo(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT, restart: bool = RESTART_OPTION) -> None:
    """Optimise the SFT policy against the reward model with PPO; with ppo.ptx_coef > 0, PPO-ptx.

    Per-token KL penalty against the frozen SFT model, a value model initialised from the RM,
    GAE, clipped policy and value losses; PPO-ptx mixes the pretraining log-likelihood into every
    update. Writes to ppo_ptx/ (ptx_coef > 0) or ppo/ under run.dir.
    """
    from instructrl.stages.ppo import run_ppo

    run_ppo(load_options(config, overrides), restart=restart, log=log)


@app.command("eval", epilog=config_help("run", "eval"))
def evaluate(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT) -> None:
    """Judge models' answers to held-out prompts: the built-in world's, by its gold labeler, or your own, by a reward model.

    Any causal LM can be judged (eval.models). eval.reward_model=PATH (or hub name) scores every answer
    with a reward model as well; eval.prompts=FILE answers your own prompts, which only a reward model
    can judge. To have people judge, use `instructrl label`'s A/B comparisons."""
    from instructrl.evaluation.evaluate import results_table, run_eval
    from instructrl.evaluation.report import write_report

    cfg = load_options(config, overrides)
    if not is_main_process():
        return  # evaluation runs in one process
    results = run_eval(cfg, log=log)
    results_console().print(results_table(results))
    log(f"eval: results in {Path(cfg.run.dir) / 'eval' / 'results.json'}; report: {write_report(Path(cfg.run.dir), cfg.pipeline.rounds)}")


@app.command(epilog=config_help("run", "world", "tokenizer", "model", "pretrain", "sft", "collect", "rm", "ppo", "pipeline", "eval"))
def pipeline(
    config: Optional[list[Path]] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    restart_from: Optional[str] = typer.Option(None, "--restart-from", help="Discard the earlier runs of this stage and every later one and run them again: pretrain, sft, collect, rm or ppo (both PPO runs; ppo_ptx says the same). For a run folder whose config you changed. Evaluation and the report are always redone."),
    check: bool = typer.Option(False, "--check", help="Make every check the pipeline makes before its first stage, then print what it would do with each run (train, resume, skip, redo) and exit, training and writing nothing."),
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

    cfg = load_options(config, overrides)
    if check:
        _print_plan(cfg, restart_from)
        return
    start = time.perf_counter()
    results = run_pipeline(cfg, log=log, is_main=is_main_process(), restart_from=restart_from)
    if results is None:
        return  # evaluation runs in one process
    out = results_console()
    out.print(results_table(results))
    for line in headline(results):
        out.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
    log(f"pipeline: finished in {time.perf_counter() - start:.0f} s; report: {Path(cfg.run.dir) / 'report.html'}")


def _print_plan(cfg: PipelineConfig, restart_from: str | None) -> None:
    """`pipeline --check`: the pipeline's checks before its first stage, then its plan, one line a run; a run it
    would stop at (begun on another config, or on inputs changed since) ends it as that stage's refusal would, with exit status 2."""
    from instructrl.pipeline.checks import before_training
    from instructrl.pipeline.plan import plan

    redo, first = before_training(cfg, restart_from, log)
    steps = plan(first, redo)
    if not is_main_process():
        return
    for where, _, words in steps:
        typer.echo(f"{where}: {words}")
    stops = [where for where, kind, _ in steps if kind == "stops"]
    if stops:
        raise UserError(f"the pipeline would stop at {stops[0]} (see above)")
    kinds = [kind for _, kind, _ in steps]
    typer.echo(f"config OK: {kinds.count('trains')} runs to train, {kinds.count('finished')} finished (run.dir {cfg.run.dir})")


@app.command(epilog=config_help("run", "model", "ppo", "rm"))
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

    cfg = load_options(config, overrides)
    if cfg.run.dir == PipelineConfig().run.dir:
        cfg.run.dir = Path("runs/bench")
    if stage == "rm":
        result = bench_rm(cfg, k, comparisons, log=log)
        console.print(bench_rm_table(result))  # on stderr: standard output is the JSON
    elif stage == "ppo":
        result = run_bench(cfg, iterations, log=log)
        console.print(bench_table(result))
    else:
        raise UserError(f"bench: unknown --stage {stage!r}; choose ppo or rm")
    typer.echo(json.dumps(result, indent=2))
