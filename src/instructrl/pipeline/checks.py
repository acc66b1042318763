"""What the pipeline refuses before its first stage, writing nothing, by the stages' own checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from instructrl.config import PipelineConfig, in_run
from instructrl.errors import UserError
from instructrl.pipeline.rounds import STAGES, Run, pipeline_runs, round_one
from instructrl.training.checkpoint import checkpoint_dirs, sizes_for_resuming
from instructrl.world.build import split_sizes

if TYPE_CHECKING:
    from instructrl.training.loop import Parallelism


def before_training(config: PipelineConfig, restart_from: str | None, log=print) -> tuple[dict[str, bool], PipelineConfig]:
    """What ``run_pipeline`` does before its first stage, writing nothing: every refusal the config decides
    (``check_before_training``, round_one's first); returns which of ``STAGES`` --restart-from redoes, and round one's config."""
    from accelerate import PartialState

    from instructrl.training.loop import launched_parallelism, without_gpu

    restart_from = "ppo" if restart_from == "ppo_ptx" else restart_from  # the folder's name for the same step
    if restart_from is not None and restart_from not in STAGES:
        raise UserError(f"--restart-from {restart_from!r}: choose one of {', '.join(STAGES)}")
    redo = {stage: restart_from is not None and i >= STAGES.index(restart_from) for i, stage in enumerate(STAGES)}
    state = PartialState(cpu=without_gpu())  # as the stages' Accelerator will count the processes
    check_before_training(config, redo, state.num_processes, launched_parallelism(state))
    return redo, round_one(config, log)  # refused nothing above: now it says how many prompts a round ranks


def check_before_training(config: PipelineConfig, redo: dict[str, bool], processes: int, parallelism: Parallelism) -> None:
    """Refuse before the first stage what round_one refuses, then, by the stages' own checks, what a stage would refuse
    from the config alone (and this machine and launch) after the stages before it had trained: the batch sizes, fp16 without
    a GPU, LoRA on sharded parameters, an attention kernel that cannot run here and PPO's rules (DeepSpeed among them), of the
    runs it will train (``runs_to_train``); eval.prompts without a judge; then a file or model you gave a stage that will run
    which is not there (``check_given_paths``). ``parallelism``: as the stages' Accelerator will run them (``launched_parallelism``)."""
    from instructrl.evaluation.evaluate import check_judge
    from instructrl.models.base import check_attention
    from instructrl.stages import ppo
    from instructrl.training.loop import check_lora_unsharded, check_precision

    check_sizes(config, redo, processes)
    sections = dict.fromkeys(run.section for run in runs_to_train(config, redo) if run.section != "collect")  # collect trains no model
    for name in sections:
        check_precision(getattr(config, name).mixed_precision, name)
        check_lora_unsharded(getattr(getattr(config, name), "lora", None), parallelism)  # as make_accelerator, after the precision
        check_attention(getattr(getattr(config, name), "attn_implementation", None), name)  # pretrain builds its model with the default
    if "ppo" in sections:
        ppo.check_distributed_type(parallelism.distributed_type)
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
    first = {run.section for run in runs if run.folder.parent == root} | {"eval"}  # round 1's, and eval, which always runs
    later = {run.section for run in runs if run.folder.parent != root}
    sft, collect, rm, ppo, evaluation = config.sft, config.collect, config.rm, config.ppo, config.eval
    ptx_data = ppo.ptx_data if ppo.ptx_coef > 0 and any(run.folder.name == "ppo_ptx" for run in runs) else None
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
    for key, (path, role) in given.items():
        section = key.partition(".")[0]
        if path is None or not (section in first or key in every_round and section in later):
            continue
        if in_run(path, root):  # however spelt: round2/../sft/final, absolute or not
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
    resumed = [(run.folder / "checkpoints", run.stage) for run in runs if not redo[run.stage] and checkpoint_dirs(run.folder / "checkpoints")]
    checkpoints, stage = resumed[0] if resumed else (None, "pretrain")  # the first it would resume
    with sizes_for_resuming(checkpoints, processes, f"--restart-from {stage}"):
        config.check_sizes(processes, {run.section for run in runs})


def runs_to_train(config: PipelineConfig, redo: dict[str, bool]) -> list[Run]:
    """The runs the pipeline may train, in order (``pipeline_runs``, collect's included): those not finished, and those
    redone. A finished run not redone is skipped, or refused for a changed config or inputs. ``config``: as given;
    round_one's refusals are raised here."""
    runs = pipeline_runs(round_one(config, log=lambda _: None), redo)
    return [run for run in runs if redo[run.stage] or not (run.folder / "done.json").is_file()]


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
