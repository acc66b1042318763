"""Train the reward model on ranked comparisons (InstructGPT §3.5, "Reward modeling").

setup (backbone from the SFT model, comparisons, held-out split) -> loop (shared ``fit``, the
K-way ranking loss: all pairs of one prompt in one batch element, each response forwarded once)
-> bias (demonstrations average 0) -> save (final/, reloads with RewardModel.from_pretrained)
-> diagnostics against the gold labeler.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.chat import response_ids, tokenize_conversation
from instructrl.data.inputs import read_data, warn_of_control_tokens
from instructrl.data.jsonl import nan_to_none
from instructrl.data.records import ComparisonRecord
from instructrl.data.sequences import TokenSequences
from instructrl.errors import UserError, located
from instructrl.evaluation.rm_diagnostics import accuracy_by_group, accuracy_by_pair_kind, correlation, figure, length_bias, pairwise_accuracy
from instructrl.models.base import apply_switches, length_cap, load_tokenizer, set_dropout
from instructrl.models.lora import add_lora, trainable_share
from instructrl.models.reward import RewardModel, score_sequences
from instructrl.padding import pad_sequences
from instructrl.rlmath import kway_ranking_loss
from instructrl.rundir.files import write_text_atomic
from instructrl.rundir.locks import releases_on_error
from instructrl.rundir.run import given_or_earlier, RunDir
from instructrl.training.checkpoint import sizes_for_resuming
from instructrl.training.loop import fit, make_accelerator, prepare_training, seed_everything, shards_parameters, write_model
from instructrl.training.progress import plural, tracked
from instructrl.world.build import WorldFiles, build_world_once, load_tasks
from instructrl.world.labeler import SimulatedLabeler
from instructrl.world.tasks import Task

SECTIONS = ("run", "world", "rm")
UPSTREAM = ("tokenizer", "model", "pretrain", "sft")  # part of the identity when the backbone is this run's SFT model


def encode_comparison(tokenizer, record: ComparisonRecord) -> list[list[int]]:
    """Token ids of (prompt, response) for each of the record's K responses, each ending with EOS."""
    prompt = [m.model_dump() for m in record.prompt]
    return [response_ids(tokenizer, prompt, r) for r in record.responses]


def best_ranked(records: list[ComparisonRecord], encoded: list[TokenSequences]) -> TokenSequences:
    """The encoded responses ranked best (ties included) in each record: a pair's chosen response."""
    return TokenSequences(seq for record, seqs in zip(records, encoded) for rank, seq in zip(record.ranks, seqs) if rank == min(record.ranks))


def split_by_prompt(records: list[ComparisonRecord], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the held-out and of the training comparisons, in order: ``fraction`` of the prompts,
    drawn with ``seed``, with every comparison of each. A prompt is its turns, whatever ids its records
    carry: several labelers' rankings of one prompt (the feedback app's overlap), or the several pairs of
    one prompt in a preference file (each its own id, file:line), fall on one side, so a held-out
    prompt's responses are never trained on."""
    keys = [json.dumps([[m.role, m.content] for m in r.prompt]) for r in records]
    prompts = list(dict.fromkeys(keys))
    random.Random(f"rm-split:{seed}").shuffle(prompts)
    n_held = max(1, int(len(prompts) * fraction)) if fraction > 0 and len(prompts) > 1 else 0  # a few prompts: still one to measure on
    held = set(prompts[:n_held])
    return [i for i, p in enumerate(keys) if p in held], [i for i, p in enumerate(keys) if p not in held]


def centring_set(demonstrations: Path | None, tokenizer, train: list[ComparisonRecord], encoded: list[TokenSequences],
                 max_length: int, progress: bool = False) -> tuple[TokenSequences, str]:
    """The sequences whose mean reward the bias sets to 0 (§3.5), and what they are: the
    ``demonstrations`` that fit in ``max_length`` tokens; without any, the best-ranked training responses.
    ``progress``: show bars while the demonstrations are read and tokenized."""
    if demonstrations is None:
        demos = best_ranked(train, encoded)
        return demos, f"the {len(demos)} best-ranked training responses (no rm.demonstrations)"
    # check, then stream, as SFT reads its demonstrations: a bad record at the end of the file is named before
    # any is tokenized, and of each only its token ids are held
    fitting, too_long = TokenSequences(), 0

    def tokenize(record: dict, demo) -> None:
        nonlocal too_long
        with located(demo.where):
            ids = tokenize_conversation(tokenizer, demo.messages, demo.tools).input_ids
        if len(ids) > max_length:
            too_long += 1
        else:
            fitting.append(ids)

    read_data(demonstrations, "conversation", progress=f"rm: reading {demonstrations}" if progress else None, keep=False)
    read_data(demonstrations, "conversation", progress=f"rm: tokenizing {demonstrations}" if progress else None, on_item=tokenize, keep=False)
    if not fitting:
        raise UserError(f"{demonstrations}: no demonstration fits in {max_length} tokens (rm.max_length)")
    skipped = f", {too_long} longer than {max_length} tokens left out" if too_long else ""
    return fitting, f"the {len(fitting)} demonstrations of {demonstrations}{skipped}"


@releases_on_error
def run_rm(config: PipelineConfig, restart: bool = False, log=print, upstream: bool | None = None) -> Path:
    """Train the reward model on ranked comparisons, into ``run.dir``/rm; returns the saved model's
    folder (final/, loaded by ``RewardModel.from_pretrained``).
    A run finished with the same config and inputs is skipped, an interrupted one resumes
    (``restart`` discards it instead); ``log`` takes each line the stage reports.

    ``upstream``: whether the earlier stages' config is part of this run's identity (default: when the inputs are this run's own)."""
    cfg = config.rm
    accelerator = make_accelerator(cfg, "rm")
    sections = SECTIONS + (UPSTREAM if (cfg.model is None if upstream is None else upstream) else ()) \
        + (("collect",) if (cfg.data is None if upstream is None else upstream) else ())
    run = RunDir(config, "rm", sections, accelerator.is_main_process, accelerator.num_processes)
    if run.skip(restart, log):
        return run.path / "final"
    root = Path(config.run.dir)
    backbone = given_or_earlier(cfg.model, root / "sft" / "final", "rm.model", "rm", "`instructrl sft`")
    data = given_or_earlier(cfg.data, root / "collect" / "comparisons.jsonl", "rm.data", "rm", "`instructrl collect`")
    with located("rm.model"):  # a bad path names the key that chose it
        tokenizer = load_tokenizer(backbone, log=lambda m: log(f"rm: {m}"))
    # your own comparisons' control tokens are counted as they are read (collect writes none)
    comparisons = read_data(data, "comparison", cfg.data_format, "rm.data", tokenizer if cfg.data is not None else None,
                            f"rm: reading {data}" if accelerator.is_main_process else None)
    records = comparisons.items
    warn_of_control_tokens(data, comparisons.control_tokens, "records", lambda line: log(f"rm: {line}"))
    seed_everything(config.run.seed)
    with located("rm.model"):
        model = RewardModel.from_causal_lm(backbone, tokenizer)

    # comparisons whose every response fits, and of those the held-out ones, by prompt, for the diagnostics
    max_length = length_cap(model, cfg.max_length, "rm.max_length")
    encoded = []
    for record in tracked(records, f"rm: tokenizing {data}", "comparison", accelerator.is_main_process):
        with located(f"{data}: comparison '{record.id}'"):  # the id a record gives, else the file's name and the record's number
            encoded.append(TokenSequences(encode_comparison(tokenizer, record)))
    fits = [i for i, seqs in enumerate(encoded) if max(seqs.lengths()) <= max_length]
    if not fits:
        raise UserError(f"{data}: no comparison has every response within {max_length} tokens (rm.max_length)")
    too_long = len(records) - len(fits)
    records, encoded = [records[i] for i in fits], [encoded[i] for i in fits]
    held, kept = split_by_prompt(records, cfg.heldout_fraction, config.run.seed)
    heldout = [records[i] for i in held]
    train, encoded = [records[i] for i in kept], [encoded[i] for i in kept]
    with sizes_for_resuming(run.path / "checkpoints", accelerator.num_processes):
        cfg.check_fits(len(train), accelerator.num_processes, str(data), "training comparisons", "rm")
    all_tied = sum(len(set(r.ranks)) == 1 for r in train)
    if all_tied == len(train):
        raise UserError(f"{data}: every training comparison ranks all its responses equal: no pair to learn from")
    # the built-in world, when the comparisons are its own or this run already has it (people ranked its prompts)
    has_world = cfg.data is None or WorldFiles(root / "world").manifest.is_file()
    world = build_world_once(config.world, root / "world", accelerator) if has_world else None
    demos, centred = centring_set(cfg.demonstrations or (world.demonstrations if world else None), tokenizer, train, encoded, max_length,
                                  accelerator.is_main_process)
    set_dropout(model.backbone, cfg.dropout)
    apply_switches(model.backbone, cfg, "rm")
    if cfg.lora.enabled:
        with located("rm.lora.target_modules"):
            model.backbone = add_lora(model.backbone, cfg.lora)  # the head stays fully trainable
    run.start(restart, log)
    run.write_lineage({"backbone": backbone, "comparisons": data})

    setup = prepare_training(accelerator, model, cfg, len(train), config.run.seed, lengths=[max(seqs.lengths()) for seqs in encoded])
    log(f"rm: {len(train)} comparisons ({sum(len(r.responses) for r in train)} responses) from {data}, "
        f"{len(heldout)} held out" + (f", {too_long} with a response longer than {max_length} tokens skipped" if too_long else "")
        + (f", {all_tied} with every response tied (nothing to learn from them)" if all_tied else "")
        + f", {plural(setup.total_steps, 'step')} on {plural(accelerator.num_processes, 'process')}, backbone {backbone}"
        + (f"; LoRA: {trainable_share(model)}" if cfg.lora.enabled else ""))

    def make_batch(indices: list[int]) -> dict:
        k = max(len(encoded[i]) for i in indices)
        sequences = [seq for i in indices for seq in encoded[i]]
        ids, attention = pad_sequences(sequences, tokenizer.pad_token_id, side="right")
        ranks = torch.zeros(len(indices), k, dtype=torch.long)
        valid = torch.zeros(len(indices), k, dtype=torch.long)
        for row, i in enumerate(indices):
            ranks[row, : len(train[i].ranks)] = torch.tensor(train[i].ranks)
            valid[row, : len(train[i].ranks)] = 1
        d = accelerator.device
        n_ranked = sum(len(set(train[i].ranks)) > 1 for i in indices)
        return {"input_ids": ids.to(d), "attention_mask": attention.to(d), "ranks": ranks.to(d), "valid": valid.to(d), "n_targets": n_ranked}

    def loss_fn(model, batch) -> torch.Tensor:
        flat = model(batch["input_ids"], batch["attention_mask"])  # (sum of K,) each response forwarded once
        rewards = torch.zeros(batch["valid"].shape, device=flat.device, dtype=flat.dtype)
        rewards[batch["valid"].bool()] = flat
        return kway_ranking_loss(rewards, batch["ranks"], batch["valid"])[0]

    fit(accelerator=accelerator, setup=setup, tokenizer=tokenizer, make_batch=make_batch, loss_fn=loss_fn, config=cfg, run=run,
        description="rm", log=log)

    if accelerator.is_main_process:
        final = run.path / "final"
        # the weights fit just saved to final/ (a sharded model's forward needs every process: reload them)
        model = RewardModel.from_pretrained(final).to(accelerator.device) if shards_parameters(accelerator) else accelerator.unwrap_model(setup.model)
        demo_rewards = score_sequences(model, demos, tokenizer.pad_token_id, accelerator.device)
        model.reward_bias.fill_(-sum(demo_rewards) / len(demo_rewards))
        log(f"rm: reward bias {float(model.reward_bias):+.3f} centres {centred} on 0")
        write_model(model, tokenizer, final)  # final/ is never half-rewritten
        tasks = {t.id: t for t in load_tasks(world.prompts("rm"))} if world else {}
        diagnostics = diagnose(model, tokenizer, heldout, tasks, accelerator.device)
        diagnostics["reward_bias"] = float(model.reward_bias)
        write_text_atomic(run.path / "diagnostics.json", json.dumps(nan_to_none(diagnostics), indent=2))
        # a figure with nothing to measure (NaN, null in diagnostics.json) is left out, not drawn as NaN
        run.log(setup.total_steps, {f"heldout/{k}": v for k, v in diagnostics.items() if isinstance(v, float) and v == v})
        if not heldout:
            log("rm: no prompt held out (rm.heldout_fraction), so no held-out diagnostics")
        else:
            log(f"rm: held-out accuracy vs {diagnostics['against']} {diagnostics['accuracy']:.3f} ({diagnostics['pairs']} pairs, ties excluded), "
                f"reward~{diagnostics['correlation_with']} r = {figure(diagnostics['gold_correlation'])}, length bias r = {figure(diagnostics['length_bias'])}")
        if "accuracy_by_family" in diagnostics:
            log(f"rm: right vs wrong answers {figure(diagnostics['accuracy_correct_vs_incorrect'])}; by family: "
                + ", ".join(f"{f} {figure(a)}" for f, a in diagnostics["accuracy_by_family"].items()))
            log("rm: by kind of pair (exact answer, right answer in the wrong form or with filler, wrong answer): "
                + ", ".join(f"{kind} {figure(k['accuracy'])} ({k['pairs']})" for kind, k in diagnostics["accuracy_by_pair_kind"].items()))
    run.finish({"model": run.path / "final"})
    log(f"rm: reward model saved to {run.path / 'final'} (RewardModel.from_pretrained)")
    return run.path / "final"


def diagnose(model, tokenizer, heldout: list[ComparisonRecord], tasks: dict[str, Task], device) -> dict:
    """Held-out accuracy against the gold labeler (overall and by gold margin), correlation with
    gold Likert (with the ranks where no Likert is known; ``correlation_with`` says which), and
    length bias. For comparisons of prompts not among ``tasks`` (the built-in world's RM prompts
    by id), the records' own ranks (and Likert scores) are the gold; ``against`` says which. When
    every comparison is of a built-in prompt, also the accuracy on right-vs-wrong pairs, per
    family and per kind of pair."""
    gold_judge = SimulatedLabeler()
    rewards, gold, gold_likert, flat = [], [], [], {"reward": [], "likert": [], "length": []}
    correct, kinds, families = [], [], []  # of the comparisons of the built-in world's prompts
    for record in heldout:
        scores = score_sequences(model, encode_comparison(tokenizer, record), tokenizer.pad_token_id, device)
        task = tasks.get(record.id)
        if task is not None and [m.model_dump() for m in record.prompt] != list(task.messages):
            task = None  # a built-in prompt's id on another prompt: its gold answer is not this one's
        judgements = [gold_judge.judge(task, resp) for resp in record.responses] if task else None
        if judgements:
            correct.append([float(not j.wrong) for j in judgements])
            kinds.append([answer_kind(j) for j in judgements])
            families.append(task.family)
        rewards.append(scores)
        gold.append([j.quality for j in judgements] if judgements else [-float(rank) for rank in record.ranks])
        gold_likert.append([float(j.likert) for j in judgements] if judgements else gold[-1])
        flat["reward"] += scores
        flat["likert"] += [j.likert for j in judgements] if judgements else (record.likert or [-rank for rank in record.ranks])
        flat["length"] += [len(resp) for resp in record.responses]
    accuracy, pairs = pairwise_accuracy(rewards, gold)
    # the same, counting as ties the pairs the gold labeler gives the same 1-7 score (two near-miss wrong answers)
    likert_accuracy, likert_pairs = pairwise_accuracy(rewards, gold_likert)
    by_margin = {f"{lo}-{hi}": pairwise_accuracy(rewards, gold, lo, hi) for lo, hi in ((0, 0.1), (0.1, 0.3), (0.3, 2))}
    by_family = accuracy_by_group(rewards, gold, families)
    every_builtin = bool(heldout) and len(families) == len(heldout)
    against = ("nothing (no prompt held out)" if not heldout else "the gold labeler" if every_builtin
               else "the held-out rankings" if not families else "the gold labeler or the held-out rankings")
    scored = sum(bool(tasks.get(record.id) or record.likert) for record in heldout)  # pairwise data has no Likert: its ranks stand in
    correlation_with = "Likert" if scored == len(heldout) else "rank" if not scored else "Likert or rank"
    return {
        "against": against, "correlation_with": correlation_with, "accuracy": accuracy, "pairs": pairs,
        "accuracy_by_gold_margin": {k: a for k, (a, _) in by_margin.items()}, "pairs_by_gold_margin": {k: n for k, (_, n) in by_margin.items()},
        "accuracy_gold_likert_distinct": likert_accuracy, "pairs_gold_likert_distinct": likert_pairs,
        "gold_correlation": correlation(flat["reward"], [float(x) for x in flat["likert"]]),
        "length_bias": length_bias(flat["reward"], flat["length"], flat["likert"]),
    } | ({
        # does it check answers? pairs of a right answer (in any form) and a wrong or empty one
        "accuracy_correct_vs_incorrect": pairwise_accuracy(rewards, correct)[0],
        "accuracy_by_family": {f: a for f, (a, _) in by_family.items()}, "pairs_by_family": {f: n for f, (_, n) in by_family.items()},
        # which differences it sees: exact vs wrong, exact vs right in the wrong form, ...
        "accuracy_by_pair_kind": accuracy_by_pair_kind(rewards, gold, kinds),
    } if every_builtin else {})


def answer_kind(judgement) -> str:
    """exact (the gold answer, nothing else), wrong (incorrect or not following), or form (right, in the wrong form or with filler)."""
    if judgement.quality == 1.0:
        return "exact"
    return "wrong" if judgement.wrong else "form"
