"""Build the small base model, and load any Hugging Face causal LM with its tokenizer."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch
from torch import nn

from instructrl.config import ModelConfig
from instructrl.errors import UserError
from instructrl.models.reward import HEAD_FILE

# How the float attributes of a config or a layer that hold a dropout probability end, across the
# architectures transformers ships (attn_pdrop, Bloom's hidden_dropout, Starcoder2's residual_dropout, ...).
DROPOUT_SUFFIXES = ("dropout", "pdrop", "dropout_prob")


def build_base_model(config: ModelConfig, tokenizer) -> nn.Module:
    """A randomly initialised decoder-only model sized by ``config``: it stands in for GPT-3."""
    from transformers import AutoModelForCausalLM

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return AutoModelForCausalLM.from_config(base_model_config(config, **ids))


def base_model_config(config: ModelConfig, **ids):
    """The Hugging Face config of ``build_base_model``'s model; ``ids``: its tokenizer's vocabulary size and special ids."""
    from transformers import GPT2Config, LlamaConfig

    if config.arch == "gpt2":
        return GPT2Config(n_layer=config.n_layer, n_embd=config.hidden_size, n_head=config.n_head, n_positions=config.max_length, **ids)
    return LlamaConfig(
        num_hidden_layers=config.n_layer, hidden_size=config.hidden_size, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head, intermediate_size=4 * config.hidden_size, max_position_embeddings=config.max_length,
        tie_word_embeddings=True, **ids,
    )


def _check_exists(name_or_path: str, what: str) -> None:
    """Fail at once on a missing folder, or on a hub name that is neither cached nor reachable
    (the hub client would otherwise retry for most of a minute before giving up)."""
    check_local_model(name_or_path, what)
    if not _looks_local(name_or_path) and hub_snapshot(name_or_path) is None and not _hub_reachable():
        raise UserError(f"{what} '{name_or_path}' is not a folder under {os.getcwd()}, not in the Hugging Face cache, "
                        "and the Hub cannot be reached to download it")


def check_local_model(name_or_path: str, what: str = "model") -> None:
    """What ``_check_exists`` finds without the Hub and without reading a file: a path that is missing, or that
    holds no model. A hub name passes, as only the Hub can tell (the pipeline asks this before its first stage)."""
    if _looks_local(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not folder.exists():
            raise UserError(f"{what} '{name_or_path}' does not exist")
        _check_model_folder(folder, f"'{name_or_path}'")


def _looks_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a path rather than a hub repository ("org/name", "gpt2")."""
    return os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1 or os.path.exists(name_or_path)


# What loading a model reads from a hub repository: config, tokenizer, and safetensors weights (a
# repository may also hold the same weights as .bin, Mistral's format, or other frameworks': ONNX, GGUF, TF, Flax)
SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
NOT_SNAPSHOT_FILES = ["consolidated*"]


def model_folder(name_or_path: str | Path, what: str = "model") -> Path:
    """The folder holding a model: ``name_or_path`` itself, or for a hub name its snapshot in the
    Hugging Face cache, downloaded first when the Hub can be reached. For loaders that read a
    model's files themselves (the reward model's head); one line for a name that is neither."""
    name_or_path = str(name_or_path)
    _check_exists(name_or_path, what)
    if _looks_local(name_or_path):
        return Path(name_or_path).expanduser()
    from huggingface_hub import snapshot_download

    online = _hub_reachable()
    try:
        folder = Path(snapshot_download(name_or_path, allow_patterns=SNAPSHOT_FILES, ignore_patterns=NOT_SNAPSHOT_FILES,
                                        local_files_only=not online))
        if online and not any(f.name != HEAD_FILE for f in folder.glob("*.safetensors")):  # weights saved before safetensors
            snapshot_download(name_or_path, allow_patterns=["*.bin"])
    except load_errors() as err:  # not cached (offline), a private or gated repository, a name the Hub refuses
        raise UserError(f"cannot get {what} '{name_or_path}' from the Hugging Face Hub: {str(err).splitlines()[0]}") from None
    return folder


def loadable(name_or_path: str, what: str = "model") -> str:
    """What ``from_pretrained`` is given for ``name_or_path``, checked (``_check_exists``): itself, but
    for a hub name the Hub cannot be reached for, its snapshot in the cache. Given the name, the hub
    client would retry every file it asks for (two minutes for a tokenizer) before reading the cache,
    where HF_HUB_OFFLINE is unset, as on a machine without internet access."""
    if not _looks_local(name_or_path) and not _hub_reachable():
        return str(model_folder(name_or_path, what))  # which checks it
    _check_exists(name_or_path, what)
    return name_or_path


# Files one of which every folder that from_pretrained can read holds (a LoRA adapter's included);
# without them transformers' error speaks of a missing `model_type` or a tokenizer backend.
MODEL_FOLDER_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "adapter_config.json")


def _check_model_folder(folder: Path, named: str) -> None:
    """Refuse a file, or a folder that holds no model, such as a stage's folder given for its final/
    or a run's folder given for one of its stages' models."""
    if not folder.is_dir():
        raise UserError(f"{named} is a file, not a model folder; give the folder that holds the model (its config.json)")
    if not any((folder / name).is_file() for name in MODEL_FOLDER_FILES):
        final = folder / "final"
        stages = sorted(str(config.parent) for config in folder.glob("*/final/config.json"))
        hint = (f"; a stage's model is in its final/: {final}" if (final / "config.json").is_file()
                else f"; a run's models are in its stages' final/ folders: {', '.join(stages)}" if stages else "")
        raise UserError(f"{named} is a folder that holds no model (no config.json){hint}")


def hub_snapshot(name: str) -> Path | None:
    """The folder of hub name ``name``'s snapshot in the Hugging Face cache (the one refs/main names;
    the folder's name is its commit), or None where it is not cached. Asks nothing of the Hub."""
    from huggingface_hub import try_to_load_from_cache

    for file in ("config.json", "tokenizer_config.json"):
        try:
            cached = try_to_load_from_cache(name, file)
        except Exception:  # noqa: BLE001  (a name that is no valid repo id is not cached)
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def load_errors() -> tuple[type[Exception], ...]:
    """What ``from_pretrained`` raises for a checkpoint that cannot be read: a missing or malformed
    file, or a weights file cut short (an interrupted copy or download)."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


@contextlib.contextmanager
def loading(what: str):
    """A context in which ``from_pretrained`` failing to read a checkpoint is one line, 'cannot load WHAT: why':
    for ``load_errors``, and for weights whose shapes are not those its config.json gives, for which transformers
    raises a RuntimeError that points at a report it logs (hidden under the CLI's quiet libraries)."""
    try:
        yield
    except load_errors() as err:
        raise UserError(f"cannot load {what}: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        if "mismatched_sizes" not in str(err):  # as transformers 4 and 5 both say; another RuntimeError (out of memory) is no bad input
            raise
        raise UserError(f"cannot load {what}: its weights do not have the shapes its config.json gives "
                        "(was config.json edited, or copied from another model?)") from None


def check_holds_a_model(name_or_path: str) -> None:
    """Refuse a local folder that holds no model of its own (no config.json): a LoRA adapter (a checkpoint's adapter/),
    which transformers would try to put on its base model and fail on when a PAD was added, with the folder to give
    instead; or a tokenizer alone (a run's pretrain/tokenizer), of whose config.json transformers says it lacks a model_type."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        merged = folder.parent if (folder.parent / "config.json").is_file() else None
        raise UserError(f"model '{name_or_path}' is a LoRA adapter, not a model: "
                        + (f"give the merged model beside it, {merged}" if merged else "merge it into its base model first (peft's merge_and_unload)"))
    if _holds_a_tokenizer(folder):
        raise UserError(f"model '{name_or_path}' is a tokenizer alone, not a model (no config.json); give the folder of the model it goes with")


@functools.cache
def _hub_reachable() -> bool:
    """One quick request to the Hub's endpoint (honouring HF_HUB_OFFLINE, HF_ENDPOINT and proxies).
    With the standard library: no HTTP client is among our dependencies, and huggingface_hub's own
    differs between its versions (requests before 1.0)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5.0).close()
    except urllib.error.HTTPError:  # an answer, even an error status, is a Hub that can be reached
        return True
    except (OSError, ValueError):  # no connection, a timeout, or an endpoint that is no URL
        return False
    return True


PAD_TOKEN = "<|pad|>"

# The chat template given to a tokenizer that has none (base models: GPT-2, Pythia, Llama base).
# Plain text, so no new token is needed; every assistant turn ends with EOS, as our own template's
# do, so a sampled answer stops where a demonstration stopped. It is saved with every checkpoint
# a stage writes, so later stages and serving render conversations the same way.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}Assistant:{% endif %}"
)


def puts_bos_first(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS before the text it encodes (Llama, Mistral, Gemma and OPT do)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    encoded, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    return encoded[:1] == [bos] and plain[:1] != [bos]


def fallback_chat_template(tokenizer) -> str:
    """``FALLBACK_CHAT_TEMPLATE``, after BOS for a tokenizer that puts BOS first. Conversations are
    encoded without the tokenizer's special tokens (the templates that want BOS write it), and the
    models of such tokenizers were trained with BOS first: without it Gemma's answers are nonsense."""
    return ("{{ bos_token }}" if puts_bos_first(tokenizer) else "") + FALLBACK_CHAT_TEMPLATE


def load_causal_lm(name_or_path: str | Path, dropout: float | None = None, tokenizer=None, dtype: torch.dtype | str = torch.float32,
                   **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of a folder or hub name, with a clear error.

    With ``tokenizer`` (from ``load_tokenizer``), the embeddings are fitted to it (``fit_embeddings``).
    ``dtype``: float32 for training (mixed precision autocasts); "auto" keeps the checkpoint's own.
    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM

    name_or_path = str(name_or_path)
    source = loadable(name_or_path, "model")
    check_holds_a_model(name_or_path)
    folder = Path(name_or_path).expanduser() if _looks_local(name_or_path) else hub_snapshot(name_or_path)
    if folder is not None and (folder / HEAD_FILE).is_file():  # its backbone would load, with no trained LM head
        raise UserError(f"model '{name_or_path}' is a reward model (it holds {HEAD_FILE}), not a policy; "
                        "give a language model, such as a run's sft/final or ppo_ptx/final")
    with loading(f"model '{name_or_path}'"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if dropout is not None:
        set_dropout(model, dropout)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


def inference_device() -> str:
    """Where a model that only answers runs (collect, eval, the feedback app's samples, serving):
    the GPU when there is one. Training stages get theirs from Accelerate."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_answering_model(name_or_path: str | Path, tokenizer=None) -> nn.Module:
    """``load_causal_lm`` of a model that only answers (collect, eval, the feedback app's samples), on ``inference_device``."""
    return load_causal_lm(name_or_path, tokenizer=tokenizer).to(inference_device())


@contextlib.contextmanager
def own_generation_config_aside(model):
    """Around ``model.generate``: the model's own generation settings (its checkpoint's
    generation_config.json) replaced by transformers' defaults. ``generate`` fills every setting
    the config it is given leaves unset from them, and a setting cannot be given as "unset"."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT generates with its base model's
    saved, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def context_length(model) -> int:
    """The longest sequence (tokens) a model's config allows; 2**20 when it names none.
    ``model``: a model, or its config (``model_config``: the pipeline asks before the model exists)."""
    from transformers import PretrainedConfig

    # a RewardModel's is its backbone's; a vision-language model's (Gemma 3 from 4B up) its language model's
    model = getattr(model, "backbone", model)
    config = (model if isinstance(model, PretrainedConfig) else model.config).get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20


def model_config(name_or_path: str):
    """The config of the model in local folder ``name_or_path``, read from its config.json without its weights; None for a
    hub name, a folder that holds no config.json (yet: a run's own final/) or one that cannot be read (its stage tells why)."""
    from transformers import AutoConfig

    folder = Path(name_or_path).expanduser()
    if not _looks_local(name_or_path) or not (folder / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(folder)
    except load_errors():
        return None


def length_cap(model, max_length: int | None, field: str) -> int:
    """The longest example a stage trains on: ``max_length`` (config key ``field``), by default the model's context.
    ``model``: a model or its config, as for ``context_length``."""
    context = context_length(model)
    if max_length is not None and max_length > context:
        raise UserError(f"config: {field} = {max_length} exceeds the model's context length ({context} tokens)")
    return max_length or context


# The files a saved tokenizer holds, one kind or another (tokenizer.json, tokenizer_config.json, vocab.json, spiece.model,
# qwen.tiktoken). Without any, transformers 5 fails on a Llama folder with an error about sentencepiece, and builds a
# Gemma tokenizer of five tokens that reads every word as <unk>.
TOKENIZER_FILES = ("tokenizer*", "vocab*", "*.model", "*.tiktoken")


def _holds_a_tokenizer(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | Path, for_chat: bool = True, log=None, what: str = "model"):
    """``AutoTokenizer.from_pretrained``, made fit for RLHF.

    PAD must exist and differ from EOS (RLHF-DETAILS.md: padding, EOS detection and "last real
    token" break when they share an id): a tokenizer without one, or whose PAD is EOS (GPT-2,
    Llama, Pythia, Qwen2 base), gets a new ``<|pad|>`` token; ``fit_embeddings`` then gives the
    model a row for it. A tokenizer without a chat template gets ``fallback_chat_template``.

    ``for_chat=False`` (serving) only needs EOS: generation pads by attention mask alone, and a
    checkpoint without a chat template can still answer raw completions. ``log``: told of each change.
    ``what``: the role of the model whose tokenizer it is ("reward model"), named when it cannot be found.
    """
    from transformers import AutoTokenizer

    name_or_path = str(name_or_path)
    source = loadable(name_or_path, what)
    unsaved = "is its tokenizer saved there (tokenizer.save_pretrained)?"
    folder = Path(source).expanduser()
    if folder.is_dir() and not _holds_a_tokenizer(folder):
        raise UserError(f"tokenizer '{name_or_path}' has no vocabulary file; {unsaved}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer '{name_or_path}': {str(err).splitlines()[0]}") from None
    except TypeError:  # transformers 4.x on a folder with a tokenizer_config.json but no vocabulary: it opens a vocabulary file of None
        raise UserError(f"tokenizer '{name_or_path}' has no vocabulary file; {unsaved}") from None
    if not tokenizer("Hello world", add_special_tokens=False).input_ids:  # transformers 5 on the same (a folder with no tokenizer file at all is refused above)
        raise UserError(f"tokenizer '{name_or_path}' turns text into no tokens; {unsaved}")
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{name_or_path}' has no EOS token")
    _check_template_parses(tokenizer, name_or_path)
    if not for_chat:
        return tokenizer
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if log:
            log(f"tokenizer of {name_or_path}: no PAD distinct from EOS, so {PAD_TOKEN} is added as id {tokenizer.pad_token_id} "
                "(the model gets an embedding row for it)")
    if tokenizer.chat_template is None:
        tokenizer.chat_template = fallback_chat_template(tokenizer)
        if log:
            log(f"tokenizer of {name_or_path}: no chat template, so conversations are rendered as 'User: ...' / 'Assistant: ...' "
                "turns, each answer ending with EOS" + (", after BOS (as the tokenizer encodes text)" if puts_bos_first(tokenizer) else ""))
    return tokenizer


def _check_template_parses(tokenizer, name_or_path: str) -> None:
    """Refuse a chat template that is not valid Jinja: every conversation would fail on it, each named as the one at
    fault (SFT's first demonstration; every chat request to the server, answered 400)."""
    from jinja2 import TemplateSyntaxError

    if tokenizer.chat_template is None:
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as err:
        raise UserError(f"the chat template of '{name_or_path}' is not valid Jinja (line {err.lineno}: {err.message}); "
                        "fix its chat_template.jinja, or the chat_template of its tokenizer_config.json") from None
    except Exception:  # noqa: BLE001  (a template that refuses this conversation, a system turn missing, may take others)
        pass


@torch.no_grad()
def fit_embeddings(model: nn.Module, tokenizer) -> nn.Module:
    """Give ``model`` an embedding row for every token id of ``tokenizer`` and its PAD id.

    New rows (the PAD ``load_tokenizer`` added) start at the mean of the existing ones, so the
    new token's logit is an average one rather than a random spike; no random numbers are drawn,
    so loading stays deterministic. A model whose vocabulary is already large enough (vocabularies
    are often padded to a multiple of 64) is left as it is.
    """
    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None and layer.weight.shape[0] == len(tokenizer):
                layer.weight[old_rows:] = layer.weight[:old_rows].mean(0)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def apply_switches(model: nn.Module, switches, section: str = "") -> nn.Module:
    """Set a stage's ``ModelSwitches`` on a loaded model: the attention kernel, and gradient
    checkpointing (non-reentrant, so it works with frozen base weights under LoRA).
    ``section``: the config section, to name its keys in an error."""
    if switches.attn_implementation is not None:
        set_attention(model, switches.attn_implementation, section)
    if switches.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns and goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def set_attention(model: nn.Module, implementation: str, section: str = "") -> None:
    """Switch ``model`` to another attention kernel; one this machine cannot run (flash_attention_2
    without its package or a GPU) is a bad config, told in one line rather than a traceback."""
    try:
        model.set_attn_implementation(implementation)
    except (ImportError, ValueError) as err:
        key = f"{section}." if section else ""
        raise UserError(f"{key}attn_implementation = {implementation}: {err}") from None


def check_attention(implementation: str | None, section: str = "") -> None:
    """``set_attention`` of ``implementation`` on a one-layer model of no memory (on the meta device), so that a
    kernel this machine cannot run (flash_attention_2 without its package or a GPU) is refused before a run starts
    rather than when its stage loads its model. Whether an architecture supports it is still told then."""
    if implementation is None:
        return
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1, vocab_size=8,
                       dtype=torch.bfloat16)  # a dtype flash attention runs in: none would be warned of
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny)
    set_attention(model, implementation, section)


def dropout_attributes(obj) -> dict[str, float]:
    """The float attributes of ``obj`` (a config or a layer) that hold a dropout probability, and OPT's ``layerdrop``."""
    return {name: value for name, value in vars(obj).items()
            if isinstance(value, float) and (name.endswith(DROPOUT_SUFFIXES) or name == "layerdrop")}


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout of ``model`` to ``p``, and LayerDrop (OPT skips whole layers while training) to 0.

    Many layers copy their probability from the config when they are built and give it to
    ``F.dropout`` at each pass, where no ``nn.Dropout`` shows it (OPT's ``dropout``, Bloom's and
    Falcon's ``hidden_dropout``, GPT-BigCode's ``attn_dropout``, Starcoder2's ``residual_dropout``):
    left on, PPO's update would not compute the rollout's log-probs. So the modules, every layer's
    float attributes and the config's (some layers read it at each pass) are all set.

    The config's values from before the first call are kept on the model, for ``saved_dropout``:
    a checkpoint's config.json holds the model's own dropout, not the one a stage trained with.
    """
    config = model.config.get_text_config()  # a vision-language model's dropout is its language model's
    if "_source_dropout" not in vars(model):
        model._source_dropout = dropout_attributes(config)
    for owner in (config, *model.modules()):
        for name in dropout_attributes(owner):
            setattr(owner, name, 0.0 if name == "layerdrop" else p)
        if isinstance(owner, nn.Dropout):
            owner.p = p


@contextlib.contextmanager
def saved_dropout(model: nn.Module):
    """A context in which ``model``'s config holds the dropout it had before ``set_dropout`` (to save it)."""
    source = vars(model).get("_source_dropout", {})
    if not source:  # set_dropout never saw it (a RewardModel: its backbone's is restored as the backbone saves)
        yield model
        return
    config = model.config.get_text_config()
    current = {name: getattr(config, name) for name in source}
    for name, value in source.items():
        setattr(config, name, value)
    try:
        yield model
    finally:
        for name, value in current.items():
            setattr(config, name, value)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_text(n: int) -> str:
    """A count as people write model sizes: "950", "45.7k", "4.5M", "124M", "1.2B" (3 significant figures at most)."""
    if n < 1000:
        return str(n)
    value = float(n)
    for unit in "kMB":
        value /= 1000
        text = f"{value:.1f}" if value < 99.95 else f"{value:.0f}"
        if float(text) < 1000 or unit == "B":  # 999,950 is "1.0M", not "1000k"
            return text + unit


def held(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: a sharded (FSDP) DTensor's local shard, else itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def count_held_parameters(model: nn.Module) -> int:
    """Parameters this process holds: under FSDP about count_parameters / processes."""
    return sum(held(p).numel() for p in model.parameters())


def parameter_bytes(*models: nn.Module | None) -> int:
    """Bytes of the distinct parameter tensors of ``models`` this process holds: a tensor two of them share counts once."""
    sizes = {held(p).data_ptr(): held(p).numel() * p.element_size() for m in models if m is not None for p in m.parameters()}
    return sum(sizes.values())


def optimizer_state_bytes(*optimizers: torch.optim.Optimizer) -> int:
    """Bytes of the optimizers' state tensors this process holds (AdamW: two per trained parameter)."""
    return sum(held(t).numel() * t.element_size() for o in optimizers for state in o.state.values() for t in state.values() if torch.is_tensor(t))
