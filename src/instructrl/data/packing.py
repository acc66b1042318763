"""Plain text packed into equal blocks of tokens: pretraining, and PPO-ptx's pretraining term."""

from __future__ import annotations

import torch

from instructrl.training.progress import counting

# documents tokenized per call: the ids of one call over every document, as Python ints, took
# ~80 bytes a token (800 MB for 10 MB of text), where the packed tensor takes 8
CHUNK = 1000


def pack_documents(tokenizer, documents: list[str], block_size: int, progress: str | None = None) -> torch.Tensor:
    """(N, block_size) token blocks: documents joined by EOS, cut into equal blocks, rest dropped.
    ``progress``: the description of a bar counting the documents tokenized (None: no bar)."""
    pieces = []
    with counting(progress or "", len(documents), "document", enabled=progress is not None) as done:
        for start in range(0, len(documents), CHUNK):
            chunk = tokenizer(documents[start : start + CHUNK], add_special_tokens=False, return_attention_mask=False)["input_ids"]
            pieces.append(torch.tensor([i for doc_ids in chunk for i in [*doc_ids, tokenizer.eos_token_id]], dtype=torch.long))
            done(start + len(chunk))
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    n_blocks = len(ids) // block_size
    return ids[: n_blocks * block_size].view(n_blocks, block_size)
