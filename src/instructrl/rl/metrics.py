"""Step 6 of PPO: what one rollout batch says, for the logs and the over-optimisation curves."""

from __future__ import annotations

import math

import torch

from instructrl.models.base import optimizer_state_bytes, parameter_bytes
from instructrl.rl.rollout import Rollout
from instructrl.rlmath import kl_per_token
from instructrl.world.labeler import SimulatedLabeler


@torch.no_grad()
def rollout_metrics(rollout: Rollout, texts: list[str], ids: list[str], gold: dict, judge: SimulatedLabeler, accelerator) -> dict[str, float]:
    """Batch means over all processes: proxy score, gold score (built-in world), KL, entropy, length, EOS rate."""
    mask = rollout.response_mask.float()
    per_episode = {
        "rollout/score": rollout.rm_scores,
        "rollout/score_in_reward": rollout.scores,  # as the reward has it: ppo.missing_eos_score for a response without EOS
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


def memory_metrics(models: tuple, optimizers: tuple) -> dict[str, float]:
    """What the models and optimizers hold on this process; a tensor two models share (the policy
    and its LoRA reference) counts once. ``None`` stands for a model that is not there."""
    trained = {id(p): p.numel() for m in models if m is not None for p in m.parameters() if p.requires_grad}
    return {"memory/parameters_mb": parameter_bytes(*models) / 2**20, "memory/trainable_parameters": float(sum(trained.values())),
            "memory/optimizer_state_mb": optimizer_state_bytes(*optimizers) / 2**20}


def time_metrics(seconds: dict[str, float], n_episodes: int, n_tokens: float) -> dict[str, float]:
    """Each phase's seconds as time/PHASE, and the iteration's pace over their sum."""
    elapsed = sum(seconds.values())
    return {**{f"time/{k}": v for k, v in seconds.items()}, "time/episodes_per_s": n_episodes / elapsed, "time/tokens_per_s": n_tokens / elapsed}
