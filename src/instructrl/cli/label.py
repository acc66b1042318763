"""``instructrl label``: the feedback web app on a project folder, and its sub-commands user, project,
export and status."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Optional

import typer

from instructrl.cli.root import app, log
from instructrl.cli.serve import check_port_free
from instructrl.errors import UserError


label_app = typer.Typer(no_args_is_help=False, rich_markup_mode="rich")
app.add_typer(label_app, name="label")
LABEL_DIR_OPTION = typer.Option(Path("runs/label"), "--dir", "-d", help="The feedback project directory (feedback.db, exports/).")


@label_app.callback(invoke_without_command=True)
def label(
    ctx: typer.Context,
    project_dir: Path = LABEL_DIR_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
) -> None:
    """Start the feedback web app on a project directory (SQLite, WAL). Sub-commands manage it.

    [bold]instructrl label user[/bold] adds accounts, [bold]label project[/bold] creates a project from a prompts
    file and a model, [bold]label export[/bold] writes the training files, [bold]label status[/bold] shows
    progress and agreement.
    """
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from instructrl.feedback.app import create_app

    check_port_free(host, port)
    server_app = create_app(project_dir)  # before saying it serves: a file that is no database is refused
    log(f"label: serving {project_dir} on http://{host}:{port} (Ctrl-C stops; nothing submitted is lost)")
    uvicorn.run(server_app, host=host, port=port, log_level="warning")


@label_app.command("user")
def label_user(
    name: str = typer.Argument(..., help="Login name."),
    role: str = typer.Option("labeler", "--role", help="admin or labeler."),
    # None, not ...: the prompt asks for it all the same, and --help does not call it required
    password: str = typer.Option(None, "--password", prompt=True, hide_input=True, help="Password, 4 characters or more (asked when not given)."),
    reset: bool = typer.Option(False, "--reset", help="Give an existing account this new password and a new API token; its old token and browser sessions stop working."),
    project_dir: Path = LABEL_DIR_OPTION,
) -> None:
    """Add an account, or --reset one; prints its API token (Authorization: Bearer TOKEN)."""
    from instructrl.feedback.accounts import create_user, reset_user
    from instructrl.feedback.db import connect

    if reset:
        user = reset_user(connect(project_dir), name, password)
        log(f"label: user {user.name} ({user.role}) has a new password and API token; the old token no longer works")
    else:
        user = create_user(connect(project_dir), name, role, password)
        log(f"label: user {user.name} ({user.role}) created")
    typer.echo(user.token)


@label_app.command("project")
def label_project(
    name: str = typer.Argument(..., help="Project name."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts: any records that hold one ({'prompt': ...}, {'messages': [...]}, ...), in JSONL, JSON, Parquet or CSV: a file `instructrl data check` finds usable as ppo.prompts."),
    write: bool = typer.Option(False, "--write", help="A write task (a demonstration) per prompt."),
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint whose K sampled responses per prompt are ranked."),
    k: int = typer.Option(4, "--k", min=2, max=9, help="Responses per rank task (InstructGPT: 4 to 9)."),
    responses: Optional[Path] = typer.Option(None, "--responses", help="Rank the responses of a comparisons file (instructrl collect's) instead of sampling."),
    compare: Optional[list[str]] = typer.Option(None, "--compare", help="NAME=CHECKPOINT, twice: compare tasks between the two models' answers."),
    overlap: int = typer.Option(1, "--overlap", help="Different labelers per task."),
    guidelines: Optional[Path] = typer.Option(None, "--guidelines", help="Text file of guidelines shown beside every task."),
    guideline_version: Optional[str] = typer.Option(None, "--guideline-version", help="Stored on each answer (default: a hash of the guidelines)."),
    lease_minutes: float = typer.Option(30.0, "--lease-minutes", help="How long an opened task stays reserved for its labeler."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use the first N prompts (or comparisons) only. Default: all."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest generated response."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled responses."),
    project_dir: Path = LABEL_DIR_OPTION,
) -> None:
    """Create a project: write tasks, rank tasks (K responses from a model or a file) and/or compare tasks."""
    from instructrl.feedback import projects
    from instructrl.feedback.db import DB_NAME, connect
    from instructrl.feedback.tasks import TaskError, check_new_name, check_tasks, create_project, progress

    settings = _project_settings(name, guidelines, guideline_version, overlap, lease_minutes)
    compared_models = _compared_models(compare)  # now, not after sampling responses for minutes
    wanted = {"--write": write, "--model": model, "--compare": compare}
    if prompts is None and any(wanted.values()):
        raise UserError(f"label project: {', '.join(k for k, v in wanted.items() if v)} need --prompts FILE")
    if not any(wanted.values()) and responses is None:
        raise UserError("label project: say which tasks to make: --write, --model CHECKPOINT, --responses FILE or --compare NAME=PATH (twice)")
    prompt_list = projects.load_prompts(prompts, limit) if prompts else []
    new_tasks = projects.write_tasks(prompt_list) if write else []
    if (project_dir / DB_NAME).is_file():  # a new folder is made once the tasks are: bad input leaves none behind
        try:
            with contextlib.closing(connect(project_dir)) as existing:
                check_new_name(existing, name)  # now, not after sampling responses for minutes
        except TaskError as err:
            raise UserError(f"label project: {err}") from None
    generation = {}  # recorded with the project: the responses alone do not say what made them
    if model:
        sampling = {"k": k, "seed": seed, "temperature": 1.0, "max_new_tokens": max_new_tokens}
        new_tasks += projects.rank_tasks_from_model(prompt_list, model, **sampling)
        generation["rank"] = {"model": model, **sampling}
    if responses:
        new_tasks += projects.rank_tasks_from_comparisons(responses)[:limit]  # their sources name the file
    if compared_models:
        new_tasks += projects.compare_tasks(prompt_list, compared_models, max_new_tokens=max_new_tokens)
        generation["compare"] = {"models": compared_models, "greedy": True, "max_new_tokens": max_new_tokens}
    try:
        check_tasks(new_tasks)  # before the database is made: a project refused leaves no folder behind
        conn = connect(project_dir)
        project_id = create_project(conn, settings.model_copy(update={"generation": generation}), new_tasks)
    except TaskError as err:
        raise UserError(f"label project: {err}") from None
    counts = {kind: sum(t["kind"] == kind for t in new_tasks) for kind in ("write", "rank", "compare")}
    identical = progress(conn, project_id)["kinds"].get("compare", {}).get("identical_answers")
    log(f"label: project {name} (id {project_id}) in {project_dir}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
         + f" tasks, overlap {overlap}, guidelines {settings.version()}"
         + (f"; {identical} compare tasks have two identical answers: ties, never shown to labelers" if identical else ""))


MAX_LEASE_MINUTES = 365 * 24 * 60


def _project_settings(name: str, guidelines: Optional[Path], guideline_version: Optional[str], overlap: int, lease_minutes: float):
    """``label project``'s options as the project's ProjectSettings; a UserError naming the bad option."""
    from pydantic import ValidationError

    from instructrl.data.jsonl import not_text
    from instructrl.feedback.tasks import ProjectSettings

    if guidelines is not None and not guidelines.is_file():
        raise UserError(f"--guidelines {guidelines}: " + ("a folder, not a text file" if guidelines.is_dir() else "file not found"))
    if not 0 < lease_minutes <= MAX_LEASE_MINUTES:  # nan too: its seconds would be no integer
        raise UserError(f"label project: --lease-minutes must be more than 0 and at most {MAX_LEASE_MINUTES} (a year), got {lease_minutes}")
    try:
        text = guidelines.read_text(encoding="utf-8-sig") if guidelines else ""  # a byte-order mark (Windows editors) is no guideline
    except UnicodeDecodeError:
        raise not_text(guidelines, f"--guidelines {guidelines}") from None
    try:
        return ProjectSettings(name=name, guidelines=text, guideline_version=guideline_version, overlap=overlap,
                               lease_seconds=max(1, round(lease_minutes * 60)))
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"label project: --{'-'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def _compared_models(compare: Optional[list[str]]) -> dict[str, str]:
    """The two models of ``--compare NAME=CHECKPOINT`` (given twice), by name; none without --compare."""
    pairs = [c.partition("=") for c in compare or []]
    if any(not sep or not n or not p for n, sep, p in pairs):
        raise UserError("label project: --compare takes NAME=CHECKPOINT")
    models = {n: p for n, _, p in pairs}
    if compare and len(models) != 2:
        raise UserError(f"label project: --compare needs two models with different names (NAME=CHECKPOINT twice), got {len(models)}")
    return models


@label_app.command("export")
def label_export(
    name: str = typer.Argument(..., help="Project name."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the files. Default: DIR/exports/<project id>."),
    project_dir: Path = LABEL_DIR_OPTION,
) -> None:
    """Write demonstrations.jsonl (sft.data), comparisons.jsonl (rm.data), comparisons_aggregated.jsonl,
    preference_pairs.jsonl (TRL), compare.jsonl and quality.json."""
    from instructrl.feedback.export import export_project

    conn, project_id = _open_project(project_dir, name, "label export")
    folder = out or project_dir / "exports" / str(project_id)
    counts = export_project(conn, project_id, folder)
    log(f"label: exported {name} to {folder}: " + ", ".join(f"{file} {n}" for file, n in counts.items()))


@label_app.command("status")
def label_status(name: str = typer.Argument(..., help="Project name."), project_dir: Path = LABEL_DIR_OPTION) -> None:
    """Progress per task kind and per labeler, agreement and win rates, as JSON."""
    from instructrl.data.jsonl import nan_to_none
    from instructrl.feedback.export import quality

    conn, project_id = _open_project(project_dir, name, "label status")
    typer.echo(json.dumps(nan_to_none(quality(conn, project_id)), indent=2))


def _open_project(project_dir: Path, name: str, command: str) -> tuple[sqlite3.Connection, int]:
    """The connection to an existing project folder and the id of its project ``name``; a UserError
    naming ``command`` when there is no such project."""
    from instructrl.feedback.db import connect
    from instructrl.feedback.tasks import TaskError, project_by_name

    conn = connect(project_dir, create=False)
    try:
        return conn, project_by_name(conn, name)["id"]
    except TaskError as err:
        raise UserError(f"{command}: {err} in {project_dir}") from None
