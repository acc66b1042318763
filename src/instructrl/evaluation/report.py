"""The run's report: one self-contained HTML page (plots embedded) from what the stages wrote.

Reads eval/results.json and samples.jsonl, rm/diagnostics.json, and the PPO runs' metrics.jsonl.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from instructrl.config.schema import GOLD_ANSWERS
from instructrl.data.jsonl import complete_lines
from instructrl.evaluation.rm_diagnostics import figure
from instructrl.rundir.files import write_text_atomic

PPO_STAGES = ("ppo", "ppo_ptx")
SMOOTHING = 8  # iterations in the over-optimisation curves' running mean
SAMPLES_SHOWN = 12  # prompts whose answers the report shows side by side: enough to see the models differ, few enough to read


def _figure_tag(fig, caption: str) -> str:
    """The figure as an embedded PNG, with ``caption`` below it (and as its alt text)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    image = f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="{html.escape(caption)}">'
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def round_folders(root: Path, rounds: int) -> list[Path]:
    """Each pipeline round's folder: the run folder, then round2/, ... (not those of an earlier run of more rounds)."""
    return [root] + [root / f"round{r}" for r in range(2, rounds + 1)]


def _ppo_metrics(root: Path, rounds: int = 1) -> dict[str, list[dict]]:
    """Each PPO run's metrics, later pipeline rounds (round2/, ...) appended. A later round counts on
    from the previous one's episodes; one that counted from 0 again (written before ppo.first_iteration) is offset."""
    found = {}
    for stage in PPO_STAGES:
        rows: list[dict] = []
        for folder in round_folders(root, rounds):
            path = folder / stage / "metrics.jsonl"
            records = [record for _, record in complete_lines(path)] if path.is_file() else []
            offset = rows[-1]["episodes"] if rows and records and records[0]["episodes"] <= rows[-1]["episodes"] else 0
            rows += [{**record, "episodes": record["episodes"] + offset} for record in records]
        if rows:
            found[stage] = rows
    return found


def _likert_plot(results: dict):
    import matplotlib.pyplot as plt

    names = [n for n in results if n != GOLD_ANSWERS]  # 7 everywhere
    families = list(results[names[0]]["families"])
    fig, ax = plt.subplots(figsize=(10, 3.8), layout="constrained")
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [results[name]["families"][f]["likert"] for f in families] + [results[name]["overall"]["likert"]]
        ax.bar([i + k * width for i in range(len(families) + 1)], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(families) + 1)], families + ["OVERALL"], rotation=30, ha="right")
    ax.set_xlabel("instruction family")
    ax.set_ylabel("mean gold Likert (1-7)")
    ax.set_ylim(1, 7)
    ax.legend(ncols=len(names), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above the bars, never on them
    return fig


def _running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value with up to ``window - 1`` before it: a noisy per-iteration curve, smoothed in training order."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _overoptimisation_plot(metrics: dict[str, list[dict]]):
    """Proxy (RM) and gold score against √KL to SFT along training (Gao et al. 2022): a dot per
    iteration, and a line of their running mean over ``SMOOTHING`` iterations in training order."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for stage, rows in metrics.items():
        for ax, key in zip(axes, ("rollout/score", "rollout/gold_likert")):
            points = [(r["rollout/sqrt_kl"], r[key]) for r in rows if key in r]
            if not points:
                continue
            x, y = zip(*points)
            dots, = ax.plot(x, y, "o", ms=3, alpha=0.35)
            ax.plot(_running_mean(x, SMOOTHING), _running_mean(y, SMOOTHING), "-", lw=2, color=dots.get_color(), label=stage)
    axes[0].set_title("proxy: the reward model's score", fontsize=10)
    axes[0].set_ylabel("mean RM score of the batch")
    axes[1].set_title("gold: the gold labeler's judgement", fontsize=10)
    axes[1].set_ylabel("mean gold Likert of the batch (1-7)")
    for ax in axes:
        ax.set_xlabel("√KL(π ‖ π_SFT), KL in nats per response")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # PPO on a user's own prompts: no gold labeler judged them
            ax.text(0.5, 0.5, "no gold scores: these prompts have no gold answers", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    return fig


def _training_plot(metrics: dict[str, list[dict]]):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    keys = [("rollout/kl", "KL to SFT (nats per response)"), ("rollout/entropy", "entropy (nats per token)"),
            ("rollout/length", "response length (tokens)"), ("rollout/eos_rate", "responses ending in EOS")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), layout="constrained")
    for ax, (key, label) in zip(axes, keys):
        for stage, rows in metrics.items():
            ax.plot([r["episodes"] for r in rows], [r[key] for r in rows], label=stage)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("episodes")
    axes[3].yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    axes[3].set_ylim(-0.02, 1.02)  # the whole range: 98% and 100% are both "nearly all"
    axes[0].legend(fontsize=8)
    return fig


def _table(header: list[str], rows: list[list[str]], caption: str = "") -> str:
    """A table of ``rows`` of HTML cells under escaped ``header``s, with ``caption`` (HTML) below it."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    caption = f"<caption>{caption}</caption>" if caption else ""
    return f"<div class='scroll'><table>{caption}<tr>{head}</tr>{body}</table></div>"


def _win_text(w: dict) -> str:
    return f"{w['win_rate']:.1%} [{w['ci95'][0]:.1%}, {w['ci95'][1]:.1%}]"


def _win_cell(w: dict | None, unit: str = "") -> str:
    """A table's win rate vs SFT with its interval and the prompts it is over; empty where there is none (SFT's own)."""
    return f"{_win_text(w)} (n={w['n']}{unit})" if w else ""


def _pays_tax(r: dict, name: str) -> bool:
    """Whether a model's alignment tax is shown: only a model trained from SFT pays one (the base model comes before it)."""
    return "alignment_tax" in r and name not in ("sft", "base")


def _loss_text(r: dict, name: str) -> str:
    """Held-out pretraining loss, and for a model trained from SFT its rise over SFT's loss: the alignment tax."""
    if _pays_tax(r, name):
        return f"alignment tax {r['alignment_tax']:+.3f} nats (held-out pretraining loss {r['pretraining_loss']:.3f} over SFT's)"
    return f"held-out pretraining loss {r['pretraining_loss']:.3f} nats"


def headline(results: dict) -> list[str]:
    """The figures the pipeline prints at the end."""
    lines = []
    for name, r in results.items():
        if name == GOLD_ANSWERS:
            if "win_rate_vs_sft" in r:
                line = f"{name} (the gold answer to every prompt): wins vs SFT {_win_text(r['win_rate_vs_sft'])}"
                if "win_rate_vs_sft" in r.get("sampled", {}):
                    line += f", vs SFT's samples {_win_text(r['sampled']['win_rate_vs_sft'])}"
                lines.append(f"{line}: no model can win more often")
            continue
        line = f"{name}: {_judged_text(r)}"
        if "pretraining_loss" in r:
            line += f", {_loss_text(r, name)}"
        if "sampled" in r and name != "demonstrations":
            line += f"; sampled at T={r['sampled']['temperature']:g}: {_judged_text(r['sampled'])}"
        lines.append(line)
    return lines


def new_prompts_caption(results: dict) -> str | None:
    """What "new" means in the tables' new-prompt figures: how many eval prompts ask a question no training prompt asks;
    None where eval did not tell them apart (your own prompts)."""
    counts = next(iter(results.values())).get("new_prompts")
    if counts is None:
        return None
    total = counts["prompts"] + counts["seen"]
    if not counts["prompts"]:
        return f"each of the {total} prompts asks a question a training prompt asks, in other words: none is new"
    return f"new: the {counts['prompts']} of {total} prompts whose question no training prompt asks ({counts['seen']} ask one in other words)"


def new_prompt_figures(results: list[dict]) -> list[dict] | None:
    """Each model's figures on the prompts whose question no training prompt asks (eval's ``new_prompts``: likert,
    win_rate_vs_sft), or None where there are none: your own prompts, or none of them new."""
    new = [r.get("new_prompts") or {} for r in results]
    return new if all("likert" in n for n in new) else None


def _judged_text(r: dict) -> str:
    """Likert and win rate by the gold labeler, and mean reward and win rate by the reward model, those judged."""
    parts = []
    if "overall" in r:
        parts.append(f"Likert {r['overall']['likert']:.2f}" + (f", wins vs SFT {_win_text(r['win_rate_vs_sft'])}" if "win_rate_vs_sft" in r else ""))
    if "reward" in r:
        w = r["reward"].get("win_rate_vs_sft")
        parts.append(f"RM reward {r['reward']['mean']:.2f}" + (f", RM wins vs SFT {_win_text(w)}" if w else ""))
    return ", ".join(parts)


HOW_TO_READ = (
    "<p><b>How to read this.</b> The gold labeler scores every answer 1-7 (Likert) and flags its faults; "
    "<i>mean Likert</i> is over the held-out prompts. <i>Win rate vs SFT</i>: on each prompt the model's answer is "
    "compared with SFT's; a better one counts 1, an equally good one (a tie) counts half, a worse one 0, and the win "
    "rate is the mean over prompts, so a model that answers as SFT does scores 50%. The brackets are its 95% interval "
    "over prompts: the normal approximation with two wins and two losses added (Agresti-Coull), so a family of a "
    "few prompts gets a wide interval, not a point. <i>Alignment tax</i>: the model's loss on held-out pretraining "
    "text (mean nats per token) minus SFT's; positive means it predicts pretraining text worse than SFT does "
    "(InstructGPT &sect;4.2; PPO-ptx mixes pretraining gradients in to pay less of it).</p>")


NEW_HEADER = ["new: mean Likert", "new: win rate vs SFT"]
NEW_WHY = (". The world's small families have few inputs (some 65 words to reverse), so a prompt that asks a trained question "
           "in other words measures recall as much as generalisation.")


def _new_columns(results: list[dict], unit: str = "") -> tuple[list[str], list[list[str]]]:
    """The header of the columns of figures on the prompts whose question no training prompt asks, and each model's
    cells (Likert, win rate vs SFT); no columns where there are no such figures."""
    new = new_prompt_figures(results)
    if new is None:
        return [], [[] for _ in results]
    return NEW_HEADER, [[f"{n['likert']:.2f}", _win_cell(n.get("win_rate_vs_sft"), unit)] for n in new]


def _family_table(results: dict, sampled: bool = False) -> str:
    """Per family (rows) and model (columns): mean Likert, and below it the win rate vs SFT with its interval."""
    results = {n: r["sampled"] if sampled else r for n, r in results.items() if n != GOLD_ANSWERS}
    names = list(results)

    def cell(r: dict, w: dict | None) -> str:
        return f"{r['likert']:.2f}" + (f"<br><small>{_win_text(w)}</small>" if w else "")

    rows = []
    for family in results[names[0]]["families"]:
        per_model = [results[n]["families"][family] for n in names]
        rows.append([html.escape(family), str(per_model[0]["n"])] + [cell(r, r.get("win_rate_vs_sft")) for r in per_model])
    overall = [results[n]["overall"] for n in names]
    rows.append(["<b>overall</b>", str(overall[0]["n"])] + [cell(r, results[n].get("win_rate_vs_sft")) for n, r in zip(names, overall)])
    return _table(["family", "answers"] + names, rows)


def _eval_section(evaluation: dict) -> list[str]:
    """The held-out prompts: each model's Likert, win rate, loss and flags, greedy then sampled, then per family."""
    results = evaluation["results"]
    parts = [f"<h2>Held-out prompts, judged by the gold labeler</h2><p>{evaluation['n_prompts']} held-out prompts, greedy answers.</p>"]
    caption = html.escape(new_prompts_caption(results) or "")
    new_header, new_cells = _new_columns(list(results.values()))
    rows = []
    for (name, r), new in zip(results.items(), new_cells):
        rows.append([html.escape(name), f"{r['overall']['likert']:.2f}", _win_cell(r.get("win_rate_vs_sft")), *new,
                     f"{r['pretraining_loss']:.3f}" if "pretraining_loss" in r else "",
                     f"{r['alignment_tax']:+.3f}" if _pays_tax(r, name) else "",
                     ", ".join(f"{html.escape(k)} {v:.0%}" for k, v in r["overall"]["flags"].items())])
    parts.append(_table(["model", "mean Likert (1-7)", "win rate vs SFT, ties half (95% interval)", *new_header,
                         "held-out pretraining loss (nats/token)", "loss − SFT's: the alignment tax", "flags (share of answers)"], rows,
                        caption + NEW_WHY if caption else ""))
    parts.append(HOW_TO_READ)
    if GOLD_ANSWERS in results:
        parts.append(f"<p><b>The ceiling.</b> {GOLD_ANSWERS}: the gold answer to every prompt. It ties with SFT's perfect answers and beats "
                     "the rest, so its win rate against SFT is the most any model can reach (50% would mean SFT is always perfect). "
                     "<i>demonstrations</i>: the demonstrator's answers to the same prompts, the level SFT imitates.</p>")
    sampled = all("sampled" in r for r in results.values())
    if sampled:
        first = next(iter(results.values()))["sampled"]
        parts.append(f"<p>Greedy answers above. Below, {first['samples']} answers per prompt sampled at temperature "
                     f"{first['temperature']:g}, the distribution PPO optimises (the demonstrations and gold answers are one per prompt, "
                     "met by every sample; the interval is over prompts).</p>")
        new_header, new_cells = _new_columns([r["sampled"] for r in results.values()], " prompts")
        rows = []
        for (name, r), new in zip(results.items(), new_cells):
            rows.append([html.escape(name), f"{r['sampled']['overall']['likert']:.2f}", _win_cell(r["sampled"].get("win_rate_vs_sft"), " prompts"),
                         *new,
                         ", ".join(f"{html.escape(k)} {v:.0%}" for k, v in r["sampled"]["overall"]["flags"].items())])
        parts.append(_table(["model", "mean Likert (sampled)", "win rate vs SFT, ties half (95% interval)", *new_header,
                             "flags (share of answers)"], rows, caption))
    parts.append(_figure_tag(_likert_plot(results), "Mean gold Likert (1-7) of the greedy answers, per instruction family and model "
                                                    "(the gold answers, 7 everywhere, left out)."))
    parts.append("<h3>Per instruction family</h3><p>Mean Likert of the greedy answers and, below it, the win rate vs SFT "
                 "with its 95% interval: families with few prompts have wide intervals.</p>")
    parts.append(_family_table(results))
    if sampled:
        parts.append("<p>The same for the sampled answers.</p>")
        parts.append(_family_table(results, sampled=True))
    return parts


def _reward_section(evaluation: dict) -> list[str]:
    """Each model's mean reward and win rate vs SFT by the reward model eval.reward_model, greedy and sampled, when it judged."""
    results = evaluation["results"]
    if not any("reward" in r for r in results.values()):
        return []
    rows = []
    for name, r in results.items():
        row = [html.escape(name)]
        for judged in (r, r.get("sampled", {})):
            w = judged.get("reward", {}).get("win_rate_vs_sft")
            row += [f"{judged['reward']['mean']:.3f}" if "reward" in judged else "", _win_cell(w)]
        rows.append(row)
    return [f"<h2>Judged by the reward model</h2><p>{evaluation['n_prompts']} prompts from <code>{html.escape(evaluation.get('prompts', ''))}</code>, "
            f"every answer scored by <code>{html.escape(str(evaluation['reward_model']))}</code>. A reward model is a proxy for people's "
            "judgement, and PPO was trained to please this run's own: judged by it, PPO's models look better than people would find them.</p>",
            _table(["model", "mean reward (greedy)", "win rate vs SFT by reward", "mean reward (sampled)", "win rate vs SFT by reward (sampled)"], rows)]


def _rm_section(d: dict, by_round: dict[int, dict] | None = None) -> list[str]:
    """The reward model's held-out diagnostics (rm/diagnostics.json): accuracy overall, by margin, family and kind of pair;
    with ``by_round`` (each pipeline round's, the last one's as ``d``), each round's accuracy first."""
    margin_pairs = d.get("pairs_by_gold_margin", {})
    parts = ["<h2>Reward model</h2>"]
    if by_round and len(by_round) > 1:
        parts.append(f"<p>Each round's RM, held-out accuracy against {html.escape(d['against'])}: "
                     + ", ".join(f"round {r} {figure(x['accuracy'])} ({x['pairs']} pairs)" for r, x in by_round.items())
                     + f". Below, round {max(by_round)}'s, whose rewards the last PPO round optimised.</p>")
    parts.append(f"<p>On the held-out comparisons (a share of the collected prompts the RM never trained on), against "
                 f"{html.escape(d['against'])}. Accuracy: the share of response pairs the RM orders as the gold judge does; "
                 "pairs the gold judge ties are left out. Margin: the gap in gold quality (0-1) between the two responses. "
                 "Length bias: the correlation of reward with response length in characters among responses of equal gold "
                 "Likert (near 0 is healthy; positive, the RM pays for length).</p>")
    parts.append(_table(["held-out accuracy vs gold", "by gold margin (pairs)", f"reward ~ gold {html.escape(d['correlation_with'])} r", "length bias r"], [[
        f"{figure(d['accuracy']) if d['accuracy'] is None else format(d['accuracy'], '.3f')} ({d['pairs']} pairs)",  # as the rm log
        ", ".join(f"{html.escape(k)}: {figure(v)}" + (f" ({margin_pairs[k]})" if k in margin_pairs else "")
                  for k, v in d["accuracy_by_gold_margin"].items()),
        figure(d["gold_correlation"]), figure(d["length_bias"])]]))
    if d.get("accuracy_by_family"):
        family_pairs = d.get("pairs_by_family", {})
        parts.append(f"<p>Right vs wrong answers (does it check answers?): {figure(d['accuracy_correct_vs_incorrect'])}. "
                     "By family (pairs): " + ", ".join(f"{html.escape(f)} {figure(a)}" + (f" ({family_pairs[f]})" if f in family_pairs else "")
                                             for f, a in d["accuracy_by_family"].items()) + ".</p>")
    if d.get("accuracy_by_pair_kind"):
        parts.append("<p>By kind of pair, better &gt; worse (exact: the gold answer; form: a right answer in the wrong form or "
                     "with filler; wrong: a wrong answer or none): " + ", ".join(
                         f"{html.escape(kind)} {figure(k['accuracy'])} ({k['pairs']} pairs)" for kind, k in d["accuracy_by_pair_kind"].items()) + ".</p>")
    return parts


def _ppo_section(metrics: dict[str, list[dict]]) -> list[str]:
    """The PPO runs' over-optimisation and training curves."""
    return [
        "<h2>PPO: over-optimisation and training</h2>",
        _figure_tag(_overoptimisation_plot(metrics),
                    "Each dot is one PPO iteration: the batch means of the RM's score (proxy, left) and of the gold "
                    "labeler's Likert (gold, right) for the responses sampled in it, against the square root of their mean "
                    f"KL to SFT. The lines follow training: the running mean of the last {SMOOTHING} iterations' dots. "
                    "A proxy that keeps rising while gold falls is the RM being over-optimised (Gao et al. 2022)."),
        _figure_tag(_training_plot(metrics), "Per PPO iteration, of the sampled batch: mean KL to SFT (exact over the "
                    "vocabulary, never negative), entropy per token, response length and the share of responses that end "
                    "with EOS."),
    ]


def _text(text: str) -> str:
    """Text a model or a user wrote, shown as text: escaped, its line breaks kept, an empty answer said to be one."""
    return html.escape(text).replace("\n", "<br>") if text else "<i>(empty)</i>"


def _judgement(answer: dict) -> str:
    """An answer's judges' figures, those that judged: the gold labeler's Likert, the reward model's reward."""
    figures = ([f"Likert {answer['likert']}"] if "likert" in answer else []) + ([f"reward {answer['reward']:.2f}"] if "reward" in answer else [])
    return f" <i>({', '.join(figures)})</i>" if figures else ""


def _samples_section(samples_path: Path, evaluation: dict, n_samples: int) -> list[str]:
    """The first ``n_samples`` evaluation prompts with every evaluated model's greedy answer side by side, and its judgement.
    The world's held-out prompts come shuffled by its seed, so their first are a fixed sample; your own come in file order."""
    every = [record for _, record in complete_lines(samples_path)]
    samples = every[:n_samples]
    if not samples:
        return []
    shown = [n for n in samples[0] if isinstance(samples[0][n], dict) and n != "demonstrations"]
    world = "gold" in samples[0]  # your own prompts have no gold answer, and no Likert
    count = f"all {len(every)}" if len(samples) == len(every) else f"the first {len(samples)} of the {len(every)}"
    which = f"{count} held-out prompts" if world else f"{count} prompts of <code>{html.escape(evaluation.get('prompts', ''))}</code>"
    judges = [words for key, words in (("likert", "the gold labeler's Likert score (1-7)"), ("reward", "the reward model's reward"))
              if any(key in samples[0][n] for n in shown)]
    return [
        "<h2>Answers side by side</h2>",
        f"<p>Each model's greedy answer to {which}" + (f"; in brackets, {' and '.join(judges)} of each answer" if judges else "") + ".</p>",
        _table(["prompt"] + (["gold answer"] if world else []) + shown, [
            ["<br>".join(f"<b>{html.escape(m['role'])}</b>: {_text(m['content'])}" for m in s["messages"])]
            + ([_text(s["gold"])] if world else []) + [_text(s[n]["answer"]) + _judgement(s[n]) for n in shown]
            for s in samples]),
    ]


PAGE_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
              ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}th{background:#f3f3f3}"
              "caption{caption-side:bottom;text-align:left;font-size:13px;padding-top:4px}img{max-width:100%;height:auto}figure{margin:1em 0}")


def write_report(root: Path, rounds: int = 1, n_samples: int = SAMPLES_SHOWN) -> Path:
    """Write ``root/report.html`` and return its path: the evaluation, then what rm, PPO and eval's samples left, where they
    did; of the first ``rounds`` pipeline rounds (pipeline.rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    root = Path(root)
    parts = ["<h1>instructrl report</h1>", f"<p>Run folder: <code>{html.escape(str(root))}</code></p>"]
    evaluation = json.loads((root / "eval" / "results.json").read_text())
    if "overall" in next(iter(evaluation["results"].values())):  # the world's prompts, judged by its gold labeler
        parts += _eval_section(evaluation)
    parts += _reward_section(evaluation)
    by_round = {r: json.loads(path.read_text()) for r, folder in enumerate(round_folders(root, rounds), start=1)
                if (path := folder / "rm" / "diagnostics.json").is_file()}
    if by_round:
        parts += _rm_section(by_round[max(by_round)], by_round)
    metrics = _ppo_metrics(root, rounds)
    if metrics:
        parts += _ppo_section(metrics)
    samples_path = root / "eval" / "samples.jsonl"
    if samples_path.is_file():
        parts += _samples_section(samples_path, evaluation, n_samples)
    page = ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>instructrl report</title><style>{PAGE_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = root / "report.html"
    write_text_atomic(out, page)
    return out
