"""``runs/<name>/.<stage>.lock``: held by the one process writing the stage's folder (``hold``); says which."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path

from instructrl.errors import UserError


_held: dict[str, int] = {}  # lock file -> the descriptor by which this process holds it


def hold(folder: Path) -> None:
    """Make this process the one writer of ``folder`` until ``release(folder)`` or its exit: another
    process that would write it (a second ``instructrl pipeline`` on the run) stops with one line naming
    this one, before it writes anything. An flock, which the kernel drops when its holder dies, kill -9
    included, so that it never goes stale; on a file beside the folder, as --restart empties the folder."""
    lock = _lock_file(folder)
    if lock in _held:  # a stage run again in this process (after an error, in a test)
        return
    fd = _take(lock, folder)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M"), "command": _command_line()}).encode())
    _held[lock] = fd


@contextlib.contextmanager
def rewriting(folder: Path):
    """Hold ``folder`` (``hold``) while the caller rewrites it, which no stage of its run may be running to read
    (the world): while another process holds one, stop with the one line ``hold`` gives, before anything is written."""
    run = Path(folder).parent
    run.mkdir(parents=True, exist_ok=True)  # where the lock files lie
    hold(folder)
    try:
        for lock in sorted([*run.glob(".*.lock"), *run.glob("*/.*.lock")]):  # the run's stages, and its later rounds'
            if os.path.realpath(lock) not in _held:  # this process's own stage (pretrain --restart rebuilds the world)
                os.close(_take(str(lock), lock.with_name(lock.name[1 : -len(".lock")]), f"cannot rewrite {folder}, which the run's stages read: "))
        yield
    finally:
        release(folder)


def _take(lock: str, folder: Path, why: str = "") -> int:
    """A descriptor of lock file ``lock`` that holds it; else one line naming the process that holds ``folder``."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(f"{why}{folder} is in use by another instructrl process ({holder}); wait for it to finish or stop it") from None
    return fd


def release(folder: Path) -> None:
    """Let another process write ``folder`` (see ``hold``)."""
    _let_go(_lock_file(folder))


def _let_go(lock: str) -> None:
    fd = _held.pop(lock, None)
    if fd is not None:
        os.close(fd)  # the kernel drops the flock with its last descriptor


def releases_on_error(stage):
    """Decorates a stage's function: if it fails, the folders it took (``hold``) are let go. The caller
    may live on (a notebook, a test), and another process must then be able to run the stage."""
    @functools.wraps(stage)
    def run(*args, **kwargs):
        before = set(_held)
        try:
            return stage(*args, **kwargs)
        except BaseException:
            for lock in set(_held) - before:
                _let_go(lock)
            raise
    return run


def _lock_file(folder: Path) -> str:
    folder = Path(folder)
    return os.path.realpath(folder.with_name(f".{folder.name}.lock"))


def _holder(fd: int) -> str:
    """Who holds a lock file, as its holder wrote it: "pid N, started ..., `command`"."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0))
        return f"pid {info['pid']}, started {info['started']}, `{info['command']}`"
    except (ValueError, KeyError, TypeError):  # the holder is writing it this instant
        return "pid unknown"


def _command_line() -> str:
    """This process's command, as typed: ``instructrl ...`` however the CLI was started (python -m, torchrun)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = "instructrl" if "instructrl" in (program.name, program.parent.name) else program.name
    return shlex.join([name, *sys.argv[1:]])
