"""Token sequences held compactly for training: a dataset's ids as lists of Python ints take
about 44 bytes a token (an 8-byte pointer, a 28-byte int object for each id above 256, and the
mask's pointer), which at 200k demonstrations is most of a stage's memory; here they take 5."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Iterable

from instructrl.data.chat import TokenizedConversation


class TokenSequences(Sequence):
    """Sequences of ints (token ids: typecode "i", 4 bytes; a 0/1 mask: "b", 1 byte) in one flat
    array with the end of each; every item (or slice of items) reads back as the list it was given,
    so batches are made from them exactly as from the lists."""

    def __init__(self, sequences: Iterable[Sequence[int]] = (), typecode: str = "i"):
        self._values = array(typecode)
        self._ends = array("q")
        for sequence in sequences:
            self.append(sequence)

    def append(self, sequence: Sequence[int]) -> None:
        self._values.extend(sequence)
        self._ends.append(len(self._values))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # a negative index counts from the end; past the end is an IndexError
        start = self._ends[index - 1] if index else 0
        return self._values[start : self._ends[index]].tolist()

    def lengths(self) -> list[int]:
        """The length of every sequence, without reading them back."""
        return [end - start for start, end in zip([0, *self._ends[:-1]], self._ends)]


class TokenizedConversations(Sequence):
    """TokenizedConversations held as two ``TokenSequences``: the ids and the assistant masks."""

    def __init__(self, conversations: Iterable[TokenizedConversation] = ()):
        self.input_ids = TokenSequences()
        self.assistant_masks = TokenSequences(typecode="b")
        for conversation in conversations:
            self.append(conversation)

    def append(self, conversation: TokenizedConversation) -> None:
        self.input_ids.append(conversation.input_ids)
        self.assistant_masks.append(conversation.assistant_mask)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return TokenizedConversation(self.input_ids[index], self.assistant_masks[index])
