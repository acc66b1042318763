"""Generated tokens to text as it streams: stop strings cut, and nothing sent that could be one.
Each token's text and bytes as log-probs list them."""

from __future__ import annotations

import json
import re
from bisect import bisect_left
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


def common_prefix_length(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` share at their start (usually all of ``a``: text only grows)."""
    size = min(len(a), len(b))
    while not b.startswith(a[:size]):  # text changes only near its end, so this runs a few times at most
        size -= 1
    return size


class TextStream:
    """The text of one generated answer, released piece by piece as tokens arrive.

    ``add(token)`` returns (new text safe to send, whether a stop string completed). Text that
    might be the beginning of a stop string, or of a character whose bytes are not all there
    yet, is held back until it is decided; a completed stop string and everything after it
    are never sent. ``finish()`` releases what is held back when generation ends another way.

    With ``token_starts`` (for log-probs) it also records where each token's text begins: a token
    counts as released (``released_tokens``) with the first character of its text, so the tokens
    after a stop string's start never are, and every token is once finished.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = (), token_starts: bool = False):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already released
        self.starts: list[int] | None = [] if token_starts else None  # where each token's text begins in self.text
        self.finished = False

    def add(self, token_id: int) -> tuple[str, bool]:
        self.token_ids.append(token_id)
        before, self.text = self.text, self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.starts is not None:  # a token begins where the text changes, or, while a character is incomplete, where that character does
            self.starts.append(min(common_prefix_length(before, self.text), len(self.text.rstrip(REPLACEMENT))))
        cut = first_stop(self.text, self.stops, self.sent)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._release(len(self.text)), True
        safe = len(self.text.rstrip(REPLACEMENT))
        safe -= stop_prefix_length(self.text[:safe], self.stops)
        return self._release(max(safe, self.sent)), False

    def finish(self, end_token: int | None = None) -> str:
        """Release what is held back; ``end_token`` (EOS) ends the answer without adding text."""
        if end_token is not None:
            self.token_ids.append(end_token)
            if self.starts is not None:
                self.starts.append(len(self.text))
        self.finished = True
        return self._release(len(self.text))

    @property
    def released_tokens(self) -> int:
        return len(self.token_ids) if self.finished else bisect_left(self.starts, self.sent)

    def _release(self, upto: int) -> str:
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


def text_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[int]]:
    """The text of ``token_ids`` and where each token's text begins in it (as a streamed answer's)."""
    stream = TextStream(tokenizer, token_starts=True)
    for token_id in token_ids:
        stream.add(token_id)
    return stream.text, stream.starts


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for one raw byte
METASPACE = "\u2581"  # SentencePiece's "▁", a space


def is_byte_level(tokenizer) -> bool:
    """Whether the vocabulary spells tokens in GPT-2's byte-level alphabet (GPT-2, Llama 3, Qwen, instructrl's own)."""
    if getattr(tokenizer, "byte_decoder", None) is not None:  # a slow GPT-2 tokenizer
        return True
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return False
    state = json.loads(decoder.__getstate__())
    return "ByteLevel" in {state.get("type"), *(d.get("type") for d in state.get("decoders", []))}


class TokenTexts:
    """Each token's text and exact UTF-8 bytes, as OpenAI's log-probs list them (``token``, ``bytes``).

    A token holding only part of a character (one byte of "é", say) has bytes that are not text
    on their own; its text shows them escaped (``"\\xc3"``), as OpenAI's does, and its bytes are
    exact so that a client can join them with the next token's.
    """

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self.byte_level = is_byte_level(tokenizer)
        # GPT-2's byte-level alphabet, read backwards: the printable character a vocabulary writes -> its byte
        self.byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()} if self.byte_level else {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            raw = self._bytes(token_id)
            self._cache[token_id] = (raw.decode("utf-8", "backslashreplace"), list(raw))
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_level and all(char in self.byte_of_char for char in piece):
            return bytes(self.byte_of_char[char] for char in piece)
        if match := BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match[1], 16)])
        if METASPACE in piece:  # decoding one token alone would drop its leading space
            return piece.replace(METASPACE, " ").encode()
        return self.tokenizer.decode([token_id]).encode()
