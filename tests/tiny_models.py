"""Tiny randomly initialised Hugging Face models of several architectures, and a user's data
files in each format, built locally for the bring-your-own-model tests (no downloads)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from instructrl.models.tokenizer import CHAT_TEMPLATE

WORDS = ["cat", "dog", "fox", "owl", "bee", "elk", "emu", "yak"]
EOS = "<|endoftext|>"
BOS = "<s>"


def tiny_tokenizer(pad: str, template: bool, bos: bool = False):
    """A byte-level BPE with EOS only, as base models ship: ``pad`` is "none" (GPT-2, Pythia) or
    "eos" (PAD = EOS, as Llama and Qwen2 recipes set it); ``template`` gives it a chat template;
    ``bos`` a BOS of its own that it puts before every text it encodes (Llama, Mistral, Gemma)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [f"User: Say {w}.\n\nAssistant: {w}" for w in WORDS] * 4
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    if bos:
        bpe.add_special_tokens([BOS])
        bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bpe.token_to_id(BOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=BOS if bos else EOS, model_max_length=1 << 20)
    if pad == "eos":
        tokenizer.pad_token = EOS
    if template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# a template that refuses a system turn, as Gemma's and older Mistral's do
NO_SYSTEM_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                      + CHAT_TEMPLATE)

# a template that renders tools, tool calls (arguments as JSON text or objects) and tool results, as many HF templates do
TOOL_TEMPLATE = ("{% if tools %}[tools]{% for tool in tools %}{{ tool | tojson }}{% endfor %}[/tools]{% endif %}"
                 "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                 "{% for call in m.tool_calls or [] %}<call>{{ call.function.name }} "
                 "{{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}</call>{% endfor %}"
                 "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")

# arch -> (tokenizer's PAD, whether it has a chat template): every combination the loader must handle
ARCHS = {"gpt2": ("none", False), "llama": ("eos", False), "qwen2": ("none", True), "gpt_neox": ("eos", True), "mistral": ("none", False),
         "opt": ("none", False), "gemma3": ("none", True)}

# hybrid recurrent models, served one sequence at a time (not in ARCHS: the stages are not tested on them)
RECURRENT_ARCHS = {"lfm2": ("none", True), "recurrent_gemma": ("none", True)}

SLIDING_WINDOW = 4


def tiny_model_config(arch: str, vocab_size: int, eos_id: int):
    from transformers import (Gemma3Config, GPT2Config, GPTNeoXConfig, LlamaConfig, Lfm2Config, MistralConfig, OPTConfig, Qwen2Config,
                              RecurrentGemmaConfig)

    ids = dict(vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id)
    if arch == "gpt2":
        return GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, **ids)
    if arch == "opt":  # dropout 0.1 as OPT's checkpoints ship it, applied by each layer with F.dropout
        return OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128, **ids)
    shape = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, **ids)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=1, **shape)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=1, **shape)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**shape)
    if arch == "gemma3":  # a vision-language model, as Gemma 3 is from 4B up: its text sizes are in text_config
        image_tokens = dict(image_token_index=vocab_size + 1, boi_token_index=vocab_size + 2, eoi_token_index=vocab_size + 3)  # past the PAD to be added
        text = dict(shape, vocab_size=vocab_size + 4, num_key_value_heads=1, head_dim=16, sliding_window=SLIDING_WINDOW)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **image_tokens)
    if arch == "mistral":  # a window shorter than any prompt: its KV cache keeps only the last 3 tokens of each layer
        return MistralConfig(num_key_value_heads=1, sliding_window=SLIDING_WINDOW, **shape)
    if arch == "lfm2":  # LFM2's short-convolution layer (a recurrent state per sequence), then attention
        return Lfm2Config(num_key_value_heads=1, **dict(shape, num_hidden_layers=2), layer_types=["conv", "full_attention"])
    if arch == "recurrent_gemma":  # keeps its recurrent state in its own modules, not in the cache it returns
        return RecurrentGemmaConfig(num_hidden_layers=2, block_types=["recurrent", "attention"], hidden_size=32, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=64, lru_width=32, attention_window_size=SLIDING_WINDOW, **ids)
    raise ValueError(arch)


def save_tiny_model(arch: str, dest: Path, seed: int = 0) -> Path:
    """A random ``arch`` model and its tokenizer (PAD and template per ``ARCHS``) saved to ``dest``."""
    from transformers import AutoModelForCausalLM

    pad, template = {**ARCHS, **RECURRENT_ARCHS}[arch]
    tokenizer = tiny_tokenizer(pad, template)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_model_config(arch, len(tokenizer), tokenizer.eos_token_id))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def save_tiny_classifier(dest: Path, seed: int = 1) -> Path:
    """A tiny random Llama sequence classifier with one label and its tokenizer (PAD = EOS), as TRL's
    RewardTrainer and OpenRLHF save a reward model, in ``dest``."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = tiny_tokenizer(pad="eos", template=False)
    config = tiny_model_config("llama", len(tokenizer), tokenizer.eos_token_id)
    config.num_labels, config.pad_token_id = 1, tokenizer.eos_token_id
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def into_hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """Copy a saved model into the Hugging Face cache ``cache`` as the hub client lays out a download
    (models--org--name/snapshots/COMMIT/, with refs/main naming the commit); returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def newer_hub_commit(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """A newer commit of a repository in the Hugging Face cache ``cache``, as downloading it after the
    repository was updated leaves the cache: its snapshot with ``files`` written over the last one's
    (refs/main names it; the older snapshot stays). Returns the new snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(repo / "snapshots" / (repo / "refs" / "main").read_text(), snapshot)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_data(folder: Path, n: int = 32) -> dict[str, Path]:
    """A user's files: demonstrations (messages), preferences (prompt/chosen/rejected), prompts, text."""
    folder.mkdir(parents=True, exist_ok=True)
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    return {
        "sft": write_jsonl(folder / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]} for w in words]),
        "rm": write_jsonl(folder / "prefs.jsonl", [{"prompt": f"Say {w}.", "chosen": w, "rejected": WORDS[(i + 3) % len(WORDS)]} for i, w in enumerate(words)]),
        "prompts": write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Say {w}."} for w in words]),
        "text": _write_text(folder / "text.txt", [f"the {w} and the {v}" for w in WORDS for v in WORDS]),
    }


def _write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path
