"""How an ``instructrl`` process ends. ``run()``, the entry point, turns bad input into one line and
exit status 2, a full disk into one line and exit status 1, Ctrl-C and SIGTERM into a line saying
how to resume; of the processes of one launch, the first to stop says why. It closes the process
group before the interpreter exits."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

from rich.markup import escape

from instructrl.cli.root import app, console, is_main_process, state
from instructrl.errors import UserError


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler pre-empting the job) is met as Ctrl-C is: checkpoints are written
    whole and the run resumes, so one line says so; the exit status is 143, the signal's."""
    state["terminated"] = True
    raise KeyboardInterrupt


def run() -> None:
    """Entry point: turn a UserError into one line on stderr and exit status 2; of several processes, the
    first to stop says why (``_first_to_stop``)."""
    signal.signal(signal.SIGTERM, _on_sigterm)  # serve and label: uvicorn installs its own while it runs
    state.pop("first_to_stop", None)
    _import_before_the_process_group()
    try:
        _run_app()
    except Exception as crash:
        # a bug or running out of memory shows its traceback; a collective broken because another process
        # of the launch stopped first (gloo: "Connection closed by peer") follows from that one's message
        if _first_to_stop() is False:
            sys.exit(1)
        _tell_launcher(f"{type(crash).__name__}: {crash}")
        raise
    finally:
        _close_process_group()


def _run_app() -> None:
    try:
        app()
    except UserError as err:
        if state["debug"]:
            raise
        _say_why(str(err))
        sys.exit(2)
    except OSError as err:  # a full disk, a read-only or forbidden folder: checkpoints written so far are whole
        in_the_way = _not_a_folder(err)
        if state["debug"] or (in_the_way is None and err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)):
            raise
        if in_the_way is not None:  # run.dir=results.txt, --dir of a file: bad input, not a full disk
            _say_why(f"{in_the_way}; give a folder's path")
            sys.exit(2)
        where = f" {err.filename}" if err.filename else ""
        _say_why(f"cannot write{where}: {err.strerror or err}; make room or fix the folder, then {_how_to_resume()}")
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit) as exit_:
        # typer turns Ctrl-C into exit status 130
        if isinstance(exit_, KeyboardInterrupt) or exit_.code == 130:
            terminated = state.get("terminated", False)
            _say_why(f"{'terminated' if terminated else 'interrupted'}: {_how_to_resume()} from the last checkpoint", error=False)
            sys.exit(143 if terminated else 130)
        raise


def _not_a_folder(err: OSError) -> str | None:
    """What stands where ``err`` needed a folder (a folder to make, or one on the way to a file to write:
    os.makedirs says EEXIST for the first, any write ENOTDIR for the second): a file, or a link to nothing."""
    if err.errno not in (errno.EEXIST, errno.ENOTDIR) or not err.filename:
        return None
    path = Path(os.fsdecode(err.filename))
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return f"{p} is a link to {os.readlink(p)}, which does not exist"
        if p.exists() and not p.is_dir():
            return f"{p} is a file, where a folder is needed"
    return None


def _say_why(message: str, error: bool = True) -> None:
    """One line on stderr saying why the command stops, from the first process of its launch to stop
    (and in the failure summary ``accelerate launch`` prints last)."""
    first = _first_to_stop()
    if not (is_main_process() if first is None else first):  # without the launcher's store, the main process speaks
        return
    console.print(("[bold red]error:[/bold red] " if error else "") + escape(message), highlight=False, soft_wrap=True)
    _tell_launcher(("error: " if error else "") + message)


def _tell_launcher(message: str) -> None:
    """Write ``message`` to torchrun's error file, whose failure summary then names it as the root cause."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):  # the full disk this may report
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def _first_to_stop() -> bool | None:
    """Whether this process, stopping early, is the first of its launch to stop, and so the one to say why;
    None when it cannot know (several processes, and no launcher's store to count them in).

    Under `accelerate launch` every process meets the same bad input, or one process alone fails (a
    checkpoint only the main process writes, a file only its own rank reads); either way the launcher
    then stops the others (SIGTERM) or their collectives break, and one message says why, from the
    process that knows. The first to stop is counted in the store of torchrun's agent."""
    if "first_to_stop" not in state:
        # this process is leaving: the launcher's SIGTERM to the others must not cut its message short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        state["first_to_stop"] = _claim_first_stop()
    return state["first_to_stop"]


def _claim_first_stop() -> bool | None:
    if not _launched():
        return True
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # not launched by torchrun's agent (accelerate launch's)
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    try:
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=10))
        # the agent's store outlives the workers; a restarted worker group counts afresh
        return store.add(f"instructrl/stopped/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", 1) == 1
    except (RuntimeError, OSError, KeyError, ValueError):  # the launcher is gone
        return None


def _how_to_resume() -> str:
    """What to run to resume: the same command, less a --restart or --restart-from, which would
    discard the progress just made once more."""
    if any(arg == "--restart" or arg.startswith("--restart-from") for arg in sys.argv[1:]):
        return "run the same command without --restart or --restart-from to resume"
    return "run the same command again to resume"


def _import_before_the_process_group() -> None:
    """Import torch.distributed.nn before Accelerate creates the process group, so that
    ``_close_process_group`` frees it. Imported later (transformers does, loading a tokenizer), its
    functions keep the group as a default argument (``group=group.WORLD``): gloo's worker threads then
    outlive destroy_process_group, and one still releasing the last collective's tensors when the
    interpreter shuts down takes the GIL and aborts the process (the pipeline's rank 1, leaving just
    after its last PPO step while rank 0 evaluates)."""
    if _launched():  # one process has no group
        import torch.distributed.nn  # noqa: F401


def _launched() -> bool:
    """Whether this is one of several processes a launcher (torchrun, accelerate launch) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _close_process_group() -> None:
    """Destroy the process group of ``accelerate launch`` and free it before the interpreter exits: gloo's
    worker threads stop only when the last reference to the group goes, once the collectives in flight are
    done. Left running into the interpreter's teardown, one that then takes the GIL (to run a completion
    callback, or to release the last collective's tensors) aborts the finished process ("terminate called
    without an active exception"). The references to let go of: those ``_import_before_the_process_group``
    avoids, every DeviceMesh's (``_let_meshes_go_of_groups``), and those of what FSDP2 left in reference
    cycles (the finished stage's sharded model), which only the garbage collector frees."""
    # Read from sys.modules, never imported: after --help there is no torch, and after Ctrl-C halfway
    # through `import torch` (a slow start) torch has left sys.modules while torch.distributed stayed, so
    # importing it would run torch's __init__ again and crash on its half-made state (no group exists then)
    dist = sys.modules.get("torch.distributed")
    if "torch" in sys.modules and dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _let_meshes_go_of_groups()
        gc.collect()


def _let_meshes_go_of_groups() -> None:
    """Empty every DeviceMesh's registry of its process groups, destroyed by now. A mesh holds its groups
    themselves, not just their names, and torch's DTensor caches (redistribution plans, mesh topologies)
    keep every mesh FSDP2 sharded a model over until the process ends."""
    device_mesh = sys.modules.get("torch.distributed.device_mesh")
    if device_mesh is None:  # no FSDP2 or DTensor ran
        return
    for obj in gc.get_objects():
        # the type, not isinstance: isinstance asks some objects for __class__, which warns (torch's reduce_op)
        if issubclass(type(obj), device_mesh.DeviceMesh):
            getattr(obj, "_pg_registry", {}).clear()
