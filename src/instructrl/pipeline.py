"""The whole recipe in one call: what ``instructrl pipeline`` and ``make demo`` run.

    pretrain -> SFT -> [collect -> RM -> PPO-ptx and plain PPO] x rounds -> eval -> report

Every stage skips itself when its outputs exist for the same config and inputs, so running the
pipeline again after a crash resumes where it stopped; after a change of config, ``restart_from``
reruns a stage and everything after it. Plain PPO runs beside PPO-ptx to measure
the alignment tax that the pretraining mix removes. With ``pipeline.rounds: N`` the bracket
repeats as InstructGPT iterated its steps 2 and 3: round r (in ``round<r>/``) ranks fresh RM
prompts with the latest PPO-ptx policy, retrains the RM from the SFT model on every comparison
so far, and continues both PPO runs from where the previous round left them, the KL reference
staying the SFT model.
"""

from __future__ import annotations

from pathlib import Path

from instructrl.config import PipelineConfig
from instructrl.data.jsonl import complete_lines
from instructrl.errors import UserError
from instructrl.rundir import write_text_atomic
from instructrl.world.build import build_world, split_sizes

PPO_STAGES = ("ppo_ptx", "ppo")
STAGES = ("pretrain", "sft", "collect", "rm", "ppo")  # the order of ``restart_from``; ppo is both PPO runs


def run_pipeline(config: PipelineConfig, log=print, is_main: bool = True, restart_from: str | None = None) -> dict | None:
    """Run every stage; returns the evaluation results (None on processes other than the main one).

    ``restart_from``: that stage and every later one discard their earlier runs and run again
    (later rounds too, as they follow from the first round's PPO)."""
    restart_from = "ppo" if restart_from == "ppo_ptx" else restart_from  # the folder's name for the same step
    if restart_from is not None and restart_from not in STAGES:
        raise UserError(f"--restart-from {restart_from!r}: choose one of {', '.join(STAGES)}")
    redo = {stage: restart_from is not None and i >= STAGES.index(restart_from) for i, stage in enumerate(STAGES)}
    from accelerate import PartialState

    from instructrl.evaluation.evaluate import run_eval
    from instructrl.evaluation.report import write_report
    from instructrl.stages.collect import run_collect
    from instructrl.stages.ppo import run_ppo
    from instructrl.stages.pretrain import run_pretrain
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    config.check_sizes(PartialState().num_processes)  # every stage's, before the first runs
    first = round_one(config, log)  # and what later rounds cannot do
    root = Path(config.run.dir)
    rounds = config.pipeline.rounds
    run_pretrain(config, restart=redo["pretrain"], log=log)
    world = build_world(config.world, root / "world")
    run_sft(config, restart=redo["sft"], log=log)
    if is_main:  # sampling and judging run in one process; the others wait for the comparisons
        run_collect(first, restart=redo["collect"], log=log)
    _barrier()
    run_rm(first, restart=redo["rm"], log=log)
    latest = {stage: root / stage for stage in PPO_STAGES}
    for cfg in _ppo_configs(first).values():
        run_ppo(cfg, restart=redo["ppo"], log=log)
    comparisons = [root / "collect" / "comparisons.jsonl"]
    for r in range(2, rounds + 1):
        rc = first.model_copy(deep=True)
        rc.run.dir = root / f"round{r}"
        rc.collect.policy = str(latest["ppo_ptx"] / "final")
        rc.collect.first_prompt = first.collect.first_prompt + (r - 1) * first.collect.n_prompts
        if is_main:
            comparisons.append(run_collect(rc, restart=redo["ppo"], log=log, upstream=True))
            _concatenate(comparisons, rc.run.dir / "comparisons_all.jsonl")
        _barrier()
        rc.rm.model, rc.rm.data = str(root / "sft" / "final"), rc.run.dir / "comparisons_all.jsonl"
        rc.rm.demonstrations = world.demonstrations
        run_rm(rc, restart=redo["ppo"], log=log, upstream=True)
        for stage, cfg in _ppo_configs(rc).items():
            cfg.ppo.policy, cfg.ppo.value_model = str(latest[stage] / "final"), str(latest[stage] / "value")
            cfg.ppo.reference, cfg.ppo.reward_model = str(root / "sft" / "final"), str(rc.run.dir / "rm" / "final")
            cfg.ppo.prompts = world.prompts("ppo")
            cfg.ppo.first_iteration = first.ppo.first_iteration + (r - 1) * first.ppo.iterations()
            if cfg.ppo.ptx_coef > 0 and cfg.ppo.ptx_data is None:
                cfg.ppo.ptx_data = world.corpus
            run_ppo(cfg, restart=redo["ppo"], log=log, upstream=True)
            latest[stage] = rc.run.dir / stage
    if not is_main:
        return None
    results = run_eval(config, log=log)  # of the last round's PPO models
    write_report(root)
    return results


def round_one(config: PipelineConfig, log=print) -> PipelineConfig:
    """The first round's config: with several rounds, collect ranks one round's RM prompts, collect.n_prompts
    (an equal share of them all when unset), and round r the next ones. Refuses, before any stage runs,
    what a later round could not do."""
    rounds, collect = config.pipeline.rounds, config.collect
    if rounds == 1:
        return config
    if collect.judgements is not None:
        raise UserError(f"pipeline.rounds = {rounds} with collect.judgements: each later round ranks samples of the previous round's "
                        f"PPO-ptx policy, which {collect.judgements} does not hold (the pipeline would train on its rankings again); "
                        "run people's rankings with pipeline.rounds=1")
    if config.ppo.lora.enabled:
        raise UserError(f"pipeline.rounds = {rounds} with ppo.lora.enabled: a later round continues PPO from the previous round's "
                        "policy with the SFT model as the KL reference, and under ppo.lora the reference is the policy's own base "
                        "model; use pipeline.rounds=1 or full fine-tuning (ppo.lora.enabled=false)")
    available = split_sizes(config.world)["rm"] - collect.first_prompt
    per_round = collect.n_prompts or available // rounds
    if per_round * rounds > available or per_round == 0:
        given = f"collect.n_prompts = {collect.n_prompts} a round" if collect.n_prompts else f"an equal share of them ({per_round})"
        raise UserError(f"pipeline.rounds = {rounds}: the world has {available} RM prompts"
                        + (f" from collect.first_prompt = {collect.first_prompt}" if collect.first_prompt else "")
                        + f", too few for {rounds} rounds of {given}; lower pipeline.rounds or collect.n_prompts, or raise world.n_prompts")
    log(f"pipeline: {rounds} rounds, each ranking {per_round} new RM prompts of {available} "
        + ("(collect.n_prompts)" if collect.n_prompts else "(an equal share of them; collect.n_prompts sets how many a round)"))
    first = config.model_copy(deep=True)
    first.collect.n_prompts = per_round
    return first


def _ppo_configs(config: PipelineConfig) -> dict[str, PipelineConfig]:
    """PPO-ptx with the config's ptx_coef, and plain PPO (ptx_coef = 0) beside it."""
    ptx = config.model_copy(deep=True)
    if ptx.ppo.ptx_coef == 0:
        return {"ppo": ptx}
    plain = config.model_copy(deep=True)
    plain.ppo.ptx_coef = 0.0
    return {"ppo_ptx": ptx, "ppo": plain}


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _concatenate(files: list[Path], dest: Path) -> None:
    """Every comparison so far in one file (rewritten whole, so a crash leaves the old one)."""
    lines = [line + "\n" for f in files for line, _ in complete_lines(f)]
    write_text_atomic(dest, "".join(lines))
