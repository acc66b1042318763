"""Win rates between two models' answers to the same prompts, as InstructGPT reports them (§4.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _outcome(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def win_rate(scores_a: Sequence, scores_b: Sequence) -> dict:
    """How often A's answer is judged better than B's, ties counting half, with a 95% interval.

    scores_*[i]: the judge's score of each model's answer to prompt i, or a list of scores of
    several answers sampled for prompt i (sample j of A meets sample j of B). A prompt's outcome is
    the mean of its comparisons (1 win, 0.5 tie, 0 loss), and the interval is the normal
    approximation over prompts, mean ± 1.96 · sd / √n: samples of one prompt are not independent,
    so they narrow the interval only as far as they make each prompt's outcome less noisy.
    ``n`` counts prompts; ``wins``, ``ties`` and ``losses`` count comparisons.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    per_prompt = []
    for a, b in zip(scores_a, scores_b):
        a, b = (list(a), list(b)) if isinstance(a, Sequence) else ([a], [b])
        if len(a) != len(b) or not a:
            raise ValueError("win_rate: each prompt needs as many answers from A as from B")
        per_prompt.append([_outcome(x, y) for x, y in zip(a, b)])
    outcomes = [sum(p) / len(p) for p in per_prompt]
    flat = [o for p in per_prompt for o in p]
    n = len(outcomes)
    mean = sum(outcomes) / n
    sd = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {
        "win_rate": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "n": n,
        "wins": flat.count(1.0), "ties": flat.count(0.5), "losses": flat.count(0.0),
    }
