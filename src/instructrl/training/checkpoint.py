"""Resumable checkpoints: weights, optimizer, scheduler, every process's RNG, and the step.

A checkpoint is written to ``step-N.tmp`` and renamed when complete, so a run killed while
saving leaves the previous checkpoint intact and the half-written one is ignored.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructrl.rundir import replace_dir


@dataclass
class TrainState:
    """What the loop needs besides the tensors: the data position follows from ``step``."""

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    selection: list = field(default_factory=list)  # [(step, score)] of every scoring


def checkpoint_dirs(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def save_checkpoint(accelerator, root: Path, state: TrainState, keep: int = 1) -> Path:
    root = Path(root)
    final = root / f"step-{state.step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
        replace_dir(tmp, final)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(accelerator, root: Path) -> TrainState:
    """Restore the newest complete checkpoint under ``root``; a fresh TrainState if there is none."""
    found = checkpoint_dirs(root)
    if not found:
        return TrainState()
    accelerator.load_state(str(found[-1]))
    return TrainState(**json.loads((found[-1] / "trainer_state.json").read_text()))
