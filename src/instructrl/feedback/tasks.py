"""Projects, tasks and who does what: assignment, leases, overlap, skips, drafts and answers.

Plain functions over a database connection, testable without HTTP. Three kinds of task
(InstructGPT §3.4 and Appendix B):

- ``write``: a labeler writes the assistant's answer to a prompt (a demonstration);
- ``rank``: K responses, each scored 1-7 with flags, then ranked, ties allowed;
- ``compare``: two models' answers, the better one or a tie (the paper's main evaluation).

Each labeler sees a task's responses in an order of their own (a fixed shuffle per labeler and
task) and never where they came from; answers are stored in the task's own response order.
``overlap`` different labelers judge each task; a lease that expires gives the task back.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from instructrl.feedback.accounts import User
from instructrl.data.jsonl import encodable
from instructrl.feedback.db import now, snapshot, transaction
from instructrl.world.labeler import FLAGS as WORLD_FLAGS

KINDS = ("write", "rank", "compare")
# a compare task whose two answers are the same text: a tie, decided without asking anyone
IDENTICAL = "(t.kind = 'compare' AND json_extract(t.responses, '$[0]') = json_extract(t.responses, '$[1]'))"
# an assignment that keeps its task from other labelers: answered, or leased and not expired (one parameter: now)
HOLDS = "(a.state = 'submitted' OR (a.state = 'leased' AND a.lease_expires > ?))"
# the simulated labeler's flags, then more of InstructGPT's labeling metadata (Table 3)
FLAGS = WORLD_FLAGS + ("hallucination", "harmful", "inappropriate")
# free text from a request: refused at parse time unless it can be stored (see data.jsonl.encodable)
Text = Annotated[str, AfterValidator(encodable)]


class TaskError(Exception):
    """A request the task logic refuses; ``status`` is the HTTP status the app answers with."""

    status = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFound(TaskError):
    status = 404


class Forbidden(TaskError):
    status = 403


class Conflict(TaskError):
    status = 409


class Invalid(TaskError):
    status = 422


class ProjectSettings(BaseModel):
    """How a project is labelled: its guidelines, overlap and leases."""

    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, description="Project name (unique).")
    guidelines: Text = Field("", description="Instructions shown beside every task.")
    guideline_version: Text | None = Field(None, description="Stored on each answer. Default: a hash of the guidelines.")
    overlap: int = Field(1, ge=1, description="Different labelers who judge each task.")
    lease_seconds: int = Field(1800, ge=1, description="How long a task stays reserved for the labeler who opened it.")
    generation: dict = Field(default_factory=dict, description="The models and settings the tasks' responses were generated with, "
                             "by kind of task (label project's --model, --k, --seed, --max-new-tokens; --compare); shown in its progress.")

    def version(self) -> str:
        return self.guideline_version or "sha256:" + hashlib.sha256(self.guidelines.encode()).hexdigest()[:12]


def check_new_name(conn: sqlite3.Connection, name: str) -> None:
    if conn.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
        raise Conflict(f"project {name!r} already exists", "name")


def create_project(conn: sqlite3.Connection, settings: ProjectSettings, tasks: Sequence[dict] = ()) -> int:
    """A new project holding ``tasks`` (as for ``add_tasks``): all of it or, on any error, nothing."""
    with transaction(conn):
        check_new_name(conn, settings.name)
        cur = conn.execute(
            "INSERT INTO projects (name, guidelines, guideline_version, overlap, lease_seconds, created, generation) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (settings.name, settings.guidelines, settings.version(), settings.overlap, settings.lease_seconds, now(), json.dumps(settings.generation)))
        _insert_tasks(conn, cur.lastrowid, tasks)
    return cur.lastrowid


def set_guidelines(conn: sqlite3.Connection, project_id: int, guidelines: str, version: str) -> None:
    """New guidelines; answers submitted from now on carry ``version``."""
    with transaction(conn):
        conn.execute("UPDATE projects SET guidelines = ?, guideline_version = ? WHERE id = ?", (guidelines, version, project_id))


def project_by_name(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM projects WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no project named {name!r}", "project")
    return row


def project_by_id(conn: sqlite3.Connection, project_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM projects WHERE id = ?", (project_id,)).fetchone()
    if row is None:
        raise NotFound(f"no project {project_id}", "project")
    return row


def add_tasks(conn: sqlite3.Connection, project_id: int, tasks: list[dict]) -> int:
    """Add tasks: each ``{"kind", "prompt_id", "prompt": messages, "responses": [...], "sources": [...]}``."""
    with transaction(conn):
        return _insert_tasks(conn, project_id, tasks)


def check_tasks(tasks: Sequence[dict]) -> None:
    """Refuse (Invalid) the first task whose kind cannot hold its number of responses, naming it."""
    for task in tasks:
        kind, n = task["kind"], len(task.get("responses", []))
        expected = {"write": 0, "compare": 2}.get(kind)
        if kind not in KINDS or (expected is not None and n != expected) or (kind == "rank" and not 2 <= n <= 9):
            raise Invalid(f"task {task.get('prompt_id')}: a {kind} task cannot hold {n} responses", "responses")


def _insert_tasks(conn: sqlite3.Connection, project_id: int, tasks: Sequence[dict]) -> int:
    """Check and insert tasks, inside the caller's transaction."""
    check_tasks(tasks)
    rows = []
    for task in tasks:
        responses = list(task.get("responses", []))
        sources = list(task.get("sources") or [""] * len(responses))
        rows.append((project_id, task["kind"], str(task["prompt_id"]), json.dumps(task["prompt"]), json.dumps(responses), json.dumps(sources)))
    conn.executemany("INSERT INTO tasks (project_id, kind, prompt_id, prompt, responses, sources) VALUES (?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def display_order(task_id: int, user_id: int, k: int) -> list[int]:
    """The order a labeler sees a task's K responses in: position p shows response order[p]."""
    order = list(range(k))
    random.Random(f"display:{task_id}:{user_id}").shuffle(order)
    return order


# ---------------------------------------------------------------- assignment


def _holders(conn: sqlite3.Connection, task_id: int, other_than: int, at: float) -> int:
    """Labelers other than ``other_than`` who answered the task or hold a live lease on it."""
    return conn.execute(
        f"SELECT COUNT(*) FROM assignments a WHERE a.task_id = ? AND a.user_id != ? AND {HOLDS}",
        (task_id, other_than, at)).fetchone()[0]


def next_task(conn: sqlite3.Connection, project_id: int, user: User, kind: str | None = None) -> int | None:
    """The id of the assignment ``user`` should work on next, leasing a task if needed; None when nothing is left.

    A live lease the user already holds comes first. Otherwise the first task (by id) that the
    user has neither answered nor skipped and that fewer than ``overlap`` others hold. A compare
    task with two identical answers is never handed out: it is a tie (``identical_compare_tasks``).
    """
    if kind is not None and kind not in KINDS:
        raise Invalid(f"kind must be one of {', '.join(KINDS)}", "kind")
    project = project_by_id(conn, project_id)
    kind_clause, kind_args = ("AND t.kind = ?", (kind,)) if kind else ("", ())
    with transaction(conn):
        at = now()
        held = conn.execute(
            f"SELECT a.id FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE a.user_id = ? AND t.project_id = ? "
            f"AND a.state = 'leased' AND a.lease_expires > ? {kind_clause} ORDER BY a.id LIMIT 1",
            (user.id, project_id, at, *kind_args)).fetchone()
        if held:
            return held["id"]
        row = conn.execute(
            f"SELECT t.id, t.responses FROM tasks t WHERE t.project_id = ? {kind_clause} AND NOT {IDENTICAL} "
            "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.task_id = t.id AND a.user_id = ? AND a.state != 'leased') "
            f"AND (SELECT COUNT(*) FROM assignments a WHERE a.task_id = t.id AND a.user_id != ? AND {HOLDS}) < ? "
            "ORDER BY t.id LIMIT 1",
            (project_id, *kind_args, user.id, user.id, at, project["overlap"])).fetchone()
        if row is None:
            return None
        order = display_order(row["id"], user.id, len(json.loads(row["responses"])))
        conn.execute(
            "INSERT INTO assignments (task_id, user_id, state, display_order, leased_at, lease_expires) VALUES (?, ?, 'leased', ?, ?, ?) "
            "ON CONFLICT (task_id, user_id) DO UPDATE SET leased_at = excluded.leased_at, lease_expires = excluded.lease_expires",
            (row["id"], user.id, json.dumps(order), at, at + project["lease_seconds"]))
        return conn.execute("SELECT id FROM assignments WHERE task_id = ? AND user_id = ?", (row["id"], user.id)).fetchone()["id"]


def _own_assignment(conn: sqlite3.Connection, assignment_id: int, user: User) -> sqlite3.Row:
    row = conn.execute(
        "SELECT a.*, t.kind, t.project_id, t.prompt_id, t.prompt, t.responses FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE a.id = ?",
        (assignment_id,)).fetchone()
    if row is None:
        raise NotFound(f"no assignment {assignment_id}", "assignment")
    if row["user_id"] != user.id:
        raise Forbidden("this task is another labeler's", "assignment")
    return row


def assignment_view(conn: sqlite3.Connection, assignment_id: int, user: User) -> dict:
    """What the labeler's page shows: the prompt, the responses in their display order (no
    sources), the guidelines, the draft and their own answer if they gave one."""
    row = _own_assignment(conn, assignment_id, user)
    project = project_by_id(conn, row["project_id"])
    order = json.loads(row["display_order"])
    responses = json.loads(row["responses"])
    answer = json.loads(row["answer"]) if row["answer"] else None
    return {
        "id": row["id"], "kind": row["kind"], "state": row["state"], "project": project["name"], "project_id": project["id"],
        "prompt_id": row["prompt_id"],
        "prompt": json.loads(row["prompt"]), "responses": [responses[i] for i in order],
        "guidelines": project["guidelines"], "guideline_version": project["guideline_version"],
        "draft": row["draft"] or "", "lease_expires": row["lease_expires"],
        "answer": None if answer is None else to_display(row["kind"], answer, order),
    }


def save_draft(conn: sqlite3.Connection, assignment_id: int, user: User, text: str) -> None:
    """Keep the text of an unfinished demonstration; it also renews the lease, where a submission would be taken."""
    with transaction(conn):
        at = now()
        row = _own_assignment(conn, assignment_id, user)
        _check_open(conn, row, user, at)
        lease = project_by_id(conn, row["project_id"])["lease_seconds"]
        conn.execute("UPDATE assignments SET draft = ?, lease_expires = MAX(lease_expires, ?) WHERE id = ?", (text, at + lease, assignment_id))


def _check_open(conn: sqlite3.Connection, row: sqlite3.Row, user: User, at: float) -> None:
    if row["state"] != "leased":
        raise Conflict(f"this task is already {row['state']}", "assignment")
    overlap = project_by_id(conn, row["project_id"])["overlap"]
    if row["lease_expires"] <= at and _holders(conn, row["task_id"], user.id, at) >= overlap:
        raise Conflict("your lease on this task expired and other labelers took it", "assignment")


def submit(conn: sqlite3.Connection, assignment_id: int, user: User, body: dict) -> dict:
    """Store the labeler's answer, given in their display order; returns it in the task's order.

    A second submission of the same assignment is a Conflict: every answer is stored once.
    """
    with transaction(conn):
        at = now()
        row = _own_assignment(conn, assignment_id, user)
        _check_open(conn, row, user, at)
        order = json.loads(row["display_order"])
        answer = parse_answer(row["kind"], body, order)
        version = project_by_id(conn, row["project_id"])["guideline_version"]
        conn.execute(
            "UPDATE assignments SET state = 'submitted', answer = ?, guideline_version = ?, seconds_spent = ?, submitted_at = ?, draft = NULL "
            "WHERE id = ? AND state = 'leased'",
            (json.dumps(answer), version, at - row["leased_at"], at, assignment_id))
    return answer


def skip(conn: sqlite3.Connection, assignment_id: int, user: User, reason: str) -> None:
    """Give the task back with a reason; it never comes back to this labeler."""
    reason = (reason or "").strip()
    if not reason:
        raise Invalid("a skip needs a reason", "reason")
    with transaction(conn):
        at = now()
        row = _own_assignment(conn, assignment_id, user)
        if row["state"] != "leased":
            raise Conflict(f"this task is already {row['state']}", "assignment")
        conn.execute("UPDATE assignments SET state = 'skipped', skip_reason = ?, seconds_spent = ?, submitted_at = ?, draft = NULL WHERE id = ?",
                     (reason, at - row["leased_at"], at, assignment_id))


# ---------------------------------------------------------------- answers


# strict: "4", 4.0 or true is not a Likert score, "yes" is not a boolean
class WriteBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: Text


class RankBody(BaseModel):
    """A ranking in the labeler's display order."""

    model_config = ConfigDict(extra="forbid", strict=True)
    likert: list[int]
    flags: list[list[Text]]
    ranks: list[int]
    none_acceptable: bool = False


class CompareBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    choice: Literal["left", "right", "tie"]


BODIES = {"write": WriteBody, "rank": RankBody, "compare": CompareBody}


def dense_ranks(ranks: list[int]) -> list[int]:
    """Ranks renumbered 0, 1, 2 ... keeping their order and ties: [2, 5, 2, 9] -> [0, 1, 0, 2]."""
    levels = {r: i for i, r in enumerate(sorted(set(ranks)))}
    return [levels[r] for r in ranks]


def parse_answer(kind: str, body, order: list[int]) -> dict:
    """Validate a submitted body (display order) and return the answer in the task's order.

    Invalid names the offending field: ``likert.2``, ``ranks``, ``choice`` ...
    """
    if not isinstance(body, dict):
        raise Invalid("the answer must be a JSON object", "body")
    try:
        parsed = BODIES[kind].model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        raise Invalid(first["msg"], ".".join(str(p) for p in first["loc"]) or "body") from None
    if kind == "write":
        if not parsed.text.strip():
            raise Invalid("the demonstration is empty", "text")
        return {"text": parsed.text}
    k = len(order)
    if kind == "compare":
        winner = {"left": order[0], "right": order[1], "tie": None}[parsed.choice]
        return {"winner": winner}
    for field in ("likert", "flags", "ranks"):
        if len(getattr(parsed, field)) != k:
            raise Invalid(f"expected {k} entries, one per response, got {len(getattr(parsed, field))}", field)
    for p, score in enumerate(parsed.likert):
        if not 1 <= score <= 7:
            raise Invalid(f"Likert scores are 1 to 7, got {score}", f"likert.{p}")
    for p, flags in enumerate(parsed.flags):
        unknown = [f for f in flags if f not in FLAGS]
        if unknown:
            raise Invalid(f"unknown flag {unknown[0]!r}; flags are {', '.join(FLAGS)}", f"flags.{p}")
    if any(r < 0 for r in parsed.ranks):
        raise Invalid("ranks are >= 0 (0 = best, equal ranks = a tie)", "ranks")

    def to_task_order(values: list) -> list:
        out = [None] * k
        for position, response in enumerate(order):
            out[response] = values[position]
        return out

    return {
        "likert": to_task_order(parsed.likert),
        "flags": to_task_order([sorted(set(f), key=FLAGS.index) for f in parsed.flags]),
        "ranks": dense_ranks(to_task_order(parsed.ranks)),
        "none_acceptable": parsed.none_acceptable,
    }


def to_display(kind: str, answer: dict, order: list[int]) -> dict:
    """A stored answer (task order) in the labeler's display order: what they see again."""
    if kind == "write":
        return answer
    if kind == "compare":
        return {"choice": "tie" if answer["winner"] is None else ("left" if order[0] == answer["winner"] else "right")}
    return {**{f: [answer[f][i] for i in order] for f in ("likert", "flags", "ranks")}, "none_acceptable": answer["none_acceptable"]}


def submitted_answers(conn: sqlite3.Connection, project_id: int, kind: str) -> list[dict]:
    """Every submitted answer of one kind, oldest first, with its task and labeler."""
    rows = conn.execute(
        "SELECT a.id, a.answer, a.guideline_version, a.seconds_spent, a.submitted_at, u.name AS labeler, "
        "t.id AS task_id, t.prompt_id, t.prompt, t.responses, t.sources FROM assignments a "
        "JOIN tasks t ON t.id = a.task_id JOIN users u ON u.id = a.user_id "
        "WHERE t.project_id = ? AND t.kind = ? AND a.state = 'submitted' ORDER BY t.id, a.submitted_at, a.id",
        (project_id, kind)).fetchall()
    return [{
        "assignment_id": r["id"], "task_id": r["task_id"], "prompt_id": r["prompt_id"], "prompt": json.loads(r["prompt"]),
        "responses": json.loads(r["responses"]), "sources": json.loads(r["sources"]), "answer": json.loads(r["answer"]),
        "labeler": r["labeler"], "guideline_version": r["guideline_version"], "seconds_spent": r["seconds_spent"],
    } for r in rows]


def identical_compare_tasks(conn: sqlite3.Connection, project_id: int) -> list[dict]:
    """The compare tasks whose two answers are the same text (never handed out: a tie), as ``submitted_answers`` gives tasks."""
    rows = conn.execute(f"SELECT t.id, t.prompt_id, t.prompt, t.responses, t.sources FROM tasks t WHERE t.project_id = ? AND {IDENTICAL} "
                        "ORDER BY t.id", (project_id,)).fetchall()
    return [{"task_id": r["id"], "prompt_id": r["prompt_id"], "prompt": json.loads(r["prompt"]), "responses": json.loads(r["responses"]),
             "sources": json.loads(r["sources"])} for r in rows]


# ---------------------------------------------------------------- progress


def progress(conn: sqlite3.Connection, project_id: int) -> dict:
    """Tasks, answers needed (tasks x overlap), submitted, skipped and live leases, per kind and per labeler;
    and how the responses were generated."""
    with snapshot(conn):  # one read transaction: per kind and per labeler count the same answers while people submit
        project = project_by_id(conn, project_id)
        at = now()
        per_kind = {}
        for kind, n_tasks, identical in conn.execute(f"SELECT kind, COUNT(*), SUM({IDENTICAL}) FROM tasks t WHERE project_id = ? GROUP BY kind",
                                                     (project_id,)).fetchall():
            n_tasks -= identical  # decided as ties, never shown
            counts = dict(conn.execute(
                "SELECT CASE WHEN a.state = 'leased' AND a.lease_expires <= ? THEN 'expired' ELSE a.state END AS s, COUNT(*) "
                "FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE t.project_id = ? AND t.kind = ? GROUP BY s",
                (at, project_id, kind)).fetchall())
            complete = conn.execute(
                "SELECT COUNT(*) FROM tasks t WHERE t.project_id = ? AND t.kind = ? AND "
                f"NOT {IDENTICAL} AND (SELECT COUNT(*) FROM assignments a WHERE a.task_id = t.id AND a.state = 'submitted') >= ?",
                (project_id, kind, project["overlap"])).fetchone()[0]
            needed = n_tasks * project["overlap"]
            submitted = counts.get("submitted", 0)
            per_kind[kind] = {"tasks": n_tasks, "tasks_complete": complete, "answers_needed": needed, "submitted": submitted,
                              "skipped": counts.get("skipped", 0), "leased": counts.get("leased", 0),
                              "done": min(1.0, submitted / needed) if needed else 1.0}
            if kind == "compare":
                per_kind[kind]["identical_answers"] = identical
        per_labeler = {}
        for r in conn.execute(
            "SELECT u.name, a.state, a.lease_expires, a.seconds_spent FROM assignments a JOIN tasks t ON t.id = a.task_id "
            "JOIN users u ON u.id = a.user_id WHERE t.project_id = ? ORDER BY u.name", (project_id,)):
            entry = per_labeler.setdefault(r["name"], {"submitted": 0, "skipped": 0, "leased": 0, "seconds": 0.0})
            if r["state"] == "leased":
                entry["leased"] += r["lease_expires"] > at
            else:
                entry[r["state"]] += 1
                entry["seconds"] += r["seconds_spent"] or 0.0
        for entry in per_labeler.values():
            finished = entry["submitted"] + entry["skipped"]
            entry["mean_seconds"] = entry.pop("seconds") / finished if finished else None
        return {"project": project["name"], "overlap": project["overlap"], "generation": json.loads(project["generation"]),
                "kinds": per_kind, "labelers": per_labeler}
