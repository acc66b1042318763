"""The simulated labeler: its scoring table, rankings, noise, agreement and demonstrations."""

from __future__ import annotations

import random

import pytest

from instructrl.world.labeler import (
    PAPER_NOISE, DemoStyle, Judgement, SimulatedLabeler, agreement_rate, likert_from_quality, strip_filler,
)
from instructrl.world.tasks import FAMILIES, Task, sample_task

GOLD = SimulatedLabeler()


def make_task(family: str, args: dict, task_id: str = "t0") -> Task:
    answer = FAMILIES[family].answer(args)
    return Task(task_id, family, ({"role": "user", "content": "..."},), answer, args)


REVERSE_TIGER = make_task("reverse_word", {"word": "tiger"})  # gold answer 'regit'
SORT_529 = make_task("sort_numbers", {"nums": "5 2 9"})  # gold answer '2 5 9'
ADD_2_3 = make_task("add_numbers", {"a": 2, "b": 3})  # gold answer '5'


# ---------------------------------------------------------------- the scoring table


def test_exact_answer_scores_7():
    # quality 1.0: 1 + round(6 * 1.0) = 7, nothing flagged
    assert GOLD.judge(REVERSE_TIGER, "regit") == Judgement(7, 1.0, ())


def test_surrounding_whitespace_is_not_a_format_error():
    assert GOLD.judge(REVERSE_TIGER, "  regit\n") == Judgement(7, 1.0, ())


def test_filler_scores_5_verbose():
    # 'Sure!' is filler around the exact answer: quality 0.7, 1 + round(4.2) = 5
    assert GOLD.judge(REVERSE_TIGER, "Sure! regit.") == Judgement(5, 0.7, ("verbose",))


@pytest.mark.parametrize(
    "task, response",
    [
        (REVERSE_TIGER, "REGIT"),  # same letters, wrong case
        (SORT_529, "2, 5, 9"),  # same order, commas
        (ADD_2_3, "5."),  # final stop
    ],
)
def test_right_content_wrong_form_scores_4_off_format(task, response):
    # quality 0.55: 1 + round(3.3) = 4
    assert GOLD.judge(task, response) == Judgement(4, 0.55, ("off_format",))


def test_filler_and_wrong_form_scores_4():
    # quality 0.45: 1 + round(2.7) = 4
    assert GOLD.judge(REVERSE_TIGER, "Sure! REGIT.") == Judgement(4, 0.45, ("verbose", "off_format"))


def test_near_miss_number_gets_partial_credit():
    # 2 + 3 = 5 answered 6: similarity 0.8 ** |6 - 5| = 0.8, quality 0.35 * 0.8 = 0.28,
    # Likert 1 + round(6 * 0.28) = 1 + round(1.68) = 3; similarity 0.8 >= 0.3: only 'incorrect'
    judgement = GOLD.judge(ADD_2_3, "6")
    assert judgement.quality == pytest.approx(0.28)
    assert (judgement.likert, judgement.flags) == (3, ("incorrect",))


def test_far_off_number_also_fails_to_follow():
    # answered 15: similarity 0.8 ** 10 = 0.1074 < 0.3, quality 0.35 * 0.1074 = 0.0376,
    # Likert 1 + round(0.23) = 1
    judgement = GOLD.judge(ADD_2_3, "15")
    assert judgement.quality == pytest.approx(0.35 * 0.8**10)
    assert (judgement.likert, judgement.flags) == (1, ("fails_to_follow", "incorrect"))


def test_wrong_answer_in_filler_is_also_verbose():
    # 'The answer is 6.' has the core '6': the quality of '6' (0.28), plus the verbose flag
    judgement = GOLD.judge(ADD_2_3, "The answer is 6.")
    assert judgement.quality == pytest.approx(0.28)
    assert judgement.flags == ("incorrect", "verbose")


def test_wrong_means_incorrect_or_not_following():
    # an empty answer follows nothing; a near miss is incorrect; filler and form are faults, not errors
    assert GOLD.judge(ADD_2_3, "").wrong and GOLD.judge(ADD_2_3, "6").wrong
    assert not GOLD.judge(ADD_2_3, "Sure! 5.").wrong and not GOLD.judge(SORT_529, "2, 5, 9").wrong


@pytest.mark.parametrize("response", ["", "   ", "\n"])
def test_empty_answer_scores_1(response):
    assert GOLD.judge(REVERSE_TIGER, response) == Judgement(1, 0.0, ("fails_to_follow",))


@pytest.mark.parametrize(
    "quality, likert",
    [
        (0.0, 1),  # 1 + 0
        (1.0, 7),  # 1 + 6
        (0.25, 3),  # 6 * 0.25 = 1.5, half rounded up to 2
        (0.75, 6),  # 6 * 0.75 = 4.5, half rounded up to 5 (Python's round() would give 4)
        (0.7, 5),  # 6 * 0.7 = 4.2 -> 4
        (1.7, 7),  # clipped to 1.0 first
        (-0.4, 1),  # clipped to 0.0 first
    ],
)
def test_likert_from_quality(quality, likert):
    assert likert_from_quality(quality) == likert


# ---------------------------------------------------------------- families x labeler
# A family's off_format() is "the right content in the wrong form" and its wrong() "a plausible
# mistake"; the labeler should judge them so, or the demonstrations' error rates are not the
# configured ones.


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gold_answers_score_7_and_mistakes_are_incorrect(family):
    rng = random.Random(0)
    for i in range(50):
        args = FAMILIES[family].sample(rng)
        task = make_task(family, args)
        assert GOLD.judge(task, task.answer) == Judgement(7, 1.0, ()), args
        mistake = GOLD.judge(task, FAMILIES[family].wrong(args, rng))
        assert "incorrect" in mistake.flags and mistake.likert < 7, (args, mistake)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_off_format_answers_are_judged_off_format(family):
    # canonical() keeps inner spaces, so an off-format answer that spaced letters out ('r e g i t')
    # would be judged incorrect (0.35 x similarity 10/14 = 0.25, Likert 3), not off-format (0.55, Likert 4)
    rng = random.Random(0)
    for i in range(50):
        args = FAMILIES[family].sample(rng)
        task = make_task(family, args)
        response = FAMILIES[family].off_format(args, rng)
        assert GOLD.judge(task, response).flags == ("off_format",), (args, response)


@pytest.mark.parametrize(
    "family, args",
    [
        # 'eagle' ends with its first letter: a mistake of its last letter would be 'e', the gold answer
        ("first_letter", {"word": "eagle"}),
        # 'sheep' reversed is 'peehs'; swapping its two e's would give 'peehs' again, the gold answer
        ("reverse_word", {"word": "sheep"}),
    ],
)
def test_wrong_answers_differ_from_the_gold_answer(family, args):
    gold = FAMILIES[family].answer(args)
    for seed in range(40):  # each seed picks the bad branch with probability >= 0.15
        assert FAMILIES[family].wrong(args, random.Random(seed)) != gold, seed


# ---------------------------------------------------------------- strip_filler


@pytest.mark.parametrize(
    "response, expected",
    [
        ("regit", ("regit", False)),  # no filler: returned as is
        ("  regit ", ("regit", False)),  # ... stripped
        ("The answer is regit.", ("regit", True)),  # 'The answer is' dropped, then the final stop
        ("Here it is: regit.", ("regit", True)),  # 'is:' counts as the filler word 'is'
        ("Sure! 2 5 9. Hope this helps!", ("2 5 9", True)),  # prefix and suffix both dropped
        ("Of course. REGIT.", ("REGIT", True)),  # the core keeps its case
    ],
)
def test_strip_filler(response, expected):
    assert strip_filler(response) == expected


# ---------------------------------------------------------------- ranking


def test_rank_orders_and_ties():
    ranks = GOLD.rank(REVERSE_TIGER, ["regit", "Sure! regit.", "tiger", "regit"])
    # qualities 1.0, 0.7, (wrong: at most 0.35), 1.0 -> distinct levels 1.0 > 0.7 > wrong,
    # so ranks 0, 1, 2 and the second exact answer ties with the first at 0
    assert ranks == [0, 1, 2, 0]


def test_filler_around_a_final_stop_scores_above_the_bare_stop():
    # as documented, not as one might expect: '5.' is off-format (0.55, Likert 4) while in
    # 'Sure! 5.' the stop ends the filler's sentence, so only verbose (0.7, Likert 5)
    assert GOLD.judge(ADD_2_3, "5.").likert == 4
    assert GOLD.judge(ADD_2_3, "Sure! 5.") == Judgement(5, 0.7, ("verbose",))


# ---------------------------------------------------------------- noise


def test_noisy_ranking_follows_its_responses_not_their_order():
    labeler = SimulatedLabeler("alice", noise=PAPER_NOISE)
    responses = ["regit", "Sure! regit.", "REGIT", "tiger", "regti", "regit"]
    ranks = labeler.rank(REVERSE_TIGER, responses)
    order = list(range(len(responses)))
    for seed in range(5):
        random.Random(seed).shuffle(order)
        assert labeler.rank(REVERSE_TIGER, [responses[i] for i in order]) == [ranks[i] for i in order]


def test_noisy_ranking_never_contradicts_the_likert_it_reports():
    # ranks and Likert come from one noisy quality: a better rank never has a lower Likert
    labeler = SimulatedLabeler("alice", noise=PAPER_NOISE)
    rng = random.Random(0)
    for _ in range(200):
        task = sample_task(rng, multi_turn_rate=0.2)
        responses = [GOLD.demonstrate(task, rng) for _ in range(4)]
        ranks = labeler.rank(task, responses)
        likert = [labeler.judge(task, r).likert for r in responses]
        for i in range(4):
            for j in range(4):
                if ranks[i] < ranks[j]:
                    assert likert[i] >= likert[j], (responses, ranks, likert)


def test_noisy_labeler_is_consistent_with_itself():
    labeler = SimulatedLabeler("alice", noise=PAPER_NOISE)
    first = labeler.judge(REVERSE_TIGER, "Sure! regit.")
    assert labeler.judge(REVERSE_TIGER, "Sure! regit.") == first
    # the noise is fixed by (labeler id, task id, response), not by the instance
    assert SimulatedLabeler("alice", noise=PAPER_NOISE).judge(REVERSE_TIGER, "Sure! regit.") == first
    # ... and it is really there: 0.7 plus a continuous normal draw is not 0.7
    assert first.quality != 0.7


def test_noisy_labeler_ties_identical_responses():
    labeler = SimulatedLabeler("alice", noise=PAPER_NOISE)
    for response in ("regit", "Sure! regit.", "REGIT", "tiger"):
        assert labeler.rank(REVERSE_TIGER, [response, response]) == [0, 0], response


def test_labelers_with_different_ids_disagree_sometimes():
    alice = SimulatedLabeler("alice", noise=PAPER_NOISE)
    bob = SimulatedLabeler("bob", noise=PAPER_NOISE)
    verdicts = []
    for i in range(200):
        task = make_task("reverse_word", {"word": "tiger"}, task_id=f"t{i}")
        pair = ["regit", "Sure! regit."]  # gold gap 0.3, about the size of the noise
        verdicts.append(alice.rank(task, pair) == bob.rank(task, pair))
    assert any(verdicts)  # they agree on some ...
    assert not all(verdicts)  # ... and disagree on others


# ---------------------------------------------------------------- agreement


@pytest.fixture(scope="module")
def comparisons():
    """3000 (task, a, b) pairs of distinct demonstrations, as the RM data would contain."""
    rng = random.Random(0)
    pairs = []
    while len(pairs) < 3000:
        task = sample_task(rng, multi_turn_rate=0.2)
        a, b = GOLD.demonstrate(task, rng), GOLD.demonstrate(task, rng)
        if a != b:
            pairs.append((task, a, b))
    return pairs


def test_paper_noise_gives_paper_agreement(comparisons):
    rate = agreement_rate(SimulatedLabeler("a", PAPER_NOISE), SimulatedLabeler("b", PAPER_NOISE), comparisons)
    # InstructGPT's labelers agreed ~73% of the time (§3.4); 3000 pairs give a standard error
    # of sqrt(0.73 * 0.27 / 3000) = 0.008, so [0.68, 0.78] is about six of them each side
    assert 0.68 <= rate <= 0.78


def test_noise_free_labelers_always_agree(comparisons):
    # without noise both judge by the same gold quality, so every untied pair goes the same way
    assert agreement_rate(SimulatedLabeler("a"), SimulatedLabeler("b"), comparisons) == 1.0


# ---------------------------------------------------------------- demonstrations


def test_perfect_demonstrator_writes_the_gold_answer():
    perfect = SimulatedLabeler("demo", style=DemoStyle(error_rate=0, off_format_rate=0, verbose_rate=0))
    rng = random.Random(1)
    for _ in range(300):
        task = sample_task(rng, multi_turn_rate=0.2)
        demo = perfect.demonstrate(task, rng)
        assert demo == task.answer
        assert GOLD.judge(task, demo).likert == 7


@pytest.fixture(scope="module")
def demo_flag_shares():
    rng = random.Random(1)
    n = 2000
    counts = {"verbose": 0, "incorrect": 0, "off_format": 0}
    for _ in range(n):
        task = sample_task(rng, multi_turn_rate=0.2)
        for flag in GOLD.judge(task, GOLD.demonstrate(task, rng)).flags:
            counts[flag] = counts.get(flag, 0) + 1
    return {flag: c / n for flag, c in counts.items()}


def test_verbose_share_of_demonstrations(demo_flag_shares):
    # DemoStyle.verbose_rate = 0.25; standard error sqrt(0.25 * 0.75 / 2000) = 0.0097
    assert demo_flag_shares["verbose"] == pytest.approx(0.25, abs=0.04)


def test_error_share_of_demonstrations(demo_flag_shares):
    # error_rate = 0.15: every family's mistake is judged incorrect (see above);
    # standard error sqrt(0.15 * 0.85 / 2000) = 0.008
    assert demo_flag_shares["incorrect"] == pytest.approx(0.15, abs=0.03)


def test_off_format_share_of_demonstrations(demo_flag_shares):
    # off_format_rate = 0.10, less a little: the off-format answer of add, count and larger is the
    # answer with a final stop, which wrapped in filler ('Sure! 5.') is the filler's stop, so only
    # verbose (-0.10 x 0.25 x 3/9 = -0.008, and a single upper-cased word likewise, -0.001);
    # standard error 0.007
    assert demo_flag_shares["off_format"] == pytest.approx(0.10, abs=0.03)
