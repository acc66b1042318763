"""``instructrl eval``: answer held-out prompts with each model and let the gold labeler judge.

Two answer sets that no model wrote are judged beside the models:

- the demonstrator's answers to the same prompts: the level SFT imitates, and the level RLHF
  should rise above;
- the gold answers themselves: their win rate against SFT is the ceiling of every model's,
  since a perfect answer only ties with SFT's answers that are perfect too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.packing import pack_documents
from instructrl.data.jsonl import write_jsonl
from instructrl.errors import UserError
from instructrl.evaluation.generate import generate_answers
from instructrl.evaluation.preference import win_rate
from instructrl.evaluation.report import GOLD_ANSWERS, round_folders
from instructrl.models.base import load_answering_model, load_tokenizer
from instructrl.rlmath import next_token_nll
from instructrl.rundir import RunDir, write_text_atomic
from instructrl.world.build import build_world, demonstration, load_tasks
from instructrl.world.labeler import FLAGS, SimulatedLabeler

SECTIONS = ("run", "world", "eval")
DEMONSTRATIONS = "demonstrations"


def default_models(config: PipelineConfig, log=print) -> dict[str, str]:
    """This run's finished models, those that exist: base, SFT, and PPO and PPO-ptx of the last
    round (``pipeline.rounds``). A model whose inputs have changed since it was trained (a PPO run
    left over from before its SFT model was trained again) is left out, and the log says so."""
    root = Path(config.run.dir)
    last = round_folders(root, config.pipeline.rounds)[-1]
    candidates = {"base": root / "pretrain", "sft": root / "sft", "ppo": last / "ppo", "ppo_ptx": last / "ppo_ptx"}
    models = {}
    for name, stage in candidates.items():
        if not (stage / "final").is_dir():
            continue
        in_round = config.model_copy(deep=True)  # a round's lineage is recorded relative to its own folder
        in_round.run.dir = stage.parent
        changed = RunDir(in_round, stage.name, ()).changed_inputs()
        if changed:
            log(f"eval: {name} ({stage}) left out: it was trained on inputs that have changed since: {', '.join(changed)}")
            continue
        models[name] = str(stage / "final")
    return models


@torch.no_grad()
def pretraining_loss(model, tokenizer, documents: list[str], block_size: int = 128, batch_size: int = 32) -> float:
    """Mean next-token NLL (nats per token) on held-out pretraining text: the alignment tax's measure (§4.2)."""
    model.eval()
    blocks = pack_documents(tokenizer, documents, block_size).to(next(model.parameters()).device)
    total, count = 0.0, 0.0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        nll, n = next_token_nll(model(input_ids=ids).logits, ids, torch.ones_like(ids))
        total, count = total + nll.item(), count + n.item()
    return total / max(count, 1.0)


def summarize(judged: list[tuple[str, object]]) -> dict:
    """Mean Likert and flag rates, overall and per family, of (family, Judgement) pairs."""
    by_family = defaultdict(list)
    for family, judgement in judged:
        by_family[family].append(judgement)

    def stats(items):
        return {
            "n": len(items),
            "likert": sum(j.likert for j in items) / len(items),
            "flags": {flag: sum(flag in j.flags for j in items) / len(items) for flag in FLAGS},
        }

    return {"overall": stats([j for _, j in judged]), "families": {f: stats(v) for f, v in sorted(by_family.items())}}


def judge_answers(tasks: list, answers: dict[str, list[list[str]]], judge) -> tuple[dict, dict]:
    """Judge each model's answers (a list per prompt, as many per prompt for every model): the
    judgements, and per model its summary and win rate against SFT on the same prompts (ties half),
    overall and per family."""
    judged = {name: [[judge.judge(t, a) for a in row] for t, row in zip(tasks, rows)] for name, rows in answers.items()}
    results = {name: summarize([(t.family, j) for t, row in zip(tasks, js) for j in row]) for name, js in judged.items()}
    if "sft" in judged:
        quality = {name: [[j.quality for j in row] for row in js] for name, js in judged.items()}
        by_family = defaultdict(list)
        for i, t in enumerate(tasks):
            by_family[t.family].append(i)
        for name in judged:
            if name != "sft":
                results[name]["win_rate_vs_sft"] = win_rate(quality[name], quality["sft"])
                for family, idx in by_family.items():
                    results[name]["families"][family]["win_rate_vs_sft"] = win_rate(
                        [quality[name][i] for i in idx], [quality["sft"][i] for i in idx])
    return judged, results


def run_eval(config: PipelineConfig, log=print) -> dict:
    cfg = config.eval
    models = cfg.models or default_models(config, log)
    if not models:
        raise UserError(f"eval: no models given and none found under {config.run.dir}; run pretrain/sft first or set eval.models")
    if "sft" not in models:
        log("eval: no model is named 'sft', so there are no win rates or alignment tax (both are measured against SFT)")
    tokenizers = {name: load_tokenizer(path) for name, path in models.items()}  # a missing model fails now, not after the others answered
    world = build_world(config.world, Path(config.run.dir) / "world")
    tasks = load_tasks(world.prompts("eval"))[: cfg.n_prompts]
    judge = SimulatedLabeler()
    log(f"eval: the built-in world's {len(tasks)} held-out prompts ({world.prompts('eval')}), judged by its gold labeler; "
        "to have people judge your own models on your own prompts, use `instructrl label`'s A/B comparisons")
    answers = {DEMONSTRATIONS: [demonstration(config.world, t) for t in tasks]}
    heldout = world.heldout_corpus.read_text().splitlines()
    sampled = {}
    conversations = [list(t.messages) for t in tasks]
    losses = {}
    for name, path in models.items():
        log(f"eval: answering {len(tasks)} held-out prompts with {name} ({path})")
        tokenizer = tokenizers[name]
        model = load_answering_model(path, tokenizer=tokenizer)
        answers[name] = generate_answers(model, tokenizer, conversations, cfg.max_new_tokens, cfg.batch_size, key="eval.max_new_tokens")
        if cfg.temperature is not None:
            torch.manual_seed(config.run.seed)  # every model draws its samples from the same seed
            sampled[name] = generate_answers(model, tokenizer, conversations, cfg.max_new_tokens, cfg.batch_size,
                                             num_samples=cfg.samples, temperature=cfg.temperature, key="eval.max_new_tokens")
        if heldout:
            losses[name] = pretraining_loss(model, tokenizer, heldout)
    answers[GOLD_ANSWERS] = [t.answer for t in tasks]
    for name in (DEMONSTRATIONS, GOLD_ANSWERS):  # one written answer per prompt, met by every sample
        sampled[name] = [[a] * cfg.samples for a in answers[name]]
    judged, results = judge_answers(tasks, {name: [[a] for a in texts] for name, texts in answers.items()}, judge)
    if cfg.temperature is not None:
        for name, r in judge_answers(tasks, sampled, judge)[1].items():
            results[name]["sampled"] = {"temperature": cfg.temperature, "samples": cfg.samples, **r}
    # alignment tax: loss on held-out pretraining text, and its rise over SFT
    # per token, so only where the tokenizer is SFT's: another one cuts the same text into other tokens
    other_tokens = [name for name in losses if "sft" in losses and tokenizers[name].get_vocab() != tokenizers["sft"].get_vocab()]
    if other_tokens:
        log(f"eval: {', '.join(other_tokens)} tokenize(s) text differently from sft: held-out pretraining loss is per token, "
            "so no alignment tax is given for them")
    for name, loss in losses.items():
        results[name]["pretraining_loss"] = loss
        if "sft" in losses and name not in other_tokens:
            results[name]["alignment_tax"] = loss - losses["sft"]
    # an evaluation holds no checkpoint: the new one replaces the old, once every model has answered
    # (a model that cannot be loaded, or Ctrl-C, leaves the last results as they were)
    run = RunDir(config, "eval", SECTIONS)
    run.start(restart=True)
    write_jsonl(run.path / "samples.jsonl", (
        {"id": t.id, "family": t.family, "messages": list(t.messages), "gold": t.answer,
         **{name: {"answer": answers[name][i], "likert": judged[name][i][0].likert}
            | ({"sampled": sampled[name][i]} if cfg.temperature is not None and name != DEMONSTRATIONS else {})
            for name in answers if name != GOLD_ANSWERS}}
        for i, t in enumerate(tasks)
    ))
    # a folder as an absolute path (results.json is read from anywhere), a hub name as given
    where = {name: str(Path(path).resolve()) if Path(path).exists() else path for name, path in models.items()}
    write_text_atomic(run.path / "results.json", json.dumps({"models": where, "n_prompts": len(tasks), "results": results}, indent=2))
    run.write_lineage({f"model:{name}": path for name, path in models.items()} | {"prompts": world.prompts("eval")})
    run.finish({"results": run.path / "results.json"})
    return results


def results_table(results: dict):
    """A rich table: mean gold Likert per family (rows) and model (columns), flags below; then the sampled answers."""
    from rich import box
    from rich.table import Table

    names = list(results)
    sampled = all("sampled" in results[n] for n in names)
    title = "Mean gold Likert (1-7) on held-out prompts, flags (share of answers), win rate vs SFT (ties half) [95% interval]"
    if sampled:
        first = results[names[0]]["sampled"]
        title += f"; greedy answers, then {first['samples']} per prompt sampled at T={first['temperature']:g}"
    # light borders and short row labels: the six columns of a pipeline fit an 80-column terminal
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("greedy", overflow="fold", min_width=15)
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for family in results[names[0]]["families"]:
        table.add_row(family, *(f"{results[n]['families'][family]['likert']:.2f}" for n in names))
    table.add_row("[bold]Likert", *(f"[bold]{results[n]['overall']['likert']:.2f}" for n in names))
    for flag in FLAGS:
        table.add_row(flag, *(f"{results[n]['overall']['flags'][flag]:.0%}" for n in names))
    if any("win_rate_vs_sft" in results[n] for n in names):
        table.add_row("[bold]wins vs SFT", *(_win_cell(results[n].get("win_rate_vs_sft")) for n in names))
    if any("pretraining_loss" in results[n] for n in names):
        table.add_row("pretrain loss", *(f"{results[n]['pretraining_loss']:.2f}" if "pretraining_loss" in results[n] else "" for n in names),
                      end_section=True)
    if sampled:
        table.add_row("[bold]sampled", *("" for _ in names))
        table.add_row("[bold]Likert", *(f"[bold]{results[n]['sampled']['overall']['likert']:.2f}" for n in names))
        for flag in ("incorrect", "verbose"):
            table.add_row(flag, *(f"{results[n]['sampled']['overall']['flags'][flag]:.0%}" for n in names))
        table.add_row("[bold]wins vs SFT", *(_win_cell(results[n]["sampled"].get("win_rate_vs_sft")) for n in names))
    return table


def _win_cell(w: dict | None) -> str:
    return "" if w is None else f"{w['win_rate']:.0%}\n[{w['ci95'][0] * 100:.0f}-{w['ci95'][1] * 100:.0f}]"
