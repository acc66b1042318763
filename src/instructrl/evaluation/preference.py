"""Win rates between two models' answers to the same prompts, as InstructGPT reports them (§4.1)."""

from __future__ import annotations

import math


def win_rate(scores_a: list[float], scores_b: list[float]) -> dict:
    """How often A's answer is judged better than B's, ties counting half, with a 95% interval.

    scores_*: the judge's score of each model's answer to prompt i. The interval is the normal
    approximation over per-prompt outcomes (1 win, 0.5 tie, 0 loss): mean ± 1.96 · sd / √n.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]
    n = len(outcomes)
    mean = sum(outcomes) / n
    sd = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {
        "win_rate": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "n": n,
        "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
    }
