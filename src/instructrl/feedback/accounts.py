"""Labeler accounts: roles, passwords (scrypt), per-labeler API tokens, browser sessions and a
throttle on failed logins."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from instructrl.errors import UserError
from instructrl.data.jsonl import encodable
from instructrl.feedback.db import digest, now, transaction

ROLES = ("admin", "labeler")
SESSION_SECONDS = 12 * 3600  # a working day: a browser left logged in is logged out overnight


class AccountError(UserError):
    """An account that cannot be created; ``field`` names the bad input."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class NameTaken(AccountError):
    """The name belongs to another account."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    token: str | None = None  # the API token, in plain text only where it is made (create_user, reset_user), to be shown once

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _hash(password: str, salt: str) -> str:
    return hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1).hex()


def _user(row: sqlite3.Row | None) -> User | None:
    return None if row is None else User(row["id"], row["name"], row["role"])


def _check(name: str, password: str) -> None:
    for field, value in (("name", name), ("password", password)):
        try:
            encodable(value)
        except ValueError as err:
            raise AccountError(f"{field}: {err}", field) from None
    if not name:
        raise AccountError("a user needs a name", "name")
    if len(password) < 4:
        raise AccountError("a password needs at least 4 characters", "password")


def create_user(conn: sqlite3.Connection, name: str, role: str, password: str) -> User:
    """A new account named ``name`` without its surrounding spaces; its API token is generated
    here and shown once to the admin: the database keeps only its digest."""
    name = name.strip()
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}", "role")
    _check(name, password)
    salt = secrets.token_hex(16)
    with transaction(conn):
        if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
            raise NameTaken(f"user {name!r} already exists", "name")
        token = secrets.token_urlsafe(24)
        user_id = conn.execute("INSERT INTO users (name, role, password_hash, salt, token_hash, created) VALUES (?, ?, ?, ?, ?, ?)",
                               (name, role, _hash(password, salt), salt, digest(token), now())).lastrowid
    return User(user_id, name, role, token)


def reset_user(conn: sqlite3.Connection, name: str, password: str) -> User:
    """Give account ``name`` a new password and a new API token: its old token and its browser
    sessions stop working (a lost password, or a token that leaked)."""
    name = name.strip()
    _check(name, password)
    salt, token = secrets.token_hex(16), secrets.token_urlsafe(24)
    with transaction(conn):
        user = _user(conn.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone())
        if user is None:
            raise AccountError(f"no user {name!r}", "name")
        conn.execute("UPDATE users SET password_hash = ?, salt = ?, token_hash = ? WHERE id = ?",
                     (_hash(password, salt), salt, digest(token), user.id))
        conn.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
    return replace(user, token=token)


def login(conn: sqlite3.Connection, name: str, password: str) -> User | None:
    row = conn.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
    if row is None or not hmac.compare_digest(row["password_hash"], _hash(password, row["salt"])):
        return None
    return _user(row)


def user_by_token(conn: sqlite3.Connection, token: str) -> User | None:
    return _user(conn.execute("SELECT * FROM users WHERE token_hash = ?", (digest(token),)).fetchone())


def start_session(conn: sqlite3.Connection, user: User) -> str:
    """A new browser session of ``user``, SESSION_SECONDS long: its id, for the cookie. The
    database keeps only its digest; expired sessions are dropped here."""
    session_id = secrets.token_urlsafe(32)
    with transaction(conn):
        at = now()
        conn.execute("DELETE FROM sessions WHERE expires <= ?", (at,))
        conn.execute("INSERT INTO sessions (id_hash, user_id, expires) VALUES (?, ?, ?)", (digest(session_id), user.id, at + SESSION_SECONDS))
    return session_id


def user_by_session(conn: sqlite3.Connection, session_id: str) -> User | None:
    return _user(conn.execute("SELECT u.* FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id_hash = ? AND s.expires > ?",
                              (digest(session_id), now())).fetchone())


def end_session(conn: sqlite3.Connection, session_id: str) -> None:
    """Log a browser out: its cookie, or any copy of it, no longer works. The API token still does."""
    with transaction(conn):
        conn.execute("DELETE FROM sessions WHERE id_hash = ?", (digest(session_id),))


def list_users(conn: sqlite3.Connection) -> list[User]:
    return [_user(r) for r in conn.execute("SELECT * FROM users ORDER BY id")]


class FailedLogins:
    """Failed logins of the last ``window`` seconds, per account name and per client address, in
    memory (one server process). Past ``per_name`` failures for a name, or ``per_client`` from an
    address, a login is refused without its password being tried: guessing a password takes
    years, not hours. A success clears the account's failures."""

    def __init__(self, per_name: int = 5, per_client: int = 20, window: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.limits = {"name": per_name, "client": per_client}
        self.window, self.clock = window, clock
        self.failures: dict[tuple[str, str], list[float]] = {}  # (kind, name or address) -> times, oldest first
        self.lock = threading.Lock()  # sync routes run in a thread pool

    def retry_after(self, name: str, client: str) -> int:
        """Seconds until ``name`` may try again from ``client``; 0: now."""
        with self.lock:
            at, wait = self.clock(), 0.0
            for key in (("name", name), ("client", client)):
                recent = [t for t in self.failures.get(key, ()) if t > at - self.window]
                limit = self.limits[key[0]]
                if len(recent) >= limit:  # allowed again once the limit-th latest failure leaves the window
                    wait = max(wait, recent[-limit] + self.window - at)
            return math.ceil(wait)

    def failed(self, name: str, client: str) -> None:
        with self.lock:
            at = self.clock()
            if len(self.failures) > 10_000:  # names nobody has: forget those of past windows
                self.failures = {k: v for k, v in self.failures.items() if v[-1] > at - self.window}
            for key in (("name", name), ("client", client)):
                self.failures[key] = [t for t in self.failures.get(key, ()) if t > at - self.window] + [at]

    def succeeded(self, name: str) -> None:
        with self.lock:
            self.failures.pop(("name", name), None)
