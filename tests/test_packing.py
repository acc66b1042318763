"""Plain text packed into blocks, read in chunks, with a bar in the main process."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from instructrl.data import packing
from instructrl.models.tokenizer import train_tokenizer
from instructrl.training import progress


def test_packing_in_chunks_gives_the_blocks_of_one_call_over_every_document(monkeypatch):
    documents = [f"document {i} says {'ab ' * (i % 7)}." for i in range(25)]
    tok = train_tokenizer(documents, vocab_size=300)
    ids = [i for doc in tok(documents, add_special_tokens=False)["input_ids"] for i in doc + [tok.eos_token_id]]
    n_blocks = len(ids) // 16
    expected = torch.tensor(ids[: n_blocks * 16]).view(n_blocks, 16)
    monkeypatch.setattr(packing, "CHUNK", 4)  # several chunks and a short last one
    assert torch.equal(packing.pack_documents(tok, documents, 16), expected)
    assert packing.pack_documents(tok, [], 16).shape == (0, 16)


def test_a_setup_phase_shows_its_counts_only_when_asked(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "log_console", lambda: Console(file=out, force_terminal=True, width=120))
    assert list(progress.tracked(["a", "b", "c"], "sft: tokenizing demos.jsonl", "demonstration")) == ["a", "b", "c"]
    assert "sft: tokenizing demos.jsonl" in out.getvalue() and "3/3" in out.getvalue()
    quiet = io.StringIO()  # another process than the main one
    monkeypatch.setattr(progress, "log_console", lambda: Console(file=quiet, force_terminal=True, width=120))
    assert list(progress.tracked(["a", "b"], "sft: tokenizing demos.jsonl", "demonstration", enabled=False)) == ["a", "b"]
    assert "tokenizing" not in quiet.getvalue()
