"""The reward model: a Hugging Face decoder backbone with a scalar head (InstructGPT §3.5).

The reward of a (prompt, response) sequence is the head's output at the sequence's last real
token (its EOS), never at a padding position, whichever side the batch is padded on. A bias,
set after training so that the demonstrations score 0 on average, is stored with the head and
added at every position. The per-token outputs (``values``) are what a value model initialised
from the RM starts from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from instructrl.data.chat import response_ids
from instructrl.errors import UserError
from instructrl.padding import last_token_index, pad_sequences, position_ids_from_mask

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"


class RewardModel(nn.Module):
    """A causal LM's backbone with a scalar head: ``model(input_ids, attention_mask)`` is the (B,)
    reward of each sequence, read at its last real token (left or right padding alike).

    Reload a trained one with ``from_pretrained`` (in eval mode, as transformers loads models);
    ``score_responses`` scores (conversation, response) pairs as the RM stage trained on them."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)  # FSDP shards per decoder layer, as for the backbone
        hidden = backbone.config.get_text_config().hidden_size  # a vision-language model's (Gemma 3 from 4B up) is its language model's
        self.head = nn.Linear(hidden, 1)
        # lm-human-preferences: head weights ~ N(0, 1 / (hidden + 1)), zero bias
        nn.init.normal_(self.head.weight, std=1 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("reward_bias", torch.zeros(()))  # added to every reward (demonstrations -> mean 0)

    @classmethod
    def from_causal_lm(cls, name_or_path: str | Path, tokenizer=None) -> "RewardModel":
        """A new reward model on the backbone of a causal LM checkpoint (InstructGPT: the SFT model).

        With ``tokenizer`` (from ``load_tokenizer``), the embeddings are fitted to it (a PAD it added).
        """
        backbone = _load_backbone(name_or_path)
        if tokenizer is not None:
            from instructrl.models.base import fit_embeddings

            fit_embeddings(backbone, tokenizer)
        return cls(backbone)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, what: str = "reward model") -> "RewardModel":
        """Reload a reward model saved with ``save_pretrained``: backbone, head and bias in one call.

        A reward model trained elsewhere as a Hugging Face sequence classifier with one label
        (TRL's RewardTrainer, OpenRLHF) loads too: its score layer is the head, with no bias.
        ``name_or_path``: a folder, or a hub name (from the Hugging Face cache, or downloaded); ``what``:
        its role ("value model"), named when it cannot be found."""
        from instructrl.models.base import load_errors, model_folder

        path = model_folder(name_or_path, what)
        if not (path / HEAD_FILE).is_file():
            return cls._from_sequence_classifier(path).eval()
        model = cls(_load_backbone(path))
        try:
            state = load_file(path / HEAD_FILE)
            bias = json.loads((path / CONFIG_FILE).read_text())["reward_bias"]
        except (*load_errors(), KeyError) as err:  # a file cut short by an interrupted copy, or missing
            raise UserError(f"cannot load the reward model '{path}': {str(err).splitlines()[0]}") from None
        model.head.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        model.reward_bias.fill_(bias)
        return model.eval()  # a new nn.Module trains; its backbone, loaded by transformers, would not

    @classmethod
    def _from_sequence_classifier(cls, path: Path) -> "RewardModel":
        from transformers import AutoModelForSequenceClassification

        from instructrl.models.base import fit_embeddings, load_tokenizer, loading

        config = path / "config.json"
        architectures = (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise UserError(f"'{path}' is not a reward model checkpoint: no {HEAD_FILE} (instructrl's), "
                            f"nor a Hugging Face sequence classifier ({', '.join(architectures) or 'no config.json'})")
        with loading(f"the reward model '{path}'"):
            classifier = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
        score = getattr(classifier, "score", None)
        if classifier.config.num_labels != 1 or not isinstance(score, nn.Linear):
            raise UserError(f"'{path}' is a sequence classifier with {classifier.config.num_labels} labels; a reward model gives one score")
        model = cls(fit_embeddings(classifier.base_model, load_tokenizer(path)))  # a row for the PAD the tokenizer may gain
        with torch.no_grad():
            model.head.weight.copy_(score.weight)
            model.head.bias.copy_(score.bias if score.bias is not None else torch.zeros(1))
        return model

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """``state_dict``: the full weights to write instead of the model's own (gathered from FSDP shards)."""
        from instructrl.models.lora import save_full

        path = Path(path)
        state = self.state_dict() if state_dict is None else state_dict
        part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        save_full(self.backbone, path, None if state_dict is None else part("backbone."))  # a LoRA backbone merged
        save_file({k: v.detach().contiguous().cpu() for k, v in part("head.").items()}, path / HEAD_FILE)
        (path / CONFIG_FILE).write_text(json.dumps({"reward_bias": float(state["reward_bias"])}, indent=2))

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) head output plus the bias at every position; position ids count real tokens only.

        The bias belongs to every position: a value model initialised from the RM starts on the
        centred rewards' scale, not off by the bias (Huang et al.'s critic is the RM, bias and all)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float() + self.reward_bias

    def forward(self, input_ids: Tensor, attention_mask: Tensor, per_token: bool = False) -> Tensor:
        """(B,) reward of each sequence, ``values`` read at its last real token; with ``per_token``,
        ``values`` (a value model is called this way, so that DDP's wrapper sees the call)."""
        values = self.values(input_ids, attention_mask)
        if per_token:
            return values
        last = last_token_index(attention_mask).clamp(min=0)
        return values.gather(1, last.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: list[list[int]], pad_id: int, device, batch_size: int = 64) -> list[float]:
    """The reward of each token sequence (a prompt and response ending with EOS), in batches."""
    model.eval()
    rewards = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_sequences(sequences[start : start + batch_size], pad_id, side="right")
        rewards += model(ids.to(device), mask.to(device)).tolist()
    return rewards


@torch.no_grad()
def score_responses(model: RewardModel, tokenizer, conversations: list[list[dict]], responses: list[str], batch_size: int = 64) -> list[float]:
    """The reward of each response to its conversation (messages ending with a user turn), on the
    model's device: each pair tokenised as the RM stage trained on it (``response_ids``)."""
    sequences = [response_ids(tokenizer, messages, response) for messages, response in zip(conversations, responses, strict=True)]
    return score_sequences(model, sequences, tokenizer.pad_token_id, next(model.parameters()).device, batch_size)


def _load_backbone(name_or_path: str | Path) -> nn.Module:
    """The transformer of a causal LM checkpoint without its LM head (``AutoModel``)."""
    from transformers import AutoModel

    from instructrl.models.base import check_holds_a_model, loadable, loading

    source = loadable(str(name_or_path))
    check_holds_a_model(str(name_or_path))
    with loading(f"a backbone from '{name_or_path}'"):
        return AutoModel.from_pretrained(source, dtype=torch.float32)
