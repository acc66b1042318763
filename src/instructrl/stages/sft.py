"""Supervised fine-tuning on demonstrations (InstructGPT §3.5, "Supervised fine-tuning").

setup (model, demonstrations, validation prompts) -> loop (shared ``fit``) -> save (final/).
Loss on assistant tokens only, every assistant turn of a conversation, each ending with EOS.
On the built-in world the output checkpoint is the one the simulated labeler scores best on
validation prompts, as the paper chose its SFT model by reward-model score rather than by
validation loss; with your own ``sft.data`` it is the last step's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.chat import tokenize_conversation, tokenize_text
from instructrl.data.formats import has_empty_answer
from instructrl.data.inputs import read_data, warn_of_control_tokens
from instructrl.data.sequences import TokenizedConversations
from instructrl.errors import UserError, located
from instructrl.evaluation.generate import check_room, generate_answers
from instructrl.models.base import apply_switches, length_cap, load_causal_lm, load_tokenizer
from instructrl.models.lora import add_lora, trainable_share
from instructrl.padding import pad_sequences
from instructrl.rlmath import next_token_nll
from instructrl.rundir.locks import releases_on_error
from instructrl.rundir.run import given_or_earlier, RunDir
from instructrl.training.checkpoint import sizes_for_resuming
from instructrl.training.loop import fit, make_accelerator, prepare_training, seed_everything, shards_parameters
from instructrl.training.progress import plural
from instructrl.world.build import build_world_once, load_tasks
from instructrl.world.labeler import SimulatedLabeler

SECTIONS = ("run", "world", "sft")
UPSTREAM = ("tokenizer", "model", "pretrain")  # part of the identity when SFT starts from this run's base model


def load_demonstrations(path: Path, tokenizer, max_length: int, data_format: str = "auto", log=None,
                        progress: bool = False) -> tuple[TokenizedConversations, int]:
    """Tokenized examples of a demonstrations file in any SFT format (``instructrl.data.formats``);
    also how many were too long. ``log`` is warned of empty answers, which teach the model to stop at once,
    and of records holding the tokenizer's control tokens. ``progress``: show bars while they are read and tokenized."""
    # check, then stream: the first pass checks every record, so a bad one at the end of the file is named
    # before minutes of tokenizing; the second tokenizes each record as it is read again, holding its token ids
    # only (the Demonstrations of 200k records took 172 MB more)
    empty = []  # where each demonstration with an empty answer was read

    def check(record: dict, demo) -> None:
        if has_empty_answer(demo):
            empty.append(demo.where)

    data = read_data(path, "demonstration", data_format, tokenizer=tokenizer, progress=f"sft: reading {path}" if progress else None,
                     on_item=check, keep=False)
    if log is not None:
        warn_of_control_tokens(path, data.control_tokens, "records", log)
    if empty and log is not None:
        log(f"warning: {plural(len(empty), 'demonstration')} of {path} {'has' if len(empty) == 1 else 'have'} an empty answer (first at {empty[0]}); "
            f"SFT teaches the model to end its answer at once there")
    examples, too_long = TokenizedConversations(), 0

    def tokenize(record: dict, demo) -> None:
        nonlocal too_long
        with located(demo.where):
            example = tokenize_conversation(tokenizer, demo.messages, demo.tools) if demo.messages is not None else tokenize_text(tokenizer, demo.text)
        if len(example.input_ids) > max_length:
            too_long += 1
        else:
            examples.append(example)

    read_data(path, "demonstration", data_format, progress=f"sft: tokenizing {path}" if progress else None, on_item=tokenize, keep=False)
    if not examples:
        raise UserError(f"{path}: no demonstration fits in {max_length} tokens")
    if not any(any(mask[1:]) for mask in examples.assistant_masks):  # the first token is never predicted
        raise UserError(f"{path}: no demonstration has an assistant token to learn from once tokenized")
    return examples, too_long


def labeler_selection(accelerator, model, tokenizer, tasks, max_new_tokens: int):
    """A ``select(model)`` that returns the gold labeler's mean Likert of greedy answers to ``tasks``;
    checks now that ``model``'s answers fit in its context.

    Each process answers its share of the prompts; the sums are reduced over processes. A sharded
    model generates in step on every process, so each then answers as many prompts (extras unscored).
    """
    judge = SimulatedLabeler()
    mine = tasks[accelerator.process_index :: accelerator.num_processes]
    synced = shards_parameters(accelerator)
    largest_share = -(-len(tasks) // accelerator.num_processes)
    asked = mine + mine[:1] * (largest_share - len(mine)) if synced else mine
    check_room(model, tokenizer, [list(t.messages) for t in tasks], max_new_tokens, "sft.max_new_tokens")

    def select(model) -> float:
        answers = generate_answers(model, tokenizer, [list(t.messages) for t in asked], max_new_tokens, synced=synced)
        total = sum(judge.judge(t, a).likert for t, a in zip(mine, answers))
        sums = accelerator.reduce(torch.tensor([float(total), float(len(mine))], device=accelerator.device), "sum")
        return (sums[0] / sums[1]).item()

    return select


@releases_on_error
def run_sft(config: PipelineConfig, restart: bool = False, log=print) -> Path:
    """Fine-tune ``sft.model`` (default: this run's base model) on demonstrations, into
    ``run.dir``/sft; returns the saved model's folder (final/).
    A run finished with the same config and inputs is skipped, an interrupted one resumes
    (``restart`` discards it instead); ``log`` takes each line the stage reports."""
    cfg = config.sft
    accelerator = make_accelerator(cfg, "sft")
    sections = SECTIONS + (UPSTREAM if cfg.model is None else ())
    run = RunDir(config, "sft", sections, accelerator.is_main_process, accelerator.num_processes)
    if run.skip(restart, log):
        return run.path / "final"
    model_path = given_or_earlier(cfg.model, Path(config.run.dir) / "pretrain" / "final", "sft.model", "sft", "`instructrl pretrain`")
    with located("sft.model"):  # a bad path names the key that chose it
        tokenizer = load_tokenizer(model_path, log=lambda m: log(f"sft: {m}"))

    # setup: demonstrations, and validation prompts when the built-in world is the data;
    # all inputs are read and checked before the run folder is written
    builtin = cfg.data is None
    world = build_world_once(config.world, Path(config.run.dir) / "world", accelerator) if builtin else None
    data_path = world.demonstrations if builtin else cfg.data
    seed_everything(config.run.seed)
    with located("sft.model"):
        model = load_causal_lm(model_path, dropout=cfg.dropout, tokenizer=tokenizer)
    max_length = length_cap(model, cfg.max_length, "sft.max_length")
    examples, too_long = load_demonstrations(data_path, tokenizer, max_length, cfg.data_format, lambda line: log(f"sft: {line}"),
                                             accelerator.is_main_process)
    apply_switches(model, cfg, "sft")
    if cfg.lora.enabled:
        with located("sft.lora.target_modules"):
            model = add_lora(model, cfg.lora)
    with sizes_for_resuming(run.path / "checkpoints", accelerator.num_processes):
        cfg.check_fits(len(examples), accelerator.num_processes, str(data_path), "demonstrations", "sft")
    select = labeler_selection(accelerator, model, tokenizer, load_tasks(world.prompts("val")), cfg.max_new_tokens) if builtin else None
    run.start(restart, log)
    run.write_lineage({"model": model_path, "demonstrations": data_path})
    setup = prepare_training(accelerator, model, cfg, len(examples), config.run.seed, lengths=examples.input_ids.lengths())
    log(f"sft: {len(examples)} demonstrations from {data_path}" + (f" ({too_long} longer than {max_length} tokens skipped)" if too_long else "")
        + f", {plural(setup.total_steps, 'step')} on {plural(accelerator.num_processes, 'process')}, model {model_path}"
        + (f"; LoRA: {trainable_share(model)}" if cfg.lora.enabled else ""))

    def make_batch(indices: list[int]) -> dict:
        ids, attention = pad_sequences([examples[i].input_ids for i in indices], tokenizer.pad_token_id, side="right")
        targets, _ = pad_sequences([examples[i].assistant_mask for i in indices], 0, side="right")
        d = accelerator.device
        return {"input_ids": ids.to(d), "attention_mask": attention.to(d), "targets": targets.to(d), "n_targets": int(targets[:, 1:].sum())}

    def loss_fn(model, batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return next_token_nll(logits, batch["input_ids"], batch["targets"])[0]

    # loop + save
    state = fit(accelerator=accelerator, setup=setup, tokenizer=tokenizer, make_batch=make_batch, loss_fn=loss_fn, config=cfg,
                run=run, description="sft", select=select, select_every=cfg.select_every, log=log)
    if state.best_step is not None:
        log(f"sft: chose the checkpoint of step {state.best_step} (validation Likert {state.best_score:.2f})")
    run.finish({"model": run.path / "final"})
    log(f"sft: model saved to {run.path / 'final'}")
    return run.path / "final"
