"""PPO and PPO-ptx of the SFT policy against the reward model (InstructGPT §3.5, "Reinforcement learning").

setup: the policy and its frozen copy (the KL reference), the frozen reward model, a value
model initialised from the RM, the prompts, and for PPO-ptx the pretraining blocks. Then one
iteration per rollout batch:

  1. generate    one response per prompt, sampled from the policy at the temperature  (rl/rollout.py)
  2. score       policy and reference log-probs, values, reward-model scores          (rl/rollout.py)
  3. rewards     -β·KL on every response token, the score on its last (EOS) token    (rlmath.py)
  4. advantages  GAE (γ, λ), whitened over real tokens                               (rlmath.py)
  5. epochs      by minibatch: clipped policy loss (+ γ_ptx · pretraining NLL) and
                 clipped value loss                                                   (rl/update.py)
  6. log         proxy (RM) and gold scores, KL, entropy, length, EOS rate; checkpoint (rl/metrics.py)

and save: final/ (the policy, a save_pretrained folder, and in ppo_state.json the β the next
iteration would use) and value/ (the value model).
The run is a pure function of (seed, iteration), whatever the number of processes: each episode
is sampled with its own seed, every process holds an equal share of every minibatch (rl/episodes.py),
and the advantages are whitened over the global batch. A killed run resumes from its last checkpoint.
With ppo.lora the reference is the policy with its adapter off (one base model in memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.chat import render_ids
from instructrl.data.packing import pack_documents
from instructrl.data.formats import Prompt
from instructrl.data.inputs import read_data, read_texts, warn_of_control_tokens
from instructrl.data.sequences import TokenSequences
from instructrl.errors import UserError, located
from instructrl.models.base import apply_switches, context_length, count_parameters, count_text, load_causal_lm, load_tokenizer, set_attention, set_dropout
from instructrl.models.lora import adapter_disabled, add_lora, targets_in, trainable_share
from instructrl.models.reward import RewardModel
from instructrl.rl.episodes import episode_seed, prompt_order, rank_episodes
from instructrl.rl.kl_control import KLController
from instructrl.rl.metrics import memory_metrics, rollout_metrics, time_metrics
from instructrl.rl.rollout import Rollout, left_pad_prompts, sample_responses, score_episodes
from instructrl.rl.update import ppo_epochs
from instructrl.rlmath import gae_advantages, kl_per_token, masked_whiten, per_token_rewards
from instructrl.rundir.files import write_text_atomic
from instructrl.rundir.locks import releases_on_error
from instructrl.rundir.run import given_or_earlier, RunDir
from instructrl.training.checkpoint import load_latest_checkpoint, save_checkpoint, sizes_for_resuming
from instructrl.training.loop import make_accelerator, save_model, seed_everything, shards_parameters
from instructrl.training.progress import plural, progress_bar, tracked
from instructrl.world.build import build_world_once, load_tasks, world_task
from instructrl.world.labeler import SimulatedLabeler

SECTIONS = ("run", "world", "ppo")
UPSTREAM = ("tokenizer", "model", "pretrain", "sft", "collect", "rm")  # identity when the inputs are this run's own
PTX_BLOCK = 128
FINAL_STATE = "ppo_state.json"  # in final/: the controller's β after the last iteration, which a later pipeline round goes on from


def stage_name(config: PipelineConfig) -> str:
    """PPO-ptx (InstructGPT proper) runs in ppo_ptx/, plain PPO in ppo/."""
    return "ppo_ptx" if config.ppo.ptx_coef > 0 else "ppo"


@dataclass(frozen=True)
class ModelPaths:
    """Where the four models of a PPO run come from (the defaults: this run's SFT and RM)."""

    policy: str
    reward_model: str
    value_model: str
    reference: str


def model_paths(config: PipelineConfig, stage: str) -> ModelPaths:
    cfg, root = config.ppo, Path(config.run.dir)
    policy = given_or_earlier(cfg.policy, root / "sft" / "final", "ppo.policy", stage, "the earlier stages")
    reward_model = given_or_earlier(cfg.reward_model, root / "rm" / "final", "ppo.reward_model", stage, "the earlier stages")
    return ModelPaths(policy, reward_model, cfg.value_model or reward_model, cfg.reference or policy)


def check_distributed_type(distributed_type: str) -> None:
    """Refuse DeepSpeed, the stage's Accelerator's or, before the pipeline's first stage, the launch's (``launched_parallelism``):
    Accelerate drives one DeepSpeed engine, the last prepared (the value model's), so the policy would never step."""
    if distributed_type == "DEEPSPEED":
        raise UserError("ppo under DeepSpeed is not supported: PPO trains two models (the policy and the value model) and Accelerate "
                        "steps one DeepSpeed engine; use configs/accelerate/fsdp.yaml or ddp.yaml (with ppo.lora.enabled=true for large models)")


def check_config(config: PipelineConfig) -> None:
    """What the config alone rules out, refused before anything is loaded or written (and by the pipeline
    before its first stage): a KL reference beside ppo.lora. The config's schema refuses the rest (ppo.lora.dropout)."""
    cfg = config.ppo
    policy = cfg.policy or Path(config.run.dir) / "sft" / "final"  # as model_paths names it
    if cfg.lora.enabled and cfg.reference is not None and os.path.abspath(cfg.reference) != os.path.abspath(policy):  # however spelt
        raise UserError(f"{stage_name(config)}: with ppo.lora the KL reference is the policy's base model; leave ppo.reference unset")


def shared_tokenizer(paths: ModelPaths, stage: str):
    """The policy's tokenizer, refused unless the reward model has the same vocabulary: token ids
    would mean other words to it, and it would score text the policy never wrote."""
    with located("ppo.policy"):  # a bad path names the key that chose it
        tokenizer = load_tokenizer(paths.policy)
    with located("ppo.reward_model"):
        rm_vocab = load_tokenizer(paths.reward_model, what="reward model").get_vocab()
    if rm_vocab != tokenizer.get_vocab():
        raise UserError(f"{stage}: the reward model {paths.reward_model} and the policy {paths.policy} use different tokenizers")
    return tokenizer


def load_prompts(config: PipelineConfig, stage: str, tokenizer, accelerator, log):
    """The prompts, their gold tasks by id (for the gold judge's logs) and the built-in world,
    which supplies the prompts (and PPO-ptx's text) only when ppo.prompts is unset."""
    cfg, root = config.ppo, Path(config.run.dir)
    if cfg.prompts is not None:  # with ppo.ptx_data where PPO-ptx runs: the config's schema sees to that
        gold = {}

        def keep_gold(record: dict, prompt: Prompt) -> None:  # a prompts file in the world's own format (family, answer) keeps its gold judge
            if (task := world_task(record, prompt.messages)) is not None:
                gold[task.id] = task

        data = read_data(cfg.prompts, "prompt", cfg.prompts_format, "ppo.prompts", tokenizer,
                         f"{stage}: reading {cfg.prompts}" if accelerator.is_main_process else None, keep_gold)
        warn_of_control_tokens(cfg.prompts, data.control_tokens, "prompts", lambda line: log(f"{stage}: {line}"))
        return data.items, gold, None
    world = build_world_once(config.world, root / "world", accelerator)
    log(f"{stage}: prompts" + (" and pretraining text" if cfg.ptx_coef > 0 and cfg.ptx_data is None else "")
        + f" from the built-in world in {root / 'world'} (ppo.prompts unset)")
    tasks = load_tasks(world.prompts("ppo"))
    return [Prompt(t.id, list(t.messages)) for t in tasks], {t.id: t for t in tasks}, world


def encode_prompts(prompts: list[Prompt], tokenizer, cfg, max_length: int, stage: str,
                   progress: bool = False) -> tuple[list[Prompt], TokenSequences]:
    """The prompts that leave room for a whole response in the context, with their token ids.
    ``progress``: show a bar while they are tokenized."""
    encoded = TokenSequences()
    for prompt in tracked(prompts, f"{stage}: tokenizing {cfg.prompts or 'the prompts'}", "prompt", progress):
        with located(f"{cfg.prompts or 'ppo.prompts'}: prompt '{prompt.id}'"):  # the id a record gives, else the file's name and the record's number
            encoded.append(render_ids(tokenizer, prompt.messages, add_generation_prompt=True))
    keep = [i for i, length in enumerate(encoded.lengths()) if length + cfg.max_new_tokens <= max_length]
    check_rollout_prompts(cfg, stage, len(prompts), len(keep), max_length)
    return [prompts[i] for i in keep], TokenSequences(encoded[i] for i in keep)


def check_rollout_prompts(cfg, stage: str, total: int, fitting: int | None = None, max_length: int | None = None) -> None:
    """Refuse prompts fewer than one rollout batch: ``total`` of them, of which ``fitting`` (by default all) leave room for
    a response in ``max_length`` tokens. The pipeline asks with ``total`` alone before its first stage."""
    fitting = total if fitting is None else fitting
    if fitting < cfg.rollout_batch_size:
        source = cfg.prompts or "the built-in world's PPO split"
        held = (f"{total} prompts" if fitting == total else f"{fitting} of its {total} prompts that fit in {max_length} "
                f"tokens with the response (ppo.max_new_tokens = {cfg.max_new_tokens})")
        raise UserError(f"{stage}: {source} has {held}, fewer than one rollout batch (ppo.rollout_batch_size = {cfg.rollout_batch_size}); "
                        "add prompts or lower ppo.rollout_batch_size" + ("" if fitting == total else " or ppo.max_new_tokens"))


def load_models(cfg, paths: ModelPaths, policy, tokenizer, stage: str):
    """The frozen reward model, the value model (from ``paths.value_model``, the RM by default) and
    the frozen reference; with ppo.lora the policy and value model get adapters and the reference is
    None (the policy with its adapter off: one copy of the base model)."""
    with located("ppo.reward_model"):
        reward_model = RewardModel.from_pretrained(paths.reward_model).eval().requires_grad_(False)
    with located("ppo.value_model"):
        value_model = RewardModel.from_pretrained(paths.value_model, "value model")
    set_dropout(value_model.backbone, 0.0)
    apply_switches(policy, cfg, "ppo")
    apply_switches(value_model.backbone, cfg, "ppo")
    if cfg.attn_implementation is not None:
        set_attention(reward_model.backbone, cfg.attn_implementation, "ppo")
    if cfg.lora.enabled:
        with located("ppo.lora.target_modules (on the value model's backbone)"):
            value_model.backbone = add_lora(value_model.backbone, targets_in(value_model.backbone, cfg.lora))
        with located("ppo.lora.target_modules"):
            return add_lora(policy, cfg.lora), None, reward_model, value_model
    with located("ppo.reference"):
        reference = load_causal_lm(paths.reference, dropout=0.0, tokenizer=tokenizer).eval().requires_grad_(False)
    if cfg.attn_implementation is not None:
        set_attention(reference, cfg.attn_implementation, "ppo")
    return policy, reference, reward_model, value_model


def pretraining_blocks(cfg, world, tokenizer, max_length: int, stage: str, progress: bool = False) -> torch.Tensor | None:
    """PPO-ptx's pretraining text packed into blocks of up to 128 tokens; None for plain PPO.
    ``progress``: show bars while the text is read and tokenized."""
    if cfg.ptx_coef <= 0:
        return None
    ptx_path = cfg.ptx_data or world.corpus
    block = min(PTX_BLOCK, max_length)
    documents = read_texts(ptx_path, f"{stage}: reading {ptx_path}" if progress else None)
    blocks = pack_documents(tokenizer, documents, block, f"{stage}: tokenizing {ptx_path}" if progress else None)
    if len(blocks) < cfg.ptx_batch_size:
        raise UserError(f"{ptx_path}: too little text for ppo.ptx_batch_size = {cfg.ptx_batch_size} blocks of {block} tokens "
                        f"(it fills {len(blocks)}); add text or lower ppo.ptx_batch_size")
    return blocks


def add_rewards_and_advantages(rollout: Rollout, cfg, kl_coef: float, over_processes) -> None:
    """Steps 3 and 4 of an iteration, written into ``rollout``: its per-token KL, its rewards (-β·KL on
    every token, the score on the last; optionally whitened) and its GAE advantages, whitened, with the
    returns. ``over_processes`` sums a tensor over every process, so the whitening statistics are the
    global batch's."""
    mask = rollout.response_mask.float()
    rollout.kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator) * mask
    rollout.rewards = per_token_rewards(rollout.scores, rollout.kl, rollout.response_mask, kl_coef)
    if cfg.whiten_rewards:
        rollout.rewards = masked_whiten(rollout.rewards, mask, shift_mean=False, total=over_processes)
    advantages, rollout.returns = gae_advantages(rollout.rewards, rollout.values, rollout.response_mask, cfg.gamma, cfg.lam)
    rollout.advantages = masked_whiten(advantages, mask, total=over_processes)


def make_optimizers(cfg, policy, value_model):
    """AdamW for the policy and for the value model (each its own learning rate, no weight decay),
    with a linear warmup over ppo.warmup_steps and constant after it; with LoRA only the adapters (and
    the value head) train. A later pipeline round starts both again, moments and warm-up: its reward
    model is new, and the warm-up damps a fresh AdamW's first steps (each parameter moves by about lr)."""
    trainable = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    policy_opt = torch.optim.AdamW(trainable(policy), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0)
    value_opt = torch.optim.AdamW(trainable(value_model), lr=cfg.value_lr, eps=cfg.adam_eps, weight_decay=0.0)
    warmup = lambda step: min(1.0, (step + 1) / max(cfg.warmup_steps, 1))  # noqa: E731
    return policy_opt, value_opt, [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in (policy_opt, value_opt)]


def final_kl_coef(policy: Path) -> float | None:
    """The β a finished PPO run's controller reached (``FINAL_STATE`` in its final/ folder ``policy``);
    None where there is none (a run finished before instructrl recorded it)."""
    path = Path(policy) / FINAL_STATE
    if not path.is_file():
        return None
    try:
        return float(json.loads(path.read_text())["kl_coef"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a PPO run's final state ({e}); `instructrl pipeline --restart-from ppo` trains it again") from e


def bar_status(metrics: dict[str, float]) -> str:
    """The progress bar's short reading of an iteration: proxy score, KL and (on the built-in world) gold Likert."""
    status = f"score {metrics['rollout/score_in_reward']:+.2f}  kl {metrics['rollout/kl']:.2f}"
    return status + (f"  gold {metrics['rollout/gold_likert']:.2f}" if "rollout/gold_likert" in metrics else "")


@releases_on_error
def run_ppo(config: PipelineConfig, restart: bool = False, log=print, upstream: bool | None = None) -> Path:
    """Optimise the policy against the reward model, into ``run.dir``/ppo_ptx (``ppo.ptx_coef`` > 0)
    or ``run.dir``/ppo; returns the saved policy's folder (final/).
    A run finished with the same config and inputs is skipped, an interrupted one resumes
    (``restart`` discards it instead); ``log`` takes each line the stage reports.

    ``upstream``: whether the earlier stages' config is part of this run's identity (default: when the inputs are this run's own)."""
    cfg = config.ppo
    accelerator = make_accelerator(cfg, "ppo")
    check_distributed_type(accelerator.distributed_type)
    stage = stage_name(config)
    world_inputs = (cfg.policy is None or cfg.reward_model is None) if upstream is None else upstream
    run = RunDir(config, stage, SECTIONS + (UPSTREAM if world_inputs else ()), accelerator.is_main_process, accelerator.num_processes)
    if run.skip(restart, log):  # whatever the process count: a finished run trains nothing
        return run.path / "final"
    with sizes_for_resuming(run.path / "checkpoints", accelerator.num_processes):
        cfg.check_sizes(accelerator.num_processes)

    # setup: models, prompts (with their gold tasks on the built-in world), pretraining blocks
    check_config(config)
    paths = model_paths(config, stage)
    tokenizer = shared_tokenizer(paths, stage)
    prompts, gold, world = load_prompts(config, stage, tokenizer, accelerator, log)
    seed_everything(config.run.seed)
    with located("ppo.policy"):
        policy = load_causal_lm(paths.policy, dropout=0.0, tokenizer=tokenizer)  # dropout off in every model during RL
    max_length = context_length(policy)
    ptx_blocks = pretraining_blocks(cfg, world, tokenizer, max_length, stage, accelerator.is_main_process)  # a bad line before the slow setup
    n_read = len(prompts)
    prompts, encoded = encode_prompts(prompts, tokenizer, cfg, max_length, stage, accelerator.is_main_process)
    policy, reference, reward_model, value_model = load_models(cfg, paths, policy, tokenizer, stage)
    run.start(restart, log)
    run.write_lineage({"policy": paths.policy, "reference": paths.reference, "reward_model": paths.reward_model, "value_model": paths.value_model,
                       "prompts": cfg.prompts or world.prompts("ppo"), "ptx_data": (cfg.ptx_data or world.corpus) if ptx_blocks is not None else None})

    policy_opt, value_opt, schedulers = make_optimizers(cfg, policy, value_model)
    policy, policy_opt = accelerator.prepare(policy, policy_opt)  # one model per call, as FSDP2 asks
    value_model, value_opt = accelerator.prepare(value_model, value_opt)
    reward_model = reward_model.to(accelerator.device)
    reference = reference.to(accelerator.device) if reference is not None else None
    for s in schedulers:
        accelerator.register_for_checkpointing(s)
    state = load_latest_checkpoint(accelerator, run.path / "checkpoints", config.run.seed, log=lambda line: log(f"{stage}: {line}"))
    run.record_start()
    kl_ctl = KLController(state.extra.get("kl_coef", cfg.kl_coef), cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
    if state.step:
        log(f"{stage}: resuming from the checkpoint of iteration {cfg.first_iteration + state.step}")
    run.trim_metrics(cfg.first_iteration + state.step)
    n_iterations, world_size, rank = cfg.iterations(), accelerator.num_processes, accelerator.process_index
    log(f"{stage}: {count_text(count_parameters(accelerator.unwrap_model(policy)))}-parameter policy {paths.policy}, reward model {paths.reward_model}; "
        f"{len(prompts)} prompts" + (f" ({n_read - len(prompts)} with no room for a response of {cfg.max_new_tokens} tokens in the "
                                     f"{max_length}-token context skipped)" if len(prompts) < n_read else "")
        + f", {plural(n_iterations, 'iteration')} of {cfg.rollout_batch_size} episodes"
        + (f" after {plural(cfg.first_iteration, 'earlier one')}" if cfg.first_iteration else "")
        + (f", pretraining mix γ = {cfg.ptx_coef}" if ptx_blocks is not None else "") + f", {plural(world_size, 'process')}"
        + (f"; LoRA: policy {trainable_share(policy)}, value model {trainable_share(value_model)}" if cfg.lora.enabled else ""))
    judge = SimulatedLabeler()
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(policy)  # generation and scoring go around the DDP/FSDP wrapper
    # LoRA: the reference is the policy with its adapters off
    ref_model, ref_context = (unwrapped, lambda: adapter_disabled(unwrapped)) if reference is None else (reference, contextlib.nullcontext)

    with progress_bar(accelerator.is_main_process) as bar:
        task = bar.add_task(stage, total=n_iterations, completed=state.step, unit="iter", status="")
        while state.step < n_iterations:
            iteration = cfg.first_iteration + state.step  # prompts, seeds and logged steps continue a previous round's
            episodes = rank_episodes(cfg.rollout_batch_size, cfg.minibatch_size, world_size, rank)
            batch_prompts = prompt_order(len(prompts), cfg.rollout_batch_size, iteration, config.run.seed)
            rows = [batch_prompts[j] for j in episodes]
            timer: dict[str, float] = {}
            t0 = time.perf_counter()

            # 1. generate
            query_ids, query_mask = left_pad_prompts([encoded[i] for i in rows], tokenizer.pad_token_id, device)
            unwrapped.eval()
            response_ids, response_mask, ended = sample_responses(
                unwrapped, query_ids, query_mask, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seeds=[episode_seed(config.run.seed, iteration, j) for j in episodes],
                synced=shards_parameters(accelerator))
            timer["generate"] = time.perf_counter() - t0

            # 2. score, every model under the autocast the prepared ones have (the frozen reference and reward model are
            # not prepared: in float32 they would be slower, and the reference's log-probs would differ from the policy's by bf16 rounding)
            with accelerator.autocast():
                rollout, seconds = score_episodes(unwrapped, ref_model, accelerator.unwrap_model(value_model), reward_model, query_ids, query_mask,
                                                  response_ids, response_mask, ended, temperature=cfg.temperature,
                                                  micro_batch_size=cfg.micro_batch_size, missing_eos_score=cfg.missing_eos_score,
                                                  reference_context=ref_context)
            timer.update({f"score_{k}": v for k, v in seconds.items()})
            t1 = time.perf_counter()

            # 3. rewards, 4. advantages
            add_rewards_and_advantages(rollout, cfg, kl_ctl.value, over_processes=lambda t: accelerator.reduce(t, "sum"))
            t2 = time.perf_counter()
            timer["score_advantages"] = t2 - t1

            # 5. epochs
            lr = policy_opt.param_groups[0]["lr"]  # of the iteration's first update, for the logs
            policy.train()
            value_model.train()
            train_stats = ppo_epochs(accelerator, cfg, rollout, policy, value_model, policy_opt, value_opt, schedulers, ptx_blocks,
                                     iteration, config.run.seed)
            timer["train"] = time.perf_counter() - t2

            # 6. log, checkpoint
            state.step += 1
            texts = [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip() for r, m in zip(response_ids, response_mask)]
            metrics = {**rollout_metrics(rollout, texts, [prompts[i].id for i in rows], gold, judge, accelerator), **train_stats,
                       "ppo/kl_coef": kl_ctl.value, "ppo/lr": lr, **memory_metrics((policy, reference, reward_model, value_model), (policy_opt, value_opt))}
            kl_ctl.update(metrics["rollout/kl"], cfg.rollout_batch_size)
            n_tokens = accelerator.reduce(torch.tensor(float(response_mask.sum() + query_mask.sum()), device=device), "sum").item()
            metrics.update(time_metrics(timer, cfg.rollout_batch_size, n_tokens))
            metrics["episodes"] = (iteration + 1) * cfg.rollout_batch_size
            if state.step % cfg.log_every == 0 or state.step == n_iterations:
                run.log(iteration + 1, metrics)
            bar.update(task, completed=state.step, status=bar_status(metrics))
            if state.step % cfg.checkpoint_every == 0 and state.step < n_iterations:
                state.extra = {"kl_coef": kl_ctl.value}
                save_checkpoint(accelerator, run.path / "checkpoints", state)

    # save: the policy as final/, the value model beside it
    save_model(accelerator, policy, tokenizer, run.path / "final")
    if accelerator.is_main_process:
        write_text_atomic(run.path / "final" / FINAL_STATE, json.dumps({"kl_coef": kl_ctl.value}))
    save_model(accelerator, value_model, tokenizer, run.path / "value")
    run.finish({"model": run.path / "final", "value_model": run.path / "value"})
    log(f"{stage}: policy saved to {run.path / 'final'}")
    return run.path / "final"


