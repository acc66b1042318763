"""The pipeline's rounds: round one's config, a later round's, the two PPO runs of a round, and every run the
pipeline trains, each with the config it trains on (``pipeline_runs``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from instructrl.config import PipelineConfig
from instructrl.errors import UserError
from instructrl.evaluation.report import round_folders
from instructrl.world.build import split_sizes

PPO_STAGES = ("ppo_ptx", "ppo")
STAGES = ("pretrain", "sft", "collect", "rm", "ppo")  # the order of ``restart_from``; ppo is both PPO runs


class Run(NamedTuple):
    """One run of the pipeline."""

    config: PipelineConfig  # what it trains on: its round's, a PPO run's own (``_ppo_configs``)
    folder: Path  # in run.dir: ppo_ptx, round2/rm
    section: str  # its config's section
    stage: str  # what --restart-from redoes it with (a later round's runs: ppo, see run_pipeline)


def pipeline_runs(first: PipelineConfig, redo: dict[str, bool]) -> list[Run]:
    """Every run the pipeline would train, round by round in the order it trains them, finished or not (not eval).
    ``first``: round one's config (``round_one``). Reads the β a later round's PPO starts from (ppo.adaptive_kl), saying
    nothing where the previous round has not finished; where --restart-from redoes PPO (``redo``: which of ``STAGES``)
    the previous round trains again before it is read: a later round's PPO runs are then given their round's config
    as it is before it goes on from the previous round's."""
    root = Path(first.run.dir)
    runs = [Run(first, root / "pretrain", "pretrain", "pretrain"), Run(first, root / "sft", "sft", "sft")]
    for r in range(1, first.pipeline.rounds + 1):
        rc, previous = (first, None) if r == 1 else later_round(first, r)
        folder = Path(rc.run.dir)
        runs += [Run(rc, folder / "collect", "collect", "collect" if r == 1 else "ppo"), Run(rc, folder / "rm", "rm", "rm" if r == 1 else "ppo")]
        ppo = _ppo_configs(rc, None if redo["ppo"] else previous, log=lambda _: None)
        runs += [Run(cfg, folder / name, "ppo", "ppo") for name, cfg in ppo.items()]
    return runs


def round_one(config: PipelineConfig, log=print) -> PipelineConfig:
    """The first round's config: with several rounds, collect ranks one round's RM prompts, collect.n_prompts
    (an equal share of them all when unset), and round r the next ones. Refuses, before any stage runs,
    what a later round could not do, and a collect.first_prompt past the RM prompts."""
    rounds, collect = config.pipeline.rounds, config.collect
    n_rm = split_sizes(config.world)["rm"]
    available = n_rm - collect.first_prompt
    if collect.judgements is None and available <= 0:
        raise UserError(f"collect.first_prompt = {collect.first_prompt} is past the world's {n_rm} RM prompts")
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


def later_round(first: PipelineConfig, r: int) -> tuple[PipelineConfig, Path]:
    """Round ``r``'s config (r > 1), in round<r>/, and the previous round's folder: collect ranks the
    next RM prompts with the previous round's policy (PPO-ptx's when it runs), the RM trains from round
    1's backbone on every round's comparisons, and PPO keeps round 1's KL reference (``_ppo_configs``
    goes on from the previous round's policies). The run's own folders are named from the round's
    ("round2/../sft/final"), so that the round's identity holds in a moved or copied run folder."""
    rc = first.model_copy(deep=True)
    rc.run.dir = round_folders(Path(first.run.dir), r)[-1]
    run = rc.run.dir / ".."
    previous = run if r == 2 else run / f"round{r - 1}"
    sft = run / "sft" / "final"
    rc.collect.first_prompt = first.collect.first_prompt + (r - 1) * first.collect.n_prompts
    rc.collect.policy = str(previous / next(iter(_ppo_configs(first))) / "final")
    rc.rm.model, rc.rm.data = first.rm.model or str(sft), rc.run.dir / "comparisons_all.jsonl"
    rc.ppo.reference = first.ppo.reference or first.ppo.policy or str(sft)
    rc.ppo.reward_model = str(rc.run.dir / "rm" / "final")
    rc.ppo.first_iteration = first.ppo.first_iteration + (r - 1) * first.ppo.iterations()
    return rc, previous


def _ppo_configs(config: PipelineConfig, previous: Path | None = None, log=print) -> dict[str, PipelineConfig]:
    """PPO-ptx with the config's ptx_coef, and plain PPO (ptx_coef = 0) beside it, by folder name;
    each goes on from its own policy and value model in ``previous`` (a later round's previous round),
    and with ppo.adaptive_kl from the β its controller reached there, as ppo.kl_coef: read from the
    finished run's final/, so a skipped or resumed round starts where an uninterrupted one would, and
    in the round's identity, so a round run on another β is not taken for this one."""
    from instructrl.stages.ppo import final_kl_coef

    ptx = config.model_copy(deep=True)
    plain = config.model_copy(deep=True)
    plain.ppo.ptx_coef = 0.0
    runs = {"ppo": ptx} if ptx.ppo.ptx_coef == 0 else {"ppo_ptx": ptx, "ppo": plain}
    if previous is not None:
        for stage, cfg in runs.items():
            cfg.ppo.policy, cfg.ppo.value_model = str(previous / stage / "final"), str(previous / stage / "value")
            if cfg.ppo.adaptive_kl:
                reached = final_kl_coef(previous / stage / "final")
                if reached is None:
                    log(f"{stage}: {os.path.normpath(previous / stage / 'final')} records no β (finished by an older instructrl): "
                        f"the adaptive controller starts again from ppo.kl_coef = {cfg.ppo.kl_coef}")
                else:
                    cfg.ppo.kl_coef = reached
    return runs
