"""The whole recipe in one call: what ``instructrl pipeline`` and ``make demo`` run.

    pretrain -> SFT -> [collect -> RM -> PPO-ptx and plain PPO] x rounds -> eval -> report

Every stage skips itself when its outputs exist for the same config and inputs, so running the
pipeline again after a crash resumes where it stopped; after a change of config, ``restart_from``
reruns a stage and everything after it. Plain PPO runs beside PPO-ptx to measure
the alignment tax that the pretraining mix removes. With ``pipeline.rounds: N`` the bracket
repeats as InstructGPT iterated its steps 2 and 3: round r (in ``round<r>/``) ranks fresh RM
prompts with the latest PPO-ptx policy (plain PPO's when ppo.ptx_coef = 0), retrains the RM from
the SFT model on every comparison so far, and continues both PPO runs from where the previous round
left them: policy, value model, iteration count and (ppo.adaptive_kl) the controller's β, the KL
reference staying the SFT model. Their AdamW moments and learning-rate warm-up start again: the
reward model they follow is new, and a fresh AdamW's first steps are the ones warm-up damps.
"""

from __future__ import annotations

import os
from pathlib import Path

from instructrl.config import PipelineConfig
from instructrl.data.jsonl import complete_lines
from instructrl.pipeline.checks import before_training
from instructrl.pipeline.rounds import later_round, _ppo_configs
from instructrl.rundir.files import copy_dir, write_text_atomic
from instructrl.world.build import build_world_once


def run_pipeline(config: PipelineConfig, log=print, is_main: bool = True, restart_from: str | None = None) -> dict | None:
    """Run every stage; returns the evaluation results (None on processes other than the main one).

    ``restart_from``: that stage and every later one discard their earlier runs and run again
    (later rounds too, as they follow from the first round's PPO)."""
    from accelerate import PartialState

    from instructrl.evaluation.evaluate import run_eval
    from instructrl.evaluation.report import write_report
    from instructrl.stages.collect import run_collect
    from instructrl.stages.ppo import run_ppo
    from instructrl.stages.pretrain import run_pretrain
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    redo, first = before_training(config, restart_from, log)
    root = Path(config.run.dir)
    run_pretrain(config, restart=redo["pretrain"], log=log)
    world = build_world_once(config.world, root / "world", PartialState())  # one process rebuilds a world a skipped pretrain left missing
    run_sft(config, restart=redo["sft"], log=log)
    comparisons = []  # each round's, for the later rounds' RMs
    for r in range(1, config.pipeline.rounds + 1):
        if r == 1:
            rc, previous, upstream, restart = first, None, None, redo
        else:  # its inputs are this run's own, though given by path; it follows from round 1's PPO
            rc, previous = later_round(first, r)
            upstream, restart = True, dict.fromkeys(redo, redo["ppo"])
        if is_main:  # sampling and judging run in one process; the others wait for the comparisons
            if r > 1:  # the round's stages read the run's world (as hard links, not a copy)
                copy_dir(world.root, rc.run.dir / "world", copy_function=os.link)
            comparisons.append(run_collect(rc, restart=restart["collect"], log=log, upstream=upstream))
            if r > 1:
                _concatenate(comparisons, rc.rm.data)
        _barrier()
        run_rm(rc, restart=restart["rm"], log=log, upstream=upstream)
        for cfg in _ppo_configs(rc, previous, log).values():
            run_ppo(cfg, restart=restart["ppo"], log=log, upstream=upstream)
    if not is_main:
        return None
    results = run_eval(config, log=log)  # of the last round's PPO models
    write_report(root, config.pipeline.rounds)
    return results


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _concatenate(files: list[Path], dest: Path) -> None:
    """Every comparison so far in one file (rewritten whole, so a crash leaves the old one)."""
    lines = [line + "\n" for f in files for line, _ in complete_lines(f)]
    write_text_atomic(dest, "".join(lines))
