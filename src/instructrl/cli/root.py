"""The root ``instructrl`` command (its Typer app, --debug and --version) and what every command
shares: the config options and the list of config keys in --help, loading the config, the log."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from instructrl.config import PipelineConfig, describe_fields, load_config
from instructrl.training.progress import log_console, quiet_libraries

app = typer.Typer(
    help="InstructGPT's recipe end to end: pretrain, SFT, collect rankings, reward model, PPO-ptx, evaluate, serve.\n\n"
         "Every stage reads the defaults, then -c FILE, then KEY=VALUE overrides (sft.lr=1e-4); "
         "`instructrl STAGE --help` lists the stage's keys with their defaults. Every stage in seconds, on a tiny model: "
         "`instructrl pipeline -c configs/smoke.yaml`.",
    no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
)
console = log_console()  # messages and bars; standard output holds the results alone (results_console)
state = {"debug": bool(os.environ.get("INSTRUCTRL_DEBUG"))}

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config file; it only needs the keys it changes. Relative paths in it are "
                             "relative to the working directory, not to the file. Give -c again to layer files: a later file's keys win.",
                             exists=False, metavar="FILE")
OVERRIDES_ARGUMENT = typer.Argument(None, metavar="KEY=VALUE", help="Config overrides as section.key=value, applied after the file, e.g. sft.lr=1e-4 run.dir=runs/try2; "
                                    "values are read as YAML: null, \\[q_proj,v_proj], {name: value}.", show_default=False)
RESTART_OPTION = typer.Option(False, "--restart", help="Discard this stage's earlier run (checkpoints included) instead of resuming it.")


def config_help(*sections: str) -> str:
    lines = ["[bold]Config keys[/bold] (set in the YAML file or as KEY=VALUE):"]
    for name in sections:
        model = PipelineConfig.model_fields[name].annotation
        for key, default, description in describe_fields(model, name):
            lines.append(f"[cyan]{key}[/cyan] = {escape(default) or '-'}  {escape(description)}")  # [all-linear] is no markup
    return "\n\n".join(lines)


def load_options(config: Optional[list[Path]], overrides: Optional[list[str]]) -> PipelineConfig:
    return load_config(config or None, overrides or [])


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def log(message: str) -> None:
    if is_main_process():
        # one line per message: paths stay whole when copied or grepped; no markup, so [brackets] in a path or value stay
        console.print(message, highlight=False, soft_wrap=True, markup=False)


def _print_version(wanted: bool) -> None:
    """instructrl's version and the libraries' that decide its numbers, read without importing them."""
    if not wanted:
        return
    from importlib.metadata import PackageNotFoundError, version

    from instructrl import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    print(f"instructrl {__version__} (" + ", ".join(f"{n} {installed(n)}" for n in ("torch", "transformers", "accelerate", "peft")) + ")")
    raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")) -> None:
    state["debug"] = state["debug"] or debug
    quiet_libraries()


def unwrap_help(typer_app: typer.Typer) -> None:
    """Join each docstring's hard-wrapped lines into paragraphs. Typer keeps a single line break
    after the first paragraph, and the terminal then wraps the long lines again, leaving ragged
    half-lines in every --help."""
    infos = list(typer_app.registered_commands) + ([typer_app.registered_callback] if typer_app.registered_callback else [])
    for info in infos:
        text = info.help or inspect.getdoc(info.callback)
        if text:  # an empty help would hide the one given to typer.Typer(help=...), as the callback `main` has none
            info.help = "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in text.split("\n\n"))
    for group in typer_app.registered_groups:
        unwrap_help(group.typer_instance)
