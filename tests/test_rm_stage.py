"""`instructrl rm` on the smoke world, and the diagnostics' arithmetic by hand."""

from __future__ import annotations

import json
import math

from instructrl.data.chat import tokenize_conversation
from instructrl.data.jsonl import read_jsonl
from instructrl.models.base import load_tokenizer
from instructrl.models.reward import score_sequences
from instructrl.evaluation.rm_diagnostics import accuracy_by_group, accuracy_by_pair_kind, correlation, length_bias, pairwise_accuracy
from instructrl.models.reward import RewardModel
from instructrl.world.labeler import QUALITY_WRONG_MAX


def test_pairwise_accuracy_by_hand():
    # gold (3, 2, 2): pairs (0,1) and (0,2) count, (1,2) is a gold tie and is left out.
    # rewards (1, 0, 5): (0,1) right (1 > 0), (0,2) wrong (1 < 5) -> 1 of 2
    assert pairwise_accuracy([[1.0, 0.0, 5.0]], [[3.0, 2.0, 2.0]]) == (0.5, 2)
    # margins: both pairs have a gold margin of 1, so a window [0, 0.5) holds none
    accuracy, pairs = pairwise_accuracy([[1.0, 0.0, 5.0]], [[3.0, 2.0, 2.0]], 0, 0.5)
    assert pairs == 0 and math.isnan(accuracy)


def test_pairwise_accuracy_margin_on_a_bucket_edge_counts_in_the_upper_bucket():
    # the gold labeler's 0.35 (an upper-casing answered in lower case: 0.35 x similarity 1) against
    # 0.25 (a wrong answer of similarity 5/7: 0.35 x 5/7): a margin of exactly 0.1, which floats
    # compute as 0.09999999999999998; rm's buckets are [0, 0.1), [0.1, 0.3), [0.3, 2)
    gold = [[QUALITY_WRONG_MAX, QUALITY_WRONG_MAX * 5 / 7]]
    assert gold[0][1] == 0.25 and gold[0][0] - gold[0][1] < 0.1  # what the floats make of it
    assert pairwise_accuracy([[1.0, 0.0]], gold, 0.1, 0.3) == (1.0, 1)
    assert pairwise_accuracy([[1.0, 0.0]], gold, 0, 0.1)[1] == 0
    # 1.0 (exact) against 0.7 (verbose) is a margin of 0.3: the top bucket
    assert pairwise_accuracy([[1.0, 0.0]], [[1.0, 0.7]], 0.3, 2) == (1.0, 1)


def test_pairwise_accuracy_counts_an_rm_tie_as_wrong():
    # gold orders the pair, the RM gives both 2.0: not ordered as the gold judge does
    assert pairwise_accuracy([[2.0, 2.0, 0.0]], [[1.0, 0.5, 0.0]]) == (2 / 3, 3)


def test_accuracy_by_pair_kind_by_hand():
    # comparison 1: gold (1.0 exact, 0.6 form, 0.0 wrong), rewards (2, 3, 1):
    #   exact>form wrong (2 < 3), exact>wrong right (2 > 1), form>wrong right (3 > 1)
    # comparison 2: gold (0.0 wrong, 1.0 exact, 0.0 wrong), rewards (5, 4, 0): exact>wrong 1 of 2; the wrong-wrong tie is left out
    rewards = [[2.0, 3.0, 1.0], [5.0, 4.0, 0.0]]
    gold = [[1.0, 0.6, 0.0], [0.0, 1.0, 0.0]]
    kinds = [["exact", "form", "wrong"], ["wrong", "exact", "wrong"]]
    by = accuracy_by_pair_kind(rewards, gold, kinds)
    assert by == {"exact>wrong": {"accuracy": 2 / 3, "pairs": 3}, "exact>form": {"accuracy": 0.0, "pairs": 1},
                  "form>wrong": {"accuracy": 1.0, "pairs": 1}}
    assert list(by)[0] == "exact>wrong"  # the most pairs first


def test_accuracy_by_group_by_hand():
    # group a: one comparison, 1 of 2 pairs right (as above); group b: its one pair ordered wrongly; group c: a gold tie only
    rewards = [[1.0, 0.0, 5.0], [0.0, 1.0], [2.0, 1.0]]
    gold = [[3.0, 2.0, 2.0], [1.0, 0.0], [0.5, 0.5]]
    by = accuracy_by_group(rewards, gold, ["a", "b", "c"])
    assert list(by) == ["a", "b", "c"] and by["a"] == (0.5, 2) and by["b"] == (0.0, 1) and math.isnan(by["c"][0]) and by["c"][1] == 0
    # two comparisons of one group pool their pairs: 1 right of 3
    assert accuracy_by_group(rewards[:2], gold[:2], ["a", "a"]) == {"a": (1 / 3, 3)}


def test_length_bias_sees_a_length_reward():
    # within each Likert level the reward equals the length: correlation 1 at both levels
    assert math.isclose(length_bias([1, 2, 3, 10, 20, 30], [1, 2, 3, 10, 20, 30], [4, 4, 4, 7, 7, 7]), 1.0)
    # reward falls with length at level 4 (-1) and rises at level 7 (+1): weighted mean 0
    assert math.isclose(length_bias([3, 2, 1, 10, 20, 30], [1, 2, 3, 10, 20, 30], [4, 4, 4, 7, 7, 7]), 0.0, abs_tol=1e-12)


def test_length_bias_weights_levels_by_their_responses_and_skips_the_unmeasurable():
    # level 4: reward rises with length over 3 responses, r = +1; level 7: falls over 4, r = -1.
    # Weighted by count: (3 * 1 + 4 * -1) / 7 = -1/7 (an unweighted mean would say 0).
    # Level 1 has 2 responses and level 5 a constant reward: no correlation, so left out of the weights
    # (counting their 5 responses would give -1/12)
    rewards = [1, 2, 3] + [4, 3, 2, 1] + [0, 9] + [5, 5, 5]
    lengths = [1, 2, 3] + [1, 2, 3, 4] + [1, 2] + [1, 2, 3]
    likert = [4] * 3 + [7] * 4 + [1] * 2 + [5] * 3
    assert math.isclose(length_bias(rewards, lengths, likert), -1 / 7)


def test_correlation_by_hand():
    # x 1 2 3 4, y 1 3 2 4: deviations from 2.5 are (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5);
    # products sum to 2.25 - .25 - .25 + 2.25 = 4, squares to 5 each: r = 4 / 5
    assert math.isclose(correlation([1, 2, 3, 4], [1, 3, 2, 4]), 0.8)
    assert math.isnan(correlation([1, 2, 3], [7, 7, 7])) and math.isnan(correlation([1, 2], [1, 2]))


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_the_held_out_comparisons_are_whole_prompts():
    """Two labelers ranked each of 20 prompts (the feedback app's overlap), or a preference file holds
    two pairs of each prompt, each pair with an id of its own (file:line): each prompt's comparisons are
    held out together or trained on together, never one of each."""
    import random

    from instructrl.data.records import ComparisonRecord
    from instructrl.stages.rm import split_by_prompt

    def record(id: str, prompt: str) -> ComparisonRecord:
        return ComparisonRecord(id=id, prompt=[{"role": "user", "content": prompt}], responses=["a", "b"], ranks=[0, 1], labeler_id="x")

    for ids in ([f"p{i}" for i in range(20) for _ in range(2)], [f"pairs.jsonl:{line}" for line in range(1, 41)]):
        records = [record(id, f"prompt {n // 2}") for n, id in enumerate(ids)]
        held, train = split_by_prompt(records, 0.2, seed=0)
        assert sorted(held + train) == list(range(40)) and len(held) == 8
        assert {records[i].prompt[0].content for i in held}.isdisjoint(records[i].prompt[0].content for i in train)
    # one comparison per prompt (collect's): the split the RM always drew, so that runs stay the same
    unique = [record(f"p{i}", f"prompt {i}") for i in range(50)]
    order = list(range(50))
    random.Random("rm-split:3").shuffle(order)
    assert split_by_prompt(unique, 0.1, seed=3) == (sorted(order[:5]), sorted(order[5:]))
    # eight prompts and a tenth held out: one prompt still is, so the diagnostics measure something; none at fraction 0
    assert [len(held) for held, _ in (split_by_prompt(unique[:8], f, seed=0) for f in (0.1, 0.0))] == [1, 0]


def test_diagnostics_judge_by_gold_only_the_built_in_prompts_themselves(smoke_rm):
    """A record under a built-in prompt's id but with another prompt (people's own) is measured against its own
    ranks: the gold labeler would judge its answers against the built-in prompt's answer."""
    from instructrl.data.inputs import read_comparisons
    from instructrl.stages.rm import diagnose
    from instructrl.world.build import load_tasks

    records = read_comparisons(smoke_rm / "collect" / "comparisons.jsonl")[:4]
    tasks = {t.id: t for t in load_tasks(smoke_rm / "world" / "prompts" / "rm.jsonl")}
    model, tokenizer = RewardModel.from_pretrained(smoke_rm / "rm" / "final"), load_tokenizer(smoke_rm / "rm" / "final")
    assert diagnose(model, tokenizer, records, tasks, "cpu")["against"] == "the gold labeler"
    renamed = [r.model_copy(update={"prompt": [r.prompt[0].model_copy(update={"content": "Tell me a story."})]}) for r in records]
    assert diagnose(model, tokenizer, renamed, tasks, "cpu")["against"] == "the held-out rankings"


def test_rm_stage_on_smoke(smoke_rm):
    # the session's reward model: `instructrl rm` on the comparisons collected from the smoke base model
    final = smoke_rm / "rm" / "final"
    model = RewardModel.from_pretrained(final)  # head, bias and backbone in one call
    diagnostics = json.loads((smoke_rm / "rm" / "diagnostics.json").read_text())
    assert diagnostics["reward_bias"] == float(model.reward_bias) != 0.0
    assert diagnostics["pairs"] > 0 and 0.0 <= diagnostics["accuracy"] <= 1.0 and diagnostics["against"] == "the gold labeler"
    # a pair the gold labeler scores differently on the 1-7 scale also differs in gold quality
    assert diagnostics["pairs_gold_likert_distinct"] <= diagnostics["pairs"]
    # the smoke world's prompts are all the built-in world's: accuracy on right-vs-wrong pairs and per family
    families = {json.loads(line)["id"]: json.loads(line)["family"] for line in (smoke_rm / "world" / "prompts" / "rm.jsonl").read_text().splitlines()}
    assert set(diagnostics["accuracy_by_family"]) <= set(families.values()) and diagnostics["accuracy_by_family"]
    assert all(a is None or 0.0 <= a <= 1.0 for a in [diagnostics["accuracy_correct_vs_incorrect"], *diagnostics["accuracy_by_family"].values()])
    by_kind = diagnostics["accuracy_by_pair_kind"]  # every pair the gold labeler orders is of one kind
    assert set(by_kind) <= {f"{a}>{b}" for a in ("exact", "form", "wrong") for b in ("exact", "form", "wrong")}
    assert sum(k["pairs"] for k in by_kind.values()) == diagnostics["pairs"]
    # each accuracy comes with the pairs it is of: the margins and the families split the same pairs
    assert set(diagnostics["pairs_by_gold_margin"]) == set(diagnostics["accuracy_by_gold_margin"])
    assert sum(diagnostics["pairs_by_gold_margin"].values()) == diagnostics["pairs"] == sum(diagnostics["pairs_by_family"].values())
    # the bias makes the demonstrations average a reward of 0 (InstructGPT §3.5)
    tokenizer = load_tokenizer(final)
    demos = [tokenize_conversation(tokenizer, r["messages"]).input_ids for _, r in read_jsonl(smoke_rm / "world" / "demonstrations.jsonl")]
    rewards = score_sequences(model, demos, tokenizer.pad_token_id, "cpu")
    assert abs(sum(rewards) / len(rewards)) < 1e-4
    # metrics.jsonl is standard JSON, and a held-out figure with nothing to measure (null above) is not logged as NaN
    rows = [json.loads(line, parse_constant=_not_json) for line in (smoke_rm / "rm" / "metrics.jsonl").read_text().splitlines()]
    heldout = {k: v for row in rows for k, v in row.items() if k.startswith("heldout/")}
    assert heldout["heldout/accuracy"] == diagnostics["accuracy"]
    assert all(isinstance(v, float) for v in heldout.values()), heldout
    lineage = json.loads((smoke_rm / "rm" / "lineage.json").read_text())
    assert lineage["inputs"]["comparisons"]["path"].endswith("collect/comparisons.jsonl")
