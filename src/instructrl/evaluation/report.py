"""The run's report: one self-contained HTML page (plots embedded) from what the stages wrote.

Reads eval/results.json and samples.jsonl, rm/diagnostics.json, and the PPO runs' metrics.jsonl.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from instructrl.data.jsonl import complete_lines
from instructrl.evaluation.rm_diagnostics import figure
from instructrl.rundir import write_text_atomic

PPO_STAGES = ("ppo", "ppo_ptx")
GOLD_ANSWERS = "gold_answers"  # eval's row of the gold answers: the ceiling of every win rate vs SFT


def _figure_tag(fig, caption: str) -> str:
    """The figure as an embedded PNG, with ``caption`` below it (and as its alt text)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    image = f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="{html.escape(caption)}">'
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _ppo_metrics(root: Path) -> dict[str, list[dict]]:
    """Each PPO run's metrics, later pipeline rounds (round2/, ...) appended with their episodes offset."""
    found = {}
    folders = [root] + sorted((p for p in root.glob("round*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for stage in PPO_STAGES:
        rows: list[dict] = []
        for folder in folders:
            path = folder / stage / "metrics.jsonl"
            if path.is_file():
                offset = rows[-1]["episodes"] if rows else 0
                rows += [{**record, "episodes": record["episodes"] + offset} for _, record in complete_lines(path)]
        if rows:
            found[stage] = rows
    return found


def _likert_plot(results: dict):
    import matplotlib.pyplot as plt

    names = [n for n in results if n != GOLD_ANSWERS]  # 7 everywhere
    families = list(results[names[0]]["families"])
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [results[name]["families"][f]["likert"] for f in families] + [results[name]["overall"]["likert"]]
        ax.bar([i + k * width for i in range(len(families) + 1)], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(families) + 1)], families + ["OVERALL"], rotation=30, ha="right")
    ax.set_ylabel("mean gold Likert (1-7)")
    ax.set_ylim(1, 7)
    ax.legend(ncols=len(names), fontsize=8)
    return fig


def _overoptimisation_plot(metrics: dict[str, list[dict]]):
    """Proxy (RM) and gold score against √KL to SFT along training (Gao et al. 2022)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage, rows in metrics.items():
        x = [r["rollout/sqrt_kl"] for r in rows]
        axes[0].plot(x, [r["rollout/score"] for r in rows], "o", ms=3, alpha=0.7, label=f"{stage}: proxy (RM)")
        gold = [(xi, r["rollout/gold_likert"]) for xi, r in zip(x, rows) if "rollout/gold_likert" in r]
        if gold:
            axes[1].plot(*zip(*gold), "o", ms=3, alpha=0.7, label=f"{stage}: gold")
    axes[0].set_ylabel("reward-model score")
    axes[1].set_ylabel("gold Likert of the samples")
    for ax in axes:
        ax.set_xlabel("√KL(π ‖ π_SFT) per response (nats^½)")
        ax.legend(fontsize=8)
    return fig


def _training_plot(metrics: dict[str, list[dict]]):
    import matplotlib.pyplot as plt

    keys = [("rollout/kl", "KL to SFT (nats)"), ("rollout/entropy", "entropy per token"), ("rollout/length", "response tokens"),
            ("rollout/eos_rate", "share ending in EOS")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3))
    for ax, (key, label) in zip(axes, keys):
        for stage, rows in metrics.items():
            ax.plot([r["episodes"] for r in rows], [r[key] for r in rows], label=stage)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("episodes")
    axes[0].legend(fontsize=8)
    return fig


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _win_text(w: dict) -> str:
    return f"{w['win_rate']:.1%} [{w['ci95'][0]:.1%}, {w['ci95'][1]:.1%}]"


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
        line = f"{name}: Likert {r['overall']['likert']:.2f}"
        if "win_rate_vs_sft" in r:
            line += f", wins vs SFT {_win_text(r['win_rate_vs_sft'])}"
        if "alignment_tax" in r and name != "sft":
            line += f", alignment tax {r['alignment_tax']:+.3f} nats"
        if "sampled" in r and name != "demonstrations":
            sampled = r["sampled"]
            line += f"; sampled at T={sampled['temperature']:g}: Likert {sampled['overall']['likert']:.2f}"
            if "win_rate_vs_sft" in sampled:
                line += f", wins vs SFT {_win_text(sampled['win_rate_vs_sft'])}"
        lines.append(line)
    return lines


def write_report(root: Path, n_samples: int = 30) -> Path:
    """Write ``root/report.html`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    root = Path(root)
    results = json.loads((root / "eval" / "results.json").read_text())["results"]
    parts = ["<h1>instructrl report</h1>", f"<p>Run folder: <code>{html.escape(str(root))}</code></p>"]

    parts.append("<h2>Held-out prompts, judged by the gold labeler</h2>")
    rows = []
    for name, r in results.items():
        w = r.get("win_rate_vs_sft")
        rows.append([html.escape(name), f"{r['overall']['likert']:.2f}",
                     f"{_win_text(w)} (n={w['n']})" if w else "",
                     f"{r['pretraining_loss']:.3f}" if "pretraining_loss" in r else "",
                     f"{r['alignment_tax']:+.3f}" if "alignment_tax" in r else "",
                     ", ".join(f"{k} {v:.0%}" for k, v in r["overall"]["flags"].items())])
    parts.append(_table(["model", "mean Likert", "win rate vs SFT (95% CI)", "held-out pretraining loss", "alignment tax", "flags"], rows))
    if GOLD_ANSWERS in results:
        parts.append(f"<p>{GOLD_ANSWERS}: the gold answer to every prompt. It ties with SFT's perfect answers and beats "
                     "the rest, so its win rate against SFT is the most any model can reach.</p>")
    if all("sampled" in r for r in results.values()):
        first = next(iter(results.values()))["sampled"]
        parts.append(f"<p>Greedy answers above. Below, {first['samples']} answers per prompt sampled at temperature "
                     f"{first['temperature']:g}, the distribution PPO optimises (the demonstrations and gold answers are one per prompt).</p>")
        rows = []
        for name, r in results.items():
            w = r["sampled"].get("win_rate_vs_sft")
            rows.append([html.escape(name), f"{r['sampled']['overall']['likert']:.2f}",
                         f"{_win_text(w)} (n={w['n']} prompts)" if w else "",
                         ", ".join(f"{k} {v:.0%}" for k, v in r["sampled"]["overall"]["flags"].items())])
        parts.append(_table(["model", "mean Likert (sampled)", "win rate vs SFT (95% CI)", "flags"], rows))
    parts.append(_figure_tag(_likert_plot(results), "Mean gold Likert (1-7) of the greedy answers, per instruction family and model."))

    diagnostics = root / "rm" / "diagnostics.json"
    if diagnostics.is_file():
        d = json.loads(diagnostics.read_text())
        parts.append("<h2>Reward model</h2>")
        parts.append(_table(["held-out accuracy vs gold", "by gold margin", "reward ~ gold Likert r", "length bias r"], [[
            f"{d['accuracy']:.3f} ({d['pairs']} pairs)",
            ", ".join(f"{k}: {figure(v)}" for k, v in d["accuracy_by_gold_margin"].items()),
            figure(d["gold_correlation"]), figure(d["length_bias"])]]))
        if d.get("accuracy_by_family"):
            parts.append(f"<p>Right vs wrong answers (does it check answers?): {figure(d['accuracy_correct_vs_incorrect'])}. "
                         "By family: " + ", ".join(f"{html.escape(f)} {figure(a)}" for f, a in d["accuracy_by_family"].items()) + ".</p>")
        if d.get("accuracy_by_pair_kind"):
            parts.append("<p>By kind of pair, better &gt; worse (exact: the gold answer; form: a right answer in the wrong form or "
                         "with filler; wrong: a wrong answer or none): " + ", ".join(
                             f"{html.escape(kind)} {figure(k['accuracy'])} ({k['pairs']} pairs)" for kind, k in d["accuracy_by_pair_kind"].items()) + ".</p>")

    metrics = _ppo_metrics(root)
    if metrics:
        parts.append("<h2>PPO: over-optimisation and training</h2>")
        parts.append(_figure_tag(_overoptimisation_plot(metrics),
                                 "Each dot is one PPO iteration: the batch means of the RM's score (proxy) and of the gold labeler's "
                                 "(gold) for the responses sampled in it, against the square root of their mean KL to SFT. A proxy "
                                 "that keeps rising while gold falls is the RM being over-optimised (Gao et al. 2022)."))
        parts.append(_figure_tag(_training_plot(metrics), "Per PPO iteration: KL to SFT, entropy per token, response length and the "
                                 "share of responses that end with EOS, of the sampled batch."))

    samples_path = root / "eval" / "samples.jsonl"
    if samples_path.is_file():
        samples = [record for _, record in complete_lines(samples_path)][:n_samples]
        shown = [n for n in samples[0] if isinstance(samples[0][n], dict) and n != "demonstrations"] if samples else []
        parts.append("<h2>Answers side by side</h2>")
        parts.append(_table(["prompt", "gold"] + shown, [
            ["<br>".join(f"<b>{m['role']}</b>: {html.escape(m['content'])}" for m in s["messages"]), html.escape(s["gold"])]
            + [f"{html.escape(s[n]['answer'])} <i>({s[n]['likert']})</i>" for n in shown]
            for s in samples]))

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>instructrl report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    out = root / "report.html"
    write_text_atomic(out, page)
    return out
