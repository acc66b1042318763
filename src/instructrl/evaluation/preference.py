"""Win rates between two models' answers to the same prompts, as InstructGPT reports them (§4.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _outcome(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


PSEUDO_OUTCOMES = (1.0, 1.0, 0.0, 0.0)  # Agresti & Coull (1998): two wins and two losses added


def interval95(outcomes: Sequence[float]) -> list[float]:
    """95% interval of the mean of per-prompt outcomes in [0, 1] (1 win, 0.5 tie, 0 loss, or a mean of those).

    The normal approximation p̃ ± 1.96 · √(v / m), p̃ and v the mean and variance of the m = n + 4
    outcomes with two wins and two losses added. For outcomes of 0 and 1 it is Agresti & Coull's
    "plus four" interval; ties (0.5) lower v, as they should. Without the four, a few prompts
    that all agree (3 wins of 3, or a family where every answer ties) would get an interval of
    width 0. Clipped to [0, 1]; over hundreds of prompts the four move it by a fraction of a point.
    """
    padded = list(outcomes) + list(PSEUDO_OUTCOMES)
    m = len(padded)
    mean = sum(padded) / m
    variance = sum((o - mean) ** 2 for o in padded) / m  # of 0/1 outcomes: p̃(1 - p̃), as Agresti-Coull's
    half = 1.96 * math.sqrt(variance / m)
    return [max(0.0, mean - half), min(1.0, mean + half)]


def win_rate(scores_a: Sequence, scores_b: Sequence) -> dict:
    """How often A's answer is judged better than B's, ties counting half, with a 95% interval.

    scores_*[i]: the judge's score of each model's answer to prompt i, or a list of scores of
    several answers sampled for prompt i (sample j of A meets sample j of B). A prompt's outcome is
    the mean of its comparisons (1 win, 0.5 tie, 0 loss); ``win_rate`` is their mean over prompts.
    The interval is ``interval95`` of the prompts' outcomes: samples of one prompt are not
    independent, so they narrow it only as far as they make each prompt's outcome less noisy.
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
    return {
        "win_rate": sum(outcomes) / len(outcomes), "ci95": interval95(outcomes), "n": len(outcomes),
        "wins": flat.count(1.0), "ties": flat.count(0.5), "losses": flat.count(0.0),
    }
