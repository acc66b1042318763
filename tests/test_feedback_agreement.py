"""Agreement between labelers, against numbers worked out by hand and Krippendorff's own example."""

from __future__ import annotations

import math

import pytest

from instructrl.feedback.agreement import krippendorff_alpha, pairwise_agreement

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the reliability data with
# missing values: 4 observers x 12 units ('.' = not coded). The paper's results: nominal 0.743,
# ordinal 0.815, interval 0.849.
TEXTBOOK = {
    "A": "1 2 3 3 2 1 4 1 2 . . .",
    "B": "1 2 3 3 2 2 4 1 2 5 . 3",
    "C": ". 3 3 3 2 3 4 2 2 5 1 .",
    "D": "1 2 3 3 2 4 4 1 2 5 1 .",
}


def textbook_units() -> list[dict[str, int]]:
    return [{o: int(row.split()[u]) for o, row in TEXTBOOK.items() if row.split()[u] != "."} for u in range(12)]


@pytest.mark.parametrize("metric, expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_reproduces_the_papers_example(metric, expected):
    result = krippendorff_alpha(textbook_units(), metric)
    assert round(result["alpha"], 3) == expected
    # unit 12 has one value only: not pairable. 40 pairable values remain (the paper's n = 40)
    assert result["values"] == 40


def test_krippendorff_alpha_by_hand():
    # two coders, units (1, 1), (2, 2), (1, 2): interval δ² is 0, 0, 1 -> with weights 1/(2-1),
    # D_o = (0 + 0 + 2 * 1) / 6 = 1/3. Values 1,1,2,2,1,2: n_1 = 3, n_2 = 3, n = 6;
    # D_e = (2 * 3 * 3 * 1) / (6 * 5) = 18 / 30 = 0.6. alpha = 1 - (1/3) / 0.6 = 4/9.
    units = [{"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 1, "b": 2}]
    result = krippendorff_alpha(units, "interval")
    assert math.isclose(result["alpha"], 4 / 9)
    # each coder takes part in every pair, so each one's alpha is the overall one
    assert all(math.isclose(a, 4 / 9) for a in result["per_labeler"].values())
    assert krippendorff_alpha([{"a": 3, "b": 3}, {"a": 5, "b": 5}], "interval")["alpha"] == 1.0
    # no variation at all: nothing to measure
    assert math.isnan(krippendorff_alpha([{"a": 3, "b": 3}], "interval")["alpha"])


def test_per_labeler_alpha_singles_out_the_odd_one():
    # a, b agree on every unit; c says the opposite
    units = [{"a": v, "b": v, "c": 8 - v} for v in (1, 2, 6, 7)]
    per = krippendorff_alpha(units, "interval")["per_labeler"]
    assert per["a"] == per["b"] > per["c"]


def test_pairwise_agreement_by_hand():
    # x orders 0 > 1 > 2, y orders 0 > 2 > 1: pairs (0,1) agree, (0,2) agree, (1,2) disagree -> 2/3
    result = pairwise_agreement([{"x": [0, 1, 2], "y": [0, 2, 1]}])
    assert result["pairs"] == 3 and math.isclose(result["agreement"], 2 / 3)
    # a tie on either side leaves the pair out: x ties 0 and 1 -> pairs (0,2), (1,2) both agree
    result = pairwise_agreement([{"x": [0, 0, 1], "y": [0, 1, 2]}])
    assert result == {"agreement": 1.0, "pairs": 2, "per_labeler": {"x": {"agreement": 1.0, "pairs": 2}, "y": {"agreement": 1.0, "pairs": 2}}}
    # three labelers on a K=2 task: z disagrees with x and y, who agree: 1 of 3 pairs agree;
    # x took part in (x,y) agree and (x,z) disagree -> 1/2; z in two disagreements -> 0
    result = pairwise_agreement([{"x": [0, 1], "y": [0, 1], "z": [1, 0]}])
    assert math.isclose(result["agreement"], 1 / 3)
    assert result["per_labeler"]["x"]["agreement"] == 0.5 and result["per_labeler"]["z"]["agreement"] == 0.0
    assert math.isnan(pairwise_agreement([{"x": [0, 1]}])["agreement"])  # one labeler: no pairs
