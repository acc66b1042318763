"""What a trained reward model gets right: accuracy against the gold ranking, and its biases.

Every function takes plain lists: per comparison, the RM's rewards and the gold judge's
qualities of the same K responses.
"""

from __future__ import annotations

import statistics
from collections import defaultdict


def pairwise_accuracy(rewards: list[list[float]], gold: list[list[float]], min_margin: float = 0.0, max_margin: float = float("inf")) -> tuple[float, int]:
    """Share of response pairs the RM orders as the gold judge does; gold ties are left out.

    Only pairs whose gold quality differs by a margin in [min_margin, max_margin) count; a pair
    the RM scores equally is ordered wrongly. Returns (accuracy, number of pairs); accuracy is nan
    when no pair counts.
    """
    right = total = 0
    for r, g in zip(rewards, gold):
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                # rounded, so a gap on a bucket's edge falls in the bucket it starts: 0.35 - 0.25 is
                # 0.09999999999999998 in floats, and belongs in [0.1, 0.3), not [0, 0.1)
                margin = round(abs(g[i] - g[j]), 9)
                if g[i] == g[j] or not min_margin <= margin < max_margin:
                    continue
                total += 1
                right += (r[i] - r[j]) * (g[i] - g[j]) > 0
    return (right / total if total else float("nan")), total


def accuracy_by_group(rewards: list[list[float]], gold: list[list[float]], groups: list[str]) -> dict[str, tuple[float, int]]:
    """``pairwise_accuracy`` within each group of comparisons (``groups[i]``: comparison i's group):
    {group: (accuracy, number of pairs)}."""
    members = defaultdict(list)
    for i, name in enumerate(groups):
        members[name].append(i)
    return {name: pairwise_accuracy([rewards[i] for i in idx], [gold[i] for i in idx]) for name, idx in sorted(members.items())}


def accuracy_by_pair_kind(rewards: list[list[float]], gold: list[list[float]], kinds: list[list[str]]) -> dict[str, dict]:
    """``pairwise_accuracy`` per kind of pair, "better>worse" by the responses' kinds
    (``kinds[c][i]``: response i of comparison c, e.g. exact, form, wrong): {kind: {accuracy, pairs}}."""
    counts = defaultdict(lambda: [0, 0])
    for r, g, k in zip(rewards, gold, kinds):
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                if g[i] == g[j]:
                    continue
                hi, lo = (i, j) if g[i] > g[j] else (j, i)
                count = counts[f"{k[hi]}>{k[lo]}"]
                count[0] += r[hi] > r[lo]
                count[1] += 1
    return {kind: {"accuracy": right / total, "pairs": total} for kind, (right, total) in sorted(counts.items(), key=lambda kv: -kv[1][1])}


def correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are fewer than 3 points."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return statistics.correlation(xs, ys)


def length_bias(rewards: list[float], lengths: list[int], gold_likert: list[int]) -> float:
    """Correlation of reward with response length among responses of equal gold Likert,
    averaged over Likert levels weighted by their counts. Near 0 is healthy; a reward model
    that mostly rewards length shows a large positive value."""
    weighted = total = 0.0
    for level in set(gold_likert):
        idx = [i for i, g in enumerate(gold_likert) if g == level]
        c = correlation([rewards[i] for i in idx], [float(lengths[i]) for i in idx])
        if c == c:  # not nan
            weighted += c * len(idx)
            total += len(idx)
    return weighted / total if total else float("nan")


def figure(x: float | None) -> str:
    """``x`` to 2 decimals, or "n/a" where there was nothing to measure (NaN here, null in diagnostics.json)."""
    return "n/a" if x is None or x != x else f"{x:.2f}"
