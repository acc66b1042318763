"""The feedback app over HTTP: auth and roles, validation, export round trip, 20 labelers at once, a crash."""

from __future__ import annotations

import hashlib
import inspect
import json
import signal
import sqlite3
import threading

import httpx
import pytest
from conftest import cli
from fastapi.testclient import TestClient
from feedback_util import make_project, rank_task, start_server
from ports import free_port

from instructrl.data.preference import comparison_from_preference
from instructrl.data.inputs import read_comparisons
from instructrl.data.records import validate_messages
from instructrl.feedback import accounts, db
from instructrl.feedback.accounts import FailedLogins, create_user
from instructrl.feedback.accounts import SESSION_SECONDS
from instructrl.feedback.app import COOKIE, MAX_BODY_BYTES, create_app
from instructrl.feedback.db import SCHEMA_VERSION, connect
from instructrl.feedback.tasks import FLAGS, dense_ranks

USERS = {"root": "admin", "ann": "labeler", "bob": "labeler"}
WRITE = {"kind": "write", "prompt_id": "w1", "prompt": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
                                                         {"role": "user", "content": "Now double it."}]}
COMPARE = {"kind": "compare", "prompt_id": "c1", "prompt": [{"role": "user", "content": "Reverse 'cat'."}], "responses": ["tac", "cat"],
           "sources": ["ppo", "sft"]}


def client(app, user) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {user.token}"})


@pytest.fixture
def project(tmp_path):
    conn, pid, users = make_project(tmp_path, USERS, [WRITE, rank_task(0), rank_task(1), COMPARE], overlap=2)
    return tmp_path, pid, users, create_app(tmp_path)


def test_unauthenticated_and_wrong_role_requests_are_refused(project):
    root, pid, users, app = project
    anonymous = TestClient(app)
    assert anonymous.post(f"/api/projects/{pid}/next", json={}).status_code == 401
    assert anonymous.get("/api/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    page = anonymous.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and 'action="/login"' in page.text  # a page asks to log in
    page = anonymous.get(f"/projects/{pid}/next?kind=compare", headers={"Accept": "text/html"})
    assert page.status_code == 401 and f'name="next" value="/projects/{pid}/next?kind=compare"' in page.text
    ann = client(app, users["ann"])
    for path in (f"/api/projects/{pid}/progress", f"/api/projects/{pid}/quality"):
        assert ann.get(path).status_code == 403
    assert ann.post(f"/api/projects/{pid}/export").status_code == 403
    assert ann.post("/api/users", json={"name": "eve", "password": "eveeve"}).status_code == 403
    # another labeler's task: 403, and its answer is never shown
    mine = ann.post(f"/api/projects/{pid}/next", json={"kind": "rank"}).json()["assignment"]["id"]
    bob = client(app, users["bob"])
    assert bob.get(f"/api/assignments/{mine}").status_code == 403
    assert bob.post(f"/api/assignments/{mine}/submit", json={"choice": "tie"}).status_code == 403
    # logging in with the form sets the session cookie; a wrong password does not
    browser = TestClient(app)
    assert browser.post("/login", data={"name": "ann", "password": "wrong"}).status_code == 401
    assert browser.post("/login", data={"name": "ann", "password": "annann"}, follow_redirects=False).status_code == 303
    assert browser.get("/api/me").json() == {"name": "ann", "role": "labeler"}


def test_logging_out_ends_the_browser_session_and_leaves_the_api_token_working(project, monkeypatch):
    # the cookie was the API token itself: logging out deleted it from the browser only, so a copy
    # of it kept working, and the only way to end that session was a new token for every script
    root, pid, users, app = project
    browser = TestClient(app)
    assert browser.post("/login", data={"name": "ann", "password": "annann"}, follow_redirects=False).status_code == 303
    cookie = browser.cookies[COOKIE]
    assert cookie != users["ann"].token
    stored = connect(root).execute("SELECT id_hash FROM sessions").fetchall()
    assert [row["id_hash"] for row in stored] == [hashlib.sha256(cookie.encode()).hexdigest()]  # the id itself is not kept
    copy = TestClient(app, cookies={COOKIE: cookie})
    assert copy.get("/api/me").json()["name"] == "ann"
    assert browser.post("/logout", follow_redirects=False).status_code == 303
    assert copy.get("/api/me").status_code == 401 and browser.get("/api/me").status_code == 401
    assert copy.get("/", headers={"Accept": "text/html"}).status_code == 401
    assert client(app, users["ann"]).get("/api/me").status_code == 200  # her scripts go on
    # a session ends by itself after SESSION_SECONDS
    browser.post("/login", data={"name": "ann", "password": "annann"})
    assert browser.get("/api/me").status_code == 200
    later = accounts.now() + SESSION_SECONDS + 1
    monkeypatch.setattr(accounts, "now", lambda: later)
    assert browser.get("/api/me").status_code == 401


def test_the_session_cookie_is_secure_over_https_only(project):
    root, pid, users, app = project
    for base_url, secure in (("https://testserver", True), ("http://testserver", False)):
        reply = TestClient(app, base_url=base_url).post("/login", data={"name": "ann", "password": "annann"}, follow_redirects=False)
        cookie = reply.headers["set-cookie"].lower()
        assert reply.status_code == 303 and "httponly" in cookie and "samesite=strict" in cookie
        assert ("; secure" in cookie) == secure


def test_failed_logins_are_throttled_per_account_and_per_client(project):
    # nothing limited failed logins: a script could try passwords as fast as scrypt allows
    if "client" not in inspect.signature(TestClient).parameters:
        pytest.skip("this starlette's TestClient sends every request from one client address (fastapi 0.110's does)")
    root, pid, users, app = project
    clock = [1000.0]
    app.state.failed_logins = FailedLogins(per_name=5, per_client=20, window=300, clock=lambda: clock[0])
    here, elsewhere = TestClient(app), TestClient(app, client=("10.0.0.9", 50000))
    for attempt in range(5):
        assert here.post("/login", data={"name": "ann", "password": f"guess{attempt}"}).status_code == 401
    for browser in (here, elsewhere):  # ann's account, from any address: refused, the right password too
        refused = browser.post("/login", data={"name": "ann", "password": "annann"}, headers={"Accept": "text/html"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "300" and "Too many failed logins" in refused.text
    assert here.post("/login", data={"name": "bob", "password": "bobbob"}, follow_redirects=False).status_code == 303
    clock[0] += 200
    assert here.post("/login", data={"name": "ann", "password": "annann"}).headers["retry-after"] == "100"
    clock[0] += 100
    assert here.post("/login", data={"name": "ann", "password": "annann"}, follow_redirects=False).status_code == 303
    # one address trying many names (ann's 5 failures have left the window)
    for attempt in range(20):
        assert here.post("/login", data={"name": f"user{attempt % 10}", "password": "guess"}).status_code == 401
    assert here.post("/login", data={"name": "bob", "password": "bobbob"}).status_code == 429
    assert elsewhere.post("/login", data={"name": "bob", "password": "bobbob"}, follow_redirects=False).status_code == 303


def test_a_page_of_another_origin_cannot_post_with_the_admins_cookie(project):
    # SameSite=strict sends the cookie from a page on another port of the same host: its form
    # created an admin account with the logged-in admin's session
    root, pid, users, app = project
    browser = TestClient(app)
    assert browser.post("/login", data={"name": "root", "password": "rootroot"}, follow_redirects=False).status_code == 303
    form = {"name": "mallory", "role": "admin", "password": "mallory1"}
    for headers in ({"Sec-Fetch-Site": "same-site", "Origin": "http://testserver:8001"},  # a browser that says where it comes from
                    {"Sec-Fetch-Site": "cross-site", "Origin": "http://testserver"},
                    {"Origin": "http://testserver:8001"},  # an older browser: Origin only
                    {"Origin": "null"}):
        response = browser.post("/admin/users", data=form, headers={"Accept": "text/html", **headers})
        assert response.status_code == 403 and "another site" in response.text, headers
        api = browser.post(f"/api/projects/{pid}/next", json={}, headers=headers)
        assert api.status_code == 403 and api.json()["field"] == "origin", headers
    assert [u["name"] for u in connect(root).execute("SELECT name FROM users ORDER BY id")] == list(USERS)
    assert connect(root).execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 0
    # the app's own pages, and scripts that send no browser headers, still work
    for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"}, {"Origin": "http://testserver"}, {}):
        assert browser.post(f"/api/projects/{pid}/next", json={}, headers=headers).status_code == 200, headers
    assert browser.post("/admin/users", data=form, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200


def test_no_response_may_be_framed_or_sniffed_and_pages_run_only_the_apps_script(project):
    # no anti-framing header: another site could show /admin in a hidden frame under its own buttons
    root, pid, users, app = project
    ann = client(app, users["ann"])
    html = {"Accept": "text/html"}
    responses = [TestClient(app).get("/login"), TestClient(app).get("/", headers=html), ann.get("/", headers=html),
                 ann.get("/static/feedback.js"), ann.get("/api/me"), ann.get("/no-such-page", headers=html),
                 ann.post(f"/api/projects/{pid}/next", json={"kind": "essay"}), ann.get(f"/projects/{pid}/next", follow_redirects=False),
                 ann.put("/api/assignments/1/draft", content=b"x" * (MAX_BODY_BYTES + 1)), TestClient(app).get("/api/me")]
    for response in responses:
        headers = response.headers
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", (response.url, response.status_code)
        assert headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'", response.url
    assert {r.status_code for r in responses} == {200, 303, 401, 404, 413, 422}
    docs = ann.get("/api/docs")  # Swagger UI runs an inline script: framing is refused all the same
    assert docs.status_code == 200 and docs.headers["content-security-policy"] == "frame-ancestors 'none'"


def test_bad_bodies_get_422_naming_the_field(project):
    root, pid, users, app = project
    ann = client(app, users["ann"])
    rank = ann.post(f"/api/projects/{pid}/next", json={"kind": "rank"}).json()["assignment"]["id"]
    cases = [
        ({"likert": [1, 2, 3], "flags": [[]] * 4, "ranks": [0, 1, 2, 3]}, "likert"),
        ({"likert": [1, 2, 3, 0], "flags": [[]] * 4, "ranks": [0, 1, 2, 3]}, "likert.3"),
        ({"likert": [1, 2, 3, "4"], "flags": [[]] * 4, "ranks": [0, 1, 2, 3]}, "likert.3"),
        ({"likert": [1, 2, 3, 4], "flags": [[]] * 4, "ranks": "first"}, "ranks"),
        ({"likert": [1, 2, 3, 4], "flags": [[], [], ["nice"], []], "ranks": [0, 1, 2, 3]}, "flags.2"),
        ([1, 2, 3], "body"),
    ]
    for body, field in cases:
        response = ann.post(f"/api/assignments/{rank}/submit", json=body)
        assert response.status_code == 422 and response.json()["field"] == field, (body, response.json())
        assert response.json()["detail"].startswith(f"{field}: ")
    response = ann.post(f"/api/assignments/{rank}/submit", content=b'{"likert": [1,', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "body"
    assert ann.post(f"/api/projects/{pid}/next", json={"kind": "essay"}).json()["field"] == "kind"
    assert ann.post(f"/api/projects/{pid}/next", json={"knd": "rank"}).json()["field"] == "knd"
    assert ann.post(f"/api/assignments/{rank}/skip", json={"reason": ""}).json()["field"] == "reason"
    assert ann.put(f"/api/assignments/{rank}/draft", json={"txt": "x"}).json()["field"] in ("text", "txt")
    assert ann.get("/api/assignments/999").status_code == 404
    assert ann.post("/api/projects/99/next", json={}).status_code == 404
    # nothing invalid was stored
    assert connect(root).execute("SELECT COUNT(*) FROM assignments WHERE state != 'leased'").fetchone()[0] == 0


def test_every_json_route_answers_a_malformed_or_ill_typed_body_naming_the_field(project):
    # draft, skip and next answered broken JSON with field "9" (the character where parsing stopped)
    # and JSON nested too deep with FastAPI's bare 400 "There was an error parsing the body"
    root, pid, users, app = project
    ann = client(app, users["ann"])
    rank = ann.post(f"/api/projects/{pid}/next", json={"kind": "rank"}).json()["assignment"]["id"]
    routes = {("PUT", f"/api/assignments/{rank}/draft"): {"text": 5}, ("POST", f"/api/assignments/{rank}/skip"): {"reason": ["x"]},
              ("POST", f"/api/projects/{pid}/next"): {"kind": 5}, ("POST", f"/api/assignments/{rank}/submit"): {"likert": "high", "flags": [[]] * 4, "ranks": [0, 1, 2, 3]}}
    for (method, path), ill_typed in routes.items():
        for body in (b'{"text": ', b"\xff\xfe", b"[" * 100_000, b"[1]", json.dumps(ill_typed).encode()):
            response = ann.request(method, path, content=body, headers={"Content-Type": "application/json"})
            field = "body" if body != json.dumps(ill_typed).encode() else next(iter(ill_typed))
            reply = response.json()
            assert response.status_code == 422 and reply["field"] == field and reply["detail"].startswith(f"{field}: "), (path, body[:9], reply)
    admin = client(app, users["root"])
    for body in (b'{"name": "eve", ', b"[" * 100_000):
        reply = admin.post("/api/users", content=body, headers={"Content-Type": "application/json"}).json()
        assert reply["field"] == "body" and "not valid JSON" in reply["detail"], reply
    assert ann.get(f"/api/assignments/{rank}").json()["state"] == "leased"


def test_ids_too_big_for_sqlite_and_json_nested_too_deep_are_422_not_500(project):
    root, pid, users, app = project
    ann = TestClient(app, headers={"Authorization": f"Bearer {users['ann'].token}"}, raise_server_exceptions=False)
    rank = ann.post(f"/api/projects/{pid}/next", json={"kind": "rank"}).json()["assignment"]["id"]
    too_big = 2**63  # an SQLite integer is 64 bits: sqlite3 raised OverflowError
    for method, path, field in (("GET", f"/api/assignments/{too_big}", "path.assignment_id"),
                                ("POST", f"/api/projects/{too_big}/next", "path.project_id"),
                                ("PUT", f"/api/assignments/{too_big}/draft", "path.assignment_id")):
        response = ann.request(method, path, json={"text": "x"} if method == "PUT" else {})
        assert response.status_code == 422 and response.json()["field"] == field, (path, response.text)
    assert ann.get(f"/assignments/{too_big}", headers={"Accept": "text/html"}).status_code == 422
    deep = ann.post(f"/api/assignments/{rank}/submit", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 422 and deep.json()["field"] == "body", deep.text
    assert ann.get(f"/api/assignments/{rank}").json()["state"] == "leased"


def test_text_that_is_not_unicode_is_refused_before_it_is_stored(project):
    root, pid, users, app = project
    ann = client(app, users["ann"])
    write = ann.post(f"/api/projects/{pid}/next", json={"kind": "write"}).json()["assignment"]["id"]
    lone_surrogate = {"Content-Type": "application/json"}
    for method, path, body, field in (("POST", "submit", b'{"text": "It is 10 \\ud800"}', "text"),
                                      ("PUT", "draft", b'{"text": "It is \\ud800"}', "text"),
                                      ("POST", "skip", b'{"reason": "\\udfff"}', "reason")):
        response = ann.request(method, f"/api/assignments/{write}/{path}", content=body, headers=lone_surrogate)
        assert response.status_code == 422 and response.json()["field"] == field, (path, response.text)
    assert ann.get(f"/api/assignments/{write}").json()["state"] == "leased"
    assert client(app, users["root"]).post(f"/api/projects/{pid}/export").status_code == 200


def test_a_body_over_the_limit_gets_413_and_nothing_is_stored(project):
    root, pid, users, app = project
    ann = client(app, users["ann"])
    write = ann.post(f"/api/projects/{pid}/next", json={"kind": "write"}).json()["assignment"]["id"]
    huge = json.dumps({"text": "x" * MAX_BODY_BYTES}).encode()

    def chunks():  # no Content-Length: counted while it is read
        yield huge[:MAX_BODY_BYTES // 2]
        yield huge[MAX_BODY_BYTES // 2:]

    for method, path, content in (("POST", "submit", huge), ("PUT", "draft", huge), ("POST", "submit", chunks())):
        response = ann.request(method, f"/api/assignments/{write}/{path}", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and str(MAX_BODY_BYTES) in response.json()["detail"], path
    view = ann.get(f"/api/assignments/{write}").json()
    assert (view["state"], view["draft"]) == ("leased", "")
    # a browser's form post over the limit, or a page that does not exist, gets a page, not JSON
    browser = {"Accept": "text/html", "Content-Type": "application/x-www-form-urlencoded"}
    response = ann.post("/login", content=b"name=ann&password=" + b"x" * MAX_BODY_BYTES, headers=browser)
    assert response.status_code == 413 and "text/html" in response.headers["content-type"] and str(MAX_BODY_BYTES) in response.text
    response = ann.get("/no-such-page", headers={"Accept": "text/html"})
    assert response.status_code == 404 and "text/html" in response.headers["content-type"] and "Error 404" in response.text


def test_a_compare_of_two_identical_answers_is_a_tie_nobody_is_asked_to_judge(tmp_path):
    # greedy SFT and PPO answers are often the same text: asking people to compare them wastes their time
    same = COMPARE | {"prompt_id": "c2", "responses": ["tac", "tac"]}
    conn, pid, users = make_project(tmp_path, USERS, [same, COMPARE], overlap=2)
    app = create_app(tmp_path)
    for name, choice in (("ann", "tie"), ("bob", "tie")):
        labeler = client(app, users[name])
        view = labeler.post(f"/api/projects/{pid}/next", json={}).json()["assignment"]
        assert view["prompt_id"] == "c1"
        assert labeler.post(f"/api/assignments/{view['id']}/submit", json={"choice": choice}).status_code == 200
        assert labeler.post(f"/api/projects/{pid}/next", json={}).json()["assignment"] is None
    admin = client(app, users["root"])
    progress = admin.get(f"/api/projects/{pid}/progress").json()["kinds"]["compare"]
    assert (progress["tasks"], progress["identical_answers"], progress["tasks_complete"], progress["done"]) == (1, 1, 1, 1.0)
    assert "(+1 with identical answers: ties)" in admin.get("/admin", headers={"Accept": "text/html"}).text
    admin.post(f"/api/projects/{pid}/export")
    out = tmp_path / "exports" / str(pid)
    compare = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert [(c["id"], c["labeler_id"], c["winner"]) for c in compare] == [("c1", "ann", "tie"), ("c1", "bob", "tie"), ("c2", None, "tie")]
    wr = json.loads((out / "quality.json").read_text())["compare"]["win_rates"]["ppo vs sft"]
    assert (wr["n"], wr["ties"], wr["win_rate"]) == (2, 3, 0.5)  # two tasks: one judged by two people, one decided


def test_user_names_are_stripped_and_a_taken_name_is_a_conflict(project):
    root, pid, users, app = project
    admin = client(app, users["root"])
    for name in ("ann", "ann "):
        response = admin.post("/api/users", json={"name": name, "password": "secret"})
        assert response.status_code == 409 and response.json()["field"] == "name", name
    created = admin.post("/api/users", json={"name": " eve ", "password": "secret"})
    assert created.status_code == 200 and created.json()["name"] == "eve"
    form = admin.post("/admin/users", data={"name": "zed", "role": "boss", "password": "secret"})
    assert form.status_code == 422 and form.json()["field"] == "role"


def test_a_reset_gives_a_new_password_and_token_and_the_old_ones_stop_working(project):
    root, pid, users, app = project
    browser = TestClient(app)
    browser.post("/login", data={"name": "ann", "password": "annann"})
    proc = cli("label", "user", "ann", "--reset", "--password", "newpass", "--dir", str(root))
    token = proc.stdout.strip()
    assert token != users["ann"].token and "the old token no longer works" in proc.stderr
    assert client(app, users["ann"]).get("/api/me").status_code == 401  # the leaked token
    assert browser.get("/api/me").status_code == 401  # a session logged in before the reset
    assert TestClient(app, headers={"Authorization": f"Bearer {token}"}).get("/api/me").json() == {"name": "ann", "role": "labeler"}
    assert TestClient(app).post("/login", data={"name": "ann", "password": "annann"}).status_code == 401
    assert TestClient(app).post("/login", data={"name": "ann", "password": "newpass"}, follow_redirects=False).status_code == 303
    proc = cli("label", "user", "nobody", "--reset", "--password", "newpass", "--dir", str(root), check=False)
    assert proc.returncode == 2 and "no user 'nobody'" in proc.stderr


# the users table as instructrl wrote it before schema version 1: each API token in plain text
VERSION_0_USERS = """CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'labeler')),
    password_hash TEXT NOT NULL,   -- scrypt, hex, with its salt
    salt TEXT NOT NULL,
    token TEXT NOT NULL UNIQUE,    -- the labeler's API token (Authorization: Bearer ...)
    created REAL NOT NULL
);"""


def version_0_database(root) -> dict[str, str]:
    """feedback.db as instructrl wrote it before hashing tokens (user_version 0); returns each user's token."""
    raw = sqlite3.connect(root / "feedback.db")
    raw.execute("PRAGMA journal_mode = WAL")
    raw.executescript(VERSION_0_USERS)
    tokens = {name: f"plain-token-of-{name}-{'x' * 16}" for name in USERS}
    for name, role in USERS.items():
        raw.execute("INSERT INTO users (name, role, password_hash, salt, token, created) VALUES (?, ?, ?, ?, ?, 0)",
                    (name, role, accounts._hash(name * 2, "00" * 16), "00" * 16, tokens[name]))
    raw.commit()
    raw.close()
    return tokens


def test_a_database_of_plain_tokens_is_upgraded_on_open_and_every_token_goes_on_working(tmp_path, monkeypatch):
    # the users table held each API token in plain text: a copy of feedback.db (a backup) logged anyone in
    tokens = version_0_database(tmp_path)
    connect_as_built = sqlite3.connect

    def connect_without_secure_delete(*args, **kwargs):  # as SQLite is built on macOS or by python.org (Debian's zeroes freed bytes)
        conn = connect_as_built(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect_without_secure_delete)
    server = connect(tmp_path)  # upgraded on open, and left open as a running server's connection is
    for path in tmp_path.glob("feedback.db*"):  # neither the file's freed bytes nor its write-ahead log keep a token
        assert not any(token.encode() in path.read_bytes() for token in tokens.values()), path
    monkeypatch.undo()
    app = create_app(tmp_path)
    for name, token in tokens.items():
        assert TestClient(app, headers={"Authorization": f"Bearer {token}"}).get("/api/me").json()["name"] == name
    assert TestClient(app).post("/login", data={"name": "ann", "password": "annann"}, follow_redirects=False).status_code == 303
    assert server.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {r["name"]: r["token_hash"] for r in server.execute("SELECT name, token_hash FROM users")} == \
        {name: hashlib.sha256(token.encode()).hexdigest() for name, token in tokens.items()}
    # and the new code's own accounts work beside the old ones
    assert create_user(server, "cat", "labeler", "catcat").token not in tokens.values()
    server.close()


def test_an_upgrade_that_fails_changes_nothing(tmp_path, monkeypatch):
    tokens = version_0_database(tmp_path)
    hashed = []

    def digest_fails_on_the_second_token(secret):
        if hashed:
            raise OSError("disk full")
        hashed.append(secret)
        return hashlib.sha256(secret.encode()).hexdigest()

    monkeypatch.setattr(db, "digest", digest_fails_on_the_second_token)
    with pytest.raises(OSError):
        connect(tmp_path)
    monkeypatch.undo()
    raw = sqlite3.connect(tmp_path / "feedback.db")
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
    assert dict(raw.execute("SELECT name, token FROM users")) == tokens  # the same plain tokens: not half of them hashed
    raw.close()
    assert TestClient(create_app(tmp_path), headers={"Authorization": f"Bearer {tokens['bob']}"}).get("/api/me").status_code == 200
    raw = sqlite3.connect(tmp_path / "feedback.db")
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    proc = cli("label", "status", "p", "--dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "made by a newer instructrl" in proc.stderr and "Traceback" not in proc.stderr


def test_pages_answer_bad_requests_with_a_page(project):
    root, pid, users, app = project
    browser = TestClient(app, headers={"Accept": "text/html"})
    missing_password = browser.post("/login", data={"name": "ann"})
    assert missing_password.status_code == 422 and "password" in missing_password.text
    browser.post("/login", data={"name": "ann", "password": "annann"})
    not_a_number = browser.get("/assignments/first")
    for response in (missing_password, not_a_number):
        assert response.status_code == 422 and response.headers["content-type"].startswith("text/html")


def test_what_labelers_submit_is_what_the_export_holds(project, tmp_path):
    root, pid, users, app = project
    sent = {}
    for name in ("ann", "bob"):
        labeler = client(app, users[name])
        for step in range(4):
            view = labeler.post(f"/api/projects/{pid}/next", json={}).json()["assignment"]
            if view["kind"] == "write":
                body = {"text": f"10, says {name}"}
            elif view["kind"] == "compare":
                body = {"choice": "left" if name == "ann" else "tie"}
            else:  # rank top to bottom as shown, the last two tied; ann finds none acceptable
                body = {"likert": [7, 5, 2, 2], "flags": [[], ["verbose"], ["incorrect"], ["incorrect", "fails_to_follow"]],
                        "ranks": [0, 1, 2, 2], "none_acceptable": name == "ann"}
            assert labeler.post(f"/api/assignments/{view['id']}/submit", json=body).status_code == 200
            sent[(name, view["kind"], view["prompt"][-1]["content"])] = (view, body)
        assert labeler.post(f"/api/projects/{pid}/next", json={}).json()["assignment"] is None
    admin = client(app, users["root"])
    counts = admin.post(f"/api/projects/{pid}/export").json()["counts"]
    assert counts == {"demonstrations.jsonl": 2, "comparisons.jsonl": 4, "comparisons_aggregated.jsonl": 2,
                      "preference_pairs.jsonl": 4 * 5, "compare.jsonl": 2}
    out = root / "exports" / str(pid)

    # comparisons: each labeler's raw ranking, order and ties intact, read by the RM stage's reader
    records = read_comparisons(out / "comparisons.jsonl")
    for record in records:
        view, body = sent[(record.labeler_id, "rank", record.prompt[-1].content)]
        for position, text in enumerate(view["responses"]):
            i = record.responses.index(text)
            assert (record.ranks[i], record.likert[i], record.flags[i]) == \
                (body["ranks"][position], body["likert"][position], sorted(body["flags"][position], key=FLAGS.index))
        assert record.none_acceptable == (record.labeler_id == "ann")
        assert record.guideline_version.startswith("sha256:")
    # aggregated: responses ordered by the two labelers' mean rank (equal means tie)
    for agg in read_comparisons(out / "comparisons_aggregated.jsonl"):
        raw = [r for r in records if r.id == agg.id]
        assert agg.ranks == dense_ranks([a + b for a, b in zip(raw[0].ranks, raw[1].ranks)]) and agg.labeler_id == "aggregate:ann,bob"
        assert agg.none_acceptable  # one of two said so: at least half
    # TRL pairs: every strictly ordered pair, read back by instructrl's TRL reader
    lines = (out / "preference_pairs.jsonl").read_text().splitlines()
    pairs = [comparison_from_preference(json.loads(line), f"line {n}", str(n)) for n, line in enumerate(lines)]
    for pair in pairs:
        raw = next(r for r in records if r.id == pair.id and r.labeler_id == pair.labeler_id)
        chosen, rejected = (raw.responses.index(t) for t in pair.responses)
        assert raw.ranks[chosen] < raw.ranks[rejected]
    # demonstrations: what the SFT stage reads
    demos = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
    assert sorted(d["messages"][-1]["content"] for d in demos) == ["10, says ann", "10, says bob"]
    assert all(validate_messages(d["messages"], "x")[:3] == WRITE["prompt"] for d in demos)
    # compare: winners by model name, the win rate with its interval
    compare = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    view, _ = sent[("ann", "compare", "Reverse 'cat'.")]
    assert {c["labeler_id"]: c["winner"] for c in compare} == {"ann": COMPARE["sources"][COMPARE["responses"].index(view["responses"][0])], "bob": "tie"}
    quality = json.loads((out / "quality.json").read_text())
    wr = quality["compare"]["win_rates"]["ppo vs sft"]
    assert wr["n"] == 1 and wr["ties"] == 1 and wr["ci95"][0] <= wr["win_rate"] <= wr["ci95"][1]  # one task, judged twice
    assert quality["rank"]["pairwise"]["pairs"] > 0 and quality["progress"]["kinds"]["rank"]["tasks_complete"] == 2
    # the admin's button and the file download
    assert "comparisons.jsonl" in admin.post(f"/admin/projects/{pid}/export").text
    assert admin.get(f"/api/projects/{pid}/export/comparisons.jsonl").text == (out / "comparisons.jsonl").read_text()
    not_export = admin.get(f"/api/projects/{pid}/export/feedback.db")
    assert not_export.status_code == 404 and "comparisons.jsonl" in not_export.json()["detail"]
    # and the command writes the same files
    cli("label", "export", "p", "--dir", str(root), "--out", str(tmp_path / "cmd"))
    assert (tmp_path / "cmd" / "comparisons.jsonl").read_text() == (out / "comparisons.jsonl").read_text()
    proc = cli("label", "export", "nope", "--dir", str(root), check=False)
    assert proc.returncode == 2 and "no project named 'nope'" in proc.stderr


def test_an_export_while_people_label_counts_the_same_answers_in_every_file(tmp_path, monkeypatch):
    from instructrl.feedback import export, tasks

    conn, pid, users = make_project(tmp_path, USERS, [rank_task(0), rank_task(1)])
    body = {"likert": [4] * 4, "flags": [[]] * 4, "ranks": [0, 1, 2, 3]}
    tasks.submit(conn, tasks.next_task(conn, pid, users["ann"]), users["ann"], body)
    bobs = tasks.next_task(conn, pid, users["bob"])
    read_compare = export.project_compare_records

    def bob_submits_meanwhile(*args):  # on another connection, between two of the export's reads
        other = connect(tmp_path)
        tasks.submit(other, bobs, users["bob"], body)
        other.close()
        return read_compare(*args)

    monkeypatch.setattr(export, "project_compare_records", bob_submits_meanwhile)
    counts = export.export_project(conn, pid, tmp_path / "out")
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert counts["comparisons.jsonl"] == len((tmp_path / "out" / "comparisons.jsonl").read_text().splitlines())
    assert quality["progress"]["kinds"]["rank"]["submitted"] == counts["comparisons.jsonl"] == 1
    assert not conn.in_transaction
    monkeypatch.undo()
    assert export.export_project(conn, pid, tmp_path / "out")["comparisons.jsonl"] == 2  # the next export has bob's


def test_twenty_labelers_at_once_then_a_crash(tmp_path):
    names = {f"l{i:02d}": "labeler" for i in range(20)}
    conn, pid, users = make_project(tmp_path, {"root": "admin", **names}, [rank_task(i) for i in range(3)], overlap=20)
    conn.close()
    port = free_port()
    server = start_server(tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    start, sent, errors = threading.Barrier(20), {}, []

    def labeler(name: str) -> None:
        try:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {users[name].token}"}, timeout=60) as http:
                start.wait()
                while (view := http.post(f"/api/projects/{pid}/next", json={}).json()["assignment"]) is not None:
                    body = {"likert": [1 + (int(name[1:]) + j) % 7 for j in range(4)], "flags": [[]] * 4,
                            "ranks": [(int(name[1:]) + j) % 3 for j in range(4)]}
                    reply = http.post(f"/api/assignments/{view['id']}/submit", json=body)
                    assert reply.status_code == 200, reply.text
                    sent[(name, view["prompt_id"])] = (view["responses"], body)
                    # a client that retries the same submission is told it is already stored
                    assert http.post(f"/api/assignments/{view['id']}/submit", json=body).status_code == 409
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {err!r}")

    threads = [threading.Thread(target=labeler, args=(n,)) for n in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert len(sent) == 60
        server.send_signal(signal.SIGKILL)  # a crash: nothing already submitted may be lost
        server.wait()
    finally:
        server.kill()
    rows = connect(tmp_path).execute(
        "SELECT u.name, t.prompt_id, t.responses, a.answer, a.state FROM assignments a JOIN users u ON u.id = a.user_id "
        "JOIN tasks t ON t.id = a.task_id").fetchall()
    assert len(rows) == 60 and {r["state"] for r in rows} == {"submitted"}
    assert len({(r["name"], r["prompt_id"]) for r in rows}) == 60  # each (labeler, task) exactly once
    for r in rows:
        shown, body = sent[(r["name"], r["prompt_id"])]
        answer, responses = json.loads(r["answer"]), json.loads(r["responses"])
        for position, text in enumerate(shown):
            assert answer["likert"][responses.index(text)] == body["likert"][position]
    # the restarted server serves everything that was stored
    server = start_server(tmp_path, port)
    try:
        progress = httpx.get(f"{base}/api/projects/{pid}/progress", headers={"Authorization": f"Bearer {users['root'].token}"}).json()
        assert progress["kinds"]["rank"]["submitted"] == 60 and progress["kinds"]["rank"]["tasks_complete"] == 3
        # behind an HTTPS proxy on this host, the session cookie is Secure; over plain HTTP it is not
        for headers, secure in (({"X-Forwarded-Proto": "https"}, True), ({}, False)):
            reply = httpx.post(f"{base}/login", data={"name": "root", "password": "rootroot"}, headers=headers)
            assert reply.status_code == 303 and ("secure" in reply.headers["set-cookie"].lower()) == secure
    finally:
        server.kill()
        server.wait()


def test_label_commands_name_the_bad_input(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse \'cat\'."}\n{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    proc = cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--write", check=False)
    assert proc.returncode == 2 and f"{prompts}:2" in proc.stderr and "Traceback" not in proc.stderr
    prompts.write_text('{"prompt": "Reverse \'cat\'."}\n')
    proc = cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--model", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "--model: " in proc.stderr and "nope' does not exist" in proc.stderr
    # a model to compare that cannot be loaded is named by its --compare
    proc = cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--compare", f"a={tmp_path / 'nope_a'}",
               "--compare", f"b={tmp_path / 'nope_b'}", check=False)
    assert proc.returncode == 2 and "--compare a: " in proc.stderr and "nope_a' does not exist" in proc.stderr
    assert not (tmp_path / "d").exists(), "a project that was not made must leave no folder or empty database behind"
    proc = cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--write", "--guidelines", str(tmp_path), check=False)
    assert proc.returncode == 2 and f"--guidelines {tmp_path}: a folder, not a text file" in proc.stderr
    cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--write", "--overlap", "2")
    proc = cli("label", "status", "p", "--dir", str(tmp_path / "d"))
    assert json.loads(proc.stdout)["progress"]["kinds"]["write"] == {
        "tasks": 1, "tasks_complete": 0, "answers_needed": 2, "submitted": 0, "skipped": 0, "leased": 0, "done": 0.0}
    proc = cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--write", check=False)
    assert proc.returncode == 2 and "project 'p' already exists" in proc.stderr
    proc = cli("label", "project", "q", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--write", "--overlap", "0", check=False)
    assert proc.returncode == 2 and "--overlap" in proc.stderr
    # nan and inf minutes have no whole seconds; --max-new-tokens 0 was refused by transformers, after the model had loaded
    for option, value in (("--limit", "0"), ("--limit", "-1"), ("--lease-minutes", "-5"), ("--lease-minutes", "nan"), ("--lease-minutes", "inf"),
                          ("--max-new-tokens", "0")):
        proc = cli("label", "project", "q", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--write", option, value, check=False)
        assert proc.returncode == 2 and option in proc.stderr and "Traceback" not in proc.stderr, (option, value)
    (tmp_path / "guidelines.txt").write_bytes("Prefer the answer that is right.\n".encode("utf-16"))
    proc = cli("label", "project", "q", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--write", "--guidelines", str(tmp_path / "guidelines.txt"), check=False)
    assert proc.returncode == 2 and f"--guidelines {tmp_path / 'guidelines.txt'}: not UTF-8 text" in proc.stderr
    proc = cli("label", "project", "q", "--dir", str(tmp_path / "d"), "--responses", str(prompts), check=False)  # named as the option it was given to
    assert proc.returncode == 2 and f"{prompts}:1: a prompt record (fields: prompt) cannot be used as --responses, which takes" in proc.stderr
    # a taken name is refused before any model is loaded
    proc = cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--model", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "project 'p' already exists" in proc.stderr


def test_label_project_leaves_nothing_behind_and_reading_commands_create_nothing(tmp_path):
    record = {"id": "r", "prompt": [{"role": "user", "content": "Sort 3 1 2."}], "labeler_id": "sim"}
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text("".join(json.dumps({**record, "responses": [f"answer {i}" for i in range(k)], "ranks": list(range(k))}) + "\n"
                                   for k in (2, 10)))
    project_dir = tmp_path / "d"
    proc = cli("label", "project", "p", "--dir", str(project_dir), "--responses", str(comparisons), check=False)
    assert proc.returncode == 2 and "cannot hold 10 responses" in proc.stderr
    assert not project_dir.exists()
    cli("label", "project", "p", "--dir", str(project_dir), "--responses", str(comparisons), "--limit", "1")  # the name is still free
    assert json.loads(cli("label", "status", "p", "--dir", str(project_dir)).stdout)["progress"]["kinds"]["rank"]["tasks"] == 1
    typo = tmp_path / "typo"
    for command in ("status", "export"):
        proc = cli("label", command, "p", "--dir", str(typo), check=False)
        assert proc.returncode == 2 and f"no feedback database at {typo}" in proc.stderr and "Traceback" not in proc.stderr
    assert not typo.exists()


def test_a_file_that_is_no_feedback_database_is_one_line_and_left_as_it_was(tmp_path):
    """--dir of a folder whose feedback.db is another kind of file, or a folder: sqlite3's DatabaseError was a traceback."""
    from instructrl.errors import UserError

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "feedback.db").write_bytes(b"not a database, but somebody's notes")
    for command in (("status", "p"), ("user", "ann", "--password", "annann")):
        proc = cli("label", *command, "--dir", str(tmp_path / "d"), check=False)
        assert proc.returncode == 2 and f"{tmp_path / 'd' / 'feedback.db'}: cannot be opened as a feedback database (file is not a database)" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert (tmp_path / "d" / "feedback.db").read_bytes() == b"not a database, but somebody's notes"
    (tmp_path / "e" / "feedback.db").mkdir(parents=True)
    with pytest.raises(UserError, match="feedback.db: cannot be opened as a feedback database"):
        create_app(tmp_path / "e")


def test_label_project_says_how_many_compare_tasks_are_ties_of_identical_answers(tmp_path, smoke_base):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse \'cat\'."}\n{"prompt": "Say dog."}\n')
    base = smoke_base / "pretrain" / "final"
    proc = cli("label", "project", "p", "--dir", str(tmp_path / "d"), "--prompts", str(prompts), "--compare", f"a={base}", "--compare", f"b={base}")
    assert "2 compare tasks, overlap 1" in proc.stderr and "2 compare tasks have two identical answers: ties, never shown" in proc.stderr
    status = json.loads(cli("label", "status", "p", "--dir", str(tmp_path / "d")).stdout)["progress"]["kinds"]["compare"]
    assert (status["tasks"], status["identical_answers"], status["done"]) == (0, 2, 1.0)


def test_a_project_records_how_its_responses_were_generated_and_status_and_admin_show_it(tmp_path):
    """label project kept the sampled responses but not the model, K, seed or length that made them;
    a database made before it kept them opens, its projects' generation unknown ({}). /admin shows either, as text."""
    from html import escape

    from tiny_models import save_tiny_model

    prompts, project_dir = tmp_path / "prompts.jsonl", tmp_path / "d"
    prompts.write_text('{"prompt": "Say cat."}\n')
    model = str(save_tiny_model("gpt2", tmp_path / "m"))
    cli("label", "project", "p", "--dir", str(project_dir), "--prompts", str(prompts), "--model", model, "--k", "3", "--seed", "7",
        "--max-new-tokens", "5", "--compare", f"<i>a</i>={model}", "--compare", f"b={model}")
    status = json.loads(cli("label", "status", "p", "--dir", str(project_dir)).stdout)["progress"]
    assert status["generation"] == {"rank": {"model": model, "k": 3, "seed": 7, "temperature": 1.0, "max_new_tokens": 5},
                                    "compare": {"models": {"<i>a</i>": model, "b": model}, "greedy": True, "max_new_tokens": 5}}
    assert status["kinds"]["rank"]["tasks"] == 1
    root = create_user(connect(project_dir), "root", "admin", "rootroot")

    def generation_on_admin() -> str:
        page = client(create_app(project_dir), root).get("/admin").text
        return " ".join(page.partition('<p class="generation">')[2].partition("</p>")[0].split())

    assert generation_on_admin() == (f"Responses generated by: <b>rank</b> model {escape(model)}, k 3, seed 7, temperature 1.0, max_new_tokens 5; "
                                     f"<b>compare</b> models &lt;i&gt;a&lt;/i&gt; = {escape(model)}, b = {escape(model)}, greedy True, max_new_tokens 5")

    raw = sqlite3.connect(project_dir / "feedback.db")  # as schema version 1 wrote it
    raw.execute("ALTER TABLE projects DROP COLUMN generation")
    raw.execute("PRAGMA user_version = 1")
    raw.close()
    status = json.loads(cli("label", "status", "p", "--dir", str(project_dir)).stdout)["progress"]
    assert status["generation"] == {} and status["kinds"]["rank"]["tasks"] == 1
    assert generation_on_admin() == ("Responses generated by: <b>rank</b> not recorded (from a file, or by an older version); "
                                     "<b>compare</b> not recorded (from a file, or by an older version)")
    raw = sqlite3.connect(project_dir / "feedback.db")
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    raw.close()
