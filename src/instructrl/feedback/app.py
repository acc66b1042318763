"""The feedback app over HTTP: server-rendered pages for people, a JSON API for scripts.

``create_app(project_dir)`` returns a FastAPI app on the project's SQLite database. Pages sign
in with a session cookie (logging out ends the session); the API takes ``Authorization: Bearer
<token>`` (each labeler's own) or the same cookie. Labelers see only their own tasks and
answers; admin pages and the export need the admin role. A state-changing request from another origin's page is refused (403,
``same_origin``). Bad requests get a 4xx whose JSON names the field:
``{"detail": "...", "field": "likert.2"}``; a body over ``MAX_BODY_BYTES`` gets 413.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from instructrl.data.jsonl import nan_to_none
from instructrl.errors import UserError
from instructrl.feedback import accounts, tasks
from instructrl.feedback.db import connect
from instructrl.feedback.export import FILES, export_project, quality

HERE = Path(__file__).parent
COOKIE = "instructrl_session"
MAX_BODY_BYTES = 1_000_000  # far more than any answer; a bigger body is refused before it is stored
# a project or assignment id in a URL: an SQLite rowid, so a bigger number is a 422, not an OverflowError (500)
RowId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


class Unauthenticated(tasks.TaskError):
    status = 401


class NextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str | None = None


class DraftBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: tasks.Text


class SkipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: tasks.Text = Field(min_length=1)


class UserBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: tasks.Text = Field(min_length=1)
    role: str = "labeler"
    password: tasks.Text = Field(min_length=4)


class BodyLimit:
    """ASGI middleware: a request body over MAX_BODY_BYTES gets 413, by its Content-Length or while it is read."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = int(Headers(scope=scope).get("content-length") or 0)
        received = 0

        # raised where the app reads the body, so that its exception handlers answer
        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if max(declared, received) > MAX_BODY_BYTES:
                raise HTTPException(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeaders:
    """ASGI middleware: every response says that no page may frame it (clickjacking: a hidden frame
    of /admin under another site's buttons), that its content type is not to be guessed, and that
    a page runs only this app's own script file, so text injected into a page runs nothing."""

    HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"}
    # /api/docs is FastAPI's Swagger UI: an inline script and files from a CDN
    DOCS = {**HEADERS, "Content-Security-Policy": "frame-ancestors 'none'"}

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = self.DOCS if scope["path"].startswith("/api/docs") else self.HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(headers)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_user(conn: sqlite3.Connection, name: str, role: str, password: str) -> accounts.User:
    """``accounts.create_user``, its refusals as the app's errors: a taken name is a Conflict."""
    try:
        return accounts.create_user(conn, name, role, password)
    except accounts.NameTaken as err:
        raise tasks.Conflict(str(err), err.field) from None
    except accounts.AccountError as err:
        raise tasks.Invalid(str(err), err.field) from None


TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))


def page(name: str, status: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(flags=tasks.FLAGS, **context), status_code=status)


def error_page(status: int, message: str) -> HTMLResponse:
    return page("message.html", status, user=None, title=f"Error {status}", message=message)


def export_folder(request: Request, project_id: int) -> Path:
    return request.app.state.project_dir / "exports" / str(project_id)


def projects_table(conn: sqlite3.Connection) -> list[dict]:
    return [dict(row) for row in conn.execute("SELECT id, name, guideline_version FROM projects ORDER BY id")]


# -- dependencies: a connection per request, the user its token or cookie names


def db(request: Request):
    conn = connect(request.app.state.project_dir, create=False)
    try:
        yield conn
    finally:
        conn.close()


def current_user(request: Request, conn: sqlite3.Connection = Depends(db)) -> accounts.User:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = accounts.user_by_token(conn, header[7:].strip())
    else:
        user = accounts.user_by_session(conn, request.cookies.get(COOKIE, ""))
    if user is None:
        raise Unauthenticated("log in, or send Authorization: Bearer <your token>", "authorization")
    return user


def same_origin(request: Request) -> None:
    """Refuse a state-changing request that a browser sends from another origin's page (CSRF).

    SameSite=strict keeps the cookie from other sites only: a page on another port or subdomain
    of the same host is the same site, and its form could create an admin with the admin's
    cookie. As Go's net/http CrossOriginProtection: the browser's Sec-Fetch-Site where it sends
    one, else Origin against Host; a request with neither is not from a browser's page.
    """
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    site = request.headers.get("sec-fetch-site")
    if site in ("same-origin", "none"):
        return
    origin = request.headers.get("origin")
    if site is None and (origin is None or urlsplit(origin).netloc == request.headers.get("host")):
        return
    raise tasks.Forbidden("a request from another site's page is refused; use this app's own pages", "origin")


def admin_user(user: accounts.User = Depends(current_user)) -> accounts.User:
    if not user.is_admin:
        raise tasks.Forbidden("this needs the admin role", "role")
    return user


# -- errors: one message naming the field, the right status; pages get a page


def wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


async def task_error(request: Request, err: tasks.TaskError):
    if wants_html(request):
        if err.status == 401:
            # with its query: a "Next compare task" link leads back to a compare task after logging in
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return page("login.html", 401, error=None, next=here)
        return error_page(err.status, str(err))
    detail = f"{err.field}: {err}" if err.field and err.status == 422 else str(err)
    return JSONResponse({"detail": detail, "field": err.field}, status_code=err.status)


async def http_error(request: Request, err: StarletteHTTPException):
    """The framework's own refusals (413 from BodyLimit, 404, 405): a page for a browser."""
    if err.status_code == 400:  # FastAPI's only 400: a body it could not parse (JSON nested too deep raised RecursionError)
        return await task_error(request, tasks.Invalid(f"the body is not valid JSON ({err.__cause__ or err.detail})", "body"))
    if wants_html(request):
        return error_page(err.status_code, str(err.detail))
    return await http_exception_handler(request, err)


async def user_error(request: Request, err: UserError):
    return JSONResponse({"detail": str(err), "field": None}, status_code=400)


async def validation_error(request: Request, err: RequestValidationError):
    first = err.errors()[0]
    if first["type"] == "json_invalid":  # its loc is ("body", the character where parsing stopped): no field
        field, message = "body", f"the body is not valid JSON ({first['ctx']['error']} at character {first['loc'][-1]})"
    else:
        field, message = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body", first["msg"]
    if wants_html(request):
        return error_page(422, f"{field}: {message}")
    return JSONResponse({"detail": f"{field}: {message}", "field": field}, status_code=422)


ERROR_HANDLERS = {tasks.TaskError: task_error, StarletteHTTPException: http_error, UserError: user_error,
                  RequestValidationError: validation_error}

# -- pages, for people with a browser

pages = APIRouter()


@pages.get("/login", response_class=HTMLResponse)
def login_page(next: str = "/"):
    return page("login.html", error=None, next=next)


@pages.post("/login")
def login(request: Request, name: str = Form(...), password: str = Form(...), next: str = Form("/"),
          conn: sqlite3.Connection = Depends(db)):
    failed_logins = request.app.state.failed_logins
    client = request.client.host if request.client else ""
    if wait := failed_logins.retry_after(name, client):
        response = page("login.html", 429, error=f"Too many failed logins: try again in {wait} seconds.", next=next)
        response.headers["Retry-After"] = str(wait)
        return response
    user = accounts.login(conn, name, password)
    if user is None:
        failed_logins.failed(name, client)
        return page("login.html", 401, error="Wrong name or password.", next=next)
    failed_logins.succeeded(name)
    # only a path on this site: "//host" would send the browser elsewhere
    response = RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/", status_code=303)
    # Secure over HTTPS, directly or behind a proxy on this host (uvicorn trusts its X-Forwarded-Proto):
    # the browser then never sends the session over plain HTTP
    response.set_cookie(COOKIE, accounts.start_session(conn, user), max_age=accounts.SESSION_SECONDS, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@pages.post("/logout")
def logout(request: Request, conn: sqlite3.Connection = Depends(db)):
    accounts.end_session(conn, request.cookies.get(COOKIE, ""))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


@pages.get("/", response_class=HTMLResponse)
def home(user: accounts.User = Depends(current_user), conn: sqlite3.Connection = Depends(db)):
    projects = []
    for project in projects_table(conn):
        report = tasks.progress(conn, project["id"])
        projects.append({"id": project["id"], "name": project["name"], "kinds": report["kinds"],
                         "mine": report["labelers"].get(user.name, {"submitted": 0, "skipped": 0})})
    return page("home.html", user=user, projects=projects)


@pages.get("/projects/{project_id}/next")
def next_page(project_id: RowId, kind: str | None = None, user: accounts.User = Depends(current_user),
              conn: sqlite3.Connection = Depends(db)):
    assignment = tasks.next_task(conn, project_id, user, kind or None)
    if assignment is None:
        message = f"No {kind or ''} task is waiting for you in this project. Thank you!"
        return page("message.html", user=user, title="Nothing left", message=message)
    return RedirectResponse(f"/assignments/{assignment}", status_code=303)


@pages.get("/assignments/{assignment_id}", response_class=HTMLResponse)
def task_page(assignment_id: RowId, user: accounts.User = Depends(current_user), conn: sqlite3.Connection = Depends(db)):
    view = tasks.assignment_view(conn, assignment_id, user)
    return page("task.html", user=user, task=view, labels=[chr(ord("A") + i) for i in range(len(view["responses"]))])


@pages.get("/admin", response_class=HTMLResponse)
def admin_page(user: accounts.User = Depends(admin_user), conn: sqlite3.Connection = Depends(db)):
    projects = []
    for project in projects_table(conn):
        q = quality(conn, project["id"])
        generated = {kind: _settings_text(q["progress"]["generation"].get(kind)) for kind in ("rank", "compare") if kind in q["progress"]["kinds"]}
        projects.append({**project, "quality": q, "generated": generated})
    return page("admin.html", user=user, projects=projects, users=accounts.list_users(conn), created=None)


def _settings_text(settings: dict | None) -> str:
    """How a kind of task's responses were generated, as /admin words it: "model M, k 3, ..." ("models a = P, b = Q" for compare)."""
    if settings is None:
        return "not recorded (from a file, or by an older version)"
    return ", ".join(f"{key} " + (", ".join(f"{name} = {path}" for name, path in value.items()) if isinstance(value, dict) else str(value))
                     for key, value in settings.items())


@pages.post("/admin/users", response_class=HTMLResponse)
def admin_create_user(name: str = Form(...), role: str = Form("labeler"), password: str = Form(...),
                      user: accounts.User = Depends(admin_user), conn: sqlite3.Connection = Depends(db)):
    created = create_user(conn, name, role, password)
    return page("message.html", user=user, title="User created",
                message=f"{created.name} ({created.role}) can log in now. API token (shown once): {created.token}")


@pages.post("/admin/projects/{project_id}/export", response_class=HTMLResponse)
def admin_export(project_id: RowId, request: Request, user: accounts.User = Depends(admin_user),
                 conn: sqlite3.Connection = Depends(db)):
    name = tasks.project_by_id(conn, project_id)["name"]
    folder = export_folder(request, project_id)
    counts = export_project(conn, project_id, folder)
    return page("export.html", user=user, project={"id": project_id, "name": name}, counts=counts, folder=folder)


# -- the JSON API, for scripts

api = APIRouter(prefix="/api")


@api.get("/me")
def me(user: accounts.User = Depends(current_user)):
    return {"name": user.name, "role": user.role}


@api.get("/projects")
def list_projects(user: accounts.User = Depends(current_user), conn: sqlite3.Connection = Depends(db)):
    return projects_table(conn)


@api.post("/projects/{project_id}/next")
def next_api(project_id: RowId, body: NextBody | None = None, user: accounts.User = Depends(current_user),
             conn: sqlite3.Connection = Depends(db)):
    assignment = tasks.next_task(conn, project_id, user, body.kind if body else None)
    return {"assignment": None if assignment is None else tasks.assignment_view(conn, assignment, user)}


@api.get("/assignments/{assignment_id}")
def get_assignment(assignment_id: RowId, user: accounts.User = Depends(current_user), conn: sqlite3.Connection = Depends(db)):
    return tasks.assignment_view(conn, assignment_id, user)


@api.put("/assignments/{assignment_id}/draft")
def put_draft(assignment_id: RowId, body: DraftBody, user: accounts.User = Depends(current_user), conn: sqlite3.Connection = Depends(db)):
    tasks.save_draft(conn, assignment_id, user, body.text)
    return {"saved": True}


@api.post("/assignments/{assignment_id}/submit")
async def submit_api(assignment_id: RowId, request: Request, user: accounts.User = Depends(current_user),
                     conn: sqlite3.Connection = Depends(db)):
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: arrays nested 100,000 deep
        raise tasks.Invalid(f"the body is not valid JSON ({err})", "body") from None
    return {"answer": tasks.submit(conn, assignment_id, user, body)}


@api.post("/assignments/{assignment_id}/skip")
def skip_api(assignment_id: RowId, body: SkipBody, user: accounts.User = Depends(current_user), conn: sqlite3.Connection = Depends(db)):
    tasks.skip(conn, assignment_id, user, body.reason)
    return {"skipped": True}


@api.get("/projects/{project_id}/progress")
def progress_api(project_id: RowId, user: accounts.User = Depends(admin_user), conn: sqlite3.Connection = Depends(db)):
    return tasks.progress(conn, project_id)


@api.get("/projects/{project_id}/quality")
def quality_api(project_id: RowId, user: accounts.User = Depends(admin_user), conn: sqlite3.Connection = Depends(db)):
    return nan_to_none(quality(conn, project_id))


@api.post("/projects/{project_id}/export")
def export_api(project_id: RowId, request: Request, user: accounts.User = Depends(admin_user), conn: sqlite3.Connection = Depends(db)):
    tasks.project_by_id(conn, project_id)
    folder = export_folder(request, project_id)
    return {"folder": str(folder), "counts": export_project(conn, project_id, folder)}


@api.get("/projects/{project_id}/export/{name}")
def export_file(project_id: RowId, name: str, request: Request, user: accounts.User = Depends(admin_user)):
    if name not in FILES:
        raise tasks.NotFound(f"{name!r} is not an export file; they are {', '.join(FILES)}", "name")
    path = export_folder(request, project_id) / name
    if not path.is_file():
        raise tasks.NotFound(f"no exported file {name!r}; export the project first", "name")
    return FileResponse(path, filename=name)


@api.post("/users")
def create_user_api(body: UserBody, user: accounts.User = Depends(admin_user), conn: sqlite3.Connection = Depends(db)):
    created = create_user(conn, body.name, body.role, body.password)
    return {"name": created.name, "role": created.role, "token": created.token}


def create_app(project_dir: Path | str) -> FastAPI:
    """The app on the project database in ``project_dir`` (made, with its schema, if missing)."""
    project_dir = Path(project_dir)
    connect(project_dir).close()  # schema and WAL mode, once
    app = FastAPI(title="instructrl feedback", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  exception_handlers=ERROR_HANDLERS, dependencies=[Depends(same_origin)])
    app.state.project_dir = project_dir
    app.state.failed_logins = accounts.FailedLogins()
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages)
    app.include_router(api)
    return app
