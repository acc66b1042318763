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


def test_ordinal_and_nominal_alpha_and_a_three_coder_per_labeler_alpha_by_hand():
    # units (1, 2), (2, 3), (1, 1): n_1 = 3, n_2 = 2, n_3 = 1, n = 6; each unit's two ordered pairs weigh 1
    units = [{"a": 1, "b": 2}, {"a": 2, "b": 3}, {"a": 1, "b": 1}]
    # ordinal δ²(c, k) = (n_c + ... + n_k - (n_c + n_k) / 2)²: δ²(1,2) = (5 - 2.5)² = 6.25, δ²(2,3) = (3 - 1.5)² = 2.25,
    # δ²(1,3) = (6 - 2)² = 16. D_o = 2 (6.25 + 2.25) / 6 = 17/6; D_e = 2 (3·2·6.25 + 2·1·2.25 + 3·1·16) / 30 = 6
    assert math.isclose(krippendorff_alpha(units, "ordinal")["alpha"], 1 - 17 / 36)
    # nominal: D_o = 4/6, D_e = 2 (3·2 + 2·1 + 3·1) / 30 = 11/15 -> 1 - 10/11
    assert math.isclose(krippendorff_alpha(units, "nominal")["alpha"], 1 / 11)
    # three coders, c the odd one: units (1, 1, 2), (2, 2, 1); interval; each ordered pair weighs 1/(3-1).
    # D_e = 2·3·3·1 / 30 = 0.6. D_o = (4 pairs of δ² 1 per unit · 1/2 · 2 units) / 6 = 2/3 -> alpha = 1 - 10/9.
    # a's pairs: (a,b) 0 and (a,c) 1 per unit -> D_o(a) = 1/2, alpha 1 - 5/6; c's: (c,a) 1, (c,b) 1 -> 1 - 5/3
    result = krippendorff_alpha([{"a": 1, "b": 1, "c": 2}, {"a": 2, "b": 2, "c": 1}], "interval")
    assert math.isclose(result["alpha"], -1 / 9)
    assert all(math.isclose(result["per_labeler"][k], v) for k, v in {"a": 1 / 6, "b": 1 / 6, "c": -2 / 3}.items())
    # pairwise over two tasks: reversed orders disagree on all 6 pairs; x = [0,0,1,1] vs y = [0,1,0,1] orders
    # strictly on both sides only (0,3) (agree) and (1,2) (disagree) -> 1 of 8
    result = pairwise_agreement([{"x": [0, 1, 2, 3], "y": [3, 2, 1, 0]}, {"x": [0, 0, 1, 1], "y": [0, 1, 0, 1]}])
    assert (result["pairs"], result["agreement"]) == (8, 1 / 8)
