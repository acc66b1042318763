"""``instructrl pipeline --check``: what the pipeline would do with each run, read from the run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from instructrl.config import PipelineConfig
from instructrl.pipeline.rounds import STAGES, pipeline_runs
from instructrl.training.checkpoint import checkpoint_dirs

if TYPE_CHECKING:
    from instructrl.rundir.run import RunDir


def plan(first: PipelineConfig, redo: dict[str, bool]) -> list[tuple[str, str, str]]:
    """What the pipeline would do with each run, in order, read from the run folder without writing to it: the run's
    folder in run.dir (round2/rm), what becomes of it ("trains", resumes or is redone included; "finished"; "stops";
    "runs", as eval and the report always do), and that in words. ``first``: round one's config (``before_training``).
    A run not redone is judged as its stage judges it (``_as_its_stage_would``); a damaged run record is refused
    as the stage refuses it."""
    from instructrl.rundir.run import RunDir

    root = Path(first.run.dir)
    restart_from = next((stage for stage in STAGES if redo[stage]), None)
    steps = []
    for cfg, folder, _, stage in pipeline_runs(first, redo):
        if redo[stage]:  # its stage discards the folder unread
            step = ("trains", f"is redone (--restart-from {restart_from})" if folder.exists() else "trains")
        else:
            step = _as_its_stage_would(RunDir.as_recorded(cfg, folder.name), stage, root)
        steps.append((os.path.relpath(folder, root), *step))
    return steps + [("eval", "runs", "runs (every time): the last round's models, replacing eval/"), ("report", "runs", "written (every time): report.html")]


def _as_its_stage_would(run: RunDir, stage: str, root: Path) -> tuple[str, str]:
    """What ``run``'s stage does with it, not redone, by the stage's own checks in their order: a run begun with another
    config, then one begun on inputs whose content has changed since (a file whose size and modification time are as
    recorded is not read), stops the pipeline; a finished run is skipped, an unfinished one resumed. Where an input
    is an earlier stage's output that no longer exists, that stage makes it again first: the run goes on only if it
    comes out as it was. ``stage``: what --restart-from redoes it with; ``root``: the run folder."""
    finished = run.done_file.is_file()
    state = "finished" if finished else "unfinished"
    changes = run.recorded_changes()
    if changes:
        return "stops", f"{state}, config changed: {changes} (the run would stop; --restart-from {stage})"
    changed = run.changed_inputs()
    if changed:
        return "stops", f"{state}, inputs changed since: {', '.join(changed)} (the run would stop; --restart-from {stage})"
    remade = "; ".join(f"{maker} makes {names} ({path}) again as it was" for names, path, maker in run.inputs_to_remake(root))
    condition = f" if {remade}, else the run would stop (--restart-from {stage})" if remade else ""
    checkpoints = checkpoint_dirs(run.path / "checkpoints")
    if finished:
        return "finished", "finished: skipped" + (condition or " (same config and inputs)")
    if checkpoints:
        return "trains", f"resumes from checkpoint step {int(checkpoints[-1].name[len('step-'):])}{condition}"
    if any(run.path.glob("*.partial.jsonl")):  # collect's records so far
        return "trains", f"resumes {run.contents()}{condition}"
    return "trains", "trains" + condition  # from the start, on the inputs it recorded as it began
