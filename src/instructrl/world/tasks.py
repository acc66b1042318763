"""Instruction families of the built-in world.

Each family knows how to sample an input, phrase it as a request (several phrasings), compute
the gold answer, phrase a follow-up turn that refers back to the first one, and produce the
plausible mistakes and off-format answers the simulated labeler's demonstrations contain.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from instructrl.world.vocab import ANIMALS, COLORS, FRUITS, NOUNS, ORDINALS, THINGS, WORDS

Args = dict


def canonical(text: str, keep_case: bool = False) -> str:
    """The content of an answer with its format stripped: case, commas, final stop, spacing.

    Two answers with the same canonical form say the same thing; if they differ as text,
    one of them is off-format. ``keep_case`` is for tasks whose content *is* the case.
    """
    text = text.strip().replace(",", " ")
    text = text if keep_case else text.lower()
    text = re.sub(r"[.!]+$", "", text)
    return " ".join(text.split())


def _swap_two(items: list, rng: random.Random) -> list:
    """Swap two neighbours that differ, so the result always differs from the input (if it can)."""
    candidates = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not candidates:
        return list(items)
    i = rng.choice(candidates)
    items = list(items)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


class Family:
    """One kind of instruction. Subclasses fill in the five methods below."""

    name: str = ""
    phrasings: tuple[str, ...] = ()
    case_matters: bool = False  # True when the case of the answer is its content (upper-casing)

    def sample(self, rng: random.Random) -> Args:
        raise NotImplementedError

    def answer(self, args: Args) -> str:
        raise NotImplementedError

    def input_text(self, args: Args) -> str:
        """How the input is quoted in a follow-up: 'Now do the same for {input_text}.'"""
        raise NotImplementedError

    def wrong(self, args: Args, rng: random.Random) -> str:
        """A plausible mistake: the kind of answer a careless person writes."""
        raise NotImplementedError

    def off_format(self, args: Args, rng: random.Random) -> str:
        """The right content in the wrong form (commas, case, ...)."""
        return self.answer(args) + "."

    def phrase(self, args: Args, rng: random.Random) -> str:
        return rng.choice(self.phrasings).format(**args)

    def follow_up(self, args: Args, rng: random.Random) -> tuple[str, Args]:
        """A second user turn that refers to the first: the same task on a new input."""
        new = self.sample(rng)
        while new == args:
            new = self.sample(rng)
        template = rng.choice(("Now do the same for {x}.", "And for {x}?", "Same again with {x}."))
        return template.format(x=self.input_text(new)), new


class Reverse(Family):
    name = "reverse_word"
    phrasings = (
        "Reverse the word {word}.",
        "Spell {word} backwards.",
        "What is {word} written backwards?",
        "Write the letters of {word} in reverse order.",
    )

    def sample(self, rng):
        return {"word": rng.choice(WORDS)}

    def answer(self, args):
        return args["word"][::-1]

    def input_text(self, args):
        return args["word"]

    def wrong(self, args, rng):
        swapped = "".join(_swap_two(list(self.answer(args)), rng))
        return swapped if rng.random() < 0.6 or args["word"] == self.answer(args) else args["word"]

    def off_format(self, args, rng):
        return self.answer(args).upper() if rng.random() < 0.5 else self.answer(args).capitalize()


class SortNumbers(Family):
    name = "sort_numbers"
    phrasings = (
        "Sort these numbers from smallest to largest: {nums}",
        "Put these numbers in ascending order: {nums}",
        "Order from low to high: {nums}",
    )

    def sample(self, rng):
        return {"nums": " ".join(str(n) for n in rng.sample(range(50), rng.randint(3, 4)))}

    def _values(self, args):
        return [int(n) for n in args["nums"].split()]

    def answer(self, args):
        return " ".join(str(n) for n in sorted(self._values(args)))

    def input_text(self, args):
        return args["nums"]

    def wrong(self, args, rng):
        values = sorted(self._values(args))
        values = _swap_two(values, rng) if rng.random() < 0.6 else sorted(values, reverse=True)
        return " ".join(str(n) for n in values)

    def off_format(self, args, rng):
        return ", ".join(self.answer(args).split())


class Add(Family):
    name = "add_numbers"
    phrasings = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What do {a} and {b} make together?")

    def sample(self, rng):
        return {"a": rng.randint(0, 12), "b": rng.randint(0, 12)}

    def answer(self, args):
        return str(args["a"] + args["b"])

    def input_text(self, args):
        return f"{args['a']} and {args['b']}"

    def wrong(self, args, rng):
        total = args["a"] + args["b"]
        return str(total + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if total + d >= 0]))

    def follow_up(self, args, rng):
        if rng.random() < 0.5:
            return super().follow_up(args, rng)
        n = rng.randint(1, 9)
        template = rng.choice(("Now add {n} to that.", "Add {n} to the result."))
        return template.format(n=n), {"a": args["a"] + args["b"], "b": n}


class CountItems(Family):
    name = "count_items"
    phrasings = (
        "How many items are in this list: {items}?",
        "Count the words: {items}",
        "How many things are listed here: {items}?",
    )

    def sample(self, rng):
        return {"items": ", ".join(rng.sample(NOUNS, rng.randint(2, 7)))}

    def answer(self, args):
        return str(len(args["items"].split(", ")))

    def input_text(self, args):
        return args["items"]

    def wrong(self, args, rng):
        return str(int(self.answer(args)) + rng.choice((-1, 1, 2)))


class Uppercase(Family):
    name = "uppercase"
    case_matters = True
    phrasings = (
        "Write {phrase} in capital letters.",
        "Uppercase this: {phrase}",
        "Shout it: {phrase}",
    )

    def sample(self, rng):
        return {"phrase": " ".join([rng.choice(COLORS), rng.choice(NOUNS)][: rng.randint(1, 2)])}

    def answer(self, args):
        return args["phrase"].upper()

    def input_text(self, args):
        return args["phrase"]

    def wrong(self, args, rng):
        words = args["phrase"].split()
        return " ".join(w.capitalize() for w in words) if rng.random() < 0.5 else args["phrase"]

    def off_format(self, args, rng):
        return ", ".join(self.answer(args).split()) + "."


class Repeat(Family):
    name = "repeat_word"
    phrasings = ("Repeat the word {word} {n} times.", "Say {word} {n} times.", "Write {word} {n} times in a row.")

    def sample(self, rng):
        return {"word": rng.choice(NOUNS), "n": rng.randint(2, 5)}

    def answer(self, args):
        return " ".join([args["word"]] * args["n"])

    def input_text(self, args):
        return f"{args['word']} {args['n']} times"

    def wrong(self, args, rng):
        return " ".join([args["word"]] * (args["n"] + rng.choice((-1, 1))))

    def off_format(self, args, rng):
        return ", ".join([args["word"]] * args["n"])


class Larger(Family):
    name = "larger_number"
    phrasings = ("Which is larger, {a} or {b}?", "Pick the bigger number: {a} or {b}.", "What is the maximum of {a} and {b}?")

    def sample(self, rng):
        a, b = rng.sample(range(100), 2)
        return {"a": a, "b": b}

    def answer(self, args):
        return str(max(args["a"], args["b"]))

    def input_text(self, args):
        return f"{args['a']} and {args['b']}"

    def wrong(self, args, rng):
        return str(min(args["a"], args["b"]))


class KthWord(Family):
    name = "kth_word"
    phrasings = ("What is the {ordinal} word of: {phrase}?", "Give me word number {k} in: {phrase}", "Which word comes {ordinal} in: {phrase}?")

    def sample(self, rng):
        words = rng.sample(WORDS, rng.randint(3, 5))
        k = rng.randint(1, len(words))
        return {"phrase": " ".join(words), "k": k, "ordinal": ORDINALS[k - 1]}

    def answer(self, args):
        return args["phrase"].split()[args["k"] - 1]

    def input_text(self, args):
        return args["phrase"]

    def follow_up(self, args, rng):
        words = rng.sample(WORDS, len(args["phrase"].split()))
        new = dict(args, phrase=" ".join(words))
        return rng.choice(("Now do the same for: {x}", "And in: {x}?")).format(x=new["phrase"]), new

    def wrong(self, args, rng):
        words = args["phrase"].split()
        k = args["k"] - 1
        return words[k + 1] if k + 1 < len(words) else words[k - 1]

    def off_format(self, args, rng):
        return self.answer(args).capitalize()


class FirstLetter(Family):
    name = "first_letter"
    phrasings = ("What letter does {word} start with?", "Give the first letter of {word}.", "Which letter begins the word {word}?")

    def sample(self, rng):
        return {"word": rng.choice(ANIMALS + FRUITS + THINGS)}

    def answer(self, args):
        return args["word"][0]

    def input_text(self, args):
        return args["word"]

    def wrong(self, args, rng):
        others = [c for c in args["word"][1:] if c != args["word"][0]]
        return rng.choice(others) if others else chr(ord(args["word"][0]) + 1)

    def off_format(self, args, rng):
        return self.answer(args).upper()


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Reverse(), SortNumbers(), Add(), CountItems(), Uppercase(), Repeat(), Larger(), KthWord(), FirstLetter(),
)}


@dataclass(frozen=True)
class Task:
    """One prompt of the world: a conversation that ends with a user turn, and its gold answers.

    ``messages`` holds earlier assistant turns too (multi-turn prompts); those carry the gold
    answer. ``answer`` is the gold answer to the last user turn; ``args`` is that turn's input.
    """

    id: str
    family: str
    messages: tuple[dict, ...]
    answer: str
    args: dict

    def to_record(self) -> dict:
        return {"id": self.id, "family": self.family, "messages": list(self.messages), "answer": self.answer, "args": self.args}

    @classmethod
    def from_record(cls, record: dict, messages: list[dict] | None = None) -> "Task":
        """``messages``: held in place of the record's (the same turns, already read once, kept once)."""
        return cls(str(record["id"]), record["family"], tuple(record["messages"] if messages is None else messages), record["answer"],
                   record["args"])


def sample_task(rng: random.Random, multi_turn_rate: float) -> Task:
    """Draw one task: a family, an input, a phrasing, and maybe a follow-up turn."""
    family = FAMILIES[rng.choice(sorted(FAMILIES))]
    args = family.sample(rng)
    messages = [{"role": "user", "content": family.phrase(args, rng)}]
    if rng.random() < multi_turn_rate:
        messages.append({"role": "assistant", "content": family.answer(args)})
        text, args = family.follow_up(args, rng)
        messages.append({"role": "user", "content": text})
    key = " | ".join(m["content"] for m in messages)
    return Task(id=_stable_id(key), family=family.name, messages=tuple(messages), answer=family.answer(args), args=args)


def _stable_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]
