"""Inter-labeler agreement: pairwise agreement on ranked pairs and Krippendorff's alpha.

Pure functions over plain lists; no database, no HTTP.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Callable, Literal

Metric = Literal["nominal", "ordinal", "interval"]


def pairwise_agreement(units: list[dict[str, list[int]]]) -> dict:
    """How often two labelers order a pair of responses the same way.

    units: one dict per task, labeler -> ranks of the task's K responses (0 = best, ties equal).
    For each task, each two labelers who ranked it and each two responses that both labelers put
    in a strict order (a tie on either side leaves the pair out): agree when the orders match,
    as InstructGPT measured its labelers (§3.4: ~73%). Returns the overall rate and count, and
    per labeler the rate over the pairs they took part in; NaN where there are no pairs.
    """
    total, agreed = 0, 0
    mine: dict[str, list[int]] = {}
    for unit in units:
        for a, b in combinations(sorted(unit), 2):
            ranks_a, ranks_b = unit[a], unit[b]
            for i, j in combinations(range(len(ranks_a)), 2):
                da, db = ranks_a[i] - ranks_a[j], ranks_b[i] - ranks_b[j]
                if da == 0 or db == 0:
                    continue
                same = (da > 0) == (db > 0)
                total, agreed = total + 1, agreed + same
                for name in (a, b):
                    counts = mine.setdefault(name, [0, 0])
                    counts[0] += 1
                    counts[1] += same
    return {"agreement": agreed / total if total else math.nan, "pairs": total,
            "per_labeler": {name: {"agreement": c[1] / c[0], "pairs": c[0]} for name, c in sorted(mine.items())}}


def _distance(metric: Metric, counts: Counter) -> Callable[[float, float], float]:
    """δ²(c, k) of Krippendorff (2011) §"Difference functions"; ``counts`` are the n_c of the pairable values."""
    if metric == "nominal":
        return lambda c, k: 0.0 if c == k else 1.0
    if metric == "interval":
        return lambda c, k: float(c - k) ** 2
    if metric == "ordinal":
        values = sorted(counts)
        below = {}  # sum of n_g for g < c
        running = 0
        for v in values:
            below[v] = running
            running += counts[v]

        def ordinal(c, k):
            lo, hi = min(c, k), max(c, k)
            # (sum_{g=lo}^{hi} n_g - (n_lo + n_hi) / 2)^2
            return (below[hi] + counts[hi] - below[lo] - (counts[lo] + counts[hi]) / 2) ** 2

        return ordinal
    raise ValueError(f"unknown metric {metric!r}")


def krippendorff_alpha(units: list[dict[str, float]], metric: Metric = "interval") -> dict:
    """Krippendorff's alpha = 1 - D_o / D_e, overall and per labeler.

    units: one dict per unit (e.g. one response of one task), labeler -> value; a labeler who did
    not judge the unit is absent. Units with fewer than two values are not pairable and left
    out. D_o: the mean δ² over ordered pairs of values within a unit, each pair weighted
    1 / (m_u - 1) (m_u values in the unit); D_e: the mean δ² over all ordered pairs of pairable
    values. Per labeler: D_o over the pairs that include the labeler's value, against the same
    D_e, i.e. how far that labeler's values sit from the others' (1 = perfect, 0 = chance).
    NaN when there is nothing to compare or no variation at all.
    """
    pairable = [unit for unit in units if len(unit) >= 2]
    counts = Counter(v for unit in pairable for v in unit.values())
    n = sum(counts.values())
    if n < 2:
        return {"alpha": math.nan, "values": n, "per_labeler": {}}
    delta = _distance(metric, counts)
    observed, weights = 0.0, 0.0
    per: dict[str, list[float]] = {}
    for unit in pairable:
        w = 1.0 / (len(unit) - 1)
        for a, b in ((a, b) for a in unit for b in unit if a != b):
            d = delta(unit[a], unit[b])
            observed += w * d
            weights += w
            entry = per.setdefault(a, [0.0, 0.0])
            entry[0] += w * d
            entry[1] += w
    values = list(counts)
    expected = sum(counts[c] * counts[k] * delta(c, k) for c in values for k in values) / (n * (n - 1))
    if expected == 0:
        return {"alpha": math.nan, "values": n, "per_labeler": {}}
    # weights == n: each pairable value takes part in m_u - 1 pairs of weight 1 / (m_u - 1)
    return {"alpha": 1.0 - (observed / weights) / expected, "values": n,
            "per_labeler": {name: 1.0 - (e[0] / e[1]) / expected for name, e in sorted(per.items())}}
