"""Shared fixtures: the CLI as a subprocess, and a smoke-sized pretrained base model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m instructrl ARGS`` and return the finished process (stdout and stderr as text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "instructrl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"instructrl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def kill_after_first_checkpoint(args: list[str], checkpoints: Path, sig: int | None = None) -> str:
    """Start ``instructrl ARGS``, send it ``sig`` (SIGKILL by default; SIGINT is Ctrl-C) once a
    complete checkpoint exists under ``checkpoints``; return what it wrote to stderr."""
    import signal
    import tempfile
    import time

    sig = signal.SIGKILL if sig is None else sig
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full one would stall the run
    # a shell's background job ignores SIGINT, and the child would inherit that: Ctrl-C must reach it
    proc = subprocess.Popen([sys.executable, "-m", "instructrl", *args], stdout=subprocess.DEVNULL, stderr=log,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(not p.name.endswith(".tmp") for p in checkpoints.glob("step-*")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    proc.wait()
    log.seek(0)
    stderr = log.read()
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig, -sig)  # Ctrl-C and SIGTERM end cleanly
    assert proc.returncode == expected, f"exit status {proc.returncode}, not {expected} (did the run finish before it could be stopped?)\n{stderr}"
    return stderr


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory) -> Path:
    """A run folder holding the smoke world and a pretrained smoke base model (pretrain/final)."""
    run_dir = tmp_path_factory.mktemp("smoke-base")
    cli("pretrain", "-c", str(SMOKE), f"run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="session")
def smoke_collect(smoke_base) -> Path:
    """The smoke run folder with comparisons collected from the base model (collect/), read only."""
    cli("collect", "-c", str(SMOKE), f"run.dir={smoke_base}", f"collect.policy={smoke_base / 'pretrain' / 'final'}")
    return smoke_base


@pytest.fixture(scope="session")
def smoke_rm(smoke_collect) -> Path:
    """The smoke run folder with a reward model (rm/final) on those comparisons, from the base model."""
    cli("rm", "-c", str(SMOKE), f"run.dir={smoke_collect}", f"rm.model={smoke_collect / 'pretrain' / 'final'}")
    return smoke_collect
