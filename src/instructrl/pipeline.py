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

import json
import os
from pathlib import Path

from instructrl.config import PipelineConfig
from instructrl.data.jsonl import complete_lines
from instructrl.errors import UserError
from instructrl.evaluation.report import round_folders
from instructrl.rundir.files import copy_dir, write_text_atomic
from instructrl.training.checkpoint import checkpoint_dirs, sizes_for_resuming
from instructrl.world.build import build_world_once, split_sizes

PPO_STAGES = ("ppo_ptx", "ppo")
STAGES = ("pretrain", "sft", "collect", "rm", "ppo")  # the order of ``restart_from``; ppo is both PPO runs


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


def before_training(config: PipelineConfig, restart_from: str | None, log=print) -> tuple[dict[str, bool], PipelineConfig]:
    """What ``run_pipeline`` does before its first stage, writing nothing: every refusal the config decides
    (``check_before_training``, then ``round_one``'s); returns which of ``STAGES`` --restart-from redoes, and round one's config."""
    from accelerate import PartialState

    from instructrl.training.loop import without_gpu

    restart_from = "ppo" if restart_from == "ppo_ptx" else restart_from  # the folder's name for the same step
    if restart_from is not None and restart_from not in STAGES:
        raise UserError(f"--restart-from {restart_from!r}: choose one of {', '.join(STAGES)}")
    redo = {stage: restart_from is not None and i >= STAGES.index(restart_from) for i, stage in enumerate(STAGES)}
    check_before_training(config, redo, PartialState(cpu=without_gpu()).num_processes)  # as the stages' Accelerator will count them
    return redo, round_one(config, log)  # and what later rounds cannot do


def check_before_training(config: PipelineConfig, redo: dict[str, bool], processes: int) -> None:
    """Refuse before the first stage, by the stages' own checks, what a stage would refuse from the config alone
    (and this machine) after the stages before it had trained: the batch sizes, fp16 without a GPU, an attention
    kernel that cannot run here and PPO's rules, of the runs it will train (``runs_to_train``); eval.prompts without
    a judge; then a file or model you gave a stage that will run which is not there (``check_given_paths``)."""
    from instructrl.evaluation.evaluate import check_judge
    from instructrl.models.base import check_attention
    from instructrl.stages import ppo
    from instructrl.training.loop import check_precision

    check_sizes(config, redo, processes)
    sections = dict.fromkeys(name for _, name, _ in runs_to_train(config, redo))
    for name in sections:
        check_precision(getattr(config, name).mixed_precision, name)
        check_attention(getattr(getattr(config, name), "attn_implementation", None), name)  # pretrain builds its model with the default
    if "ppo" in sections:
        ppo.check_config(config)
    check_judge(config.eval)
    check_given_paths(config, redo)
    check_lengths(config, sections)  # of the models given, now known to be there


def check_given_paths(config: PipelineConfig, redo: dict[str, bool]) -> None:
    """The data files and local models you gave the stages that will run exist, asked in the order the stages read
    them and refused with the stage's own message. Not a path in run.dir, however spelt (an earlier stage's output,
    perhaps not written yet), nor a hub name (its stage asks the Hub), nor what a stage that is finished would read."""
    from instructrl.data.readers import not_found
    from instructrl.errors import located
    from instructrl.models.base import check_local_model

    root = Path(config.run.dir)
    runs = runs_to_train(config, redo)
    first = {section for folder, section, _ in runs if folder.parent == root} | {"eval"}  # round 1's, and eval, which always runs
    later = {section for folder, section, _ in runs if folder.parent != root}
    if redo["collect"] or not (root / "collect" / "done.json").is_file():
        first.add("collect")  # round 1's only: later rounds rank the previous round's policy's samples
    sft, collect, rm, ppo, evaluation = config.sft, config.collect, config.rm, config.ppo, config.eval
    ptx_data = ppo.ptx_data if ppo.ptx_coef > 0 and any(folder.name == "ppo_ptx" for folder, _, _ in runs) else None
    given = {  # key: (path, a model's role or None for a data file), in the order the stages read them
        "sft.model": (sft.model, "model"), "sft.data": (sft.data, None),
        "collect.judgements": (collect.judgements, None), "collect.policy": (None if collect.judgements else collect.policy, "model"),
        "rm.model": (rm.model, "model"), "rm.data": (rm.data, None), "rm.demonstrations": (rm.demonstrations, None),
        "ppo.policy": (ppo.policy, "model"), "ppo.reward_model": (ppo.reward_model, "reward model"), "ppo.prompts": (ppo.prompts, None),
        "ppo.ptx_data": (ptx_data, None), "ppo.value_model": (ppo.value_model, "value model"), "ppo.reference": (ppo.reference, "model"),
        **{f"eval.models.{name}": (path, "model") for name, path in (evaluation.models or {}).items()},
        "eval.reward_model": (evaluation.reward_model, "reward model"), "eval.prompts": (evaluation.prompts, None),
    }
    # what later rounds read as round 1 does (later_round replaces the rest); ppo.policy is their KL reference where ppo.reference is unset
    every_round = {"rm.model", "rm.demonstrations", "ppo.prompts", "ppo.ptx_data", "ppo.reference"} | ({"ppo.policy"} if ppo.reference is None else set())
    run_dir = os.path.abspath(root)
    for key, (path, role) in given.items():
        section = key.partition(".")[0]
        if path is None or not (section in first or key in every_round and section in later):
            continue
        if Path(os.path.abspath(Path(path).expanduser())).is_relative_to(run_dir):  # however spelt: round2/../sft/final, absolute or not
            continue
        if role is not None:
            with located(key):  # as the stage names the key that chose the model
                check_local_model(str(path), role)
        elif not (Path(path).is_file() or Path(path).is_dir()):  # what read_records and read_texts accept
            raise not_found(Path(path))


def check_sizes(config: PipelineConfig, redo: dict[str, bool], processes: int) -> None:
    """The batch sizes of every run the pipeline may train divide over ``processes``; where one does not
    and the pipeline would resume a checkpoint of another count, the error names it (sizes_for_resuming).
    A finished run is skipped whatever the count: nothing is trained, so its sizes do not matter."""
    runs = runs_to_train(config, redo)
    resumed = [(folder / "checkpoints", stage) for folder, _, stage in runs if not redo[stage] and checkpoint_dirs(folder / "checkpoints")]
    checkpoints, stage = resumed[0] if resumed else (None, "pretrain")  # the first it would resume
    with sizes_for_resuming(checkpoints, processes, f"--restart-from {stage}"):
        config.check_sizes(processes, {section for _, section, _ in runs})


def runs_to_train(config: PipelineConfig, redo: dict[str, bool]) -> list[tuple[Path, str, str]]:
    """The training runs the pipeline may train, in order: those not finished, and those redone. Each as its
    folder, its config section, and the stage --restart-from names to redo it (a later round's are redone
    with PPO, see run_pipeline). A finished run not redone is skipped, or refused for a changed config or inputs."""
    root = Path(config.run.dir)
    runs = [(root / "pretrain", "pretrain", "pretrain"), (root / "sft", "sft", "sft")]
    for r, folder in enumerate(round_folders(root, config.pipeline.rounds), 1):
        runs += [(folder / "rm", "rm", "rm" if r == 1 else "ppo")] + [(folder / name, "ppo", "ppo") for name in PPO_STAGES]
    return [(folder, section, stage) for folder, section, stage in runs if redo[stage] or not (folder / "done.json").is_file()]


def plan(first: PipelineConfig, redo: dict[str, bool]) -> list[tuple[str, str, str]]:
    """What the pipeline would do with each run, in order, read from the run folder without writing to it: the run's
    folder in run.dir (round2/rm), what becomes of it ("trains", resumes or is redone included; "finished"; "stops";
    "runs", as eval and the report always do), and that in words. ``first``: round one's config (``before_training``).
    A run begun before is compared with this config (``RunDir.config_changes``) over the sections it recorded, as those
    a stage records follow from its own section's keys; its inputs are not hashed here, so a finished run is skipped
    only while they are unchanged (its stage refuses changed ones)."""
    from instructrl.rundir.run import RunDir

    root = Path(first.run.dir)
    restart_from = next((stage for stage in STAGES if redo[stage]), None)
    runs = [(first, "pretrain", "pretrain"), (first, "sft", "sft")]  # each as its config, its folder's name, and the stage redoing it
    for r in range(1, first.pipeline.rounds + 1):
        rc, previous = (first, None) if r == 1 else later_round(first, r)
        runs += [(rc, "collect", "collect" if r == 1 else "ppo"), (rc, "rm", "rm" if r == 1 else "ppo")]
        runs += [(cfg, name, "ppo") for name, cfg in _ppo_configs(rc, previous, log=lambda _: None).items()]
    steps = []
    for cfg, name, stage in runs:
        run = RunDir(cfg, name, ())
        finished = run.done_file.is_file()
        record = run.done_file if finished else run.path / "identity.json"
        saved = json.loads(record.read_text()) if record.is_file() else None
        saved = saved.get("identity") if finished else saved
        checkpoints = checkpoint_dirs(run.path / "checkpoints")
        changes = RunDir(cfg, name, tuple(s for s in saved if s in PipelineConfig.model_fields)).config_changes(saved) if saved else ""
        if redo[stage]:
            step = ("trains", f"is redone (--restart-from {restart_from})" if run.path.exists() else "trains")
        elif changes:
            step = ("stops", f"{'finished' if finished else 'unfinished'}, config changed: {changes} (the run would stop; --restart-from {stage})")
        elif finished:
            step = ("finished", "finished: skipped if its inputs are unchanged")
        elif checkpoints:
            step = ("trains", f"resumes from checkpoint step {int(checkpoints[-1].name[len('step-'):])}")
        elif any(run.path.glob("*.partial.jsonl")):  # collect's records so far
            step = ("trains", f"resumes {run.contents()}")
        else:
            step = ("trains", "trains")
        steps.append((os.path.relpath(run.path, root), *step))
    return steps + [("eval", "runs", "runs (every time): the last round's models, replacing eval/"), ("report", "runs", "written (every time): report.html")]


def check_lengths(config: PipelineConfig, sections) -> None:
    """Refuse, by the stages' own checks, the lengths and counts the config decides: sft/rm.max_length past the model's
    context, a max_new_tokens that leaves no room for a prompt, ppo.rollout_batch_size past the PPO prompts. ``sections``:
    those of the runs the pipeline will train. A model's context is the config's for the run's own models and a local
    model's config.json's; a hub model's is left to its stage, as is a prompts file no counter reads quickly."""
    from instructrl.data.readers import count_records
    from instructrl.evaluation.generate import check_room_for_a_prompt
    from instructrl.models.base import base_model_config, length_cap, model_config
    from instructrl.stages import ppo

    def given_or(name_or_path, default):  # the config of a stage's model: the given one's, else the stage before's
        return default if name_or_path is None else model_config(name_or_path)

    def room(models, max_new_tokens: int, key: str) -> None:
        for model in models:
            if model is not None:  # None: a model whose context its stage learns
                check_room_for_a_prompt(model, max_new_tokens, key)

    base = base_model_config(config.model)
    sft = given_or(config.sft.model, base)
    rm, policy, collect = given_or(config.rm.model, sft), given_or(config.ppo.policy, sft), given_or(config.collect.policy, sft)
    if "sft" in sections and sft is not None:
        length_cap(sft, config.sft.max_length, "sft.max_length")
        if config.sft.data is None:  # validation answers are generated on the built-in world only
            room([sft], config.sft.max_new_tokens, "sft.max_new_tokens")
    if config.collect.judgements is None:  # a later round's collect samples the previous round's policy
        room([collect] + ([policy] if config.pipeline.rounds > 1 else []), config.collect.max_new_tokens, "collect.max_new_tokens")
    if "rm" in sections and rm is not None:
        length_cap(rm, config.rm.max_length, "rm.max_length")
    if "ppo" in sections:
        prompts = split_sizes(config.world)["ppo"] if config.ppo.prompts is None else count_records(config.ppo.prompts)
        if prompts:  # a file of none is refused as it is read
            ppo.check_rollout_prompts(config.ppo, ppo.stage_name(config), prompts)
        room([policy], config.ppo.max_new_tokens, "ppo.max_new_tokens")
    evaluated = [model_config(path) for path in config.eval.models.values()] if config.eval.models else [base, sft, policy]  # default_models
    room(evaluated, config.eval.max_new_tokens, "eval.max_new_tokens")


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


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _concatenate(files: list[Path], dest: Path) -> None:
    """Every comparison so far in one file (rewritten whole, so a crash leaves the old one)."""
    lines = [line + "\n" for f in files for line, _ in complete_lines(f)]
    write_text_atomic(dest, "".join(lines))
