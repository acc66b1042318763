"""The pretraining corpus: plain prose over the world's vocabulary, with no instruction format.

It states the same facts the instructions ask about (a word backwards, a sum, a sorted list),
the way web text states facts GPT-3 learned from, so that SFT teaches the *format* of helpful
answers rather than the facts themselves.
"""

from __future__ import annotations

import random

from instructrl.world.tasks import FAMILIES
from instructrl.world.vocab import COLORS, NAMES, NOUNS, VERBS

_FACTS = {
    "reverse_word": ("{word} backwards is {ans}.", "the word {word} reversed reads {ans}.", "read from the end, {word} gives {ans}."),
    "sort_numbers": ("sorted, {nums} becomes {ans}.", "in order the numbers {nums} are {ans}."),
    "add_numbers": ("{a} plus {b} is {ans}.", "{a} and {b} make {ans}.", "adding {b} to {a} gives {ans}."),
    "count_items": ("the list {items} has {ans} items.", "there are {ans} things in {items}."),
    "uppercase": ("in capitals, {phrase} is {ans}.", "{phrase} shouted is {ans}."),
    "repeat_word": ("{word} said {n} times is {ans}.", "{name} called {word} {n} times: {ans}."),
    "larger_number": ("the larger of {a} and {b} is {ans}.", "between {a} and {b}, {ans} is bigger."),
    "kth_word": ("in {phrase}, the {ordinal} word is {ans}.", "word number {k} of {phrase} is {ans}."),
    "first_letter": ("{word} starts with {ans}.", "the first letter of {word} is {ans}."),
}

_STORIES = (
    "{name} {verb} the {color} {noun}.",
    "{name} has {n} {noun}s and {m} {noun2}s.",
    "the {noun} is {color} and the {noun2} is {color2}.",
    "{name} and {name2} walk to the {noun}.",
)


def fact_sentence(rng: random.Random) -> str:
    """One sentence that states a fact of a random instruction family."""
    family = FAMILIES[rng.choice(sorted(FAMILIES))]
    args = family.sample(rng)
    fields = dict(args, ans=family.answer(args), name=rng.choice(NAMES))
    return rng.choice(_FACTS[family.name]).format(**fields)


_VERDICTS = (("that is right.", "that is wrong."), ("correct.", "not correct."), ("true.", "false."))


def judged_claim(rng: random.Random) -> str:
    """A fact stated by someone, right or wrong, and a verdict on it.

    Web text is full of such checks ("no, 57 is the smaller one"); learning to predict the verdict
    is what gives the base model the features a reward model needs to tell right from wrong.
    """
    family = FAMILIES[rng.choice(sorted(FAMILIES))]
    args = family.sample(rng)
    right = rng.random() < 0.5
    answer = family.answer(args) if right else family.wrong(args, rng)
    if not right and answer == family.answer(args):
        right = True
    fields = dict(args, ans=answer, name=rng.choice(NAMES))
    claim = rng.choice(_FACTS[family.name]).format(**fields).rstrip(".")
    yes, no = rng.choice(_VERDICTS)
    return f"{rng.choice(NAMES)} says {claim}; {yes if right else no}"


def story_sentence(rng: random.Random) -> str:
    return rng.choice(_STORIES).format(
        name=rng.choice(NAMES), name2=rng.choice(NAMES), verb=rng.choice(VERBS), color=rng.choice(COLORS),
        color2=rng.choice(COLORS), noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS), n=rng.randint(2, 9), m=rng.randint(2, 9),
    )


def corpus_documents(n_documents: int, seed: int) -> list[str]:
    """``n_documents`` short documents of 2-6 sentences: three quarters facts, a tenth judged claims, the rest story.

    The mix is what a 1M-parameter base model needs to learn the facts in a few CPU minutes: with
    half facts and a third judged claims it reversed a quarter of the words, with this mix 0.9.
    """
    rng = random.Random(f"corpus:{seed}")
    docs = []
    kinds = (fact_sentence, judged_claim, story_sentence)
    for _ in range(n_documents):
        sentences = [rng.choices(kinds, weights=(0.75, 0.1, 0.15))[0](rng) for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return docs
