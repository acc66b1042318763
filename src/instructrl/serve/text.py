"""Generated tokens to text as it streams: stop strings cut, and nothing sent that could be one."""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"  # what a decoder writes for the first bytes of a character not yet complete


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (and may yet complete it).

    >>> stop_prefix_length("Hello\\nUs", ["\\nUser:"])
    3
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index in ``text`` where the earliest stop string begins (searching from ``start``), or -1."""
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else -1


class TextStream:
    """The text of one generated answer, released piece by piece as tokens arrive.

    ``add(token)`` returns (new text safe to send, whether a stop string completed). Text that
    might be the beginning of a stop string, or of a character whose bytes are not all there
    yet, is held back until it is decided; a completed stop string and everything after it
    are never sent. ``finish()`` releases what is held back when generation ends another way.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already released

    def add(self, token_id: int) -> tuple[str, bool]:
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = first_stop(self.text, self.stops, self.sent)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._release(len(self.text)), True
        safe = len(self.text.rstrip(REPLACEMENT))
        safe -= stop_prefix_length(self.text[:safe], self.stops)
        return self._release(max(safe, self.sent)), False

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
