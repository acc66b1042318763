"""Plain text packed into equal blocks of tokens: pretraining, and PPO-ptx's pretraining term."""

from __future__ import annotations

import torch


def pack_documents(tokenizer, documents: list[str], block_size: int) -> torch.Tensor:
    """(N, block_size) token blocks: documents joined by EOS, cut into equal blocks, rest dropped."""
    ids: list[int] = []
    for doc_ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
