"""The feedback app's SQLite database: schema (and its upgrade), connections and transactions.

One file, ``feedback.db`` in the project directory, in WAL mode so that readers never block the
writer, with ``synchronous=FULL`` so that a committed answer survives a crash or a power cut.
Every write goes through ``transaction`` (``BEGIN IMMEDIATE``: one writer at a time, the others
wait up to ``busy_timeout``), so many labelers submitting at once are serialised, never lost.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from instructrl.errors import UserError

DB_NAME = "feedback.db"
BUSY_TIMEOUT_MS = 30_000
# PRAGMA user_version. 0: API tokens in plain text (users.token); 1: their digests (users.token_hash);
# 2: how a project's responses were generated (projects.generation)
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'labeler')),
    password_hash TEXT NOT NULL,   -- scrypt, hex, with its salt
    salt TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,  -- digest of the labeler's API token (Authorization: Bearer ...)
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,      -- digest of the session id in the browser's cookie
    user_id INTEGER NOT NULL REFERENCES users(id),
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    guidelines TEXT NOT NULL,
    guideline_version TEXT NOT NULL,
    overlap INTEGER NOT NULL CHECK (overlap >= 1),  -- different labelers per task
    lease_seconds INTEGER NOT NULL CHECK (lease_seconds >= 1),
    created REAL NOT NULL,
    generation TEXT NOT NULL DEFAULT '{}'  -- JSON: the models and settings its responses were generated with
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    kind TEXT NOT NULL CHECK (kind IN ('write', 'rank', 'compare')),
    prompt_id TEXT NOT NULL,
    prompt TEXT NOT NULL,          -- JSON list of messages, ending with the user's turn
    responses TEXT NOT NULL,       -- JSON list: K responses (rank), 2 answers (compare), [] (write)
    sources TEXT NOT NULL          -- JSON list: where each response came from; never shown to labelers
);
CREATE INDEX IF NOT EXISTS tasks_by_project ON tasks(project_id, kind, id);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    state TEXT NOT NULL CHECK (state IN ('leased', 'submitted', 'skipped')),
    display_order TEXT NOT NULL,   -- JSON permutation: position p shows response display_order[p]
    leased_at REAL NOT NULL,
    lease_expires REAL NOT NULL,
    draft TEXT,
    answer TEXT,                   -- JSON, in the task's own response order
    skip_reason TEXT,
    guideline_version TEXT,
    seconds_spent REAL,
    submitted_at REAL,
    UNIQUE (task_id, user_id)      -- nobody judges a task twice: overlap N means N different people
);
CREATE INDEX IF NOT EXISTS assignments_by_user ON assignments(user_id, state);
"""


def connect(project_dir: Path | str, create: bool = True) -> sqlite3.Connection:
    """A connection to the project's database (``create``: with its schema, made if missing;
    otherwise a missing database is a UserError, so a mistyped directory creates nothing).

    One connection per thread or request; rows come back as ``sqlite3.Row``. Autocommit mode:
    ``transaction`` opens each write transaction explicitly.
    """
    path = Path(project_dir) / DB_NAME
    if not create and not path.is_file():
        raise UserError(f"no feedback database at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    except sqlite3.OperationalError as err:  # a folder of that name, say
        raise UserError(f"{path}: cannot be opened as a feedback database ({err})") from None
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # the first read of the file: another kind of file, or a damaged one, fails here, unchanged
    except sqlite3.DatabaseError as err:
        conn.close()
        raise UserError(f"{path}: cannot be opened as a feedback database ({err})") from None
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    upgrade(conn, path)
    if create:
        conn.executescript(SCHEMA)
    return conn


def upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """Bring a database made by an earlier instructrl to SCHEMA_VERSION: all of it in one
    transaction, or, on any error, nothing. Version 0 kept API tokens in plain text: each is
    replaced by its digest, so every labeler's token goes on working. Before version 2 a project
    did not record how its responses were generated: its ``generation`` is ``{}``."""
    if _version(conn) == SCHEMA_VERSION:
        return
    with transaction(conn):
        version = _version(conn)  # again, in the transaction: another process may have upgraded it meanwhile
        if version > SCHEMA_VERSION:
            raise UserError(f"{path} was made by a newer instructrl (schema version {version}; this one reads {SCHEMA_VERSION})")
        if "token" in _columns(conn, "users"):
            conn.execute("PRAGMA secure_delete = ON")  # the plain tokens' bytes are overwritten, not just freed
            for user_id, token in conn.execute("SELECT id, token FROM users").fetchall():
                conn.execute("UPDATE users SET token = ? WHERE id = ?", (digest(token), user_id))
            conn.execute("ALTER TABLE users RENAME COLUMN token TO token_hash")
        if (project_columns := _columns(conn, "projects")) and "generation" not in project_columns:
            conn.execute("ALTER TABLE projects ADD COLUMN generation TEXT NOT NULL DEFAULT '{}'")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # until the log is copied back, the file's old pages hold the plain tokens


def _version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The names of ``table``'s columns; none where a new database does not have it yet."""
    return {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read transaction: every query inside sees the database as it was at the first one,
    whatever other connections commit meanwhile (WAL: nobody waits). Inside another
    transaction, that one is the snapshot."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def now() -> float:
    return time.time()


def digest(secret: str) -> str:
    """What the database keeps of a secret it checks (an API token, a session id): its sha256,
    hex, so that a copy of the file logs nobody in. The secrets are random
    (``secrets.token_urlsafe``), not passwords: no salt or slow hash is needed."""
    return hashlib.sha256(secret.encode()).hexdigest()
