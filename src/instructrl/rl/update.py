"""Step 5 of PPO: the epochs of clipped policy and value updates over one rollout, with
PPO-ptx's pretraining term (InstructGPT §3.5, eq. 2)."""

from __future__ import annotations

import torch

from instructrl.rl.episodes import shuffled_local_order
from instructrl.rl.rollout import Rollout, response_logprobs, response_values
from instructrl.rlmath import clipped_policy_loss, clipped_value_loss, next_token_nll
from instructrl.training.loop import accumulating

TOKEN_MEANS = {"ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/ratio", "ppo/value_clipfrac"}


def ptx_backward(accelerator, policy, ptx_blocks: torch.Tensor, cfg, seed: int, iteration: int, step: int) -> float:
    """PPO-ptx: backward of γ · NLL of pretraining text in the same update (§3.5, eq. 2); returns the NLL.

    The step's blocks are drawn alike on every process, each taking its share."""
    world_size, rank = accelerator.num_processes, accelerator.process_index
    g = torch.Generator().manual_seed(seed * 104729 + iteration * 1013 + step * 7)
    local_blocks = max(1, cfg.ptx_batch_size // world_size)
    drawn = torch.randint(len(ptx_blocks), (local_blocks * world_size,), generator=g)[rank * local_blocks : (rank + 1) * local_blocks]
    ids = ptx_blocks[drawn].to(accelerator.device)
    with accumulating(accelerator, policy, last=False):
        with accelerator.autocast():
            nll_sum, nll_count = next_token_nll(policy(input_ids=ids).logits, ids, torch.ones_like(ids))
            ptx_loss = nll_sum / nll_count
        accelerator.backward(cfg.ptx_coef * ptx_loss)
    return ptx_loss.item()


def micro_batch_backward(accelerator, cfg, batch: Rollout, policy, value_model, scale: float, sync: bool) -> dict[str, torch.Tensor]:
    """Backward of the clipped policy and value losses of one micro-batch, weighted by its share
    of the minibatch's tokens (``scale`` = processes / minibatch tokens); gradients are synced
    across processes only on the minibatch's last micro-batch (``sync``). Returns its token means."""
    batch = batch.trimmed()  # as scoring did: the same shapes, so the first ratio is exactly 1
    weight = float(batch.response_mask.sum()) * scale
    mask = batch.response_mask.float()
    # the backward inside accumulating(): FSDP decides at backward time whether to reduce-scatter
    with accumulating(accelerator, policy, last=sync):
        with accelerator.autocast():
            logprobs, _ = response_logprobs(policy, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask, cfg.temperature)
            pg_loss, stats = clipped_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, cfg.clip)
        accelerator.backward(pg_loss * weight)
    with accumulating(accelerator, value_model, last=sync):
        with accelerator.autocast():
            values = response_values(value_model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
            vf_loss, vf_clipfrac = clipped_value_loss(values, batch.values, batch.returns, mask, cfg.value_clip)
        accelerator.backward(vf_loss * weight)
    return {"ppo/policy_loss": pg_loss, "ppo/value_loss": vf_loss, "ppo/clipfrac": stats["clipfrac"], "ppo/approx_kl": stats["approx_kl"],
            "ppo/ratio": stats["ratio"], "ppo/value_clipfrac": vf_clipfrac}


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
            if ptx_blocks is not None:
                add("ppo/ptx_loss", ptx_backward(accelerator, policy, ptx_blocks, cfg, seed, iteration, step))
            for i, rows in enumerate(micro):
                batch = rollout.select(rows)
                stats = micro_batch_backward(accelerator, cfg, batch, policy, value_model, scale, sync=i == len(micro) - 1)
                share = float(batch.response_mask.sum()) / n_tokens  # for the logs: this process's part of the minibatch's token mean
                for k, v in stats.items():
                    step_stats[k] = step_stats.get(k, 0.0) + v.item() * share
                if step == 0 and i == 0:
                    first = {"check/first_ratio": stats["ppo/ratio"].item(), "check/first_approx_kl": stats["ppo/approx_kl"].item()}
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
