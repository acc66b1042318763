"""``instructrl pipeline --check``: what the pipeline would do with each run, read from the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from instructrl.config import PipelineConfig
from instructrl.pipeline.rounds import STAGES, pipeline_runs
from instructrl.training.checkpoint import checkpoint_dirs


def plan(first: PipelineConfig, redo: dict[str, bool]) -> list[tuple[str, str, str]]:
    """What the pipeline would do with each run, in order, read from the run folder without writing to it: the run's
    folder in run.dir (round2/rm), what becomes of it ("trains", resumes or is redone included; "finished"; "stops";
    "runs", as eval and the report always do), and that in words. ``first``: round one's config (``before_training``).
    A run begun before is compared with this config (``RunDir.config_changes``) over the sections it recorded, as those
    a stage records follow from its own section's keys; its inputs are not hashed here, so a finished run is skipped
    only while they are unchanged (its stage refuses changed ones)."""
    from instructrl.rundir.run import RunDir

    root = Path(first.run.dir)
    restart_from = next((stage for stage in STAGES if redo[stage]), None)
    steps = []
    for cfg, folder, _, stage in pipeline_runs(first, redo):
        run = RunDir(cfg, folder.name, ())
        finished = run.done_file.is_file()
        record = run.done_file if finished else run.path / "identity.json"
        saved = json.loads(record.read_text()) if record.is_file() else None
        saved = saved.get("identity") if finished else saved
        checkpoints = checkpoint_dirs(run.path / "checkpoints")
        changes = RunDir(cfg, folder.name, tuple(s for s in saved if s in PipelineConfig.model_fields)).config_changes(saved) if saved else ""
        if redo[stage]:
            step = ("trains", f"is redone (--restart-from {restart_from})" if run.path.exists() else "trains")
        elif changes:
            step = ("stops", f"{'finished' if finished else 'unfinished'}, config changed: {changes} (the run would stop; --restart-from {stage})")
        elif finished:
            step = ("finished", "finished: skipped if its inputs are unchanged")
        elif checkpoints:
            step = ("trains", f"resumes from checkpoint step {int(checkpoints[-1].name[len('step-'):])}")
        elif any(run.path.glob("*.partial.jsonl")):  # collect's records so far
            step = ("trains", f"resumes {run.contents()}")
        else:
            step = ("trains", "trains")
        steps.append((os.path.relpath(run.path, root), *step))
    return steps + [("eval", "runs", "runs (every time): the last round's models, replacing eval/"), ("report", "runs", "written (every time): report.html")]
