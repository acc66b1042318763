"""Collect rankings of K sampled responses per prompt (InstructGPT §3.4-3.5, the RM data).

setup (policy, RM prompts, labelers) -> loop over prompt chunks (sample K, judge, rank) -> save
``comparisons.jsonl`` in the record format of ``data/records.py``. Each chunk is sampled under
its own seed and appended as it is finished, so a killed collection resumes where it stopped
and ends with the same records as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.jsonl import complete_lines
from instructrl.data.inputs import read_comparisons
from instructrl.data.readers import read_records
from instructrl.data.records import ComparisonRecord, comparison_line, write_comparisons
from instructrl.errors import UserError, located
from instructrl.evaluation.generate import check_room, generate_answers
from instructrl.models.base import load_answering_model, load_tokenizer
from instructrl.rundir.files import trim_step_log, write_text_atomic
from instructrl.rundir.locks import releases_on_error
from instructrl.rundir.run import given_or_earlier, RunDir
from instructrl.training.progress import progress_bar
from instructrl.world.build import build_world, load_tasks
from instructrl.world.labeler import SimulatedLabeler, ranks_from_qualities
from instructrl.world.tasks import Task

SECTIONS = ("run", "world", "collect")
UPSTREAM = ("tokenizer", "model", "pretrain", "sft")  # part of the identity when the policy is this run's SFT model


def judge_responses(labeler: SimulatedLabeler, task: Task, responses: list[str]) -> ComparisonRecord:
    """One labeler's comparison record for K responses to ``task``."""
    judgements = [labeler.judge(task, r) for r in responses]
    return ComparisonRecord(
        id=task.id, prompt=list(task.messages), responses=responses, ranks=ranks_from_qualities([j.quality for j in judgements]),
        likert=[j.likert for j in judgements], flags=[list(j.flags) for j in judgements], labeler_id=labeler.labeler_id,
    )


def read_judgements(path: Path) -> list[ComparisonRecord]:
    """People's comparison records, each checked, and none twice: a record repeating another's labeler,
    prompt id and responses (a file joined to itself), or a prompt id naming two prompts, is an error at its line."""
    records = read_comparisons(path, key="collect.judgements")
    first_of_task, first_of_id = {}, {}
    for (where, _), record in zip(read_records(path), records):
        prompt = [m.model_dump() for m in record.prompt]
        task = (record.labeler_id, record.id, tuple(record.responses))
        if task in first_of_task:
            raise UserError(f"{where}: repeats the record at {first_of_task[task]} (labeler '{record.labeler_id}', prompt "
                            f"'{record.id}', the same responses); each labeler ranks a task once")
        first_of_task[task] = where
        seen_where, seen_prompt = first_of_id.setdefault(record.id, (where, prompt))
        if seen_prompt != prompt:
            raise UserError(f"{where}: prompt id '{record.id}' names another prompt at {seen_where}; give each prompt its own id")
    return records


@releases_on_error
def run_collect(config: PipelineConfig, restart: bool = False, log=print, upstream: bool | None = None) -> Path:
    """Sample K responses per RM prompt and have the labelers rank them, into ``run.dir``/collect;
    returns the comparisons file. A run finished with the same config and inputs is skipped
    (``restart`` runs it again); ``log`` takes each line the stage reports.

    ``upstream``: whether the earlier stages' config is part of this run's identity (default: when the policy is this run's SFT model)."""
    cfg = config.collect
    upstream = cfg.policy is None if upstream is None else upstream
    run = RunDir(config, "collect", SECTIONS + (UPSTREAM if upstream else ()))
    output = run.path / "comparisons.jsonl"
    if run.skip(restart, log):
        return output
    if cfg.judgements is not None:  # people's rankings: check every line, then use them as they are
        records = read_judgements(cfg.judgements)
        run.start(restart, log)
        run.write_lineage({"judgements": cfg.judgements})
        run.record_start()
        write_comparisons(output, records)
        run.finish({"comparisons": output})
        log(f"collect: {len(records)} comparison records from {cfg.judgements}")
        return output

    policy = given_or_earlier(cfg.policy, Path(config.run.dir) / "sft" / "final", "collect.policy", "collect", "`instructrl sft`")
    with located("collect.policy"):  # a bad path names the key that chose it
        tokenizer = load_tokenizer(policy)
        model = load_answering_model(policy, tokenizer=tokenizer)
    world = build_world(config.world, Path(config.run.dir) / "world")
    end = None if cfg.n_prompts is None else cfg.first_prompt + cfg.n_prompts
    tasks = load_tasks(world.prompts("rm"))[cfg.first_prompt : end]
    if not tasks:
        raise UserError(f"collect: collect.first_prompt = {cfg.first_prompt} is past the last RM prompt")
    labelers = [SimulatedLabeler(f"sim-{i}", noise=cfg.labeler_noise) for i in range(cfg.labelers)]
    check_room(model, tokenizer, [list(t.messages) for t in tasks], cfg.max_new_tokens, "collect.max_new_tokens")
    run.start(restart, log)
    run.write_lineage({"policy": policy, "prompts": world.prompts("rm")})
    run.record_start()

    partial = run.path / "comparisons.partial.jsonl"
    kept = [line for line, _ in complete_lines(partial)]
    done = len(kept) - len(kept) % cfg.batch_size  # only whole chunks count; a torn chunk is sampled again
    write_text_atomic(partial, "".join(line + "\n" for line in kept[:done]))
    trim_step_log(run.path / "metrics.jsonl", 0, keep_equal=False)  # a line an interrupted run wrote at its end is written again
    if done:
        log(f"collect: resuming after {done} of {len(tasks)} prompts")
    with progress_bar() as bar:
        progress = bar.add_task("collect", total=len(tasks), completed=done, unit="prompt", status=f"K = {cfg.k}")
        for start in range(done, len(tasks), cfg.batch_size):
            chunk = tasks[start : start + cfg.batch_size]
            torch.manual_seed(config.run.seed * 1_000_003 + start)  # each chunk's samples depend on it alone
            samples = generate_answers(model, tokenizer, [list(t.messages) for t in chunk], cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, num_samples=cfg.k, temperature=cfg.temperature)
            records = [judge_responses(labelers[(start + i) % len(labelers)], t, s) for i, (t, s) in enumerate(zip(chunk, samples))]
            with partial.open("a") as f:
                f.writelines(comparison_line(r) for r in records)
            bar.update(progress, advance=len(chunk))
    records = read_comparisons(partial)
    scored = [s for r in records for s in r.likert or ()]
    mean_likert = sum(scored) / max(len(scored), 1)
    all_tied = sum(len(set(r.ranks)) == 1 for r in records) / len(records)
    run.log(0, {"collect/records": len(records), "collect/mean_likert": mean_likert, "collect/all_tied": all_tied})
    partial.replace(output)  # last: a run killed before it resumes from its records rather than collecting them again
    run.finish({"comparisons": output})
    log(f"collect: {len(records)} prompts x {cfg.k} responses ranked; mean Likert {mean_likert:.2f}, "
        f"{all_tied:.0%} of prompts with every response tied -> {output}")
    return output
