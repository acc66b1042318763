"""The simulated labeler: it writes demonstrations and judges responses where a person would.

With ``noise=0`` it is the gold judge of every evaluation (the gold-reward-model setup of Gao et
al. 2022). With noise on, each labeler perturbs its judgement of a (prompt, response) pair by a
fixed pseudo-random amount of its own, so it is consistent with itself but disagrees with other
labelers on close calls, as people do.

Scoring (``quality``, in [0, 1], then Likert = 1 + round(6 * quality)):

=============================================  =======  ======  =====================
response                                       quality  Likert  flags
=============================================  =======  ======  =====================
exactly the gold answer                        1.0      7
gold answer wrapped in filler ("Sure! ...")    0.7      5       verbose
right content, wrong form (case, commas)       0.55     4       off_format
both of the above                              0.45     4       verbose, off_format
wrong: 0.35 x similarity to the gold answer    < 0.35   1-3     incorrect (+ fails_to_follow
                                                                when similarity < 0.3)
empty                                          0.0      1       fails_to_follow
=============================================  =======  ======  =====================
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
import re
from dataclasses import dataclass, field

from instructrl.world.tasks import FAMILIES, Task, canonical

FLAGS = ("fails_to_follow", "incorrect", "verbose", "off_format")

VERBOSE_PREFIXES = ("Sure! ", "The answer is ", "Here it is: ", "Of course. ", "Happy to help: ")
VERBOSE_SUFFIXES = ("", " Hope this helps!", " Let me know if you need more.")
FILLER_WORDS = frozenset(
    w for phrase in VERBOSE_PREFIXES + VERBOSE_SUFFIXES for w in re.findall(r"[a-z]+", phrase.lower())
)

QUALITY_EXACT = 1.0
QUALITY_VERBOSE = 0.7
QUALITY_OFF_FORMAT = 0.55
QUALITY_VERBOSE_OFF_FORMAT = 0.45
QUALITY_WRONG_MAX = 0.35
PAPER_NOISE = 0.3  # two labelers at this noise agree ~73% of the time (InstructGPT §3.4)


@dataclass(frozen=True)
class Judgement:
    """A labeler's verdict on one response: 1-7 Likert, flags, and the quality behind the Likert."""

    likert: int
    quality: float
    flags: tuple[str, ...] = ()

    @property
    def wrong(self) -> bool:
        """Incorrect, or not following the instruction (an empty answer): wrong in any form."""
        return "incorrect" in self.flags or "fails_to_follow" in self.flags


def likert_from_quality(quality: float) -> int:
    """1 + round(6 * quality), halves rounded up, quality clipped to [0, 1]."""
    return 1 + int(math.floor(6 * min(max(quality, 0.0), 1.0) + 0.5))


def strip_filler(response: str) -> tuple[str, bool]:
    """Split a response into its core and whether filler words surrounded it.

    >>> strip_filler("The answer is regit.")
    ('regit', True)
    """
    words = response.split()
    core = [w for w in words if re.sub(r"[^a-z]", "", w.lower()) not in FILLER_WORDS]
    if len(core) == len(words):
        return response.strip(), False
    return " ".join(core).strip(" :").rstrip(".!"), True


def similarity(response: str, answer: str) -> float:
    """Partial credit in [0, 1] for a wrong answer: numeric closeness or character overlap."""
    a, b = canonical(response), canonical(answer)
    if re.fullmatch(r"-?\d+", a) and re.fullmatch(r"-?\d+", b):
        return 0.8 ** abs(int(a) - int(b))
    return difflib.SequenceMatcher(None, a, b).ratio()


def gold_judgement(task: Task, response: str) -> Judgement:
    """The noise-free judgement of ``response`` as an answer to ``task``'s last turn."""
    text = response.strip()
    if not text:
        return Judgement(1, 0.0, ("fails_to_follow",))
    if text == task.answer:
        return Judgement(7, QUALITY_EXACT)
    core, verbose = strip_filler(text)
    if core == task.answer:
        return Judgement(likert_from_quality(QUALITY_VERBOSE), QUALITY_VERBOSE, ("verbose",))
    keep_case = FAMILIES[task.family].case_matters
    if core and canonical(core, keep_case) == canonical(task.answer, keep_case):
        q = QUALITY_VERBOSE_OFF_FORMAT if verbose else QUALITY_OFF_FORMAT
        return Judgement(likert_from_quality(q), q, ("verbose", "off_format") if verbose else ("off_format",))
    sim = similarity(core, task.answer)
    q = QUALITY_WRONG_MAX * sim
    flags = ("fails_to_follow", "incorrect") if sim < 0.3 else ("incorrect",)
    if verbose:
        flags += ("verbose",)
    return Judgement(likert_from_quality(q), q, flags)


def _unit_normal(*parts: object) -> float:
    """A standard normal draw fixed by its inputs (Box-Muller over a hash)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    u1 = (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 1)
    u2 = int.from_bytes(digest[8:16], "big") / 2**64
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


@dataclass(frozen=True)
class DemoStyle:
    """How imperfect the labeler's demonstrations are, as real demonstrations are."""

    error_rate: float = 0.15  # a plausible mistake
    off_format_rate: float = 0.10  # right content, wrong form
    verbose_rate: float = 0.25  # wrapped in filler


@dataclass(frozen=True)
class SimulatedLabeler:
    """A labeler. ``noise`` is the standard deviation of its private error on quality.

    ``PAPER_NOISE`` (0.3) makes two labelers agree on ~73% of the comparisons between distinct
    demonstration-quality responses, as InstructGPT's labelers did (see ``agreement_rate``).
    """

    labeler_id: str = "gold"
    noise: float = 0.0
    style: DemoStyle = field(default_factory=DemoStyle)

    def judge(self, task: Task, response: str) -> Judgement:
        """This labeler's judgement of ``response`` as an answer to ``task``'s last turn: ``gold_judgement``,
        its quality moved by this labeler's own noise (the Likert with it; the flags stay the gold ones)."""
        gold = gold_judgement(task, response)
        if self.noise == 0:
            return gold
        q = gold.quality + self.noise * _unit_normal(self.labeler_id, task.id, response)
        return Judgement(likert_from_quality(q), q, gold.flags)

    def rank(self, task: Task, responses: list[str]) -> list[int]:
        """Rank of each response, 0 = best; responses judged equally good share a rank."""
        return ranks_from_qualities([self.judge(task, r).quality for r in responses])

    def demonstrate(self, task: Task, rng: random.Random) -> str:
        """Write an answer to ``task``'s last turn, with this labeler's imperfections."""
        family = FAMILIES[task.family]
        u = rng.random()
        if u < self.style.error_rate:
            text = family.wrong(task.args, rng)
        elif u < self.style.error_rate + self.style.off_format_rate:
            text = family.off_format(task.args, rng)
        else:
            text = task.answer
        if rng.random() < self.style.verbose_rate:
            text = rng.choice(VERBOSE_PREFIXES) + text + ("." if not text.endswith(".") else "") + rng.choice(VERBOSE_SUFFIXES)
        return text


def ranks_from_qualities(qualities: list[float]) -> list[int]:
    """Dense ranks, 0 = best: equal qualities share a rank (a tie)."""
    distinct = sorted(set(qualities), reverse=True)
    return [distinct.index(q) for q in qualities]


def agreement_rate(a: SimulatedLabeler, b: SimulatedLabeler, comparisons: list[tuple[Task, str, str]]) -> float:
    """How often two labelers prefer the same response of a pair (pairs either one ties are left out)."""
    agree = total = 0
    for task, x, y in comparisons:
        da = a.judge(task, x).quality - a.judge(task, y).quality
        db = b.judge(task, x).quality - b.judge(task, y).quality
        if da == 0 or db == 0:
            continue
        total += 1
        agree += (da > 0) == (db > 0)
    return agree / max(total, 1)
