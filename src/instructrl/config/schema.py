"""The typed configs: one per stage, nested in PipelineConfig, with their defaults, the checks that
batch sizes divide, and the views of them that --help and run folders read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from instructrl.errors import UserError


# The data formats of instructrl.data.formats; "auto" detects the format from the first record's fields.
# Spelt out rather than imported, so that loading a config does not import the readers (a test keeps them equal).
DataFormat = Literal["auto", "text", "prompt_completion", "messages", "preference", "comparison", "prompt", "unpaired_preference", "stepwise_supervision"]
SFTFormat = Literal["auto", "messages", "prompt_completion", "text"]  # the formats that hold demonstrations
RMFormat = Literal["auto", "comparison", "preference"]  # the formats that hold rankings


Division = tuple[int, int, str, str]  # (a, b, a's name, b's name): b must divide a


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any, info) -> Any:
        """YAML reads no/yes/off/on/true/false as booleans. A choice among words takes the word
        back (``mixed_precision: no``); a number or a path never takes a boolean (``seed: true``)."""
        if not isinstance(value, bool):
            return value
        choices = annotation_choices(cls.model_fields[info.field_name].annotation)
        if bool in choices:
            return value
        words = [w for w in (("yes", "on", "true") if value else ("no", "off", "false")) if w in choices]
        if words:
            return words[0]
        literals = [repr(c) for c in choices if isinstance(c, str)]
        expected = " or ".join(literals) if literals else "a path or name in quotes" if {str, Path} & set(choices) else "a number"
        raise ValueError(f"expected {expected}, not the boolean {str(value).lower()}")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section(cls, value: Any, info) -> Any:
        """A section with every key under it commented out (``sft:`` alone) is YAML's null: it changes nothing."""
        return {} if value is None and is_section(cls.model_fields[info.field_name].annotation) else value

    @field_validator("*", mode="after")
    @classmethod
    def _home(cls, value: Any) -> Any:
        """``~/data.jsonl`` is in your home folder, as a model path is (the shell leaves a ``~`` after ``=`` as it is)."""
        return value.expanduser() if isinstance(value, Path) else value


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def annotation_choices(annotation: Any) -> list:
    """The types and Literal values an annotation admits (through Optional and unions), in order."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    args = get_args(annotation)
    return [c for arg in args for c in annotation_choices(arg)] if args else [annotation]


class RunConfig(Strict):
    dir: Path = Field(Path("runs/default"), description="Where every stage writes its outputs (one sub-folder per stage).")
    # numpy, seeded by every training stage, takes 0 to 2**32 - 1; half that leaves room for the process index
    seed: int = Field(0, ge=0, lt=2**31, description="Seed of every stage: data order, initial weights, sampled answers (PPO's by episode, on any number of processes); process r of a multi-process run draws its dropout masks from seed + r.")


class WorldConfig(Strict):
    seed: int = Field(0, description="Seed of the built-in world: prompts, splits, demonstrations, corpus.")
    n_prompts: int = Field(24000, gt=0, description="Training prompts, split SFT : RM : PPO = 13 : 33 : 31 as in InstructGPT. 24000 gives 4053 demonstrations: with 2027 the 1M-parameter SFT model memorised them (77% right on its training prompts, 53% on held-out ones); with three times as many demonstrations and the same number of steps, 74%.")
    n_val: int = Field(96, gt=0, description="Validation prompts (SFT checkpoint selection).")
    n_eval: int = Field(360, gt=0, description="Held-out evaluation prompts.")
    multi_turn_rate: float = Field(0.2, ge=0, le=1, description="Share of prompts with a follow-up turn that refers to the first.")
    corpus_documents: int = Field(12000, gt=0, description="Documents in the plain-text pretraining corpus.")
    heldout_documents: int = Field(500, ge=0, description="Corpus documents held out (pretraining loss, alignment tax).")
    demo_error_rate: float = Field(0.15, ge=0, le=1, description="Share of demonstrations with a plausible mistake.")
    demo_off_format_rate: float = Field(0.10, ge=0, le=1, description="Share of demonstrations with the right content in the wrong form.")
    demo_verbose_rate: float = Field(0.25, ge=0, le=1, description="Share of demonstrations wrapped in filler ('Sure! ...').")


class TokenizerConfig(Strict):
    vocab_size: int = Field(1024, ge=300, description="Byte-level BPE vocabulary size, special tokens included.")


class ModelConfig(Strict):
    arch: Literal["gpt2", "llama"] = Field("llama", description="Architecture of the base model trained from scratch.")
    n_layer: int = Field(4, gt=0, description="Transformer blocks.")
    hidden_size: int = Field(128, gt=0, description="Width of the residual stream.")
    n_head: int = Field(4, gt=0, description="Attention heads (must divide hidden_size).")
    max_length: int = Field(192, gt=0, description="Longest sequence (tokens) the model handles.")


class LoRAConfig(Strict):
    """LoRA adapters (peft): only low-rank updates of the chosen linear layers train."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight; checkpoints are saved merged (plus adapter/).")
    r: int = Field(16, gt=0, description="Rank of the low-rank update.")
    alpha: float = Field(32.0, gt=0, description="Scale of the update (alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(["all-linear"], description="Module names to adapt, or all-linear (every linear layer but the output head).")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names_in_one_string(cls, value: Any) -> Any:
        # as peft and the command line write them: `target_modules: all-linear`, `...target_modules=q_proj,v_proj`
        return [name.strip() for name in value.split(",")] if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _one_way_to_choose(cls, value: list[str]) -> list[str]:
        # peft would take all-linear beside other names as one more module name, matching nothing
        if not value:
            raise ValueError("name at least one module, or give all-linear")
        if "all-linear" in value and len(value) > 1:
            raise ValueError("all-linear already adapts every linear layer; give it alone, or name the modules")
        return value


class PPOLoRAConfig(LoRAConfig):
    """ppo.lora: as the other stages', without adapter dropout."""

    @field_validator("dropout")
    @classmethod
    def _without_dropout(cls, value: float, info) -> float:
        # the adapters' dropout would be on in the update and off in the rollout
        if value > 0 and info.data.get("enabled"):
            raise ValueError("PPO runs every model without dropout, so that an update's log-probs and values are the rollout's "
                             "until the weights move (the first ratio is 1); set it to 0")
        return value


class TrainConfig(Strict):
    """What every training stage shares: batch sizes, optimiser, schedule, checkpoints."""

    batch_size: int = Field(32, gt=0, description="Global batch per optimizer step, over all processes and accumulation.")
    micro_batch_size: int = Field(16, gt=0, description="Examples per forward pass on one process.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (cosine decay after warm-up).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Residual/attention/embedding dropout while training.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision (bf16 on a GPU).")
    checkpoint_every: int = Field(50, gt=0, description="Optimizer steps between resumable checkpoints.")
    log_every: int = Field(10, gt=0, description="Optimizer steps between metric lines.")
    record_data_order: bool = Field(False, description="Write which examples each process trained on (tests, debugging).")

    def grad_accum(self, num_processes: int, section: str = "") -> int:
        """Micro-batches per process per optimizer step, so that the global batch stays batch_size
        (``section``: the config section, to name the keys in an error)."""
        return exact_div(*self.divisions(num_processes, section)[0])

    def divisions(self, num_processes: int, section: str = "") -> list[Division]:
        key = f"{section}." if section else ""
        return [(self.batch_size, self.micro_batch_size * num_processes, f"{key}batch_size", f"{key}micro_batch_size x {num_processes} processes")]

    def check_fits(self, n_examples: int, num_processes: int, source: str, what: str, section: str) -> None:
        """Check the sizes before a run starts: they divide, and the data holds one global batch."""
        self.grad_accum(num_processes, section)
        if n_examples < self.batch_size:
            raise UserError(f"{source}: {n_examples} {what} are fewer than one batch ({section}.batch_size = {self.batch_size})")


class ModelSwitches(Strict):
    """How a stage runs a Hugging Face model it loads (GPU memory and speed; same results)."""

    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(None, description="Attention kernel: sdpa (PyTorch's fused attention), eager, flash_attention_2. Default: the model's own.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, ~30% more compute.")


class PretrainConfig(TrainConfig):
    block_size: int = Field(128, gt=8, description="Tokens per packed training sequence.")
    epochs: float = Field(5.0, gt=0, description="Passes over the corpus.")
    batch_size: int = Field(8, gt=0, description="Global batch of packed sequences (small: the copying circuits a tiny model needs form after enough steps, not enough tokens).")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass on one process.")
    checkpoint_every: int = Field(500, gt=0, description="Optimizer steps between resumable checkpoints.")
    log_every: int = Field(50, gt=0, description="Optimizer steps between metric lines.")


class SFTConfig(TrainConfig, ModelSwitches):
    model: str | None = Field(None, description="Hugging Face model to fine-tune: a local folder or hub name. Default: this run's pretrain/final.")
    data: Path | None = Field(None, description="Demonstrations: JSONL, JSON, Parquet, CSV or a datasets folder of messages, prompt/completion or text records. Default: the built-in world's.")
    data_format: SFTFormat = Field("auto", description="Format of sft.data: auto (from the fields), messages, prompt_completion or text.")
    epochs: float = Field(8.0, gt=0, description="Passes over the demonstrations (InstructGPT: 16). On the built-in world 8 passes over 4053 demonstrations (1008 steps) beat 16 over 2027 at the same cost: validation Likert 5.58 vs 4.50 (with the easier add, sort and k-th word tasks); more demonstrations generalise better than more passes.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout while training (InstructGPT: 0.2 residual; Llama models have attention dropout only).")
    max_length: int | None = Field(None, gt=0, description="Longest demonstration (tokens) trained on; longer ones are skipped and counted in the log. Default: the model's context length.")
    select_every: int = Field(100, gt=0, description="Optimizer steps between scorings of validation answers by the labeler (built-in world only; on your own sft.data the last step is the output).")
    max_new_tokens: int = Field(24, gt=0, description="Longest answer generated for validation (built-in world only).")
    lora: LoRAConfig = Field(LoRAConfig(), description="LoRA adapters instead of full fine-tuning.")


class CollectConfig(Strict):
    policy: str | None = Field(None, description="Model whose answers are ranked: a folder or hub name. Default: this run's sft/final.")
    k: int = Field(4, ge=2, le=9, description="Responses sampled per prompt (InstructGPT: 4 to 9).")
    n_prompts: int | None = Field(None, gt=0, description="Rank n RM prompts only (in the pipeline, n a round). Default: all of them (with pipeline.rounds, an equal share a round).")
    first_prompt: int = Field(0, ge=0, description="Index of the first RM prompt to rank (later pipeline rounds rank fresh prompts).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (InstructGPT: 1).")
    max_new_tokens: int = Field(24, gt=0, description="Longest response sampled.")
    batch_size: int = Field(32, gt=0, description="Prompts per generation batch; also the unit a killed collection resumes from.")
    labelers: int = Field(4, gt=0, description="Simulated labelers sharing the prompts round-robin (noise: collect.labeler_noise).")
    labeler_noise: float = Field(0.3, ge=0, description="Noise of the simulated labelers who rank comparisons (0.3: ~73% agreement).")
    judgements: Path | None = Field(None, description="A comparisons JSONL written by people (the feedback app's export): validated (no record twice, one prompt per id) and used instead of the simulated labelers; in the pipeline, with pipeline.rounds = 1 only.")


class RMConfig(TrainConfig, ModelSwitches):
    model: str | None = Field(None, description="Causal LM whose backbone the reward model starts from. Default: this run's sft/final (InstructGPT).")
    data: Path | None = Field(None, description="Comparisons (K-way records) or TRL preference pairs: JSONL, JSON, Parquet, CSV or a datasets folder. Default: this run's collect/comparisons.jsonl.")
    data_format: RMFormat = Field("auto", description="Format of rm.data: auto (from the fields), comparison or preference.")
    demonstrations: Path | None = Field(None, description="Demonstrations (messages or prompt/completion) whose mean reward is set to 0 after training. Default: the built-in world's, when rm.data is not given or this run has the world; otherwise the best-ranked response of each training comparison (a pair's chosen one).")
    max_length: int | None = Field(None, gt=0, description="Longest prompt plus response (tokens) trained on; a comparison with a longer response is skipped and counted in the log. Default: the model's context length.")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of prompts held out for the diagnostics, with every comparison of each (several labelers' rankings of one prompt stay together).")
    epochs: float = Field(1.0, gt=0, description="Passes over the comparisons (InstructGPT: 1; more overfits).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(32, gt=0, description="Comparisons (prompts, each with all K responses) per optimizer step.")
    micro_batch_size: int = Field(8, gt=0, description="Comparisons per forward pass on one process.")
    lora: LoRAConfig = Field(LoRAConfig(), description="LoRA adapters on the backbone (the scalar head trains fully).")


class PPOConfig(ModelSwitches):
    """PPO (and PPO-ptx) of the SFT policy against the reward model (InstructGPT §3.5, Appendix C.4)."""

    policy: str | None = Field(None, description="Policy to optimise: a folder or hub name. Default: this run's sft/final.")
    reference: str | None = Field(None, description="Frozen model of the KL penalty (InstructGPT: the SFT model). Default: the policy's starting point.")
    reward_model: str | None = Field(None, description="Reward model: a folder or hub name (RewardModel.save_pretrained, or a sequence classifier with one label). Default: this run's rm/final.")
    value_model: str | None = Field(None, description="Reward model (a folder or hub name) the value model starts from (InstructGPT: the RM). Default: reward_model.")
    prompts: Path | None = Field(None, description="Prompts: prompt-only records ({'prompt': ...} or messages ending with a user turn), or the prompts of any other format. Default: the built-in world's PPO split.")
    prompts_format: DataFormat = Field("auto", description="Format of ppo.prompts: auto (from the fields) or a format name.")
    episodes: int = Field(4096, gt=0, description="Prompts answered and scored in all (InstructGPT: 256k).")
    first_iteration: int = Field(0, ge=0, description="Iterations run before this one: a later pipeline round continues its policy's count, so its prompts, sampling seeds and logged steps go on from there instead of repeating the first round's.")
    rollout_batch_size: int = Field(64, gt=0, description="Episodes generated per PPO iteration, over all processes (InstructGPT: 512).")
    minibatch_size: int = Field(16, gt=0, description="Episodes per optimizer step (InstructGPT: 64).")
    micro_batch_size: int = Field(16, gt=0, description="Episodes per forward pass on one process.")
    ppo_epochs: int = Field(2, gt=0, description="Passes over each rollout batch (InstructGPT: 1).")
    lr: float = Field(2e-5, gt=0, description="Policy learning rate (constant after warm-up); at 1e-4 the built-in world's policy reaches a KL of 2 nats in 5 iterations and exploits the RM.")
    value_lr: float = Field(5e-5, gt=0, description="Value model learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    adam_eps: float = Field(1e-5, gt=0, description="AdamW epsilon (1e-5 for RL, as in the PPO implementations).")
    grad_clip: float = Field(1.0, gt=0, description="Clip each model's gradient norm to this.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature, applied in the rollout and in every log-prob pass.")
    max_new_tokens: int = Field(24, gt=0, description="Longest response sampled.")
    kl_coef: float = Field(0.02, ge=0, description="β of the per-token KL penalty against the SFT reference (InstructGPT: 0.02).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimator in the reward: k1 = log π - log π_ref; k3 = (ρ-1) - log ρ.")
    adaptive_kl: bool = Field(False, description="Adapt β towards target_kl (lm-human-preferences' controller), from kl_coef; a later pipeline round goes on from the β the previous one reached.")
    target_kl: float = Field(1.0, gt=0, description="Target KL per response (nats) of the adaptive controller.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon (episodes) of the adaptive controller.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="λ of GAE.")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip ε.")
    value_clip: float = Field(0.2, gt=0, description="Value clip: the value moves at most this far from its rollout value per update.")
    missing_eos_score: float = Field(-3.0, description="Score given instead of the RM's to a response that never emits EOS.")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards before GAE (off: the RM bias already centres them).")
    ptx_coef: float = Field(0.1, ge=0, description="γ of PPO-ptx: weight of the mean pretraining NLL per token in every policy update; 0 = plain PPO (InstructGPT: 27.8 on its own loss scale; here 1.0 outweighs the PPO loss and moves the policy 4.5 nats from SFT within 7 iterations).")
    ptx_batch_size: int = Field(8, gt=0, description="Pretraining sequences mixed into each optimizer step.")
    ptx_data: Path | None = Field(None, description="Pretraining text: a plain-text file (one document per line) or text records (JSONL, JSON, Parquet, CSV, datasets folder). Default: the built-in world's corpus when ppo.prompts is unset; PPO-ptx on your own prompts needs your own.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision (bf16 on a GPU).")
    lora: PPOLoRAConfig = Field(PPOLoRAConfig(), description="LoRA on the policy and the value model; the KL reference is then the policy with its adapter off (one base model in memory).")
    log_every: int = Field(1, gt=0, description="PPO iterations between metric lines.")
    checkpoint_every: int = Field(10, gt=0, description="PPO iterations between resumable checkpoints.")

    @field_validator("adaptive_kl")
    @classmethod
    def _from_a_nonzero_coef(cls, value: bool, info) -> bool:
        # the controller scales β by a factor: from 0 it would stay 0, and the option would change nothing
        if value and info.data.get("kl_coef") == 0:
            raise ValueError("the adaptive controller scales ppo.kl_coef by a factor, so from 0 it stays 0; give ppo.kl_coef > 0 as its starting β")
        return value

    @model_validator(mode="after")
    def _ptx_data_with_own_prompts(self) -> PPOConfig:
        # the built-in world's corpus is no pretraining text for a user's prompts (and its model). Told at ppo.prompts,
        # the key you gave, so that the error names where you set it (ptx_data is its default, set nowhere)
        if self.prompts is not None and self.ptx_coef > 0 and self.ptx_data is None:
            raise error_at("prompts", str(self.prompts), "PPO-ptx mixes pretraining text into every update: set ppo.ptx_data=FILE (plain "
                           "text or {\"text\": ...} records) to go with ppo.prompts, or ppo.ptx_coef=0 for plain PPO")
        return self

    def iterations(self) -> int:
        return self.episodes // self.rollout_batch_size

    def check_sizes(self, num_processes: int) -> None:
        """Every batch size divides the next, over ``num_processes`` processes."""
        check_divisions(self.divisions(num_processes))

    def divisions(self, num_processes: int) -> list[Division]:
        return [(self.episodes, self.rollout_batch_size, "ppo.episodes", "ppo.rollout_batch_size"),
                (self.rollout_batch_size, self.minibatch_size, "ppo.rollout_batch_size", "ppo.minibatch_size"),
                (self.minibatch_size, self.micro_batch_size * num_processes, "ppo.minibatch_size", f"ppo.micro_batch_size x {num_processes} processes")]


# eval's rows of the built-in world's written answers, beside its models': the gold answers are the ceiling of every win rate vs SFT
DEMONSTRATIONS, GOLD_ANSWERS = "demonstrations", "gold_answers"


class EvalConfig(Strict):
    models: dict[str, str] | None = Field(None, description="name: model path to evaluate; win rates and the alignment tax are measured against the one named sft. Default: this run's base, SFT, PPO and PPO-ptx models (of the last round), those that exist.")
    prompts: Path | None = Field(None, description="Your own prompts (any records that hold one: a file `instructrl data check` finds usable as ppo.prompts), judged by eval.reward_model alone: the world's gold labeler knows only its own. Default: the built-in world's held-out prompts.")
    prompts_format: DataFormat = Field("auto", description="Format of eval.prompts: auto (from the fields) or a format name.")
    reward_model: str | None = Field(None, description="Also judge every answer by this reward model (a folder or hub name): mean reward and win rate against sft by reward. A proxy, and the one PPO was trained to please when it is this run's RM: one trained on other comparisons judges more fairly.")
    n_prompts: int | None = Field(None, gt=0, description="Evaluate on the first n prompts only.")
    max_new_tokens: int = Field(24, gt=0, description="Longest answer generated.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch.")
    temperature: float | None = Field(1.0, gt=0, description="Also judge answers sampled at this temperature (null: greedy answers only). PPO maximises the reward of samples at its rollout temperature (1.0), so these are the figures of what it optimised, as in Gao et al.'s gold-labeler evaluation; greedy answers are judged as well.")
    samples: int = Field(4, gt=0, description="Answers sampled per prompt at eval.temperature; the win rate's interval still counts prompts.")

    @field_validator("models")
    @classmethod
    def _names_of_their_own(cls, models: dict[str, str] | None) -> dict[str, str] | None:
        # a model named as one of eval's own rows was written over by it, or wrote over it, with no word said
        for name in models or {}:
            if not name.strip():
                raise ValueError("every model needs a name, as {name: path}")
            if name in (DEMONSTRATIONS, GOLD_ANSWERS):
                raise ValueError(f"'{name}' is the name of eval's row of the built-in world's {name.replace('_', ' ')}; give the model another")
        return models


class RoundsConfig(Strict):
    rounds: int = Field(1, ge=1, le=20, description="Rounds of collect -> RM -> PPO (InstructGPT iterated steps 2 and 3): each later round ranks fresh RM prompts (collect.n_prompts a round) with the latest PPO-ptx policy, retrains the RM on every comparison so far and continues PPO. Not with collect.judgements (people ranked the first round's samples only) nor ppo.lora (whose KL reference is the policy's own base model).")


class PipelineConfig(Strict):
    run: RunConfig = RunConfig()
    world: WorldConfig = WorldConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    collect: CollectConfig = CollectConfig()
    rm: RMConfig = RMConfig()
    ppo: PPOConfig = PPOConfig()
    pipeline: RoundsConfig = RoundsConfig()
    eval: EvalConfig = EvalConfig()

    def check_sizes(self, num_processes: int, sections=("pretrain", "sft", "rm", "ppo")) -> None:
        """The batch sizes of the training ``sections`` divide, over ``num_processes`` processes. The pipeline
        checks those it will train before its first stage: a bad PPO size is not found after SFT and the RM."""
        divisions = {"pretrain": self.pretrain.divisions(num_processes, "pretrain"), "sft": self.sft.divisions(num_processes, "sft"),
                     "rm": self.rm.divisions(num_processes, "rm"), "ppo": self.ppo.divisions(num_processes)}
        check_divisions([pair for section in divisions if section in sections for pair in divisions[section]])


def error_at(key: str, value: Any, message: str) -> ValidationError:
    """A model validator's error at field ``key`` (given ``value``), for a rule that reads several fields: a pydantic
    error is at the field validated, and a loaded config's error names the file line or override that set it."""
    return ValidationError.from_exception_data("config", [InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}), loc=(key,), input=value)])


def check_divisions(divisions: list[Division]) -> None:
    """A UserError naming every pair of sizes in ``divisions`` where b does not divide a, all in one message."""
    wrong = [f"{a_name} ({a}) must be a multiple of {b_name} ({b})" for a, b, a_name, b_name in divisions if b <= 0 or a % b]
    if wrong:
        raise UserError(f"config: {'; '.join(wrong)}")


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    """a / b, or a UserError naming both sizes when b does not divide a."""
    check_divisions([(a, b, a_name, b_name)])
    return a // b


def describe_fields(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML writes it, description) for every field, for --help: the
    section's own keys (its model and data) before those it shares with other stages (batch sizes,
    optimiser, GPU switches)."""
    inherited = [name for base in model.__bases__ if is_section(base) for name in base.model_fields]
    names = [name for name in model.model_fields if name not in inherited] + list(dict.fromkeys(inherited))
    rows = []
    for name in names:
        field = model.model_fields[name]
        if isinstance(field.default, BaseModel):
            rows += describe_fields(type(field.default), f"{prefix}.{name}")
        else:
            rows.append((f"{prefix}.{name}", _as_yaml(field.default), field.description or ""))
    return rows


def _as_yaml(value: Any) -> str:
    """A default as it is typed in a config file or override (false, [all-linear]), not as Python prints it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(_as_yaml, value)) + "]"
    return str(value)


# keys that change what a run logs or how often it saves, never its results
NOT_IDENTITY = ("log_every", "checkpoint_every")
# keys moved to the stage that reads them: a config that still sets the old key is told the new one, and a run
# recorded under the old key is compared by the new (the world's files never depended on the labelers' noise)
MOVED_KEYS = {"world.labeler_noise": "collect.labeler_noise"}
RUN_DIR = "<run.dir>"


def spelt_in_run(path: str, run_dir: str) -> bool:
    """Whether ``path`` is spelt from ``run_dir`` (runs/a/sft/final, and runs/a/round2/../sft/final, which leaves
    ``run_dir`` once normalised): the run's own, wherever the run folder is moved or copied to. Run identities
    (``section``) and lineage records (``RunDir.write_lineage``) count a path as the run's by this rule."""
    return path.startswith(run_dir + "/")


def in_run(path: str | Path, run_dir: str | Path) -> bool:
    """Whether ``path`` is one of the run's own: inside ``run_dir`` once both are absolute, or spelt from it
    (``spelt_in_run``). Lineage records (``RunDir.write_lineage``) and the pipeline's check of the paths you gave
    (``check_given_paths``: the run's own outputs may not exist yet) take it so."""
    full, root = os.path.abspath(os.path.expanduser(path)), os.path.abspath(run_dir)
    return full.startswith(root + os.sep) or spelt_in_run(str(path), str(run_dir))


def section(config: PipelineConfig, *names: str) -> dict[str, Any]:
    """The named sections of a config as plain data, for comparing two runs: what decides a run's
    results. Not run.dir (a folder moved, copied or spelt another way holds the same run; paths
    inside it are written from ``<run.dir>``), nor the ``NOT_IDENTITY`` keys."""
    dumped = config.model_dump(mode="json")
    run_dir = str(config.run.dir)

    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items() if k not in NOT_IDENTITY}
        if isinstance(value, str) and (value == run_dir or spelt_in_run(value, run_dir)):
            return RUN_DIR + value[len(run_dir):]
        return value

    identity = {name: portable(dumped[name]) for name in names}
    if "run" in identity:
        del identity["run"]["dir"]
    return identity
