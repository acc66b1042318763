"""Step 6 of PPO: what one rollout batch says, for the logs and the over-optimisation curves."""

from __future__ import annotations

import math

import torch

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
