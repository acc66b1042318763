"""PPO and PPO-ptx of the SFT policy against the reward model (InstructGPT §3.5, "Reinforcement learning").

setup: the policy and its frozen copy (the KL reference), the frozen reward model, a value
model initialised from the RM, the prompts, and for PPO-ptx the pretraining blocks. Then one
iteration per rollout batch:

  1. generate    one response per prompt, sampled from the policy at the temperature
  2. score       policy and reference log-probs, values, reward-model scores
  3. rewards     -β·KL on every response token, the score on its last (EOS) token
  4. advantages  GAE (γ, λ), whitened over real tokens
  5. epochs      by minibatch: clipped policy loss (+ γ_ptx · pretraining NLL) and clipped value loss
  6. log         proxy (RM) and gold scores, KL, entropy, length, EOS rate; checkpoint

and save: final/ (the policy, a save_pretrained folder) and value/ (the value model).
The run is a pure function of (seed, iteration), whatever the number of processes: each episode
is sampled with its own seed, every process holds an equal share of every minibatch, and the
advantages are whitened over the global batch. A killed run resumes from its last checkpoint.
With ppo.lora the reference is the policy with its adapter off (one base model in memory).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.chat import render_ids
from instructrl.data.packing import pack_documents
from instructrl.data.formats import Prompt, read_prompts, read_texts
from instructrl.errors import UserError
from instructrl.models.base import apply_switches, count_parameters, load_causal_lm, load_tokenizer, optimizer_state_bytes, parameter_bytes, set_dropout
from instructrl.models.lora import adapter_disabled, add_lora
from instructrl.models.reward import RewardModel
from instructrl.rl.kl_control import KLController
from instructrl.rl.rollout import (
    Rollout, in_micro_batches, left_pad_prompts, policy_and_reference_logprobs, response_logprobs, response_values, sample_responses,
)
from instructrl.rlmath import (
    clipped_policy_loss, clipped_value_loss, gae_advantages, kl_per_token, masked_whiten, next_token_nll,
    per_token_rewards,
)
from instructrl.rundir import RunDir
from instructrl.training.checkpoint import load_latest_checkpoint, save_checkpoint
from instructrl.training.loop import make_accelerator, save_model, seed_everything, shards_parameters
from instructrl.training.progress import progress_bar
from instructrl.world.build import build_world, load_tasks, world_tasks_in
from instructrl.world.labeler import SimulatedLabeler

SECTIONS = ("run", "world", "ppo")
UPSTREAM = ("tokenizer", "model", "pretrain", "sft", "collect", "rm")  # identity when the inputs are this run's own
PTX_BLOCK = 128
TOKEN_MEANS = {"ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/ratio", "ppo/value_clipfrac"}


def stage_name(config: PipelineConfig) -> str:
    """PPO-ptx (InstructGPT proper) runs in ppo_ptx/, plain PPO in ppo/."""
    return "ppo_ptx" if config.ppo.ptx_coef > 0 else "ppo"


def prompt_order(n_prompts: int, batch: int, iteration: int, seed: int) -> list[int]:
    """The prompts of one iteration's global batch: epochs over the prompts, each a fresh permutation."""
    start = iteration * batch
    rows, epoch = [], start // n_prompts
    while len(rows) < batch:
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        offset = start + len(rows) - epoch * n_prompts
        rows += perm[offset : offset + batch - len(rows)]
        epoch += 1
    return rows


def rank_episodes(rollout_batch: int, minibatch: int, world_size: int, rank: int) -> list[int]:
    """Positions in the global rollout batch of process ``rank``'s episodes, in its local order.

    Global minibatch b holds positions [b * minibatch, (b + 1) * minibatch); each process gets an
    equal share of every one (``minibatch / world_size`` consecutive positions), so local
    minibatch b on every process together is global minibatch b, and any number of processes
    makes the same optimizer steps as one.
    """
    local = minibatch // world_size
    return [b * minibatch + rank * local + k for b in range(rollout_batch // minibatch) for k in range(local)]


def shuffled_local_order(rollout_batch: int, minibatch: int, world_size: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Local episode indices of a later PPO epoch: new minibatches that are the same for any
    number of processes. Episodes move between minibatches but keep their position within one
    (so they stay on their process): each position p gets its own permutation of the minibatches,
    drawn by every process alike."""
    n_minibatches, local = rollout_batch // minibatch, minibatch // world_size
    perms = [torch.randperm(n_minibatches, generator=generator) for _ in range(minibatch)]
    return torch.tensor([int(perms[rank * local + k][b]) * local + k for b in range(n_minibatches) for k in range(local)])


def episode_seed(seed: int, iteration: int, episode: int) -> int:
    """The sampling seed of one episode (its position in the global batch of ``iteration``)."""
    return (seed * 1_000_003 + iteration) * 1_000_033 + episode


def run_ppo(config: PipelineConfig, restart: bool = False, log=print, upstream: bool | None = None) -> Path:
    """``upstream``: whether the earlier stages' config is part of this run's identity (default: when the inputs are this run's own)."""
    cfg = config.ppo
    accelerator = make_accelerator(cfg)
    cfg.check_sizes(accelerator.num_processes)
    world_inputs = (cfg.policy is None or cfg.reward_model is None) if upstream is None else upstream
    stage = stage_name(config)
    run = RunDir(config, stage, SECTIONS + (UPSTREAM if world_inputs else ()), accelerator.is_main_process, accelerator.num_processes)
    if run.is_done() and not restart:
        log(f"{stage}: {run.path} is complete with this config; nothing to do")
        return run.path / "final"
    root = Path(config.run.dir)
    policy_path = cfg.policy or str(root / "sft" / "final")
    rm_path = cfg.reward_model or str(root / "rm" / "final")
    value_path = cfg.value_model or rm_path
    reference_path = cfg.reference or policy_path
    for what, path, default in (("policy", policy_path, cfg.policy), ("reward_model", rm_path, cfg.reward_model)):
        if default is None and not Path(path).is_dir():
            raise UserError(f"{stage}: no ppo.{what} given and {path} does not exist; run the earlier stages first or set ppo.{what}=PATH")

    # setup: prompts (with their gold tasks on the built-in world), models, pretraining blocks
    tokenizer = load_tokenizer(policy_path)
    if load_tokenizer(rm_path).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{stage}: the reward model {rm_path} and the policy {policy_path} use different tokenizers")
    world = None
    if cfg.prompts is None or cfg.ptx_data is None:
        if accelerator.is_main_process:
            build_world(config.world, root / "world")
        accelerator.wait_for_everyone()
        world = build_world(config.world, root / "world")
    if cfg.prompts is None:
        tasks = load_tasks(world.prompts("ppo"))
        prompts = [Prompt(t.id, list(t.messages)) for t in tasks]
        gold = {t.id: t for t in tasks}
    else:  # a prompts file in the world's own format (family, answer) keeps its gold judge
        prompts = read_prompts(cfg.prompts, cfg.prompts_format)
        gold = {t.id: t for t in world_tasks_in(cfg.prompts)} if Path(cfg.prompts).suffix == ".jsonl" else {}
    seed_everything(config.run.seed)
    policy = load_causal_lm(policy_path, dropout=0.0, tokenizer=tokenizer)  # dropout off in every model during RL
    max_length = getattr(policy.config, "max_position_embeddings", None) or getattr(policy.config, "n_positions", 2048)
    encoded = [render_ids(tokenizer, p.messages, add_generation_prompt=True) for p in prompts]
    keep = [i for i, ids in enumerate(encoded) if len(ids) + cfg.max_new_tokens <= max_length]
    prompts, encoded = [prompts[i] for i in keep], [encoded[i] for i in keep]
    if len(prompts) < cfg.rollout_batch_size:
        raise UserError(f"{stage}: {len(prompts)} prompts fit in {max_length} tokens with the response; fewer than ppo.rollout_batch_size ({cfg.rollout_batch_size})")
    reward_model = RewardModel.from_pretrained(rm_path).eval().requires_grad_(False)
    value_model = RewardModel.from_pretrained(value_path)
    set_dropout(value_model.backbone, 0.0)
    apply_switches(policy, cfg)
    apply_switches(value_model.backbone, cfg)
    if cfg.attn_implementation is not None:
        reward_model.backbone.set_attn_implementation(cfg.attn_implementation)
    if cfg.lora.enabled:  # the reference is the policy with its adapter off: one copy of the base model
        if cfg.reference is not None and cfg.reference != policy_path:
            raise UserError(f"{stage}: with ppo.lora the KL reference is the policy's base model; leave ppo.reference unset")
        policy, reference = add_lora(policy, cfg.lora), None
        value_model.backbone = add_lora(value_model.backbone, cfg.lora)
    else:
        reference = load_causal_lm(reference_path, dropout=0.0, tokenizer=tokenizer).eval().requires_grad_(False)
        if cfg.attn_implementation is not None:
            reference.set_attn_implementation(cfg.attn_implementation)
    ptx_blocks = None
    if cfg.ptx_coef > 0:
        ptx_path = cfg.ptx_data or world.corpus
        ptx_blocks = pack_documents(tokenizer, read_texts(ptx_path), min(PTX_BLOCK, max_length))
        if len(ptx_blocks) < cfg.ptx_batch_size:
            raise UserError(f"{ptx_path}: too little text for ppo.ptx_batch_size = {cfg.ptx_batch_size} blocks of {PTX_BLOCK} tokens")
    run.start(restart)

    trainable = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    policy_opt = torch.optim.AdamW(trainable(policy), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0)
    value_opt = torch.optim.AdamW(trainable(value_model), lr=cfg.value_lr, eps=cfg.adam_eps, weight_decay=0.0)
    warmup = lambda step: min(1.0, (step + 1) / max(cfg.warmup_steps, 1))  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in (policy_opt, value_opt)]
    policy, policy_opt = accelerator.prepare(policy, policy_opt)  # one model per call, as FSDP2 asks
    value_model, value_opt = accelerator.prepare(value_model, value_opt)
    reward_model = reward_model.to(accelerator.device)
    reference = reference.to(accelerator.device) if reference is not None else None
    for s in schedulers:
        accelerator.register_for_checkpointing(s)
    state = load_latest_checkpoint(accelerator, run.path / "checkpoints")
    kl_ctl = KLController(state.extra.get("kl_coef", cfg.kl_coef), cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
    if state.step:
        log(f"{stage}: resuming from the checkpoint of iteration {state.step}")
    run.trim_metrics(state.step)
    n_iterations, world_size, rank = cfg.iterations(), accelerator.num_processes, accelerator.process_index
    log(f"{stage}: {count_parameters(accelerator.unwrap_model(policy)) / 1e6:.2f}M-parameter policy {policy_path}, reward model {rm_path}; "
        f"{len(prompts)} prompts, {n_iterations} iterations of {cfg.rollout_batch_size} episodes"
        + (f", pretraining mix γ = {cfg.ptx_coef}" if ptx_blocks is not None else "") + f", {world_size} process(es)")
    judge = SimulatedLabeler()
    device = accelerator.device

    with progress_bar(accelerator.is_main_process) as bar:
        task = bar.add_task(stage, total=n_iterations, completed=state.step, status="")
        while state.step < n_iterations:
            iteration = state.step
            episodes = rank_episodes(cfg.rollout_batch_size, cfg.minibatch_size, world_size, rank)
            batch_prompts = prompt_order(len(prompts), cfg.rollout_batch_size, iteration, config.run.seed)
            rows = [batch_prompts[j] for j in episodes]
            timer: dict[str, float] = {}
            t0 = time.perf_counter()

            # 1. generate
            query_ids, query_mask = left_pad_prompts([encoded[i] for i in rows], tokenizer.pad_token_id, device)
            unwrapped = accelerator.unwrap_model(policy).eval()
            response_ids, response_mask, ended = sample_responses(
                unwrapped, query_ids, query_mask, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seeds=[episode_seed(config.run.seed, iteration, j) for j in episodes],
                synced=shards_parameters(accelerator))
            t1 = time.perf_counter()
            timer["generate"] = t1 - t0

            # 2. score: the same micro-batches as the first PPO epoch, so its ratio is exactly 1
            mb, args = cfg.micro_batch_size, (query_ids, query_mask, response_ids, response_mask)
            seconds: dict[str, float] = {}
            # LoRA: the reference is the policy with its adapters off
            ref_model, ref_context = (unwrapped, lambda: adapter_disabled(unwrapped)) if reference is None else (reference, contextlib.nullcontext)
            logprobs, entropy, ref_logprobs, exact_kl = in_micro_batches(lambda *t: policy_and_reference_logprobs(
                unwrapped, ref_model, *t, cfg.temperature, reference_context=ref_context, seconds=seconds), mb, *args)
            timer["score_reference"] = seconds["reference"]
            timer["score_policy"] = _lap(timer, t1)
            values = in_micro_batches(lambda *t: response_values(accelerator.unwrap_model(value_model), *t), mb, *args)
            timer["score_value"] = _lap(timer, t1)
            rm_scores = in_micro_batches(lambda q, qm, r, rm: reward_model(torch.cat([q, r], 1), torch.cat([qm, rm], 1)), mb, *args)
            timer["score_reward"] = _lap(timer, t1)
            scores = torch.where(ended, rm_scores, torch.full_like(rm_scores, cfg.missing_eos_score))
            rollout = Rollout(query_ids, query_mask, response_ids, response_mask, ended, logprobs, ref_logprobs, values, scores, rm_scores, entropy,
                              exact_kl=exact_kl)

            # 3. rewards
            mask = response_mask.float()
            rollout.kl = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator) * mask
            rollout.rewards = per_token_rewards(scores, rollout.kl, response_mask, kl_ctl.value)
            over_processes = lambda t: accelerator.reduce(t, "sum")  # noqa: E731  (statistics of the global batch)
            if cfg.whiten_rewards:
                rollout.rewards = masked_whiten(rollout.rewards, mask, shift_mean=False, total=over_processes)

            # 4. advantages
            advantages, rollout.returns = gae_advantages(rollout.rewards, values, response_mask, cfg.gamma, cfg.lam)
            rollout.advantages = masked_whiten(advantages, mask, total=over_processes)
            timer["score_advantages"] = _lap(timer, t1)
            t2 = time.perf_counter()

            # 5. epochs
            policy.train()
            value_model.train()
            train_stats = ppo_epochs(accelerator, cfg, rollout, policy, value_model, policy_opt, value_opt, schedulers, ptx_blocks,
                                     iteration, config.run.seed)
            timer["train"] = time.perf_counter() - t2

            # 6. log, checkpoint
            state.step += 1
            texts = [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip() for r, m in zip(response_ids, response_mask)]
            metrics = rollout_metrics(rollout, texts, [prompts[i].id for i in rows], gold, judge, accelerator)
            metrics.update(train_stats)
            metrics["ppo/kl_coef"] = kl_ctl.value
            # what the models hold (a tensor the policy and its LoRA reference share counts once)
            metrics.update({"memory/parameters_mb": parameter_bytes(policy, reference, reward_model, value_model) / 2**20,
                            "memory/trainable_parameters": float(sum(p.numel() for p in trainable(policy) + trainable(value_model))),
                            "memory/optimizer_state_mb": optimizer_state_bytes(policy_opt, value_opt) / 2**20})
            kl_ctl.update(metrics["rollout/kl"], cfg.rollout_batch_size)
            n_tokens = accelerator.reduce(torch.tensor(float(response_mask.sum() + query_mask.sum()), device=device), "sum").item()
            elapsed = sum(timer.values())
            metrics.update({f"time/{k}": v for k, v in timer.items()})
            metrics.update({"time/episodes_per_s": cfg.rollout_batch_size / elapsed, "time/tokens_per_s": n_tokens / elapsed,
                            "episodes": state.step * cfg.rollout_batch_size})
            if state.step % cfg.log_every == 0 or state.step == n_iterations:
                run.log(state.step, metrics)
            status = f"score {metrics['rollout/score']:+.2f}  kl {metrics['rollout/kl']:.2f}"
            if "rollout/gold_likert" in metrics:
                status += f"  gold {metrics['rollout/gold_likert']:.2f}"
            bar.update(task, completed=state.step, status=status)
            if state.step % cfg.checkpoint_every == 0 and state.step < n_iterations:
                state.extra = {"kl_coef": kl_ctl.value}
                save_checkpoint(accelerator, run.path / "checkpoints", state)

    # save: the policy as final/, the value model beside it
    save_model(accelerator, policy, tokenizer, run.path / "final")
    save_model(accelerator, value_model, tokenizer, run.path / "value")
    run.write_lineage({"policy": policy_path, "reference": reference_path, "reward_model": rm_path, "value_model": value_path,
                       "prompts": cfg.prompts or world.prompts("ppo"), "ptx_data": (cfg.ptx_data or world.corpus) if ptx_blocks is not None else None})
    run.finish({"model": run.path / "final", "value_model": run.path / "value"})
    log(f"{stage}: policy saved to {run.path / 'final'}")
    return run.path / "final"


def _lap(timer: dict[str, float], since: float) -> float:
    """Seconds since ``since`` not yet booked in ``timer``'s score_* entries."""
    return time.perf_counter() - since - sum(v for k, v in timer.items() if k.startswith("score_"))


def ppo_epochs(accelerator, cfg, rollout: Rollout, policy, value_model, policy_opt, value_opt, schedulers, ptx_blocks,
               iteration: int, seed: int) -> dict[str, float]:
    """Step 5: ``cfg.ppo_epochs`` passes over the rollout in minibatches, one optimizer step each.

    Losses are token sums divided by the minibatch's token count over all processes, so
    micro-batching and the number of processes do not change the update. The first epoch goes
    through the episodes in rollout order (already a random order of prompts) with the rollout's
    micro-batches, so its first ratio is exactly 1; later epochs shuffle.
    """
    world_size, rank = accelerator.num_processes, accelerator.process_index
    local_minibatch = cfg.minibatch_size // world_size
    n_local = len(rollout)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, value: float) -> None:
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1

    step, first = 0, {}
    for epoch in range(cfg.ppo_epochs):
        generator = torch.Generator().manual_seed(seed * 7919 + iteration * 31 + epoch)
        order = torch.arange(n_local) if epoch == 0 else shuffled_local_order(cfg.rollout_batch_size, cfg.minibatch_size, world_size, rank, generator)
        for start in range(0, n_local, local_minibatch):
            minibatch = order[start : start + local_minibatch]
            micro = [minibatch[i : i + cfg.micro_batch_size] for i in range(0, len(minibatch), cfg.micro_batch_size)]
            local_tokens = rollout.response_mask[minibatch].sum().float().to(accelerator.device)
            n_tokens = accelerator.reduce(local_tokens, "sum").clamp(min=1).item()
            scale = world_size / n_tokens  # DDP averages gradients over processes
            step_stats: dict[str, float] = {}
            # PPO-ptx: γ · NLL of pretraining text in the same update (§3.5, eq. 2)
            if ptx_blocks is not None:
                # the step's blocks are drawn alike on every process, each taking its share
                g = torch.Generator().manual_seed(seed * 104729 + iteration * 1013 + step * 7)
                local_blocks = max(1, cfg.ptx_batch_size // world_size)
                drawn = torch.randint(len(ptx_blocks), (local_blocks * world_size,), generator=g)[rank * local_blocks : (rank + 1) * local_blocks]
                ids = ptx_blocks[drawn].to(accelerator.device)
                with accelerator.no_sync(policy), accelerator.autocast():
                    nll_sum, nll_count = next_token_nll(policy(input_ids=ids).logits, ids, torch.ones_like(ids))
                    ptx_loss = nll_sum / nll_count
                accelerator.backward(cfg.ptx_coef * ptx_loss)
                add("ppo/ptx_loss", ptx_loss.item())
            for i, rows in enumerate(micro):
                batch = rollout.select(rows)
                last = i == len(micro) - 1
                weight = float(batch.response_mask.sum()) * scale  # this micro-batch's share of the minibatch mean
                with (contextlib.nullcontext() if last else accelerator.no_sync(policy)), accelerator.autocast():
                    logprobs, _ = response_logprobs(policy, batch.query_ids, batch.query_mask, batch.response_ids,
                                                    batch.response_mask, cfg.temperature)
                    pg_loss, stats = clipped_policy_loss(logprobs, batch.logprobs, batch.advantages, batch.response_mask.float(), cfg.clip)
                accelerator.backward(pg_loss * weight)
                with (contextlib.nullcontext() if last else accelerator.no_sync(value_model)), accelerator.autocast():
                    values = response_values(value_model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
                    vf_loss, vf_clipfrac = clipped_value_loss(values, batch.values, batch.returns, batch.response_mask.float(), cfg.value_clip)
                accelerator.backward(vf_loss * weight)
                share = float(batch.response_mask.sum()) / n_tokens  # for the logs: this process's part of the minibatch's token mean
                for k, v in (("ppo/policy_loss", pg_loss), ("ppo/value_loss", vf_loss), ("ppo/clipfrac", stats["clipfrac"]),
                             ("ppo/approx_kl", stats["approx_kl"]), ("ppo/ratio", stats["ratio"]), ("ppo/value_clipfrac", vf_clipfrac)):
                    step_stats[k] = step_stats.get(k, 0.0) + v.item() * share
                if step == 0 and i == 0:
                    first = {"check/first_ratio": stats["ratio"].item(), "check/first_approx_kl": stats["approx_kl"].item()}
            for k, v in step_stats.items():
                add(k, v)
            add("ppo/policy_grad_norm", float(accelerator.clip_grad_norm_(policy.parameters(), cfg.grad_clip)))
            add("ppo/value_grad_norm", float(accelerator.clip_grad_norm_(value_model.parameters(), cfg.grad_clip)))
            policy_opt.step()
            value_opt.step()
            for s in schedulers:
                s.step()
            policy_opt.zero_grad(set_to_none=True)
            value_opt.zero_grad(set_to_none=True)
            step += 1
    # the logs: token means summed over the processes' parts, other statistics averaged over processes
    names = sorted(sums)
    local = torch.tensor([sums[k] / counts[k] for k in names], device=accelerator.device, dtype=torch.float64)
    summed = accelerator.reduce(local, "sum").tolist()
    return {**{k: v / (1 if k in TOKEN_MEANS else world_size) for k, v in zip(names, summed)}, **first}


@torch.no_grad()
def rollout_metrics(rollout: Rollout, texts: list[str], ids: list[str], gold: dict, judge: SimulatedLabeler, accelerator) -> dict[str, float]:
    """Batch means over all processes: proxy score, gold score (built-in world), KL, entropy, length, EOS rate."""
    mask = rollout.response_mask.float()
    per_episode = {
        "rollout/score": rollout.rm_scores,
        "rollout/score_with_penalty": rollout.scores,
        "rollout/kl": (rollout.exact_kl * mask).sum(-1),
        "rollout/kl_k1": (kl_per_token(rollout.logprobs, rollout.ref_logprobs, "k1") * mask).sum(-1),
        "rollout/kl_k3": (kl_per_token(rollout.logprobs, rollout.ref_logprobs, "k3") * mask).sum(-1),
        "rollout/length": mask.sum(-1),
        "rollout/eos_rate": rollout.ended.float(),
        "rollout/entropy": (rollout.entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1),
    }
    if gold and all(i in gold for i in ids):
        judgements = [judge.judge(gold[i], text) for i, text in zip(ids, texts)]
        device = rollout.scores.device
        per_episode["rollout/gold_likert"] = torch.tensor([float(j.likert) for j in judgements], device=device)
        per_episode["rollout/gold_quality"] = torch.tensor([j.quality for j in judgements], device=device)
    names = sorted(per_episode)
    local = torch.stack([per_episode[n].float().sum() for n in names] + [torch.tensor(float(len(rollout)), device=rollout.scores.device)])
    total = accelerator.reduce(local, "sum")
    metrics = {n: (total[i] / total[-1]).item() for i, n in enumerate(names)}
    metrics["rollout/sqrt_kl"] = math.sqrt(max(metrics["rollout/kl"], 0.0))
    return metrics
