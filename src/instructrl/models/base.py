"""Build the small base model, and load any Hugging Face causal LM with its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from instructrl.config import ModelConfig
from instructrl.errors import UserError

# Config attributes that hold a dropout probability, across the architectures transformers ships.
DROPOUT_ATTRIBUTES = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


def build_base_model(config: ModelConfig, tokenizer) -> nn.Module:
    """A randomly initialised decoder-only model sized by ``config``: it stands in for GPT-3."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if config.arch == "gpt2":
        hf_config = GPT2Config(n_layer=config.n_layer, n_embd=config.hidden_size, n_head=config.n_head, n_positions=config.max_length, **ids)
    else:
        hf_config = LlamaConfig(
            num_hidden_layers=config.n_layer, hidden_size=config.hidden_size, num_attention_heads=config.n_head,
            num_key_value_heads=config.n_head, intermediate_size=4 * config.hidden_size, max_position_embeddings=config.max_length,
            tie_word_embeddings=True, **ids,
        )
    return AutoModelForCausalLM.from_config(hf_config)


def _check_exists(name_or_path: str, what: str) -> None:
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1 or os.path.exists(name_or_path)
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise UserError(f"{what} '{name_or_path}' does not exist")


def load_causal_lm(name_or_path: str | Path, dropout: float | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of a folder or hub name, with a clear error."""
    from transformers import AutoModelForCausalLM

    name_or_path = str(name_or_path)
    _check_exists(name_or_path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model '{name_or_path}': {str(err).splitlines()[0]}") from None
    if dropout is not None:
        set_dropout(model, dropout)
    return model


def load_tokenizer(name_or_path: str | Path, for_chat: bool = True):
    """``AutoTokenizer.from_pretrained``; PAD must exist and differ from EOS (RLHF-DETAILS.md).

    ``for_chat=False`` (serving) only needs EOS: generation pads by attention mask alone, and
    a checkpoint without a chat template can still answer raw completions.
    """
    from transformers import AutoTokenizer

    name_or_path = str(name_or_path)
    _check_exists(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer '{name_or_path}': {str(err).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{name_or_path}' has no EOS token")
    if not for_chat:
        return tokenizer
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"tokenizer '{name_or_path}' has no PAD token distinct from EOS")
    if tokenizer.chat_template is None:
        raise UserError(f"tokenizer '{name_or_path}' has no chat template")
    return tokenizer


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout of ``model`` (modules and the config attributes that feed functional dropout)."""
    for name in DROPOUT_ATTRIBUTES:
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
