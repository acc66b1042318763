"""The KL coefficient β: fixed (InstructGPT), or adapted towards a target (lm-human-preferences)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KLController:
    """β of the per-token KL penalty.

    Adaptive (Ziegler et al. 2019, §2.2): after each batch,
        error = clip(KL / target - 1, -0.2, 0.2);  β ← β · (1 + error · n_episodes / horizon)
    so β rises while the policy drifts further than ``target`` nats from the reference, and falls
    while it stays closer. Fixed when ``adaptive`` is False.
    """

    value: float
    adaptive: bool = False
    target: float = 1.0
    horizon: int = 10000

    def update(self, mean_kl: float, n_episodes: int) -> float:
        if self.adaptive:
            error = min(max(mean_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value
