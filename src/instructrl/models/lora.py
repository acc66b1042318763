"""LoRA adapters (peft) for SFT, the reward model and PPO, and full checkpoints from them.

With LoRA only the low-rank matrices (and a reward model's head) train: no gradients or AdamW
state for the base weights. In PPO the KL reference is the policy's own base model with the
adapter switched off (``disable_adapter``), so no second copy is held. Every checkpoint a stage
writes is a full model with the adapter merged in (any tool loads it), plus the adapter alone in
``adapter/`` beside the weights (with the embedding layers too when a PAD was added to the
tokenizer, as the resized embeddings differ from the base model's).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from instructrl.config import LoRAConfig
from instructrl.errors import UserError
from instructrl.models.base import saved_dropout


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """``model`` (a causal LM or a bare transformer) wrapped with a fresh LoRA adapter; only the
    adapter's parameters require gradients."""
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules if config.target_modules != ["all-linear"] else "all-linear"
    if targets != "all-linear":
        check_targets(model, targets)
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, bias="none")
    return get_peft_model(model, peft_config)


def _adaptable_types() -> tuple[type, ...]:
    """The layer types peft's LoRA can wrap (its own list)."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D


def _named(name: str, target: str) -> bool:
    """Whether ``target`` names the module called ``name``: its dotted name is it or ends with it, as in peft."""
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Refuse a target that names no module of ``model``, or a module LoRA cannot wrap (a block, a
    norm), naming the layers it can; peft would stop with a traceback, or pass over a misspelt name."""
    adaptable = _adaptable_types()
    layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, adaptable)})
    for target in targets:
        matched = [module for name, module in model.named_modules() if _named(name, target)]
        wrong = sorted({type(m).__name__ for m in matched if not isinstance(m, adaptable)})
        if not matched or wrong:
            found = f"'{target}' names {' and '.join(wrong)} modules, which LoRA cannot wrap" if wrong else f"'{target}' names no module of the model"
            raise UserError(f"{found}; its linear and embedding layers are {', '.join(layers)} (or give all-linear)")


def targets_in(model: nn.Module, config: LoRAConfig) -> LoRAConfig:
    """``config`` with only the targets that name a module of ``model``, unless none does: PPO's value
    model takes the policy's targets but has no LM head."""
    names = [name for name, _ in model.named_modules()]
    present = [t for t in config.target_modules if t == "all-linear" or any(_named(name, t) for name in names)]
    return config.model_copy(update={"target_modules": present}) if present else config


def trainable_share(model: nn.Module) -> str:
    """How many of ``model``'s parameters train, for a stage's log (as peft's print_trainable_parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%})"


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def adapter_disabled(model: nn.Module):
    """A context in which a LoRA model computes as its base model (PPO's KL reference)."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


def merged_state_dict(model: nn.Module) -> dict:
    """The base model's state dict with every adapter's low-rank update added to its weight (the
    model itself is left unmerged, so training can go on)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = {name.replace(".base_layer", ""): tensor for name, tensor in base.state_dict().items() if "lora_" not in name}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
            state[f"{name}.weight"] = (module.base_layer.weight + delta).detach()
    return state


@contextlib.contextmanager
def _tied_only_if_equal(base: nn.Module, state: dict):
    """A context in which ``base``'s config ties its LM head to its embeddings only while their merged
    weights in ``state`` agree. An adapter on one of the two (target_modules lm_head or embed_tokens of
    a tied model) sets them apart, and a loader that ties by the config would drop one's update."""
    names = {id(module): name for name, module in base.named_modules()}
    layers = [base.get_input_embeddings(), base.get_output_embeddings()]
    keys = [f"{names[id(layer)]}.weight" for layer in layers if layer is not None and id(layer) in names]
    apart = (getattr(base.config, "tie_word_embeddings", False) and len(keys) == 2 and all(k in state for k in keys)
             and not torch.equal(state[keys[0]], state[keys[1]]))
    if apart:
        base.config.tie_word_embeddings = False
    try:
        yield
    finally:
        if apart:
            base.config.tie_word_embeddings = True


def save_full(model: nn.Module, dest: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` to ``dest``; a LoRA model as its merged full weights, plus its adapter in dest/adapter.
    ``state_dict``: the full weights to write instead of the model's own (gathered from FSDP shards)."""
    if not is_lora(model):
        with saved_dropout(model):
            model.save_pretrained(dest, state_dict=state_dict)
        return
    if state_dict is not None:
        raise ValueError("save_full: a LoRA model is merged from its own weights; no state_dict")
    state = {k: v.contiguous() for k, v in merged_state_dict(model).items()}
    with saved_dropout(model.get_base_model()) as base, _tied_only_if_equal(base, state):
        base.save_pretrained(dest, state_dict=state)
    with warnings.catch_warnings():  # peft warns that it keeps embeddings resized for an added PAD: the adapter needs them
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
        model.save_pretrained(Path(dest) / "adapter")
