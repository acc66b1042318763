"""Resumable checkpoints: weights, optimizer, scheduler, every process's RNG, and the step.

A checkpoint is written to ``step-N.tmp`` and renamed when complete, so a run killed while
saving leaves the previous checkpoint intact and the half-written one is ignored. It resumes on
another number of processes too (the global batch and the data order do not depend on it), but
then the RNG states it holds belong to other processes, and each process's starts afresh. It does
not resume under another layout of the state (FSDP's, DeepSpeed's, or one process's as DDP's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructrl.errors import UserError
from instructrl.rundir.files import copy_dir, replace_dir
from instructrl.training.progress import plural


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
        recorded = {"processes": accelerator.num_processes, "layout": layout_of(accelerator)}
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state) | recorded))
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


# How Accelerate's save_state lays out the weights and optimizer: FSDP and DeepSpeed write their own
# files, which load only under the same; one process's are DDP's too. Each: its name in a message,
# and how to launch a run under it.
LAYOUTS = {
    "fsdp": ("FSDP", "under FSDP as it was launched (an accelerate config with distributed_type: FSDP)"),
    "deepspeed": ("DeepSpeed", "under DeepSpeed as it was launched (an accelerate config with distributed_type: DEEPSPEED)"),
    "ddp": ("DDP", "without FSDP or DeepSpeed as it was launched (configs/accelerate/ddp.yaml, or one process)"),
}


def layout_of(accelerator) -> str:
    """The key in LAYOUTS of the checkpoints ``accelerator`` writes and can load."""
    kind = accelerator.distributed_type  # an enum of strings
    return "fsdp" if kind == "FSDP" else "deepspeed" if kind == "DEEPSPEED" else "ddp"


def written_by(checkpoint: Path) -> tuple[int, str]:
    """How many processes wrote ``checkpoint``, and how its state is laid out (a key in LAYOUTS): as its
    trainer_state.json records, or for a checkpoint older than that record, from its files: one RNG
    state per process (none: the first is missing), model files Accelerate names after the layout."""
    from accelerate.utils import RNG_STATE_NAME

    recorded = json.loads((checkpoint / "trainer_state.json").read_text())
    processes = recorded.get("processes") or max(1, len(list(checkpoint.glob(f"{RNG_STATE_NAME}_*.pkl"))))
    layout = recorded.get("layout") or ("fsdp" if any(checkpoint.glob("pytorch_model_fsdp*"))
                                        else "deepspeed" if (checkpoint / "pytorch_model").is_dir() else "ddp")
    return processes, layout


def launched(processes: int, layout: str) -> str:
    """A run's processes and layout in words: "2 processes under FSDP", "1 process" (one process is no DDP)."""
    return plural(processes, "process") + ("" if layout == "ddp" and processes == 1 else f" under {LAYOUTS[layout][0]}")


@contextlib.contextmanager
def sizes_for_resuming(root: Path | None, processes: int, restart: str = "--restart"):
    """Around a stage's size checks: a size that does not divide over ``processes``, where the run would
    resume a checkpoint under ``root`` written by another number of processes, also names the checkpoint
    and the number it resumes on (the sizes are part of the run's config: changing them starts it over,
    as the option ``restart`` does). ``root`` None: there is nothing to resume."""
    try:
        yield
    except UserError as err:
        found = checkpoint_dirs(root) if root is not None else []
        try:
            writers = written_by(found[-1])[0] if found else processes
        except (OSError, ValueError):  # a damaged checkpoint: resuming says so
            raise err from None
        if writers == processes:
            raise
        raise UserError(f"{err}; the checkpoint {found[-1]} was written by {plural(writers, 'process')} and this run has {processes}: "
                        f"resume it with {plural(writers, 'process')}, or pass {restart} with sizes that divide") from None


def fresh_random_state(seed: int, step: int, process_index: int) -> None:
    """Seed this process's RNGs from the run's seed, the step and the process (as a run starts from
    seed + process): a run resumed on another number of processes has no saved state for them,
    and must still repeat itself run to run. The step keeps the masks of step 0 from being replayed."""
    from accelerate.utils import set_seed

    set_seed((seed + process_index + 1_000_003 * step) % 2**32)


def load_latest_checkpoint(accelerator, root: Path, seed: int, best: Path | None = None, log=print) -> TrainState:
    """Restore the newest complete checkpoint under ``root`` (and its snapshot of ``best``);
    a fresh TrainState if there is none. Written by another number of processes, it restores all
    but the RNGs, which start afresh from ``seed``, and ``log`` says so; written under another
    layout (FSDP against DDP), it is refused, naming both."""
    found = checkpoint_dirs(root)
    if not found:
        return TrainState()
    from instructrl.models.base import load_errors

    checkpoint, processes = found[-1], accelerator.num_processes
    writers = processes  # until the checkpoint says otherwise
    try:
        writers, layout = written_by(checkpoint)
        if layout != layout_of(accelerator):  # before loading: Accelerate would look for files of its own layout, and name one missing
            raise UserError(f"cannot resume from the checkpoint {checkpoint}: it was written by {launched(writers, layout)} and this run "
                            f"has {launched(processes, layout_of(accelerator))}, which cannot load it; resume {LAYOUTS[layout][1]}, "
                            "or pass --restart to start over")
        if writers == processes:
            check_rng_state(checkpoint, accelerator.process_index)
        accelerator.load_state(str(checkpoint))
    except (*load_errors(), RuntimeError) as err:  # a file cut short (a copied run folder), or written by another model
        reason = str(err).splitlines()[0]
        if writers != processes:  # of the same layout, yet laid out for those processes (DeepSpeed's partitioned state)
            raise UserError(f"cannot resume from the checkpoint {checkpoint}: it was written by {plural(writers, 'process')} and this run "
                            f"has {processes}, which cannot load it ({reason}); resume with {plural(writers, 'process')} "
                            "as it was launched, or pass --restart to start over") from None
        raise UserError(f"cannot resume from the checkpoint {checkpoint}: {reason}; pass --restart to start over") from None
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    state = TrainState(**{k: v for k, v in saved.items() if k not in ("processes", "layout")})
    if writers != processes:
        fresh_random_state(seed, state.step, accelerator.process_index)
        log(f"{checkpoint} was written by {plural(writers, 'process')} and this run has {processes}: weights, optimizer, "
            "schedule and data position carry over; each process's random state (dropout masks) starts afresh from run.seed")
    if best is not None and (checkpoint / "best").is_dir() and accelerator.is_main_process:
        copy_dir(checkpoint / "best", best, copy_function=os.link)
    accelerator.wait_for_everyone()
    return state
