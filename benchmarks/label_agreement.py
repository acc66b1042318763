"""How well the labels a reward model learns from agree with the gold labeler: the labelers' own rankings scored
as a reward model's are, on the same held-out and training comparisons.

    .venv/bin/python benchmarks/label_agreement.py --run runs/default

On the comparisons ``instructrl collect`` wrote (``--run``/collect/comparisons.jsonl), split into held-out
and training prompts as ``instructrl rm`` splits them, each record's ranks are scored against the gold
labeler (noise 0): pairwise accuracy, overall and by kind of pair (exact answer, right answer in the wrong
form or with filler, wrong answer), the figures ``rm/diagnostics.json`` gives for the trained RM. The
labelers' noise is independent from one response to the next, so a learner of many labels can beat them;
an RM below them on a kind of pair has not learnt what the labels say there. The RM trained on the gold
labeler's rankings of the same responses: ``collect.labeler_noise=0 --restart-from collect`` on a copy of
the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from instructrl.data.chat import response_ids
from instructrl.data.inputs import read_comparisons
from instructrl.evaluation.rm_diagnostics import accuracy_by_pair_kind, pairwise_accuracy
from instructrl.models.base import load_tokenizer
from instructrl.stages.rm import answer_kind, split_by_prompt
from instructrl.world.build import WorldFiles, load_tasks
from instructrl.world.labeler import SimulatedLabeler


def agreement(records, tasks) -> dict:
    """The records' own ranks scored against the gold labeler: overall and by kind of pair."""
    gold_judge = SimulatedLabeler()
    labels, gold, kinds = [], [], []
    for record in records:
        judgements = [gold_judge.judge(tasks[record.id], r) for r in record.responses]
        labels.append([-float(rank) for rank in record.ranks])  # rank 0 is best; a labeler's tie counts as wrong, as an RM's does
        gold.append([j.quality for j in judgements])
        kinds.append([answer_kind(j) for j in judgements])
    accuracy, pairs = pairwise_accuracy(labels, gold)
    return {"accuracy": accuracy, "pairs": pairs, "accuracy_by_pair_kind": accuracy_by_pair_kind(labels, gold, kinds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (world/, collect/, sft/final)")
    args = parser.parse_args()
    config = yaml.safe_load((args.run / "collect" / "config.yaml").read_text())
    records = read_comparisons(args.run / "collect" / "comparisons.jsonl")
    tasks = {t.id: t for t in load_tasks(WorldFiles(args.run / "world").prompts("rm"))}

    # as run_rm: the comparisons whose every response fits, then the split by prompt
    tokenizer = load_tokenizer(args.run / "sft" / "final")
    max_length = config["rm"]["max_length"] or config["model"]["max_length"]
    fits = [r for r in records if max(len(response_ids(tokenizer, [m.model_dump() for m in r.prompt], x)) for x in r.responses) <= max_length]
    held, kept = split_by_prompt(fits, config["rm"]["heldout_fraction"], config["run"]["seed"])
    print(json.dumps({"comparisons": len(records), "fit": len(fits), "heldout": agreement([fits[i] for i in held], tasks),
                      "training": agreement([fits[i] for i in kept], tasks)}, indent=2))


if __name__ == "__main__":
    main()
