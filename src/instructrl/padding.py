"""Named index arithmetic: padding, position ids and "where is the last real token".

Every public RLHF implementation has shipped a bug in one of these (TRL #3750, #5338, #2778),
so each gets a name, a docstring and a test instead of being written inline. Torch only.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

__all__ = ["pad_sequences", "position_ids_from_mask", "last_token_index", "leading_padding", "shared_padding", "truncate_after_eos"]


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"], value_dtype=torch.long
) -> tuple[Tensor, Tensor]:
    """Stack token lists into (B, T) ``ids`` and a (B, T) ``attention_mask`` (1 = real token).

    ``side="left"`` puts padding before the tokens (prompts for generation), ``"right"`` after
    (training sequences). T is the longest sequence.
    """
    longest = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), longest), pad_id, dtype=value_dtype)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not len(seq):
            continue
        cols = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(seq, dtype=value_dtype)
        mask[row, cols] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counting real tokens only: cumsum(mask) - 1, and 0 on padding.

    Left-padded prompts need these in every forward pass; without them the first real token of
    a padded row sits at position 3 instead of 0, and its log-probs differ from the unpadded row.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B,) column of the last real token of each row, for left or right padding alike.

    A row with no real token gets -1.
    """
    T = attention_mask.shape[-1]
    has_token = attention_mask.bool().any(-1)
    from_end = attention_mask.bool().flip(-1).long().argmax(-1)
    return torch.where(has_token, T - 1 - from_end, torch.full_like(from_end, -1))


def leading_padding(mask: Tensor) -> int:
    """How many first columns of a (B, T) left-padded ``mask`` are padding in every row (T when all are)."""
    used = mask.bool().any(0)
    return int(used.long().argmax()) if bool(used.any()) else mask.shape[-1]


def shared_padding(query_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """(first, width): the padding every row of an episode batch shares, as column bounds.

    Prompts are left-padded to the batch's longest, responses right-padded to its longest; in a
    micro-batch of shorter rows the first query columns and the last response columns may be
    padding in every row. ``query[:, first:]`` and ``response[:, :width]`` drop exactly those
    columns: a forward pass over them costs less and gives the same values on real tokens.
    """
    first = leading_padding(query_mask)
    used = response_mask.bool().any(0)
    width = response_mask.shape[-1] - int(used.flip(0).long().argmax()) if bool(used.any()) else 0
    return first, width


def truncate_after_eos(response_ids: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each generated response after its first EOS: (ids, response_mask, ended), right-padded.

    response_ids: (B, T) tokens as generated (whatever follows an EOS is garbage: generation
    continues for the other rows). Returns the ids with everything after the first EOS set to
    ``pad_id``; a (B, T) mask that is 1 up to and including that EOS (the reward model reads the
    score there, and KL, value and loss ignore the rest); and (B,) ``ended``, False for a
    response that never emitted EOS (it gets the missing-EOS penalty score instead).
    """
    is_eos = response_ids == eos_id
    ended = is_eos.any(-1)
    T = response_ids.shape[-1]
    first_eos = torch.where(ended, is_eos.long().argmax(-1), torch.full_like(ended, T - 1, dtype=torch.long))
    columns = torch.arange(T, device=response_ids.device).unsqueeze(0)
    response_mask = (columns <= first_eos.unsqueeze(-1)).long()
    return torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad_id)), response_mask, ended
