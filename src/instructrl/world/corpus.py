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


def story_sentence(rng: random.Random) -> str:
    return rng.choice(_STORIES).format(
        name=rng.choice(NAMES), name2=rng.choice(NAMES), verb=rng.choice(VERBS), color=rng.choice(COLORS),
        color2=rng.choice(COLORS), noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS), n=rng.randint(2, 9), m=rng.randint(2, 9),
    )


def corpus_documents(n_documents: int, seed: int) -> list[str]:
    """``n_documents`` short documents of 2-6 sentences, two thirds facts, one third story."""
    rng = random.Random(f"corpus:{seed}")
    docs = []
    for _ in range(n_documents):
        sentences = [fact_sentence(rng) if rng.random() < 0.67 else story_sentence(rng) for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return docs
