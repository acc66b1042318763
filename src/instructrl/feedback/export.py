"""Export a project's answers in the formats instructrl's stages (and TRL) read.

    demonstrations.jsonl          {"messages": prompt + the labeler's answer}   -> instructrl sft sft.data=
    comparisons.jsonl             one ComparisonRecord per labeler and task      -> instructrl rm rm.data=
    comparisons_aggregated.jsonl  one ComparisonRecord per task (mean rank)      -> instructrl rm rm.data=
    preference_pairs.jsonl        TRL's {"prompt", "chosen", "rejected"}, every strictly ordered pair
    compare.jsonl                 each A/B judgement, models named (two identical answers: a tie, labeler_id null)
    quality.json                  progress, agreement, win rates with their interval
"""

from __future__ import annotations

import json
import sqlite3
from fractions import Fraction
from pathlib import Path

from instructrl.data.jsonl import nan_to_none, write_jsonl
from instructrl.data.records import ComparisonRecord, write_comparisons
from instructrl.evaluation.preference import win_rate
from instructrl.feedback.agreement import krippendorff_alpha, pairwise_agreement
from instructrl.feedback.db import snapshot
from instructrl.feedback.tasks import FLAGS, dense_ranks, identical_compare_tasks, progress, project_by_id, submitted_answers
from instructrl.rundir.files import write_text_atomic

FILES = ("demonstrations.jsonl", "comparisons.jsonl", "comparisons_aggregated.jsonl", "preference_pairs.jsonl", "compare.jsonl", "quality.json")


def demonstration_records(answers: list[dict]) -> list[dict]:
    return [{"id": a["prompt_id"], "messages": a["prompt"] + [{"role": "assistant", "content": a["answer"]["text"]}],
             "labeler_id": a["labeler"], "guideline_version": a["guideline_version"]} for a in answers]


def comparison_record(answer: dict) -> ComparisonRecord:
    """One labeler's ranking of one task, exactly as submitted (task order; ties kept)."""
    ranking = answer["answer"]
    return ComparisonRecord(id=answer["prompt_id"], prompt=answer["prompt"], responses=answer["responses"], ranks=ranking["ranks"],
                            likert=ranking["likert"], flags=ranking["flags"], labeler_id=answer["labeler"],
                            guideline_version=answer["guideline_version"], none_acceptable=ranking["none_acceptable"])


def rankings_by_task(rankings: list[ComparisonRecord]) -> dict[tuple, list[ComparisonRecord]]:
    """Each task's rankings (one per labeler), keyed by the task's prompt id and responses, in first-seen order."""
    by_task: dict[tuple, list[ComparisonRecord]] = {}
    for r in rankings:
        by_task.setdefault((r.id, tuple(r.responses)), []).append(r)
    return by_task


def aggregate(records: list[ComparisonRecord]) -> ComparisonRecord:
    """Several labelers' rankings of one task as one: responses ordered by mean rank (equal
    means tie), Likert the mean rounded half up, a flag where at least half the labelers set it,
    'none acceptable' where at least half said so."""
    first, n, k = records[0], len(records), len(records[0].responses)
    mean_rank = [sum(Fraction(r.ranks[i]) for r in records) / n for i in range(k)]  # exact: ties stay ties
    likert = [int(sum(Fraction(r.likert[i]) for r in records) / n + Fraction(1, 2)) for i in range(k)]
    flags = [[f for f in FLAGS if 2 * sum(f in r.flags[i] for r in records) >= n] for i in range(k)]
    versions = sorted({r.guideline_version for r in records})
    return ComparisonRecord(id=first.id, prompt=first.prompt, responses=first.responses, ranks=dense_ranks(mean_rank), likert=likert,
                            flags=flags, labeler_id="aggregate:" + ",".join(r.labeler_id for r in records),
                            guideline_version="+".join(versions), none_acceptable=2 * sum(r.none_acceptable for r in records) >= n)


def preference_pairs(record: ComparisonRecord) -> list[dict]:
    """Every pair the record orders strictly, in TRL's explicit-prompt conversational format."""
    prompt = [m.model_dump() for m in record.prompt]
    pairs = []
    for i, chosen in enumerate(record.responses):
        for j, rejected in enumerate(record.responses):
            if record.ranks[i] < record.ranks[j]:
                pairs.append({"id": record.id, "prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                              "rejected": [{"role": "assistant", "content": rejected}], "labeler_id": record.labeler_id})
    return pairs


def compare_records(answers: list[dict], identical: list[dict] = ()) -> list[dict]:
    """Each A/B judgement, the winner named by model; each task of two ``identical`` answers
    (``identical_compare_tasks``) once, as a tie nobody was asked to judge (labeler_id None)."""
    out = []
    for a in answers:
        winner = a["answer"]["winner"]
        out.append({"id": a["prompt_id"], "prompt": a["prompt"], "answers": a["responses"], "models": a["sources"],
                    "winner": "tie" if winner is None else a["sources"][winner], "labeler_id": a["labeler"],
                    "guideline_version": a["guideline_version"]})
    for t in identical:
        out.append({"id": t["prompt_id"], "prompt": t["prompt"], "answers": t["responses"], "models": t["sources"], "winner": "tie",
                    "labeler_id": None, "guideline_version": None})
    return out


def project_compare_records(conn: sqlite3.Connection, project_id: int) -> list[dict]:
    return compare_records(submitted_answers(conn, project_id, "compare"), identical_compare_tasks(conn, project_id))


def win_rates(records: list[dict]) -> dict:
    """Per pair of models: how often the first beats the second, ties half, with a 95% interval.
    A task is one prompt of ``win_rate``: its labelers' judgements are its comparisons, so several
    labelers of one task make its outcome surer but do not count as more prompts."""
    by_pair: dict[tuple[str, str], dict[tuple, tuple[list[float], list[float]]]] = {}
    for r in records:
        a, b = sorted(r["models"])
        scores = by_pair.setdefault((a, b), {}).setdefault((r["id"], tuple(r["answers"])), ([], []))
        scores[0].append(1.0 if r["winner"] == a else 0.0)
        scores[1].append(1.0 if r["winner"] == b else 0.0)
    return {f"{a} vs {b}": win_rate(*zip(*tasks.values())) for (a, b), tasks in sorted(by_pair.items())}


def quality(conn: sqlite3.Connection, project_id: int, rankings: list[ComparisonRecord] | None = None,
            comparisons: list[dict] | None = None) -> dict:
    """Progress, agreement (ranked pairs; Krippendorff's alpha on Likert and on A/B choices) and win rates.
    Given ``rankings`` and ``comparisons``, call it in the snapshot they were read in."""
    with snapshot(conn):  # progress counts the answers the figures are made of, while people label
        report_progress = progress(conn, project_id)
        if rankings is None:
            rankings = [comparison_record(a) for a in submitted_answers(conn, project_id, "rank")]
        if comparisons is None:
            comparisons = project_compare_records(conn, project_id)
    ranked_tasks = list(rankings_by_task(rankings).values())
    likert_units = [{r.labeler_id: r.likert[i] for r in task} for task in ranked_tasks for i in range(len(task[0].responses))]
    choices: dict[tuple, dict[str, str]] = {}
    for c in comparisons:
        if c["labeler_id"] is None:  # a tie of identical answers: no labeler's choice to agree on
            continue
        choices.setdefault((c["id"], tuple(c["answers"])), {})[c["labeler_id"]] = c["winner"]
    choice_codes = {}
    return {
        "progress": report_progress,
        "rank": {
            "pairwise": pairwise_agreement([{r.labeler_id: r.ranks for r in task} for task in ranked_tasks]),
            "likert_alpha_interval": krippendorff_alpha(likert_units, "interval"),
            "likert_alpha_ordinal": krippendorff_alpha(likert_units, "ordinal"),
        },
        "compare": {
            "alpha_nominal": krippendorff_alpha([{name: choice_codes.setdefault(w, len(choice_codes)) for name, w in unit.items()}
                                                 for unit in choices.values()], "nominal"),
            "win_rates": win_rates(comparisons),
        },
    }


def export_project(conn: sqlite3.Connection, project_id: int, out_dir: Path | str) -> dict[str, int]:
    """Write every export file of a project under ``out_dir``; returns how many records each holds."""
    out_dir = Path(out_dir)
    with snapshot(conn):  # every file holds the same answers while labelers go on submitting
        project_by_id(conn, project_id)
        demos = demonstration_records(submitted_answers(conn, project_id, "write"))
        rankings = [comparison_record(a) for a in submitted_answers(conn, project_id, "rank")]
        comparisons = project_compare_records(conn, project_id)
        report = quality(conn, project_id, rankings, comparisons)
    aggregated = [aggregate(task) for task in rankings_by_task(rankings).values()]
    pairs = [p for r in rankings for p in preference_pairs(r)]
    write_jsonl(out_dir / "demonstrations.jsonl", demos)
    write_comparisons(out_dir / "comparisons.jsonl", rankings)
    write_comparisons(out_dir / "comparisons_aggregated.jsonl", aggregated)
    write_jsonl(out_dir / "preference_pairs.jsonl", pairs)
    write_jsonl(out_dir / "compare.jsonl", comparisons)
    write_text_atomic(out_dir / "quality.json", json.dumps(nan_to_none(report), indent=2))
    return {"demonstrations.jsonl": len(demos), "comparisons.jsonl": len(rankings), "comparisons_aggregated.jsonl": len(aggregated),
            "preference_pairs.jsonl": len(pairs), "compare.jsonl": len(comparisons)}

