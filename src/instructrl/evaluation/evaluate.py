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

from instructrl.config import EvalConfig, PipelineConfig
from instructrl.config.schema import DEMONSTRATIONS, GOLD_ANSWERS
from instructrl.data.chat import response_ids
from instructrl.data.inputs import read_prompts
from instructrl.data.jsonl import read_jsonl, write_jsonl
from instructrl.data.packing import pack_documents
from instructrl.errors import UserError, located
from instructrl.evaluation.generate import generate_answers
from instructrl.evaluation.preference import win_rate
from instructrl.evaluation.report import new_prompt_figures, new_prompts_caption, round_folders
from instructrl.models.base import context_length, inference_device, load_answering_model, load_tokenizer
from instructrl.models.reward import RewardModel, score_sequences
from instructrl.rlmath import next_token_nll
from instructrl.rundir.files import write_text_atomic
from instructrl.rundir.locks import releases_on_error
from instructrl.rundir.run import RunDir
from instructrl.world.build import SPLIT_RATIOS, WorldFiles, build_world, demonstration, load_tasks
from instructrl.world.labeler import FLAGS, SimulatedLabeler

SECTIONS = ("run", "world", "eval")


def default_models(config: PipelineConfig, log=print) -> dict[str, str]:
    """This run's finished models, those that exist: base, SFT, and PPO and PPO-ptx of the last
    round (``pipeline.rounds``). A stage begun but not finished (no final/ yet), a model trained from
    an earlier stage's output that no longer exists (a PPO run whose SFT model --restart discarded),
    and one whose inputs have changed since it was trained (a PPO run left over from before its SFT
    model was trained again), are left out, and the log says so."""
    root = Path(config.run.dir)
    last = round_folders(root, config.pipeline.rounds)[-1]
    candidates = {"base": root / "pretrain", "sft": root / "sft", "ppo": last / "ppo", "ppo_ptx": last / "ppo_ptx"}
    models = {}
    for name, stage in candidates.items():
        if not (stage / "final").is_dir():
            if stage.is_dir():
                log(f"eval: {name} ({stage}) left out: it has not finished (no final/ yet)")
            continue
        in_round = config.model_copy(deep=True)  # a round's lineage is recorded relative to its own folder
        in_round.run.dir = stage.parent
        run = RunDir(in_round, stage.name, ())
        missing = run.missing_inputs(root)
        if missing:
            log(f"eval: {name} ({stage}) left out: it was trained from inputs that no longer exist: {', '.join(missing)}")
            continue
        changed = run.changed_inputs()
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
    return judged, judged_results(tasks, judged)


def judged_results(tasks: list, judged: dict[str, list[list]]) -> dict:
    """Per model the summary of its judgements (a list per task) and its win rate against SFT's, overall and per family."""
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
    return results


def seen_in_training(world: WorldFiles, tasks: list) -> list[bool]:
    """Whether each task asks a question that a training split's prompts (sft, rm, ppo) ask too: the same
    family and input (``args``), in whatever phrasing. The world keeps prompt texts disjoint, but its small
    families have few inputs (reverse_word some 65 words), so a held-out prompt often repeats a trained question."""
    def question(family: str, args: dict) -> tuple[str, str]:
        return family, json.dumps(args, sort_keys=True)

    trained = {question(r["family"], r["args"]) for split in SPLIT_RATIOS for _, r in read_jsonl(world.prompts(split))}  # the training splits
    return [question(t.family, t.args) in trained for t in tasks]


def new_prompt_results(tasks: list, judged: dict[str, list[list]], seen: list[bool]) -> dict[str, dict]:
    """Per model its mean Likert and win rate vs SFT on the prompts not ``seen`` in training alone, and how many those are."""
    new = [i for i, s in enumerate(seen) if not s]
    counts = {"prompts": len(new), "seen": len(seen) - len(new)}
    if not new:
        return {name: counts for name in judged}
    results = judged_results([tasks[i] for i in new], {name: [rows[i] for i in new] for name, rows in judged.items()})
    return {name: {**counts, "likert": r["overall"]["likert"], **({"win_rate_vs_sft": r["win_rate_vs_sft"]} if "win_rate_vs_sft" in r else {})}
            for name, r in results.items()}


class RewardJudge:
    """Scores answers with a reward model: each (conversation, answer) is tokenised with the RM's own
    tokenizer, so any policy's answers can be judged, whatever its tokenizer."""

    def __init__(self, path: str):
        self.path = path
        self.tokenizer = load_tokenizer(path, what="reward model")
        self.model = RewardModel.from_pretrained(path).to(inference_device())

    def score(self, conversations: list[list[dict]], answers: list[str]) -> list[float]:
        sequences = [response_ids(self.tokenizer, c, a) for c, a in zip(conversations, answers)]
        longest, context = max(map(len, sequences), default=0), context_length(self.model)
        if longest > context:
            raise UserError(f"eval.reward_model = {self.path}: a prompt and its answer are {longest} tokens, "
                            f"more than the reward model's context ({context}); lower eval.max_new_tokens or drop the longest prompts")
        return score_sequences(self.model, sequences, self.tokenizer.pad_token_id, inference_device())

    def score_rows(self, conversations: list[list[dict]], rows: list[list[str]]) -> list[list[float]]:
        """The rewards of several answers per conversation, row by row."""
        flat = self.score([c for c, row in zip(conversations, rows) for _ in row], [a for row in rows for a in row])
        out, start = [], 0
        for row in rows:
            out.append(flat[start : start + len(row)])
            start += len(row)
        return out


def reward_summary(rewards: dict[str, list[list[float]]]) -> dict[str, dict]:
    """Per model its mean reward over every answer and, beside sft's, its win rate by reward (ties half)."""
    summary = {name: {"mean": sum(map(sum, rows)) / sum(map(len, rows))} for name, rows in rewards.items()}
    if "sft" in rewards:
        for name, rows in rewards.items():
            if name != "sft":
                summary[name]["win_rate_vs_sft"] = win_rate(rows, rewards["sft"])
    return summary


def _eval_prompts(config: PipelineConfig, log) -> tuple[list[str], list[list[dict]], list, Path, list[str]]:
    """The prompts' ids and conversations, the world's tasks behind them (none for your own prompts),
    the prompts' file, and the held-out pretraining text (for the alignment tax; the world's only)."""
    cfg = config.eval
    if cfg.prompts is not None:
        prompts = read_prompts(cfg.prompts, cfg.prompts_format, "eval.prompts", f"eval: reading {cfg.prompts}")[: cfg.n_prompts]
        log(f"eval: {len(prompts)} prompts from {cfg.prompts}, judged by the reward model {cfg.reward_model}")
        return [p.id for p in prompts], [p.messages for p in prompts], [], Path(cfg.prompts), []
    world = build_world(config.world, Path(config.run.dir) / "world")
    tasks = load_tasks(world.prompts("eval"))[: cfg.n_prompts]
    log(f"eval: the built-in world's {len(tasks)} held-out prompts ({world.prompts('eval')}), judged by its gold labeler"
        + (f" and the reward model {cfg.reward_model}" if cfg.reward_model else "")
        + "; to have people judge your own models on your own prompts, use `instructrl label`'s A/B comparisons")
    return [t.id for t in tasks], [list(t.messages) for t in tasks], tasks, world.prompts("eval"), world.heldout_corpus.read_text().splitlines()


@releases_on_error
def check_judge(cfg: EvalConfig) -> None:
    """Refuse your own prompts without a reward model to judge them: the gold labeler knows only the world's.
    The pipeline asks before its first stage, not after every model has trained."""
    if cfg.prompts is not None and cfg.reward_model is None:
        raise UserError("eval.prompts: your own prompts need eval.reward_model to judge the answers "
                        "(the built-in world's gold labeler knows only its own prompts)")


def run_eval(config: PipelineConfig, log=print) -> dict:
    """Answer the evaluation prompts with each model, greedily and sampled, and judge the answers
    (the gold labeler; a reward model with ``eval.reward_model``); writes ``run.dir``/eval and
    returns the results (``results.json``'s ``results``: model name -> figures). ``log`` takes each line it reports."""
    cfg = config.eval
    models = cfg.models or default_models(config, log)
    if not models:
        raise UserError(f"eval: no models given and none found under {config.run.dir}; run pretrain/sft first or set eval.models")
    check_judge(cfg)
    if "sft" not in models:
        log("eval: no model is named 'sft', so there are no win rates or alignment tax (both are measured against SFT)")
    tokenizers = {}
    for name, path in models.items():  # a missing model fails now, not after the others answered
        with located(f"eval.models.{name}"):
            tokenizers[name] = load_tokenizer(path)
    with located("eval.reward_model"):
        reward_judge = RewardJudge(cfg.reward_model) if cfg.reward_model else None
    ids, conversations, tasks, prompts_file, heldout = _eval_prompts(config, log)
    answers, sampled, losses = {}, {}, {}
    if tasks:
        answers[DEMONSTRATIONS] = [demonstration(config.world, t) for t in tasks]
    for name, path in models.items():
        log(f"eval: answering {len(conversations)} prompts with {name} ({path})")
        tokenizer = tokenizers[name]
        with located(f"eval.models.{name}"):
            model = load_answering_model(path, tokenizer=tokenizer)
        answers[name] = generate_answers(model, tokenizer, conversations, cfg.max_new_tokens, cfg.batch_size, key="eval.max_new_tokens")
        if cfg.temperature is not None:
            torch.manual_seed(config.run.seed)  # every model draws its samples from the same seed
            sampled[name] = generate_answers(model, tokenizer, conversations, cfg.max_new_tokens, cfg.batch_size,
                                             num_samples=cfg.samples, temperature=cfg.temperature, key="eval.max_new_tokens")
        if heldout:
            losses[name] = pretraining_loss(model, tokenizer, heldout)
    if tasks:
        answers[GOLD_ANSWERS] = [t.answer for t in tasks]
        for name in (DEMONSTRATIONS, GOLD_ANSWERS):  # one written answer per prompt, met by every sample
            sampled[name] = [[a] * cfg.samples for a in answers[name]]
        judge = SimulatedLabeler()
        judged, results = judge_answers(tasks, {name: [[a] for a in texts] for name, texts in answers.items()}, judge)
        seen = seen_in_training(WorldFiles(Path(config.run.dir) / "world"), tasks)
        for name, r in new_prompt_results(tasks, judged, seen).items():
            results[name]["new_prompts"] = r
        if cfg.temperature is not None:
            sampled_judged, sampled_results = judge_answers(tasks, sampled, judge)
            new_sampled = new_prompt_results(tasks, sampled_judged, seen)
            for name, r in sampled_results.items():
                results[name]["sampled"] = {"temperature": cfg.temperature, "samples": cfg.samples, **r, "new_prompts": new_sampled[name]}
    else:
        judged, results, seen = {}, {name: {} for name in answers}, []
        if cfg.temperature is not None:
            for r in results.values():
                r["sampled"] = {"temperature": cfg.temperature, "samples": cfg.samples}
    rewards, sampled_rewards = {}, {}
    if reward_judge is not None:
        log(f"eval: scoring every answer with the reward model {cfg.reward_model}")
        rewards = {name: reward_judge.score_rows(conversations, [[a] for a in texts]) for name, texts in answers.items()}
        for name, summary in reward_summary(rewards).items():
            results[name]["reward"] = summary
        if cfg.temperature is not None:
            # the demonstrations' and gold answers' rows repeat their one written answer: scored once, above
            sampled_rewards = {name: [[r] * cfg.samples for [r] in rewards[name]] if name in (DEMONSTRATIONS, GOLD_ANSWERS)
                               else reward_judge.score_rows(conversations, rows) for name, rows in sampled.items()}
            for name, summary in reward_summary(sampled_rewards).items():
                results[name]["sampled"]["reward"] = summary
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
    run.record_start()

    def answer_record(name: str, i: int) -> dict:
        record = {"answer": answers[name][i]}
        if name in judged:
            record["likert"] = judged[name][i][0].likert
        if name in rewards:
            record["reward"] = rewards[name][i][0]
        if cfg.temperature is not None and name != DEMONSTRATIONS:
            record["sampled"] = sampled[name][i]
            if name in sampled_rewards:
                record["sampled_rewards"] = sampled_rewards[name][i]
        return record

    write_jsonl(run.path / "samples.jsonl", (
        {"id": ids[i], **({"family": tasks[i].family} if tasks else {}), "messages": conversation,
         **({"gold": tasks[i].answer, "seen_in_training": seen[i]} if tasks else {}),
         **{name: answer_record(name, i) for name in answers if name != GOLD_ANSWERS}}
        for i, conversation in enumerate(conversations)
    ))
    # a folder as an absolute path (results.json is read from anywhere), a hub name as given
    where = {name: str(Path(path).resolve()) if Path(path).exists() else path for name, path in models.items()}
    write_text_atomic(run.path / "results.json", json.dumps(
        {"models": where, "prompts": str(prompts_file), "reward_model": cfg.reward_model, "n_prompts": len(conversations), "results": results}, indent=2))
    run.write_lineage({f"model:{name}": path for name, path in models.items()} | {"prompts": prompts_file}
                      | ({"reward_model": cfg.reward_model} if cfg.reward_model else {}))
    run.finish({"results": run.path / "results.json"})
    return results


def results_table(results: dict):
    """A rich table: mean gold Likert per family (rows) and model (columns), flags below; then the sampled answers."""
    from rich import box
    from rich.table import Table

    names = list(results)
    if "overall" not in results[names[0]]:
        return _reward_table(results)
    sampled = all("sampled" in results[n] for n in names)
    title = "Mean gold Likert (1-7) on held-out prompts, flags (share of answers), win rate vs SFT (ties half) [95% interval]"
    if sampled:
        first = results[names[0]]["sampled"]
        title += f"; greedy answers, then {first['samples']} per prompt sampled at T={first['temperature']:g}"
    # light borders and short row labels: the six columns of a pipeline fit an 80-column terminal
    table = Table(title=title, caption=new_prompts_caption(results), caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
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
        table.add_row("pretrain loss", *(f"{results[n]['pretraining_loss']:.2f}" if "pretraining_loss" in results[n] else "" for n in names))
    _reward_rows(table, [results[n] for n in names])
    _new_prompt_rows(table, [results[n] for n in names])
    table.rows[-1].end_section = True
    if sampled:
        table.add_row("[bold]sampled", *("" for _ in names))
        table.add_row("[bold]Likert", *(f"[bold]{results[n]['sampled']['overall']['likert']:.2f}" for n in names))
        for flag in ("incorrect", "verbose"):
            table.add_row(flag, *(f"{results[n]['sampled']['overall']['flags'][flag]:.0%}" for n in names))
        table.add_row("[bold]wins vs SFT", *(_win_cell(results[n]["sampled"].get("win_rate_vs_sft")) for n in names))
        _reward_rows(table, [results[n]["sampled"] for n in names])
        _new_prompt_rows(table, [results[n]["sampled"] for n in names])
    return table


def _new_prompt_rows(table, results: list[dict]) -> None:
    """Likert and win rate vs SFT on the prompts whose question no training prompt asks (eval's ``new_prompts``)."""
    if new := new_prompt_figures(results):
        table.add_row("new: Likert", *(f"{n['likert']:.2f}" for n in new))
        table.add_row("new: wins", *(_win_cell(n.get("win_rate_vs_sft")) for n in new))


def _reward_rows(table, results: list[dict]) -> None:
    """The reward model's mean reward and win rate vs SFT, when it judged (eval.reward_model)."""
    if any("reward" in r for r in results):
        table.add_row("RM reward", *(f"{r['reward']['mean']:.2f}" for r in results))
        table.add_row("RM wins", *(_win_cell(r["reward"].get("win_rate_vs_sft")) for r in results))


def _reward_table(results: dict):
    """Your own prompts (eval.prompts): each model's mean reward and win rate vs SFT by reward, greedy then sampled."""
    from rich import box
    from rich.table import Table

    names = list(results)
    table = Table(title="Judged by the reward model: win rates ties half [95% interval]",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("greedy", min_width=15)
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    _reward_rows(table, [results[n] for n in names])
    if all("sampled" in results[n] for n in names):
        first = results[names[0]]["sampled"]
        table.rows[-1].end_section = True
        table.add_row(f"[bold]{first['samples']} sampled, T={first['temperature']:g}", *("" for _ in names))
        _reward_rows(table, [results[n]["sampled"] for n in names])
    return table


def _win_cell(w: dict | None) -> str:
    return "" if w is None else f"{w['win_rate']:.0%}\n[{w['ci95'][0] * 100:.0f}-{w['ci95'][1] * 100:.0f}]"
