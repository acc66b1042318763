"""Resumable checkpoints: weights, optimizer, scheduler, every process's RNG, and the step.

A checkpoint is written to ``step-N.tmp`` and renamed when complete, so a run killed while
saving leaves the previous checkpoint intact and the half-written one is ignored.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructrl.errors import UserError
from instructrl.rundir import copy_dir, replace_dir


@dataclass
class TrainState:
    """What the loop needs besides the tensors: the data position follows from ``step``."""

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    selection: list = field(default_factory=list)  # [(step, score)] of every scoring
    extra: dict = field(default_factory=dict)  # a stage's own resumable values (PPO: the KL coefficient)


def checkpoint_dirs(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob("step-*") if p.is_dir() and p.name[len("step-"):].isdigit())


def save_checkpoint(accelerator, root: Path, state: TrainState, best: Path | None = None, keep: int = 1) -> Path:
    """Save everything needed to resume; ``best`` (the best-scoring model so far) is snapshotted
    too, as hard links, so a resumed run's best/ matches its best_score."""
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
        if best is not None and best.is_dir():
            shutil.copytree(best, tmp / "best", copy_function=os.link)
        replace_dir(tmp, final)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_rng_state(checkpoint: Path, process_index: int) -> None:
    """Raise RuntimeError unless this process's RNG state in ``checkpoint`` loads: Accelerate skips
    one it cannot read with a log line only, and the resumed run would silently stop being reproducible."""
    from accelerate.utils import RNG_STATE_NAME, load

    path = checkpoint / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        load(path)["torch_manual_seed"]
    except Exception as err:  # whatever unpickling a damaged file raises; Accelerate catches as widely
        raise RuntimeError(f"{path.name} is missing or damaged ({type(err).__name__})") from None


def load_latest_checkpoint(accelerator, root: Path, best: Path | None = None) -> TrainState:
    """Restore the newest complete checkpoint under ``root`` (and its snapshot of ``best``);
    a fresh TrainState if there is none."""
    found = checkpoint_dirs(root)
    if not found:
        return TrainState()
    from instructrl.models.base import load_errors

    try:
        check_rng_state(found[-1], accelerator.process_index)
        accelerator.load_state(str(found[-1]))
    except (*load_errors(), RuntimeError) as err:  # a file cut short (a copied run folder), or written by another model
        raise UserError(f"cannot resume from the checkpoint {found[-1]}: {str(err).splitlines()[0]}; "
                        "pass --restart to start over") from None
    if best is not None and (found[-1] / "best").is_dir() and accelerator.is_main_process:
        copy_dir(found[-1] / "best", best, copy_function=os.link)
    accelerator.wait_for_everyone()
    return TrainState(**json.loads((found[-1] / "trainer_state.json").read_text()))
