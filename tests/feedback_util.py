"""Helpers of the feedback app's tests: a project directory with users and tasks, a live server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from instructrl.feedback.accounts import create_user
from instructrl.feedback.db import connect
from instructrl.feedback.tasks import ProjectSettings, add_tasks, create_project

PROMPT = [{"role": "user", "content": "Sort 3 1 2."}]
RESPONSES = ["1 2 3", "3 2 1", "Sure! 1 2 3", "banana"]


def rank_task(i: int, responses=RESPONSES) -> dict:
    return {"kind": "rank", "prompt_id": f"r{i}", "prompt": [{"role": "user", "content": f"Sort {i} 1 2."}],
            "responses": [f"{r} ({i})" for r in responses], "sources": [f"model#{j}" for j in range(len(responses))]}


def make_project(root: Path, users: dict[str, str], tasks: list[dict], overlap: int = 1, lease_seconds: int = 600,
                 guidelines: str = "Prefer correct, concise answers.") -> tuple:
    """A project directory: ``users`` (name -> role, password = name * 2), one project 'p' holding ``tasks``."""
    conn = connect(root)
    accounts = {name: create_user(conn, name, role, name * 2) for name, role in users.items()}
    project_id = create_project(conn, ProjectSettings(name="p", guidelines=guidelines, overlap=overlap, lease_seconds=lease_seconds))
    add_tasks(conn, project_id, tasks)
    return conn, project_id, accounts


def start_server(project_dir: Path, port: int) -> subprocess.Popen:
    """``instructrl label --dir project_dir --port port`` in a subprocess, once it answers."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "instructrl", "label", "--dir", str(project_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/login", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start within 60 s")
